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

use serde::{Deserialize, Serialize};

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

/// A piece of work's speed against a peak, as every benchmark reports it (natively and in the
/// browser's workers).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Speed {
    /// Floating-point operations of the matrix products done (this module's count).
    pub flops: u64,
    /// `flops` over the work's seconds, in GFLOP/s.
    pub achieved_gflops: f64,
    /// The best matrix product the machine does, in GFLOP/s, measured in the same run.
    pub peak_gflops: f64,
    /// Which kernel reached the peak.
    pub peak_kernel: String,
    /// `achieved_gflops / peak_gflops`.
    pub fraction_of_peak: f64,
}

impl Speed {
    /// The speed of `flops` operations done in `seconds`, against `peak_gflops` by `peak_kernel`.
    pub fn new(flops: u64, seconds: f64, peak_gflops: f64, peak_kernel: String) -> Speed {
        let achieved = flops as f64 / seconds.max(1e-12) / 1e9;
        Speed {
            flops,
            achieved_gflops: achieved,
            peak_gflops,
            peak_kernel,
            fraction_of_peak: achieved / peak_gflops.max(1e-9),
        }
    }
}
