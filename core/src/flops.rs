//! A running count of the floating-point operations in Loci's matrix products, for benchmarks
//! to state the work they timed from the shapes actually computed.
//!
//! Counted: every product through [`Linear`](crate::model::layers::Linear) (the model's maps,
//! the vocabulary head, low-rank edits), attention's score and value products, the frozen-weight
//! backward of v*, and the key statistics' second moments — `2·m·n·k` each. An op tracked by
//! autograd counts its backward's products (twice the forward's) when it runs forward.
//! Elementwise work (norms, activations, softmax) is not counted: it is a few percent of the
//! arithmetic and none of the peak. The count is process-wide: read it around one job at a time.

use std::sync::atomic::{AtomicU64, Ordering};

static FLOPS: AtomicU64 = AtomicU64::new(0);

/// Adds one product of `[m, k]` by `[k, n]`: `2·m·n·k` operations.
pub fn matmul(m: usize, n: usize, k: usize) {
    add(2 * (m as u64) * (n as u64) * (k as u64));
}

/// Adds `n` operations.
pub fn add(n: u64) {
    FLOPS.fetch_add(n, Ordering::Relaxed);
}

/// The operations counted since the process started.
pub fn total() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}
