//! The progress bars of long commands, drawn on standard error — or, while a program that shows
//! its own runs the command (the Python package), hidden; the steps of work without an
//! optimisation loop of its own (key statistics) are then told to that program, which may stop
//! them.

use std::cell::{Cell, RefCell};

use indicatif::{ProgressBar, ProgressStyle};

/// Hears `what` reach `done` of `total`; `false` asks the work to stop.
pub type Heard = Box<dyn FnMut(&str, u64, u64) -> bool>;

thread_local! {
    static HIDDEN: Cell<bool> = const { Cell::new(false) };
    static HEARD: RefCell<Option<Heard>> = const { RefCell::new(None) };
}

/// The state before a [`with_hidden_bars`], put back when it ends (also by a panic).
struct Restore {
    hidden: bool,
    heard: Option<Heard>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        HIDDEN.with(|h| h.set(self.hidden));
        HEARD.with(|h| *h.borrow_mut() = self.heard.take());
    }
}

/// Runs `work` with the bars it makes on this thread hidden, and the steps it [`tell`]s heard
/// by `heard` (if any).
pub fn with_hidden_bars<T>(heard: Option<Heard>, work: impl FnOnce() -> T) -> T {
    let _restore = Restore {
        hidden: HIDDEN.with(|h| h.replace(true)),
        heard: HEARD.with(|h| std::mem::replace(&mut *h.borrow_mut(), heard)),
    };
    work()
}

/// Tells the program running the command (if any) that `what` reached `done` of `total`;
/// `false` when it asks to stop.
pub fn tell(what: &str, done: u64, total: u64) -> bool {
    // Out of its cell while it runs: the listener may itself run a command.
    let Some(mut heard) = HEARD.with(|h| h.borrow_mut().take()) else {
        return true;
    };
    let going = heard(what, done, total);
    HEARD.with(|h| *h.borrow_mut() = Some(heard));
    going
}

/// A bar of `len` steps drawn with `template` (indicatif's), or a hidden one.
pub fn bar(len: u64, template: &str) -> ProgressBar {
    if HIDDEN.with(Cell::get) {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(ProgressStyle::with_template(template).expect("valid template"));
    b
}

/// A spinner that ticks by itself, or a hidden one.
pub fn spinner() -> ProgressBar {
    if HIDDEN.with(Cell::get) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}
