//! Step-by-step progress of the long optimisations (ROME's v*, MEMIT's targets, fine-tuning),
//! heard by whoever runs them: the tab's worker streams each step's loss to the page while the
//! edit runs, the server stops an edit whose client left or whose time is up. A listener is
//! scoped to one call on one thread, so the edit functions keep their signatures and a run with
//! no listener pays nothing.

use std::cell::RefCell;

/// One optimisation step, as it ends.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// What is being optimised: "value" (ROME's v*, MEMIT's z) or "fine-tuning".
    pub phase: &'static str,
    /// The step just taken, from 1.
    pub step: usize,
    /// The most steps the optimisation may take.
    pub steps: usize,
    /// The loss at this step (the mean over the requests still optimising).
    pub loss: f32,
}

/// Hears a step; `false` stops the optimisation (it ends with
/// [`LociError::Cancelled`](crate::LociError::Cancelled)).
type Listener = Box<dyn FnMut(&Step) -> bool>;

thread_local! {
    static LISTENER: RefCell<Option<Listener>> = const { RefCell::new(None) };
}

/// Runs `work` with `listener` hearing every optimisation step `work` takes on this thread (and
/// stopping it by returning `false`); the previous listener (if any) is back afterwards, also
/// when `work` panics.
pub fn listen<T>(listener: impl FnMut(&Step) -> bool + 'static, work: impl FnOnce() -> T) -> T {
    struct Restore(Option<Listener>);
    impl Drop for Restore {
        fn drop(&mut self) {
            LISTENER.with(|l| *l.borrow_mut() = self.0.take());
        }
    }
    let _before = Restore(LISTENER.with(|l| l.borrow_mut().replace(Box::new(listener))));
    work()
}

/// The loss a step reports: the mean of the finite losses of the requests still optimising
/// (NaN when none is finite). A page stepping a shared optimisation reports the same.
pub fn step_loss(losses: &[f32]) -> f32 {
    let finite: Vec<f32> = losses.iter().copied().filter(|l| l.is_finite()).collect();
    if finite.is_empty() {
        f32::NAN
    } else {
        finite.iter().sum::<f32>() / finite.len() as f32
    }
}

/// Tells this thread's listener (if any) about a step; an error when it says stop.
pub(crate) fn report(
    phase: &'static str,
    step: usize,
    steps: usize,
    losses: &[f32],
) -> crate::Result<()> {
    let loss = step_loss(losses);
    // Out of its cell while it runs: the listener may itself start work that listens (a
    // Python callback editing another model).
    let Some(mut listener) = LISTENER.with(|l| l.borrow_mut().take()) else {
        return Ok(());
    };
    let going = listener(&Step {
        phase,
        step,
        steps,
        loss,
    });
    LISTENER.with(|l| *l.borrow_mut() = Some(listener));
    if going {
        Ok(())
    } else {
        Err(crate::LociError::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn a_listener_hears_the_steps_of_its_call_only() {
        report("value", 1, 3, &[1.0]).unwrap(); // no listener: nothing happens
        let heard = Rc::new(RefCell::new(vec![]));
        let h = heard.clone();
        let out = listen(
            move |s| {
                h.borrow_mut().push(s.clone());
                true
            },
            || {
                report("value", 1, 3, &[1.0, 3.0, f32::NAN]).unwrap();
                report("fine-tuning", 2, 3, &[0.5]).unwrap();
                7
            },
        );
        assert_eq!(out, 7);
        report("value", 3, 3, &[9.0]).unwrap(); // after the call: not heard
        let heard = heard.borrow();
        assert_eq!(heard.len(), 2);
        assert_eq!(
            (heard[0].phase, heard[0].step, heard[0].loss),
            ("value", 1, 2.0)
        );
        assert_eq!(
            (heard[1].phase, heard[1].step, heard[1].loss),
            ("fine-tuning", 2, 0.5)
        );
    }

    #[test]
    fn a_listener_may_start_work_that_listens() {
        let inner_heard = Rc::new(RefCell::new(0));
        let h = inner_heard.clone();
        let outer = Rc::new(RefCell::new(0));
        let o = outer.clone();
        listen(
            move |_| {
                *o.borrow_mut() += 1;
                let h = h.clone();
                listen(
                    move |_| {
                        *h.borrow_mut() += 1;
                        true
                    },
                    || report("value", 1, 1, &[1.0]),
                )
                .is_ok()
            },
            || {
                report("value", 1, 2, &[1.0]).unwrap();
                report("value", 2, 2, &[1.0]).unwrap();
            },
        );
        assert_eq!((*outer.borrow(), *inner_heard.borrow()), (2, 2));
    }

    #[test]
    fn a_listener_that_says_stop_cancels() {
        let stopped = listen(
            |s| s.step < 2,
            || {
                report("value", 1, 3, &[1.0])?;
                report("value", 2, 3, &[1.0])?;
                Ok::<_, crate::LociError>(())
            },
        );
        assert!(matches!(stopped, Err(crate::LociError::Cancelled)));
    }
}
