//! The AVX-512 loops: blocks of the right-hand side copied into 32-column panels, the
//! left-hand side into 12-row panels, and the 12 × 32 register tile that multiplies them.

use std::arch::x86_64::*;

use std::ops::Range;

use super::{Lhs, Rhs};

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
/// Columns copied per block (512 KiB of panels at `KC` rows: the L2 cache).
const NC: usize = 512;
/// Rows per block of left-hand panels that meet each right-hand panel in turn (96 KiB at
/// `KC`, in the L2 cache beside the right-hand block).
const MC: usize = 96;

/// `c = a[rows] · b`, `a` `[m, k]` as `lhs` stores it, `b` `[k, n]` as `rhs` stores it, `c` the
/// rows' `[rows, n]` outputs, row-major;
/// every output summed over `k` in blocks of [`block_terms`], each in order (the module's
/// promise).
///
/// # Safety
/// The processor must support AVX-512F, the slices must hold their shapes, and `c` must be
/// valid for writing the rows' outputs (it may be uninitialised: the first block of terms stores
/// every output before any is read).
#[target_feature(enable = "avx512f")]
pub unsafe fn product(
    lhs: Lhs,
    m: usize,
    rows: Range<usize>,
    k: usize,
    rhs: Rhs,
    n: usize,
    c: *mut f32,
) {
    SCRATCH.with_borrow_mut(|scratch| {
        let kc = block_terms(k);
        let b_len = kc * NC.min(n.next_multiple_of(NR));
        let a_len = kc * rows.len().next_multiple_of(MR);
        let (b_panels, a_panels) = scratch.panels(b_len, a_len);
        let lhs = Left { lhs, m, rows };
        blocks(lhs, k, rhs, n, c, b_panels, a_panels)
    })
}

/// The rows `rows` of a left-hand side of `m` rows.
struct Left<'a> {
    lhs: Lhs<'a>,
    m: usize,
    rows: Range<usize>,
}

thread_local! {
    /// Each thread's panel buffers, kept between products (a fresh buffer per product costs
    /// the kernel's page clearing).
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch { b: Vec::new(), a: Vec::new() })
    };
}

/// Buffers for the right- and left-hand panels.
struct Scratch {
    b: Vec<f32>,
    a: Vec<f32>,
}

/// Left-hand panels larger than this are not kept after the product (the rows of a long
/// text's statistics, say).
const KEEP_FLOATS: usize = 1 << 21;

impl Scratch {
    /// Buffers of at least these lengths (their contents are stale: packing writes every value
    /// the tiles read).
    fn panels(&mut self, b_len: usize, a_len: usize) -> (&mut [f32], &mut [f32]) {
        for (buf, len) in [(&mut self.b, b_len), (&mut self.a, a_len)] {
            // Too short, or a long product's buffer that a short one should not keep.
            if buf.len() < len || (buf.len() > KEEP_FLOATS && len <= KEEP_FLOATS) {
                *buf = vec![0f32; len];
            }
        }
        (&mut self.b[..b_len], &mut self.a[..a_len])
    }
}

/// The blocked loops of [`product`] over given panel buffers.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn blocks(
    lhs: Left,
    k: usize,
    rhs: Rhs,
    n: usize,
    c: *mut f32,
    b_panels: &mut [f32],
    a_panels: &mut [f32],
) {
    let m = lhs.rows.len();
    let terms = block_terms(k);
    for p0 in (0..k).step_by(terms) {
        let kc = terms.min(k - p0);
        // Every row's terms of this block, once: the left-hand side is copied k values per row
        // in all, the right-hand side k per column.
        pack_lhs(&lhs, k, p0, kc, a_panels);
        for j0 in (0..n).step_by(NC) {
            let nc = NC.min(n - j0);
            pack_rhs(rhs, k, n, p0, kc, j0, nc, b_panels);
            for i0 in (0..m).step_by(MC) {
                let mc = MC.min(m - i0);
                let block = &a_panels[i0 * kc..];
                for (jp, panel) in b_panels.chunks(kc * NR).take(nc.div_ceil(NR)).enumerate() {
                    let cols = NR.min(nc - jp * NR);
                    let masks = [column_mask(cols), column_mask(cols.saturating_sub(16))];
                    for (ip, lhs) in block.chunks(kc * MR).take(mc.div_ceil(MR)).enumerate() {
                        let (i, rows) = (i0 + ip * MR, MR.min(mc - ip * MR));
                        let out = c.add(i * n + j0 + jp * NR);
                        let t = Tile {
                            kc,
                            a: lhs.as_ptr(),
                            b: panel.as_ptr(),
                            c: out,
                            ldc: n,
                            masks,
                            first: p0 == 0,
                        };
                        t.run(rows);
                    }
                }
            }
        }
    }
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
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn pack_rhs(
    rhs: Rhs,
    k: usize,
    n: usize,
    p0: usize,
    kc: usize,
    j0: usize,
    nc: usize,
    dst: &mut [f32],
) {
    for (jp, panel) in dst.chunks_mut(kc * NR).take(nc.div_ceil(NR)).enumerate() {
        let (j, cols) = (j0 + jp * NR, NR.min(nc - jp * NR));
        match rhs {
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
                        transpose16(first.add(p), k, rows, terms, out, NR);
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
/// `dst + t·ld_dst`.
///
/// # Safety
/// AVX-512F; the source rows valid for `terms` values, the destination rows for 16.
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(
    src: *const f32,
    ld: usize,
    rows: usize,
    terms: usize,
    dst: *mut f32,
    ld_dst: usize,
) {
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
                _mm512_storeu_ps(dst.add(t * ld_dst), v);
            }
        }
    }
}

/// Copies `a[rows, p0..p0 + kc]` into `MR`-row panels, each `[kc, MR]` (a column of the panel
/// per term), the rows past the last zero.
fn pack_lhs(left: &Left, k: usize, p0: usize, kc: usize, dst: &mut [f32]) {
    let m = left.rows.len();
    for (ip, panel) in dst.chunks_mut(kc * MR).take(m.div_ceil(MR)).enumerate() {
        let (first, rows) = (left.rows.start + ip * MR, MR.min(m - ip * MR));
        if rows < MR {
            panel.fill(0.0);
        }
        match left.lhs {
            Lhs::Plain(a) => {
                for r in 0..rows {
                    let src = &a[(first + r) * k + p0..][..kc];
                    for (p, &v) in src.iter().enumerate() {
                        panel[p * MR + r] = v;
                    }
                }
            }
            // Stored term by term: each term's values for the panel's rows lie together.
            Lhs::Transposed(s) => {
                for p in 0..kc {
                    let src = &s[(p0 + p) * left.m + first..][..rows];
                    panel[p * MR..][..rows].copy_from_slice(src);
                }
            }
        }
    }
}

/// One tile's operands: a left panel `[kc, MR]`, a right panel `[kc, NR]`, and where its
/// outputs go.
struct Tile {
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    masks: [__mmask16; 2],
    /// The first block of terms: store the sums rather than add them to the output.
    first: bool,
}

impl Tile {
    /// The tile for its first `rows` rows (one code path per row count, so that a short last
    /// panel does no wasted work).
    ///
    /// # Safety
    /// AVX-512F, and pointers valid for the tile's panels and its `rows` × masked columns.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(&self, rows: usize) {
        match rows {
            12 => self.rows::<12>(),
            11 => self.rows::<11>(),
            10 => self.rows::<10>(),
            9 => self.rows::<9>(),
            8 => self.rows::<8>(),
            7 => self.rows::<7>(),
            6 => self.rows::<6>(),
            5 => self.rows::<5>(),
            4 => self.rows::<4>(),
            3 => self.rows::<3>(),
            2 => self.rows::<2>(),
            1 => self.rows::<1>(),
            _ => unreachable!("a panel has 1 to {MR} rows"),
        }
    }

    /// `R` rows: `2R` registers of sums, one multiply-add per register per term.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows<const R: usize>(&self) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for p in 0..self.kc {
            let b0 = _mm512_loadu_ps(self.b.add(p * NR));
            let b1 = _mm512_loadu_ps(self.b.add(p * NR + 16));
            let a = self.a.add(p * MR);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(r));
                acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
            }
        }
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
