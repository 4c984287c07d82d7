//! The hardware's limit, measured in the same run as the work it judges: the best matrix product
//! this machine does in the model's dtype, over the threads the work uses, with the fastest
//! kernel found (candle's `gemm`, Loci's own AVX-512 kernel, a system BLAS opened at run time,
//! cuBLAS on a GPU). Every
//! benchmark states its work in FLOPs counted from the shapes it computed and its fraction of
//! this peak.

use std::time::Instant;

use anyhow::Result;
use loci_core::kernels::gemm::Precision;
use loci_core::{DType, Device};
use serde::Serialize;

/// One kernel's best product speed.
#[derive(Serialize, Clone, Debug)]
pub struct KernelSpeed {
    pub kernel: String,
    pub gflops: f64,
}

/// The best product speed on this machine for one dtype and thread count.
#[derive(Serialize, Clone, Debug)]
pub struct Peak {
    pub peak_gflops: f64,
    pub peak_kernel: String,
    /// Every kernel measured.
    pub kernels: Vec<KernelSpeed>,
}

pub use loci_core::flops::Speed;

impl Peak {
    /// The speed of `flops` operations done in `seconds`, against this peak.
    pub fn speed(&self, flops: u64, seconds: f64) -> Speed {
        Speed::new(flops, seconds, self.peak_gflops, self.peak_kernel.clone())
    }
}

/// Operations counted while `f` runs, with its seconds.
pub fn counted<R>(f: impl FnOnce() -> Result<R>) -> Result<(R, u64, f64)> {
    let (before, s) = (loci_core::flops::total(), Instant::now());
    let r = f()?;
    Ok((
        r,
        loci_core::flops::total() - before,
        s.elapsed().as_secs_f64(),
    ))
}

/// The side of the square products timed: large enough for every kernel's best blocking.
const SIDE: usize = 1536;

/// Measures the peak for `dtype` on `device`, as `threads` threads would reach it: on the CPU,
/// candle's kernel (as the process configures its threads) and, for f32, the system BLAS, each
/// running one product per thread at once; on a GPU, one product on the device.
pub fn measure(device: &Device, dtype: DType, threads: usize) -> Result<Peak> {
    let mut kernels = vec![];
    if device.is_cpu() {
        let per_call = loci_core::kernels::kernel_threads().max(1);
        let copies = (threads / per_call).max(1);
        let isa = cpu_isa();
        let candle = concurrent(copies, || candle_product(device, dtype))?;
        kernels.push(KernelSpeed {
            kernel: format!("candle gemm ({isa}, {dtype:?})"),
            gflops: candle,
        });
        if let Some(name) = loci_core::kernels::gemm::name().filter(|_| dtype == DType::F32) {
            kernels.push(KernelSpeed {
                kernel: format!("{name} (f32)"),
                gflops: concurrent(copies, || loci_product(per_call, Precision::F32))?,
            });
            // With the maps in bf16, the limit is bf16's.
            if loci_core::kernels::gemm::maps_precision() == Precision::Bf16 {
                kernels.push(KernelSpeed {
                    kernel: format!("{name} (bf16 dot products, f32 sums)"),
                    gflops: concurrent(copies, || loci_product(per_call, Precision::Bf16))?,
                });
            }
        }
        if dtype == DType::F32 {
            if let Some(blas) = loci_core::blas::system() {
                blas.set_threads(1);
                let gflops = concurrent(threads.max(1), || blas_product(blas))?;
                kernels.push(KernelSpeed {
                    kernel: format!("{} (f32)", blas.name()),
                    gflops,
                });
            }
        }
    } else {
        kernels.push(KernelSpeed {
            kernel: format!("cuBLAS via candle ({dtype:?})"),
            gflops: candle_product(device, dtype)?,
        });
    }
    let best = kernels
        .iter()
        .max_by(|a, b| a.gflops.total_cmp(&b.gflops))
        .expect("at least one kernel")
        .clone();
    Ok(Peak {
        peak_gflops: best.gflops,
        peak_kernel: best.kernel,
        kernels,
    })
}

/// The vector extension candle's `gemm` dispatches to here.
fn cpu_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "AVX-512 available; gemm built for AVX2+FMA";
        }
        if std::is_x86_feature_detected!("fma") {
            return "AVX2+FMA";
        }
    }
    "portable"
}

/// `copies` threads each timing `one` (GFLOP/s of one thread): their sum.
fn concurrent(copies: usize, one: impl Fn() -> Result<f64> + Sync) -> Result<f64> {
    let speeds: Vec<Result<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..copies).map(|_| s.spawn(&one)).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect()
    });
    speeds.into_iter().sum()
}

fn candle_product(device: &Device, dtype: DType) -> Result<f64> {
    let side = if device.is_cpu() { SIDE } else { 4 * SIDE };
    Ok(loci_core::kernels::product_gflops(
        device, dtype, side, 0.5,
    )?)
}

/// Loci's kernel at its best: the square product, and a batch of 384 rows through a 1536²
/// map (its blocking favours a model's shapes over the square's long sums), the faster.
fn loci_product(threads: usize, precision: Precision) -> Result<f64> {
    use loci_core::kernels::gemm::{product_in, Lhs, Rhs};
    let a: Vec<f32> = (0..SIDE * SIDE).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut best = 0f64;
    for rows in [SIDE, 384] {
        let flops = 2.0 * (rows * SIDE * SIDE) as f64;
        let (lhs, rhs) = (Lhs::Plain(&a[..rows * SIDE]), Rhs::Transposed(&a));
        let gflops = loci_core::kernels::best_gflops(flops, 0.5, || -> Result<()> {
            drop(product_in(precision, lhs, rows, SIDE, rhs, SIDE, threads));
            Ok(())
        })?;
        best = best.max(gflops);
    }
    Ok(best)
}

fn blas_product(blas: &loci_core::blas::Blas) -> Result<f64> {
    let a: Vec<f32> = (0..SIDE * SIDE).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut c = vec![0f32; SIDE * SIDE];
    let flops = 2.0 * (SIDE as f64).powi(3);
    loci_core::kernels::best_gflops(flops, 0.5, || -> Result<()> {
        blas.matmul_bt(&a, &a, &mut c, SIDE, SIDE, SIDE);
        Ok(())
    })
}
