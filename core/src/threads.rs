//! How many threads Loci's own parallel loops use on native targets (v*'s row groups, key
//! statistics over several texts). Loops like these beat threading inside each small matrix
//! product, so a program that sets this above 1 should keep candle's kernels single-threaded
//! (`RAYON_NUM_THREADS=1`), as the `loci` tool does. In the browser everything runs in one thread
//! per worker.

use std::sync::atomic::{AtomicUsize, Ordering};

static WORKERS: AtomicUsize = AtomicUsize::new(1);

/// Sets how many threads Loci's own parallel loops use (at least 1; ignored on wasm32).
pub fn set_workers(n: usize) {
    WORKERS.store(n.max(1), Ordering::Relaxed);
}

/// The thread count set by [`set_workers`] (default 1); always 1 on wasm32.
pub fn workers() -> usize {
    if cfg!(target_arch = "wasm32") {
        1
    } else {
        WORKERS.load(Ordering::Relaxed)
    }
}

/// `f` over every item, each on its own scoped thread when there are several (native).
pub fn map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    #[cfg(not(target_arch = "wasm32"))]
    if items.len() > 1 {
        return std::thread::scope(|scope| {
            let handles: Vec<_> = items
                .iter()
                .map(|it| {
                    let f = &f;
                    scope.spawn(move || f(it))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
    }
    items.iter().map(f).collect()
}
