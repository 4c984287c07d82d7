//! How many threads Loci's own parallel loops use on native targets (v*'s row groups, key
//! statistics over several texts), and how batches of independent work are cut to a memory
//! budget. Loops like these beat threading inside each small matrix
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

/// `f` over every item (borrowed, or owned such as a disjoint piece of an output), each on its
/// own scoped thread when there are several (native).
pub fn map<T: Send, R: Send>(
    items: impl IntoIterator<Item = T>,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let items: Vec<T> = items.into_iter().collect();
    #[cfg(not(target_arch = "wasm32"))]
    if items.len() > 1 {
        return std::thread::scope(|scope| {
            let handles: Vec<_> = items
                .into_iter()
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
    items.into_iter().map(f).collect()
}

/// Splits items of the given costs, in order, into runs whose costs sum to at most `budget`
/// (an item over the budget alone is a run of its own): the run lengths. Batches use it to
/// bound their memory.
pub fn chunks_within(costs: &[usize], budget: usize) -> Vec<usize> {
    let mut runs = vec![];
    let (mut n, mut sum) = (0, 0usize);
    for &c in costs {
        if n > 0 && sum.saturating_add(c) > budget {
            runs.push(n);
            (n, sum) = (0, 0);
        }
        n += 1;
        sum = sum.saturating_add(c);
    }
    if n > 0 {
        runs.push(n);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::chunks_within;

    #[test]
    fn runs_stay_within_the_budget_and_keep_every_item() {
        assert_eq!(chunks_within(&[3, 3, 3, 3], 6), vec![2, 2]);
        assert_eq!(chunks_within(&[2, 4, 3], 6), vec![2, 1]);
        // An item over the budget is a run of its own; nothing is dropped.
        assert_eq!(chunks_within(&[9, 1, 9], 5), vec![1, 1, 1]);
        assert_eq!(chunks_within(&[], 5), Vec::<usize>::new());
    }
}
