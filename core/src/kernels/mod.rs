//! Loci's own CPU kernels, where candle's generic operations leave speed behind:
//!
//! - **the matrix product** ([`gemm`]): a blocked f32 kernel in AVX-512 registers for the
//!   linear maps, which candle's `gemm` crate runs in 256-bit AVX2 on a stable compiler;
//! - **the elementwise work around the products**, where candle makes several passes and
//!   buffers (and calls a scalar `exp` or `tanh` per element): SwiGLU's `silu(gate) · up` in one
//!   pass, GPT-2's tanh-form GELU, and the causal softmax that skips the masked keys instead of
//!   adding a −∞ mask first (a padding mask, where a batch has one, it adds as the reference
//!   does, so padded and unpadded rows share the kernel). Each takes an exponential by Cephes'
//!   polynomial (within 2 ulp of `f32::exp` over the range used), vectorised for AVX2 where the
//!   processor has it (and for SIMD128 in the browser's build).
//!
//! One difference from the reference, on purpose: the causal softmax never reads a query's
//! future keys, so a NaN there no longer spreads to the earlier positions' rows (through
//! NaN + −∞); the positions that see it still turn NaN, the last one always among them.
//!
//! [`set_fast`]`(false)` sends every caller back to candle's operations — the reference path that
//! tests and `loci bench … --compare` measure the kernels against. The kernels serve f32 tensors
//! on the CPU outside autograd; anything else takes the reference path.

pub mod gemm;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::error::Result;

static FAST: AtomicBool = AtomicBool::new(true);

/// Chooses Loci's kernels (`true`, the default) or candle's operations everywhere they apply.
pub fn set_fast(on: bool) {
    FAST.store(on, Ordering::Relaxed);
}

/// Whether Loci's kernels are in use.
pub fn fast() -> bool {
    FAST.load(Ordering::Relaxed)
}

/// Whether Loci's kernels serve `x`: on, and `x` an f32 CPU tensor outside autograd.
fn served(x: &Tensor) -> bool {
    fast() && !x.track_op() && x.dtype() == DType::F32 && x.device().is_cpu()
}

/// `f` over the contiguous f32 values of a CPU tensor outside autograd; `None` when the fast
/// path does not apply.
pub(crate) fn with_cpu_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !served(x) {
        return None;
    }
    let (storage, layout) = x.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(&v[start..end])),
        _ => None,
    }
}

/// `silu(gate) · up` for `gu = [.., 2·d_ff]` holding gate then up on its last axis: `[.., d_ff]`.
/// `None` when the fast path does not apply (the caller then uses candle's operations).
pub fn silu_mul(gu: &Tensor) -> Result<Option<Tensor>> {
    let two = *gu.dims().last().unwrap_or(&0);
    if two == 0 || !two.is_multiple_of(2) {
        return Ok(None);
    }
    let d_ff = two / 2;
    let out = with_cpu_f32(gu, |src| {
        let mut out = vec![0f32; src.len() / 2];
        rows_in_parallel(&mut out, d_ff, |row, dst| {
            let s = &src[row * two..(row + 1) * two];
            simd::silu_mul(&s[..d_ff], &s[d_ff..], dst);
        });
        out
    });
    let Some(out) = out else {
        return Ok(None);
    };
    let mut shape = gu.dims().to_vec();
    *shape.last_mut().expect("checked above") = d_ff;
    Ok(Some(Tensor::from_vec(out, shape, gu.device())?))
}

/// GPT-2's and GPT-J's `gelu` (the tanh form candle's `Tensor::gelu` computes), elementwise.
/// `None` when the fast path does not apply.
pub fn gelu_tanh(x: &Tensor) -> Result<Option<Tensor>> {
    let width = *x.dims().last().unwrap_or(&0);
    if width == 0 {
        return Ok(None);
    }
    let out = with_cpu_f32(x, |src| {
        let mut out = vec![0f32; src.len()];
        rows_in_parallel(&mut out, width, |row, dst| {
            simd::gelu_tanh(&src[row * width..(row + 1) * width], dst)
        });
        out
    });
    match out {
        Some(out) => Ok(Some(Tensor::from_vec(out, x.dims(), x.device())?)),
        None => Ok(None),
    }
}

/// Softmax over the last axis of attention scores `[b, h, rep·t, t_all]`, each query row i of the
/// `t` new ones (repeated `rep` times, as [`CausalMasks`](crate::model::layers::CausalMasks)
/// lays them out) seeing keys `0..=t_all − t + i`; the rest get 0. `key_mask`, `[b, 1, 1,
/// t_all]` of 0 or −∞ (padding inside batched prefixes), is added first, as the reference adds
/// it. `None` when the fast path does not apply.
pub fn causal_softmax(
    scores: &Tensor,
    t: usize,
    key_mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let Some(mut v) = with_cpu_f32(scores, |s| s.to_vec()) else {
        return Ok(None);
    };
    let t_all = *scores.dims().last().unwrap_or(&0);
    let b = scores.dims().first().copied().unwrap_or(0);
    if t == 0 || t_all < t || !v.len().is_multiple_of(t_all) || !(v.len() / t_all).is_multiple_of(t)
    {
        return Ok(None);
    }
    let mask = match key_mask {
        Some(m) => match with_cpu_f32(m, |s| s.to_vec()) {
            Some(m) if m.len() == b * t_all => Some(m),
            _ => return Ok(None),
        },
        None => None,
    };
    let rows_per_item = v.len() / t_all / b.max(1);
    rows_in_parallel(&mut v, t_all, |row, r| {
        let seen = t_all - t + row % t + 1;
        match &mask {
            // The keys the padding mask leaves, gathered, so that a padded row sums its terms in
            // the same vector lanes as the same row unpadded (bit for bit the same result).
            Some(m) => {
                let m = &m[(row / rows_per_item) * t_all..][..seen];
                let mut kept: Vec<f32> = (0..seen)
                    .filter(|&j| m[j] != f32::NEG_INFINITY)
                    .map(|j| r[j] + m[j])
                    .collect();
                simd::softmax_in_place(&mut kept);
                let mut kept = kept.into_iter();
                for (x, &m) in r[..seen].iter_mut().zip(m) {
                    *x = if m == f32::NEG_INFINITY {
                        0.0
                    } else {
                        kept.next().unwrap_or(0.0)
                    };
                }
            }
            None => simd::softmax_in_place(&mut r[..seen]),
        }
        r[seen..].fill(0.0);
    });
    Ok(Some(Tensor::from_vec(v, scores.dims(), scores.device())?))
}

/// The best speed, in GFLOP/s, of candle's product of two `side`² matrices in `dtype` on
/// `device` (the kernel every pass uses), over about `seconds` after one warm-up: the limit
/// benchmarks hold their work against, natively and in the browser's workers.
pub fn product_gflops(device: &Device, dtype: DType, side: usize, seconds: f64) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (side, side), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (side, side), device)?.to_dtype(dtype)?;
    best_gflops(2.0 * (side as f64).powi(3), seconds, || -> Result<()> {
        drop(a.matmul(&b)?);
        Ok(device.synchronize()?)
    })
}

/// The best speed, in GFLOP/s, of `run` (work of `flops` operations, finished when it returns)
/// over about `seconds` of repetitions after one warm-up.
pub fn best_gflops<E>(
    flops: f64,
    seconds: f64,
    mut run: impl FnMut() -> std::result::Result<(), E>,
) -> std::result::Result<f64, E> {
    run()?;
    let (start, mut best) = (crate::clock::now_seconds(), f64::INFINITY);
    while crate::clock::now_seconds() - start < seconds {
        let t0 = crate::clock::now_seconds();
        run()?;
        best = best.min(crate::clock::now_seconds() - t0);
    }
    Ok(flops / best.max(1e-9) / 1e9)
}

/// Threads candle's CPU kernels use inside each operation (its `RAYON_NUM_THREADS`; 1 in the
/// browser).
pub fn kernel_threads() -> usize {
    if cfg!(target_arch = "wasm32") {
        1
    } else {
        candle_core::utils::get_num_threads()
    }
}

/// Calls `f(row index, row)` for every `width`-long row of `out`, split over candle's CPU
/// threads when the work is large enough to pay for them.
fn rows_in_parallel(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let threads = kernel_threads();
    let rows = out.len() / width.max(1);
    if threads <= 1 || out.len() < 1 << 16 || rows < 2 {
        out.chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        for (part, block) in out.chunks_mut(per * width).enumerate() {
            let f = &f;
            scope.spawn(move || {
                for (i, r) in block.chunks_mut(width).enumerate() {
                    f(part * per + i, r)
                }
            });
        }
    });
}

/// The loops, written so the compiler vectorises them; on x86_64 a copy compiled for AVX2 and
/// FMA is chosen at run time.
mod simd {
    /// `exp(x)` by Cephes' `expf`: x = n·ln2 + r, `exp(r)` by a degree-6 polynomial, scaled by
    /// 2ⁿ through the exponent bits. Above f32's range it gives +∞, below its normal range 0
    /// (so a −∞ score weighs exactly nothing); NaN stays NaN.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        const HI: f32 = 88.376_26;
        const LO: f32 = -87.336_54;
        let (over, under) = (x > HI, x < LO);
        let x = x.clamp(LO, HI);
        // n = round(x / ln2) by the 1.5·2²³ trick: the sum's low mantissa bits are n itself, so
        // neither a rounding call nor a float-to-int conversion stands in the vector loop.
        const MAGIC: f32 = 12_582_912.0;
        let shifted = x * std::f32::consts::LOG2_E + MAGIC;
        let n = shifted - MAGIC;
        let n_bits = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
        let p = 1.987_569_1e-4;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 0.5;
        let y = p * r * r + r + 1.0;
        let y = y * f32::from_bits(n_bits.wrapping_add(127) << 23);
        if over {
            f32::INFINITY
        } else if under {
            0.0
        } else {
            y
        }
    }

    /// Lanes of the reductions: independent partial maxima and sums the compiler can keep in
    /// one vector register (float reductions are not reassociated otherwise).
    const LANES: usize = 8;

    #[inline(always)]
    fn silu_mul_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }

    #[inline(always)]
    fn gelu_tanh_body(x: &[f32], out: &mut [f32]) {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        for (o, &v) in out.iter_mut().zip(x) {
            let y = SQRT_2_OVER_PI * (v + 0.044_715 * v * v * v);
            // tanh(y) = 1 − 2 / (e^{2y} + 1), exact at both ends of exp's clamped range.
            let tanh = 1.0 - 2.0 / (exp(2.0 * y) + 1.0);
            *o = 0.5 * v * (1.0 + tanh);
        }
    }

    #[inline(always)]
    fn softmax_body(row: &mut [f32]) {
        let (mut max, mut nan) = ([f32::NEG_INFINITY; LANES], [false; LANES]);
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                max[i] = if c[i] > max[i] { c[i] } else { max[i] };
                nan[i] |= c[i].is_nan();
            }
        }
        for (i, &x) in chunks.remainder().iter().enumerate() {
            max[i] = if x > max[i] { x } else { max[i] };
            nan[i] |= x.is_nan();
        }
        let max = max.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        for x in row.iter_mut() {
            *x = exp(*x - max);
        }
        let mut sum = [0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                sum[i] += c[i];
            }
        }
        for (i, &x) in chunks.remainder().iter().enumerate() {
            sum[i] += x;
        }
        // A NaN anywhere makes the whole row NaN, as candle's softmax does.
        let inv = if nan.contains(&true) {
            f32::NAN
        } else {
            1.0 / sum.iter().sum::<f32>()
        };
        for x in row.iter_mut() {
            *x *= inv;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
        silu_mul_body(gate, up, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gelu_tanh_avx2(x: &[f32], out: &mut [f32]) {
        gelu_tanh_body(x, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn softmax_avx2(row: &mut [f32]) {
        softmax_body(row)
    }

    #[cfg(target_arch = "x86_64")]
    fn has_avx2() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }

    /// `out = silu(gate) · up`, elementwise.
    pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the processor has AVX2 and FMA, checked just above.
            return unsafe { silu_mul_avx2(gate, up, out) };
        }
        silu_mul_body(gate, up, out)
    }

    /// `out = gelu(x)` (tanh form), elementwise.
    pub fn gelu_tanh(x: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the processor has AVX2 and FMA, checked just above.
            return unsafe { gelu_tanh_avx2(x, out) };
        }
        gelu_tanh_body(x, out)
    }

    /// The softmax of `row`, in place.
    pub fn softmax_in_place(row: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the processor has AVX2 and FMA, checked just above.
            return unsafe { softmax_avx2(row) };
        }
        softmax_body(row)
    }
}

/// `exp` as the kernels compute it (for tests of its accuracy).
pub fn exp_approx(x: f32) -> f32 {
    simd::exp(x)
}
