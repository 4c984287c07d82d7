//! The little dense linear algebra ROME needs, in f64: Cholesky factor and solve. Small blocks
//! are factored on the host; the big products of a blocked factorisation run on the device, so a
//! GPT-J key covariance (16384²) factors in a fraction of a second on a GPU.

use candle_core::{DType, Tensor};

use crate::error::{LociError, Result};

/// Lower-triangular `L` with `A = L Lᵀ`, for a symmetric positive-definite row-major `a` (n × n).
pub fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>> {
    cholesky_block(a, n, 0)
}

/// `cholesky` of a diagonal block that starts at row `offset` of a bigger matrix (for messages).
fn cholesky_block(a: &[f64], n: usize, offset: usize) -> Result<Vec<f64>> {
    if a.len() != n * n {
        return Err(LociError::input("cholesky: matrix is not n × n"));
    }
    let mut l = vec![0f64; n * n];
    for j in 0..n {
        let row_j = j * n;
        let mut d = a[row_j + j];
        for k in 0..j {
            d -= l[row_j + k] * l[row_j + k];
        }
        if d.is_nan() || d <= 0.0 || !d.is_finite() {
            return Err(LociError::input(format!(
                "the key covariance is singular (pivot {} is {d:.3e}); collect statistics over more tokens",
                offset + j
            )));
        }
        let d = d.sqrt();
        l[row_j + j] = d;
        for i in j + 1..n {
            let row_i = i * n;
            let dot: f64 = l[row_i..row_i + j]
                .iter()
                .zip(&l[row_j..row_j + j])
                .map(|(x, y)| x * y)
                .sum();
            l[row_i + j] = (a[row_i + j] - dot) / d;
        }
    }
    Ok(l)
}

/// Solves `L Lᵀ x = b` given the Cholesky factor `L`.
pub fn cholesky_solve(l: &[f64], n: usize, b: &[f64]) -> Vec<f64> {
    let mut y = vec![0f64; n];
    for i in 0..n {
        let s: f64 = (0..i).map(|k| l[i * n + k] * y[k]).sum();
        y[i] = (b[i] - s) / l[i * n + i];
    }
    let mut x = vec![0f64; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k * n + i] * x[k]).sum();
        x[i] = (y[i] - s) / l[i * n + i];
    }
    x
}

/// The inverse of a lower-triangular row-major `l` (n × n), itself lower-triangular.
fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
    let mut inv = vec![0f64; n * n];
    for j in 0..n {
        inv[j * n + j] = 1.0 / l[j * n + j];
        for i in j + 1..n {
            let s: f64 = (j..i).map(|k| l[i * n + k] * inv[k * n + j]).sum();
            inv[i * n + j] = -s / l[i * n + i];
        }
    }
    inv
}

/// One block column of `L`: the inverse of its diagonal block (host) and the panel below it.
#[derive(Debug)]
struct BlockColumn {
    start: usize,
    size: usize,
    diag_inv: Vec<f64>,
    /// `L[start+size.., start..start+size]`, `[n - start - size, size]` f64 on the device.
    panel: Option<Tensor>,
}

/// `A = L Lᵀ` of a symmetric positive-definite matrix, kept by block columns.
#[derive(Debug)]
pub struct CholeskyFactor {
    n: usize,
    columns: Vec<BlockColumn>,
}

/// Host-side blocks up to this size; bigger matrices are factored blockwise.
const BLOCK: usize = 256;

impl CholeskyFactor {
    /// Right-looking blocked Cholesky: each diagonal block on the host, the panel and the
    /// trailing update (the O(n³) part) as matrix products on `a`'s device, in f64.
    pub fn new(a: &Tensor) -> Result<Self> {
        let (n, n2) = a.dims2()?;
        if n != n2 {
            return Err(LociError::input("cholesky: matrix is not square"));
        }
        let dev = a.device().clone();
        let mut rest = a.to_dtype(DType::F64)?;
        let mut columns = vec![];
        let mut start = 0;
        while start < n {
            let m = n - start;
            let b = BLOCK.min(m);
            let a11: Vec<f64> = rest
                .narrow(0, 0, b)?
                .narrow(1, 0, b)?
                .flatten_all()?
                .to_vec1()?;
            let l11 = cholesky_block(&a11, b, start)?;
            let diag_inv = invert_lower(&l11, b);
            let panel = if m > b {
                let inv_t = Tensor::from_vec(diag_inv.clone(), (b, b), &dev)?.t()?;
                let below = rest.narrow(0, b, m - b)?;
                let l21 = below
                    .narrow(1, 0, b)?
                    .contiguous()?
                    .matmul(&inv_t.contiguous()?)?;
                rest = (below.narrow(1, b, m - b)? - l21.matmul(&l21.t()?)?)?;
                Some(l21)
            } else {
                None
            };
            columns.push(BlockColumn {
                start,
                size: b,
                diag_inv,
                panel,
            });
            start += b;
        }
        Ok(Self { n, columns })
    }

    /// Solves `L Lᵀ x = b`.
    pub fn solve(&self, b: &[f64]) -> Result<Vec<f64>> {
        Ok(self.solve_many(&[b.to_vec()])?.remove(0))
    }

    /// Solves `L Lᵀ X = B` for several right-hand sides at once: each block's panel product
    /// takes all of them, so a GPU sees one product and one transfer per block, not per vector.
    pub fn solve_many(&self, bs: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
        let r = bs.len();
        if r == 0 {
            return Ok(vec![]);
        }
        if bs.iter().any(|b| b.len() != self.n) {
            return Err(LociError::input(
                "cholesky solve: vector of the wrong length",
            ));
        }
        // Row-major [n, r]: row i holds element i of every right-hand side.
        let mut y = vec![0f64; self.n * r];
        for (j, b) in bs.iter().enumerate() {
            for (i, v) in b.iter().enumerate() {
                y[i * r + j] = *v;
            }
        }
        // `inv` (size²) or its transpose times the block's rows of `v` ([size, r]).
        let block_product = |inv: &[f64], size: usize, v: &[f64], transpose: bool| -> Vec<f64> {
            let mut out = vec![0f64; size * r];
            for i in 0..size {
                for k in 0..size {
                    let e = if transpose {
                        inv[k * size + i]
                    } else {
                        inv[i * size + k]
                    };
                    if e != 0.0 {
                        for j in 0..r {
                            out[i * r + j] += e * v[k * r + j];
                        }
                    }
                }
            }
            out
        };
        let on_device = |v: &[f64], rows: usize, panel: &Tensor| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, (rows, r), panel.device())?)
        };
        // L Y = B, one block column at a time.
        for c in &self.columns {
            let (lo, hi) = (c.start * r, (c.start + c.size) * r);
            let yk = block_product(&c.diag_inv, c.size, &y[lo..hi], false);
            y[lo..hi].copy_from_slice(&yk);
            if let Some(p) = &c.panel {
                let upd: Vec<f64> = p
                    .matmul(&on_device(&yk, c.size, p)?)?
                    .flatten_all()?
                    .to_vec1()?;
                for (yi, u) in y[hi..].iter_mut().zip(upd) {
                    *yi -= u;
                }
            }
        }
        // Lᵀ X = Y, backwards.
        let mut x = y;
        for c in self.columns.iter().rev() {
            let (lo, hi) = (c.start * r, (c.start + c.size) * r);
            let mut t = x[lo..hi].to_vec();
            if let Some(p) = &c.panel {
                let below = on_device(&x[hi..], self.n - c.start - c.size, p)?;
                let upd: Vec<f64> = p.t()?.matmul(&below)?.flatten_all()?.to_vec1()?;
                for (ti, u) in t.iter_mut().zip(upd) {
                    *ti -= u;
                }
            }
            let xk = block_product(&c.diag_inv, c.size, &t, true);
            x[lo..hi].copy_from_slice(&xk);
        }
        Ok((0..r)
            .map(|j| (0..self.n).map(|i| x[i * r + j]).collect())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_blocked_factor_solves_like_the_plain_one() {
        // A random SPD matrix bigger than a block: B Bᵀ + n I.
        let n = BLOCK * 2 + 37;
        let mut rng = crate::rng::SplitMix64::new(7);
        let bm: Vec<f64> = (0..n * n).map(|_| rng.next_f64() - 0.5).collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| bm[i * n + k] * bm[j * n + k]).sum::<f64>()
                    + if i == j { n as f64 } else { 0.0 };
            }
        }
        let rhs: Vec<f64> = (0..n).map(|i| (i as f64).sin()).collect();
        let want = cholesky_solve(&cholesky(&a, n).unwrap(), n, &rhs);
        let f =
            CholeskyFactor::new(&Tensor::from_slice(&a, (n, n), &Device::Cpu).unwrap()).unwrap();
        let got = f.solve(&rhs).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9 * w.abs().max(1.0), "{g} vs {w}");
        }
        // Several right-hand sides at once give each one's solution.
        let rhs2: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).cos() * 3.0).collect();
        let want2 = cholesky_solve(&cholesky(&a, n).unwrap(), n, &rhs2);
        let both = f.solve_many(&[rhs.clone(), rhs2]).unwrap();
        for (got, want) in both.iter().zip([&want, &want2]) {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-9 * w.abs().max(1.0), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn solves_a_spd_system_and_refuses_a_singular_one() {
        let a = [4.0, 2.0, 0.6, 2.0, 5.0, 1.0, 0.6, 1.0, 3.0];
        let l = cholesky(&a, 3).unwrap();
        let x = cholesky_solve(&l, 3, &[1.0, 2.0, 3.0]);
        for i in 0..3 {
            let r: f64 = (0..3).map(|k| a[i * 3 + k] * x[k]).sum();
            assert!((r - [1.0, 2.0, 3.0][i]).abs() < 1e-12);
        }
        let singular = [1.0, 1.0, 1.0, 1.0];
        assert!(
            CholeskyFactor::new(&Tensor::from_slice(&singular, (2, 2), &Device::Cpu).unwrap())
                .is_err()
        );
        assert!(cholesky(&singular, 2)
            .unwrap_err()
            .to_string()
            .contains("singular"));
    }
}
