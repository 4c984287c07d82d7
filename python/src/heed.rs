//! Long work heard from Python: each step goes to the caller's progress callback, and each
//! step first asks Python whether Ctrl-C (or a notebook's stop button) came; if it did, the
//! work is told to stop, and the `KeyboardInterrupt` is what the call raises. The core stops
//! long work only between steps, leaving the model as it was.

use std::cell::RefCell;
use std::rc::Rc;

use pyo3::prelude::*;

/// The callback and the interruption, if any, of one call.
pub struct Heed {
    progress: Option<Py<PyAny>>,
    stopped: Option<PyErr>,
}

impl Heed {
    pub fn new(progress: Option<Py<PyAny>>) -> Rc<RefCell<Heed>> {
        Rc::new(RefCell::new(Heed {
            progress,
            stopped: None,
        }))
    }

    /// One step: `done` of `total`, what is going on, the loss if any. `false`: stop.
    pub fn step(&mut self, done: u64, total: u64, what: &str, loss: Option<f32>) -> bool {
        if self.stopped.is_some() {
            return false;
        }
        Python::attach(|py| {
            if let Err(e) = py.check_signals() {
                self.stopped = Some(e);
                return false;
            }
            if let Some(cb) = &self.progress {
                if let Err(e) = cb.call1(py, (done, total, what, loss)) {
                    self.stopped = Some(e);
                    return false;
                }
            }
            true
        })
    }

    /// Whether Ctrl-C came (it is then the call's error); the callback is not called.
    pub fn interrupted(&mut self) -> bool {
        if self.stopped.is_none() {
            if let Err(e) = Python::attach(|py| py.check_signals()) {
                self.stopped = Some(e);
            }
        }
        self.stopped.is_some()
    }

    /// The interruption (or the callback's error) that stopped the work.
    pub fn take_stop(&mut self) -> Option<PyErr> {
        self.stopped.take()
    }
}

/// Runs `work` with the core's optimisation steps (ROME's v*, MEMIT's z, fine-tuning) heard
/// by `heed`.
pub fn hearing_steps<T>(heed: &Rc<RefCell<Heed>>, work: impl FnOnce() -> T) -> T {
    let h = heed.clone();
    loci_core::progress::listen(
        move |s| {
            h.borrow_mut()
                .step(s.step as u64, s.steps as u64, s.phase, Some(s.loss))
        },
        work,
    )
}

/// `heed` as the CLI's code tells its steps (`workspace::tell`: key statistics computed on the
/// way).
pub fn as_heard(heed: &Rc<RefCell<Heed>>) -> loci_backend::workspace::Heard {
    let h = heed.clone();
    Box::new(move |what, done, total| h.borrow_mut().step(done, total, what, None))
}

/// The work's result as Python's: an interruption first, else the work's error.
pub fn finish<T>(heed: &Rc<RefCell<Heed>>, out: anyhow::Result<T>) -> PyResult<T> {
    if let Some(e) = heed.borrow_mut().take_stop() {
        return Err(e);
    }
    out.map_err(crate::errors::to_py)
}
