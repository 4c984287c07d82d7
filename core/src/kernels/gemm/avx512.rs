//! The AVX-512 loops: blocks of the right-hand side copied into 32-column panels, the
//! left-hand side into 12-row panels, and the 12 × 32 register tile that multiplies them.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Lhs, Operands, Precision, Rhs};

/// Rows of a left-hand panel (broadcast one value at a time).
pub const MR: usize = 12;
/// Columns of a right-hand panel: two 16-wide registers.
pub const NR: usize = 32;
/// The most terms summed in registers before the tile is added to the output (each time it is,
/// the output is read and written again).
const KC: usize = 512;

/// The terms per block for a sum of `k`: `k` split evenly into as few blocks of at most `KC` as
/// it takes (576 terms: two blocks of 288, not 512 and 64).
pub fn block_terms(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC).max(1)).max(1)
}

/// Columns copied per block (up to 1 MiB of panels at 512 terms: the L2 cache of the processors
/// measured; a right-hand panel of 32 columns, up to 64 KiB, meets every row block in turn).
const NC: usize = 512;
/// Rows per block of left-hand panels that meet each right-hand panel in turn (up to 192 KiB).
const MC: usize = 96;

/// `c = a[rows] · b` for the operands `ops`, `c` the rows' `[rows, n]` outputs, row-major;
/// every output summed over `k` in blocks of [`block_terms`], each in order (the module's
/// promise).
///
/// With [`Precision::Bf16`] the panels are rounded to bf16 and each pair of terms is taken by
/// one `VDPBF16PS` (two products summed into the f32 sums).
///
/// # Safety
/// The processor must support AVX-512F (and AVX512-BF16 for bf16), the slices must hold their
/// shapes, and `c` must be valid for writing the rows' outputs (it may be uninitialised: the
/// first block of terms stores every output before any is read).
#[target_feature(enable = "avx512f")]
pub unsafe fn product(ops: &Operands, rows: Range<usize>, c: *mut f32, precision: Precision) {
    SCRATCH.with_borrow_mut(|scratch| {
        let kc = block_terms(ops.k);
        let pairs = precision == Precision::Bf16;
        let depth = if pairs { kc.div_ceil(2) } else { 0 };
        let (cols, rows_all) = (
            NC.min(ops.n.next_multiple_of(NR)),
            rows.len().next_multiple_of(MR),
        );
        let p = scratch.panels([kc * cols, kc * rows_all, depth * cols, depth * rows_all]);
        blocks(ops, rows, c, p, pairs)
    })
}

thread_local! {
    /// Each thread's panel buffers, kept between products (a fresh buffer per product costs
    /// the kernel's page clearing).
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch { bufs: [Vec::new(), Vec::new(), Vec::new(), Vec::new()] })
    };
}

/// Buffers for the right- and left-hand panels, then their bf16 pairs (bit patterns held as
/// f32s).
struct Scratch {
    bufs: [Vec<f32>; 4],
}

/// The four panel buffers of one product.
struct Panels<'a> {
    b: &'a mut [f32],
    a: &'a mut [f32],
    b_pairs: &'a mut [f32],
    a_pairs: &'a mut [f32],
}

/// Left-hand panels larger than this are not kept after the product (the rows of a long
/// text's statistics, say).
const KEEP_FLOATS: usize = 1 << 21;

impl Scratch {
    /// Buffers of at least these lengths (their contents are stale: packing writes every value
    /// the tiles read).
    fn panels(&mut self, lens: [usize; 4]) -> Panels<'_> {
        for (buf, &len) in self.bufs.iter_mut().zip(&lens) {
            // Too short, or a long product's buffer that a short one should not keep.
            if buf.len() < len || (buf.len() > KEEP_FLOATS && len <= KEEP_FLOATS) {
                *buf = vec![0f32; len];
            }
        }
        let [b, a, b_pairs, a_pairs] = &mut self.bufs;
        Panels {
            b: &mut b[..lens[0]],
            a: &mut a[..lens[1]],
            b_pairs: &mut b_pairs[..lens[2]],
            a_pairs: &mut a_pairs[..lens[3]],
        }
    }
}

/// The blocked loops of [`product`] over given panel buffers (`pairs`: in bf16).
#[target_feature(enable = "avx512f")]
unsafe fn blocks(ops: &Operands, rows: Range<usize>, c: *mut f32, p: Panels, pairs: bool) {
    let (k, n, m) = (ops.k, ops.n, rows.len());
    let terms = block_terms(k);
    for p0 in (0..k).step_by(terms) {
        let kc = terms.min(k - p0);
        // Every row's terms of this block, once: the left-hand side is copied k values per row
        // in all, the right-hand side k per column.
        pack_lhs(ops, &rows, p0, kc, p.a);
        // A tile's depth: its terms, or their pairs.
        let depth = if pairs { kc.div_ceil(2) } else { kc };
        if pairs {
            pair_panels(p.a, kc, MR, m.div_ceil(MR), p.a_pairs);
        }
        for j0 in (0..n).step_by(NC) {
            let nc = NC.min(n - j0);
            pack_rhs(ops, p0, kc, j0, nc, p.b);
            if pairs {
                pair_panels(p.b, kc, NR, nc.div_ceil(NR), p.b_pairs);
            }
            let (a_all, b_all) = if pairs {
                (&*p.a_pairs, &*p.b_pairs)
            } else {
                (&*p.a, &*p.b)
            };
            for i0 in (0..m).step_by(MC) {
                let mc = MC.min(m - i0);
                let block = &a_all[i0 * depth..];
                for (jp, panel) in b_all.chunks(depth * NR).take(nc.div_ceil(NR)).enumerate() {
                    let cols = NR.min(nc - jp * NR);
                    let masks = [column_mask(cols), column_mask(cols.saturating_sub(16))];
                    for (ip, lhs) in block.chunks(depth * MR).take(mc.div_ceil(MR)).enumerate() {
                        let (i, rows) = (i0 + ip * MR, MR.min(mc - ip * MR));
                        let out = c.add(i * n + j0 + jp * NR);
                        let t = Tile {
                            depth,
                            a: lhs.as_ptr(),
                            b: panel.as_ptr(),
                            c: out,
                            ldc: n,
                            masks,
                            first: p0 == 0,
                        };
                        if pairs {
                            t.run_bf16(rows);
                        } else {
                            t.run(rows);
                        }
                    }
                }
            }
        }
    }
}

/// bf16 pairs of `panels` panels `[kc, width]` (f32; `width` is `MR` or `NR`): `[⌈kc/2⌉,
/// width]`, value `(q, c)` holding terms `2q` (low half) and `2q + 1` (high half, zero past
/// `kc`) of column `c`, rounded to nearest even — the layout `VDPBF16PS` multiplies lane by lane.
///
/// # Safety
/// AVX-512F and AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pair_panels(src: &[f32], kc: usize, width: usize, panels: usize, dst: &mut [f32]) {
    let depth = kc.div_ceil(2);
    for panel in 0..panels {
        let from = src[panel * kc * width..].as_ptr();
        let to = dst[panel * depth * width..].as_mut_ptr();
        for q in 0..depth {
            for lane in (0..width).step_by(16) {
                let mask = column_mask(width - lane);
                let first = from.add(2 * q * width + lane);
                let second = (2 * q + 1 < kc).then(|| first.add(width));
                let pair = pair_of(first, second, mask);
                _mm512_mask_storeu_epi32(to.add(q * width + lane).cast(), mask, pair);
            }
        }
    }
}

/// The `mask`ed lanes of `lo` and `hi` (zero without one) rounded to bf16 (nearest, ties to
/// even; NaN stays NaN) and packed in pairs: lane `c` holds `lo[c]` in its low half, `hi[c]` in
/// its high half.
///
/// # Safety
/// AVX-512F and AVX512-BF16; the pointers valid for the masked lanes.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn pair_of(lo: *const f32, hi: Option<*const f32>, mask: __mmask16) -> __m512i {
    let widen = |x: __m512| {
        let bf = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x));
        _mm512_cvtepu16_epi32(bf)
    };
    let lo = widen(_mm512_maskz_loadu_ps(mask, lo));
    let hi = match hi {
        Some(hi) => widen(_mm512_maskz_loadu_ps(mask, hi)),
        None => _mm512_setzero_si512(),
    };
    _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi))
}

/// The lanes of a 16-wide register holding the first `cols` columns.
fn column_mask(cols: usize) -> __mmask16 {
    if cols >= 16 {
        0xffff
    } else {
        ((1u32 << cols) - 1) as __mmask16
    }
}

/// Copies `b[p0..p0 + kc, j0..j0 + nc]` into `NR`-wide panels, each `[kc, NR]` row-major, the
/// columns past `nc` zero.
#[target_feature(enable = "avx512f")]
unsafe fn pack_rhs(ops: &Operands, p0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32]) {
    let (k, n) = (ops.k, ops.n);
    for (jp, panel) in dst.chunks_mut(kc * NR).take(nc.div_ceil(NR)).enumerate() {
        let (j, cols) = (j0 + jp * NR, NR.min(nc - jp * NR));
        match ops.rhs {
            // Each weight row is one output column: 16 rows' next 16 terms are turned
            // together in registers, each of 16 panel rows getting 16 columns.
            Rhs::Transposed(w) => {
                for half in 0..2 {
                    let rows = cols.saturating_sub(16 * half).min(16);
                    if rows == 0 {
                        // Past the last column: zeros (no weight row to point at).
                        for p in 0..kc {
                            panel[p * NR + 16 * half..][..16].fill(0.0);
                        }
                        continue;
                    }
                    let first = w.as_ptr().add((j + 16 * half) * k + p0);
                    for p in (0..kc).step_by(16) {
                        let terms = 16.min(kc - p);
                        let out = panel.as_mut_ptr().add(p * NR + 16 * half);
                        transpose16(first.add(p), k, rows, terms, (out, NR, 16));
                    }
                }
            }
            Rhs::Plain(b) => {
                if cols < NR {
                    panel.fill(0.0);
                }
                for p in 0..kc {
                    let src = &b[(p0 + p) * n + j..][..cols];
                    panel[p * NR..][..cols].copy_from_slice(src);
                }
            }
        }
    }
}

/// Writes the transpose of a 16 × 16 block: source row `r` (`src + r·ld`, its first `terms`
/// values; rows from `rows` on read as zero) becomes column `r` of the `terms` rows at
/// `dst + t·ld_dst`, of which the first `width` columns are written.
///
/// # Safety
/// AVX-512F; the source rows valid for `terms` values, the destination rows for `width`.
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(
    src: *const f32,
    ld: usize,
    rows: usize,
    terms: usize,
    (dst, ld_dst, width): (*mut f32, usize, usize),
) {
    let width = column_mask(width);
    let mask = column_mask(terms);
    let row = |r: usize| {
        if r < rows {
            _mm512_maskz_loadu_ps(mask, src.add(r * ld))
        } else {
            _mm512_setzero_ps()
        }
    };
    // Pairs of rows interleaved, then fours (each 128-bit lane holds four rows' values of one
    // term), then the lanes gathered so that each register holds one term of all 16 rows.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (a, b, c, d) = (row(4 * g), row(4 * g + 1), row(4 * g + 2), row(4 * g + 3));
        let (ab_lo, ab_hi) = (_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let (cd_lo, cd_hi) = (_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        u[4 * g] = _mm512_shuffle_ps::<0x44>(ab_lo, cd_lo);
        u[4 * g + 1] = _mm512_shuffle_ps::<0xee>(ab_lo, cd_lo);
        u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(ab_hi, cd_hi);
        u[4 * g + 3] = _mm512_shuffle_ps::<0xee>(ab_hi, cd_hi);
    }
    for q in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[q], u[4 + q]);
        let v1 = _mm512_shuffle_f32x4::<0xdd>(u[q], u[4 + q]);
        let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + q], u[12 + q]);
        let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + q], u[12 + q]);
        // Term 4L + q sits in lane L of the four groups.
        let terms_out = [
            (q, _mm512_shuffle_f32x4::<0x88>(v0, w0)),
            (q + 4, _mm512_shuffle_f32x4::<0x88>(v1, w1)),
            (q + 8, _mm512_shuffle_f32x4::<0xdd>(v0, w0)),
            (q + 12, _mm512_shuffle_f32x4::<0xdd>(v1, w1)),
        ];
        for (t, v) in terms_out {
            if t < terms {
                _mm512_mask_storeu_ps(dst.add(t * ld_dst), width, v);
            }
        }
    }
}

/// Copies `a[rows, p0..p0 + kc]` into `MR`-row panels, each `[kc, MR]` (a column of the panel
/// per term), the rows past the last zero.
///
/// # Safety
/// AVX-512F; the left-hand side holds its shape.
#[target_feature(enable = "avx512f")]
unsafe fn pack_lhs(ops: &Operands, of: &Range<usize>, p0: usize, kc: usize, dst: &mut [f32]) {
    let (k, m) = (ops.k, of.len());
    for (ip, panel) in dst.chunks_mut(kc * MR).take(m.div_ceil(MR)).enumerate() {
        let (first, rows) = (of.start + ip * MR, MR.min(m - ip * MR));
        match ops.lhs {
            // Each row's next 16 terms turned in registers, as the weights are.
            Lhs::Plain(a) => {
                let src = a[first * k + p0..].as_ptr();
                for p in (0..kc).step_by(16) {
                    let terms = 16.min(kc - p);
                    let out = (panel.as_mut_ptr().add(p * MR), MR, MR);
                    transpose16(src.add(p), k, rows, terms, out);
                }
            }
            // Stored term by term: each term's values for the panel's rows lie together.
            Lhs::Transposed(s) => {
                if rows < MR {
                    panel.fill(0.0);
                }
                for p in 0..kc {
                    let src = &s[(p0 + p) * ops.m + first..][..rows];
                    panel[p * MR..][..rows].copy_from_slice(src);
                }
            }
        }
    }
}

/// One tile's operands: a left panel `[depth, MR]`, a right panel `[depth, NR]` (terms, or bf16
/// pairs of terms), and where its outputs go.
struct Tile {
    depth: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    masks: [__mmask16; 2],
    /// The first block of terms: store the sums rather than add them to the output.
    first: bool,
}

/// `tile.method::<R>()` for the `rows` a panel has (one code path per row count, so that a short
/// last panel does no wasted work).
macro_rules! by_rows {
    ($tile:expr, $rows:expr, $method:ident) => {
        match $rows {
            12 => $tile.$method::<12>(),
            11 => $tile.$method::<11>(),
            10 => $tile.$method::<10>(),
            9 => $tile.$method::<9>(),
            8 => $tile.$method::<8>(),
            7 => $tile.$method::<7>(),
            6 => $tile.$method::<6>(),
            5 => $tile.$method::<5>(),
            4 => $tile.$method::<4>(),
            3 => $tile.$method::<3>(),
            2 => $tile.$method::<2>(),
            1 => $tile.$method::<1>(),
            _ => unreachable!("a panel has 1 to {MR} rows"),
        }
    };
}

impl Tile {
    /// The tile for its first `rows` rows (one code path per row count, so that a short last
    /// panel does no wasted work).
    ///
    /// # Safety
    /// AVX-512F, and pointers valid for the tile's panels and its `rows` × masked columns.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(&self, rows: usize) {
        by_rows!(self, rows, rows)
    }

    /// [`run`](Self::run) on bf16 pairs.
    ///
    /// # Safety
    /// As `run`, and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn run_bf16(&self, rows: usize) {
        by_rows!(self, rows, rows_bf16)
    }

    /// `R` rows: `2R` registers of sums, one multiply-add per register per term.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows<const R: usize>(&self) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for p in 0..self.depth {
            let b0 = _mm512_loadu_ps(self.b.add(p * NR));
            let b1 = _mm512_loadu_ps(self.b.add(p * NR + 16));
            let a = self.a.add(p * MR);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(r));
                acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
            }
        }
        self.store(&acc);
    }

    /// `R` rows on bf16 pairs: one `VDPBF16PS` per register per pair of terms.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn rows_bf16<const R: usize>(&self) {
        use std::mem::transmute;
        let (a, b) = (self.a.cast::<i32>(), self.b.cast::<i32>());
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for q in 0..self.depth {
            let b0 = transmute::<__m512i, __m512bh>(_mm512_loadu_epi32(b.add(q * NR)));
            let b1 = transmute::<__m512i, __m512bh>(_mm512_loadu_epi32(b.add(q * NR + 16)));
            let a = a.add(q * MR);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*a.add(r)));
                acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
            }
        }
        self.store(&acc);
    }

    /// Stores (first block) or adds the sums of a tile's rows to the output's masked columns.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store(&self, acc: &[[__m512; 2]]) {
        for (r, acc) in acc.iter().enumerate() {
            let row = self.c.add(r * self.ldc);
            for (half, &sum) in acc.iter().enumerate() {
                let mask = self.masks[half];
                if mask == 0 {
                    // No column here (and no address to form past the output's end).
                    continue;
                }
                let ptr = row.add(16 * half);
                let sum = if self.first {
                    sum
                } else {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, ptr), sum)
                };
                _mm512_mask_storeu_ps(ptr, mask, sum);
            }
        }
    }
}
