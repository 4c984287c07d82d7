//! Loci's own matrix product for x86-64 processors with AVX-512: f32, and bf16 operands with
//! f32 sums where the processor has bf16 dot products ([`Precision`]).
//!
//! candle's CPU kernel (the `gemm` crate) uses AVX-512 only when built with a nightly compiler;
//! on stable Rust it runs 256-bit AVX2 code, which leaves half of a processor with two 512-bit
//! multiply-add pipes (Zen 5, Sapphire Rapids and later) idle. This kernel is BLIS's classic
//! design in 512-bit registers:
//!
//! - the right-hand side is copied, up to 512 columns at a time, into panels 32 columns wide (two
//!   registers), a map's weight read transposed by 16 × 16 turns in registers;
//! - the left-hand side is copied into panels of 12 rows, read one value at a time and
//!   broadcast;
//! - a tile of up to 12 × 32 outputs lives in 24 registers while a block of terms accumulates
//!   into it by fused multiply-adds, then is added to the output; the sum over `k` is split
//!   evenly into as few blocks of at most 512 terms as it takes.
//!
//! **Every output's sum runs in the same order** whatever the number of rows, the row's place in
//! its panel, the column's place or the thread: block by block, each block's terms in order. So
//! a row's result does not depend on the batch it is in, and padded and unpadded batches agree
//! bit for bit, as the model's batched paths need (for batches of at least [`MIN_ROWS`] rows).
//!
//! [`linear`], [`times`] and [`batched`] serve f32 tensors on the CPU outside autograd with at
//! least [`MIN_ROWS`] rows; anything else, a processor without AVX-512, wasm32, `LOCI_GEMM=off`
//! or [`set_fast`](super::set_fast)`(false)` falls back to candle's product. The linear maps may
//! run in bf16 instead ([`set_maps_in_bf16`]).

#[cfg(target_arch = "x86_64")]
mod avx512;

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::{CpuStorage, Layout, Storage, Tensor};

use crate::error::Result;

/// The left-hand side `a` of a product `a · b`.
#[derive(Clone, Copy, Debug)]
pub enum Lhs<'a> {
    /// `a` stored `[m, k]`, row-major (a batch of activations).
    Plain(&'a [f32]),
    /// `a = sᵀ` for `s` stored `[k, m]`, row-major (keys whose second moment `sᵀs` is taken).
    Transposed(&'a [f32]),
}

/// The arithmetic of a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f32 operands, f32 sums (every product's default).
    F32,
    /// Operands rounded to bf16 (nearest, ties to even; an 8-bit significand, 2–3 significant
    /// digits), each pair of terms multiplied and added to f32 sums by `VDPBF16PS`: twice the f32
    /// instruction's work.
    Bf16,
}

/// The right-hand side `b` of a product `a · b`.
#[derive(Clone, Copy, Debug)]
pub enum Rhs<'a> {
    /// `b = wᵀ` for `w` stored `[n, k]`, row-major (a linear map's weight).
    Transposed(&'a [f32]),
    /// `b` stored `[k, n]`, row-major.
    Plain(&'a [f32]),
}

/// Fewer rows than this go to candle's kernel, which has a matrix-vector path: copying the
/// right-hand side into panels would cost as much as a product of a row or two.
pub const MIN_ROWS: usize = 8;

/// Whether the processor runs this kernel (AVX-512F) and nothing turned it off.
pub fn available() -> bool {
    super::fast() && detected()
}

/// The kernel's name as benchmarks report it, when it runs here.
pub fn name() -> Option<&'static str> {
    detected().then_some("loci gemm (AVX-512)")
}

/// Whether the kernel runs here in `precision`.
pub fn runs_in(precision: Precision) -> bool {
    match precision {
        Precision::F32 => detected(),
        Precision::Bf16 => bf16_detected(),
    }
}

/// Whether the processor also has AVX512-BF16's dot products (`VDPBF16PS`).
pub fn bf16_detected() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        return detected() && std::is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    })
}

static MAPS_IN_BF16: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs the linear maps' products in bf16 (`true`) or f32 (the default), process-wide, on the
/// CPU; attention's products and the statistics' `kᵀk` stay f32 (their keys come from the maps,
/// so statistics collected this way differ from f32's). Products of fewer than [`MIN_ROWS`]
/// rows (a decoding step) stay on candle's f32 path. Refused where the processor lacks
/// `VDPBF16PS`.
pub fn set_maps_in_bf16(on: bool) -> Result<()> {
    if on && !bf16_detected() {
        return Err(crate::error::LociError::Input(
            "bf16 products need Loci's AVX-512 kernel with bf16 dot products (VDPBF16PS): this \
             processor lacks them, or LOCI_GEMM=off turned the kernel off"
                .into(),
        ));
    }
    MAPS_IN_BF16.store(on, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// The linear maps' precision ([`set_maps_in_bf16`]).
pub fn maps_precision() -> Precision {
    match MAPS_IN_BF16.load(std::sync::atomic::Ordering::Relaxed) {
        true => Precision::Bf16,
        false => Precision::F32,
    }
}

fn detected() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let off = std::env::var("LOCI_GEMM").is_ok_and(|v| v == "off");
        #[cfg(target_arch = "x86_64")]
        return !off && std::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        return {
            let _ = off;
            false
        };
    })
}

/// `a · b` for `a` `[m, k]` row-major and `b` `[k, n]` (as `rhs` stores it), split by rows over
/// up to `threads` threads: `[m, n]` row-major, or `None` where the processor cannot run the
/// kernel. (The switch back to candle, [`set_fast`](super::set_fast), acts in the tensor entry
/// points, [`linear`], [`times`] and [`batched`]; benchmarks call this directly to measure the
/// peak.)
///
/// # Panics
/// When a slice is shorter than its shape.
pub fn product(
    lhs: Lhs,
    m: usize,
    k: usize,
    rhs: Rhs,
    n: usize,
    threads: usize,
) -> Option<Vec<f32>> {
    product_in(Precision::F32, lhs, m, k, rhs, n, threads)
}

/// [`product`] in `precision` (`None` also where bf16 is asked of a processor without it).
pub fn product_in(
    precision: Precision,
    lhs: Lhs,
    m: usize,
    k: usize,
    rhs: Rhs,
    n: usize,
    threads: usize,
) -> Option<Vec<f32>> {
    if !runs_in(precision) {
        return None;
    }
    let ops = Operands { lhs, rhs, m, k, n };
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    product_into(
        precision,
        &ops,
        threads,
        &mut c.spare_capacity_mut()[..m * n],
    )?;
    // SAFETY: the product wrote all m × n outputs.
    unsafe { c.set_len(m * n) };
    Some(c)
}

/// The operands of one product `a · b`: `a` `[m, k]` and `b` `[k, n]`, as stored.
#[derive(Clone, Copy, Debug)]
struct Operands<'a> {
    lhs: Lhs<'a>,
    rhs: Rhs<'a>,
    m: usize,
    k: usize,
    n: usize,
}

/// [`product`] written into `out` (`m × n` floats, which may be uninitialised); `None`, with
/// nothing written, where the processor cannot run the kernel.
fn product_into(
    precision: Precision,
    ops: &Operands,
    threads: usize,
    out: &mut [MaybeUninit<f32>],
) -> Option<()> {
    if !detected() {
        return None;
    }
    let Operands { lhs, rhs, m, k, n } = *ops;
    let (Lhs::Plain(a) | Lhs::Transposed(a)) = lhs;
    let (Rhs::Plain(b) | Rhs::Transposed(b)) = rhs;
    assert!(
        a.len() >= m * k,
        "gemm: the left-hand side is shorter than {m} × {k}"
    );
    assert!(
        b.len() >= k * n,
        "gemm: the right-hand side is shorter than {k} × {n}"
    );
    assert_eq!(out.len(), m * n, "gemm: the output is not {m} × {n}");
    if m == 0 || n == 0 || k == 0 {
        out.fill(MaybeUninit::new(0.0));
        return Some(());
    }
    blocked(precision, ops, threads, out)
}

/// [`product_into`] of non-empty operands on AVX-512.
#[cfg(target_arch = "x86_64")]
fn blocked(
    precision: Precision,
    ops: &Operands,
    threads: usize,
    out: &mut [MaybeUninit<f32>],
) -> Option<()> {
    let Operands { m, k, n, .. } = *ops;
    // Rows split evenly by whole panels; below a few million operations a thread costs more than
    // it saves.
    let big = 2 * m * n * k >= 1 << 22;
    let threads = if big {
        threads.clamp(1, m.div_ceil(avx512::MR))
    } else {
        1
    };
    let per = m.div_ceil(threads).div_ceil(avx512::MR) * avx512::MR;
    crate::threads::map(out.chunks_mut(per * n).enumerate(), |(part, out)| {
        let rows = part * per..part * per + out.len() / n;
        // SAFETY: AVX-512F was detected, the operands hold their shapes (checked by
        // `product_into`), and `out` holds these rows' outputs.
        unsafe { avx512::product(ops, rows, out.as_mut_ptr().cast(), precision) }
    });
    Some(())
}

#[cfg(not(target_arch = "x86_64"))]
fn blocked(_: Precision, _: &Operands, _: usize, _: &mut [MaybeUninit<f32>]) -> Option<()> {
    None
}

/// `x · wᵀ` for `x` `[rows, in]` and a linear map's weight `w` `[out, in]`, both f32 on the
/// CPU outside autograd, with at least [`MIN_ROWS`] rows: `[rows, out]`, or `None` where
/// candle's product should run.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    by_weight(x, w, true)
}

/// `g · w` for `g` `[rows, out]` and `w` `[out, in]` (a linear map's input gradient), under the
/// same conditions as [`linear`]: `[rows, in]`, or `None`.
pub fn times(g: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    by_weight(g, w, false)
}

/// `x · wᵀ` (`transposed`) or `x · w` for a 2-D `x` and weight `w`, under [`linear`]'s
/// conditions.
fn by_weight(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Option<Tensor>> {
    let (rows, k) = x.dims2()?;
    let (w_rows, w_cols) = w.dims2()?;
    let (n, w_k) = if transposed {
        (w_rows, w_cols)
    } else {
        (w_cols, w_rows)
    };
    if rows < MIN_ROWS || w_k != k || !detected() {
        return Ok(None);
    }
    let out = super::with_cpu_f32(x, |xs| {
        super::with_cpu_f32(w, |ws| {
            let rhs = if transposed {
                Rhs::Transposed(ws)
            } else {
                Rhs::Plain(ws)
            };
            let threads = super::kernel_threads();
            product_in(maps_precision(), Lhs::Plain(xs), rows, k, rhs, n, threads)
        })
    });
    match out.flatten().flatten() {
        Some(y) => Ok(Some(Tensor::from_vec(y, (rows, n), x.device())?)),
        None => Ok(None),
    }
}

/// `a · b` matrix by matrix over the leading dimensions they share, `a` `[.., m, k]` and `b`
/// `[.., k, n]` — or, `b_transposed`, `b` `[.., n, k]` (attention's keys) — each matrix lying
/// row-major in its storage (a tensor narrowed along its rows qualifies), both f32 on the CPU
/// outside autograd, with at least [`MIN_ROWS`] rows: `[.., m, n]`, or `None` for candle's
/// product. Matrices go to threads whole when candle's kernels are threaded.
pub fn batched(a: &Tensor, b: &Tensor, b_transposed: bool) -> Result<Option<Tensor>> {
    let (ad, bd) = (a.dims(), b.dims());
    let rank = ad.len();
    if rank < 2 || bd.len() != rank || ad[..rank - 2] != bd[..rank - 2] {
        return Ok(None);
    }
    let (m, k) = (ad[rank - 2], ad[rank - 1]);
    let (n, b_k) = match b_transposed {
        true => (bd[rank - 2], bd[rank - 1]),
        false => (bd[rank - 1], bd[rank - 2]),
    };
    if m < MIN_ROWS || n == 0 || b_k != k || !detected() || !super::served(a) || !super::served(b) {
        return Ok(None);
    }
    let (Some(a_at), Some(b_at)) = (matrix_offsets(a.layout()), matrix_offsets(b.layout())) else {
        return Ok(None);
    };
    let mut c: Vec<f32> = Vec::with_capacity(a_at.len() * m * n);
    let out = &mut c.spare_capacity_mut()[..a_at.len() * m * n];
    let done = with_storage(a, |av| {
        with_storage(b, |bv| {
            let one = |i: usize, out: &mut [MaybeUninit<f32>]| {
                let lhs = Lhs::Plain(&av[a_at[i]..]);
                let rhs = match b_transposed {
                    true => Rhs::Transposed(&bv[b_at[i]..]),
                    false => Rhs::Plain(&bv[b_at[i]..]),
                };
                product_into(Precision::F32, &Operands { lhs, rhs, m, k, n }, 1, out).is_some()
            };
            // Whole matrices per thread, in contiguous runs of the output.
            let per = a_at
                .len()
                .div_ceil(super::kernel_threads().clamp(1, a_at.len()));
            let runs = out.chunks_mut(per * m * n).enumerate();
            crate::threads::map(runs, |(run, out)| {
                let mut matrices = out.chunks_mut(m * n).enumerate();
                matrices.all(|(j, out)| one(run * per + j, out))
            })
        })
    });
    if !done
        .flatten()
        .is_some_and(|runs| runs.into_iter().all(|ok| ok))
    {
        return Ok(None);
    }
    // SAFETY: every matrix's outputs were written.
    unsafe { c.set_len(a_at.len() * m * n) };
    let mut shape = ad[..rank - 2].to_vec();
    shape.extend([m, n]);
    Ok(Some(Tensor::from_vec(c, shape, a.device())?))
}

/// Where each `[r, c]` matrix of a layout starts in its storage, when every one lies row-major
/// and whole (row stride `c`, column stride 1).
fn matrix_offsets(layout: &Layout) -> Option<Vec<usize>> {
    let (dims, stride) = (layout.dims(), layout.stride());
    let rank = dims.len();
    if rank < 2
        || stride[rank - 1] != 1
        || (dims[rank - 2] > 1 && stride[rank - 2] != dims[rank - 1])
    {
        return None;
    }
    let mut offsets = vec![layout.start_offset()];
    for (&d, &st) in dims[..rank - 2].iter().zip(&stride[..rank - 2]) {
        offsets = offsets
            .iter()
            .flat_map(|&o| (0..d).map(move |i| o + i * st))
            .collect();
    }
    Some(offsets)
}

/// `f` over a CPU f32 tensor's whole storage.
fn with_storage<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(v)),
        _ => None,
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests;
