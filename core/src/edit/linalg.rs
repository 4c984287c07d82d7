//! The little dense linear algebra the editors need, in f64: Cholesky factor and solve, and a
//! symmetric eigen-decomposition (AlphaEdit's null space). Small blocks
//! are factored on the host; the big products of a recursive factorisation run on the device, so
//! a GPT-J key covariance (16384²) factors in a fraction of a second on a GPU.

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

/// `a · b` with four running sums, so the compiler can keep them in vector lanes.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// The inverse of a lower-triangular row-major `l` (n × n), itself lower-triangular: column j
/// by forward substitution, reading rows of `l` and the column so far contiguously.
fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
    let mut inv = vec![0f64; n * n];
    let mut col = vec![0f64; n];
    for j in 0..n {
        // col[i - j] holds inv[i, j].
        col[0] = 1.0 / l[j * n + j];
        for i in j + 1..n {
            col[i - j] = -dot(&l[i * n + j..i * n + i], &col[..i - j]) / l[i * n + i];
        }
        for i in j..n {
            inv[i * n + j] = col[i - j];
        }
    }
    inv
}

/// Blocks up to this size are factored on the host; above it, the factor recurses on halves
/// whose products run on the matrix's device.
const LEAF: usize = 64;

/// `A = L Lᵀ` of a symmetric positive-definite matrix, kept as `L⁻¹` on `A`'s device: a solve is
/// two matrix products there, for any number of right-hand sides at once.
#[derive(Debug)]
pub struct CholeskyFactor {
    n: usize,
    /// `L⁻¹`, `[n, n]` f64, lower-triangular.
    inv: Tensor,
}

impl CholeskyFactor {
    /// Recursive Cholesky that yields `L⁻¹` directly: with `A = [A₁₁ ·; A₂₁ A₂₂]`,
    /// `L₂₁ = A₂₁ L₁₁⁻ᵀ`, `L₂₂` from `A₂₂ − L₂₁ L₂₁ᵀ`, and `(L⁻¹)₂₁ = −L₂₂⁻¹ L₂₁ L₁₁⁻¹`. All the
    /// O(n³) work is matrix products on the device (a GPT-J covariance, 16384², in f64 on a GPU:
    /// a few large GEMMs); only 64² leaves visit the host.
    pub fn new(a: &Tensor) -> Result<Self> {
        let (n, n2) = a.dims2()?;
        if n != n2 {
            return Err(LociError::input("cholesky: matrix is not square"));
        }
        let inv = factor_inverse(&a.to_dtype(DType::F64)?, 0)?;
        Ok(Self { n, inv })
    }

    /// Solves `L Lᵀ x = b`.
    pub fn solve(&self, b: &[f64]) -> Result<Vec<f64>> {
        Ok(self.solve_many(&[b.to_vec()])?.remove(0))
    }

    /// Solves `L Lᵀ X = B` for several right-hand sides at once: `X = L⁻ᵀ (L⁻¹ B)`, one upload and
    /// one read-back for all of them.
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
        let flat: Vec<f64> = bs.iter().flatten().copied().collect();
        let b = Tensor::from_vec(flat, (r, self.n), self.inv.device())?.t()?;
        for _ in 0..2 {
            crate::flops::matmul(self.n, r, self.n);
        }
        let x = self.inv.t()?.matmul(&self.inv.matmul(&b)?)?;
        let x: Vec<f64> = x.t()?.contiguous()?.flatten_all()?.to_vec1()?;
        Ok(x.chunks_exact(self.n).map(<[f64]>::to_vec).collect())
    }
}

/// `L⁻¹` of SPD `a` (f64, `[n, n]`), whose first row is row `offset` of the whole matrix (for
/// the message that names a failing pivot).
fn factor_inverse(a: &Tensor, offset: usize) -> Result<Tensor> {
    let n = a.dim(0)?;
    let dev = a.device();
    if n <= LEAF {
        let host: Vec<f64> = a.flatten_all()?.to_vec1()?;
        // The factor and the triangle's inverse: n³/3 multiply-adds each.
        crate::flops::add(4 * (n as u64).pow(3) / 3);
        let l = cholesky_block(&host, n, offset)?;
        return Ok(Tensor::from_vec(invert_lower(&l, n), (n, n), dev)?);
    }
    // A leaf-aligned split keeps every leaf full-sized but the last.
    let h = (n / 2).div_ceil(LEAF) * LEAF;
    let m = n - h;
    let block = |r: usize, c: usize, rows: usize, cols: usize| -> Result<Tensor> {
        Ok(a.narrow(0, r, rows)?.narrow(1, c, cols)?.contiguous()?)
    };
    let i11 = factor_inverse(&block(0, 0, h, h)?, offset)?;
    // l21, its Gram matrix, then l21·i11 and i22 times that.
    crate::flops::matmul(m, h, h);
    crate::flops::matmul(m, m, h);
    crate::flops::matmul(m, h, h);
    crate::flops::matmul(m, h, m);
    let l21 = block(h, 0, m, h)?.matmul(&i11.t()?)?;
    let schur = (block(h, h, m, m)? - l21.matmul(&l21.t()?)?)?;
    let i22 = factor_inverse(&schur, offset + h)?;
    drop(schur);
    let i21 = i22.matmul(&l21.matmul(&i11)?)?.neg()?;
    drop(l21);
    let top = Tensor::cat(&[&i11, &Tensor::zeros((h, m), DType::F64, dev)?], 1)?;
    drop(i11);
    let bottom = Tensor::cat(&[&i21, &i22], 1)?;
    Ok(Tensor::cat(&[&top, &bottom], 0)?)
}

/// The eigen-decomposition of a symmetric matrix: `A = V diag(values) Vᵀ`.
#[derive(Debug)]
pub struct SymmetricEigen {
    /// The eigenvalues, ascending.
    pub values: Vec<f64>,
    /// `[n, n]` row-major: column `j` is the unit eigenvector of `values[j]`.
    pub vectors: Vec<f64>,
}

/// The eigen-decomposition of symmetric row-major `a` (n × n), by faer's Householder
/// tridiagonalisation and divide and conquer (about 9n³ flops; 0.7 s at n = 1536 on one core).
pub fn symmetric_eigen(a: &[f64], n: usize) -> Result<SymmetricEigen> {
    if a.len() != n * n {
        return Err(LociError::input("eigen-decomposition: matrix is not n × n"));
    }
    if a.iter().any(|x| !x.is_finite()) {
        return Err(LociError::input(
            "eigen-decomposition: the matrix has NaN or infinite entries",
        ));
    }
    crate::flops::add(9 * (n as u64).pow(3));
    // Only the lower triangle is read; averaging with the upper keeps a matrix that is
    // symmetric up to rounding from depending on which half was rounded.
    let m = faer::Mat::<f64>::from_fn(n, n, |i, j| 0.5 * (a[i * n + j] + a[j * n + i]));
    let eig = m
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| LociError::model(format!("eigen-decomposition failed: {e:?}")))?;
    let (s, u) = (eig.S(), eig.U());
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| s[i].total_cmp(&s[j]));
    let values = order.iter().map(|&j| s[j]).collect();
    let mut vectors = vec![0f64; n * n];
    for (col, &j) in order.iter().enumerate() {
        for i in 0..n {
            vectors[i * n + col] = u[(i, j)];
        }
    }
    Ok(SymmetricEigen { values, vectors })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_eigen_decomposition_reconstructs_the_matrix() {
        let n = 40;
        let mut rng = crate::rng::SplitMix64::new(9);
        let b: Vec<f64> = (0..n * n).map(|_| rng.next_f64() - 0.5).collect();
        let a: Vec<f64> = (0..n * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                0.5 * (b[i * n + j] + b[j * n + i])
            })
            .collect();
        let e = symmetric_eigen(&a, n).unwrap();
        assert!(e.values.windows(2).all(|w| w[0] <= w[1]), "ascending");
        for (j, &lambda) in e.values.iter().enumerate() {
            let v: Vec<f64> = (0..n).map(|i| e.vectors[i * n + j]).collect();
            assert!((dot(&v, &v) - 1.0).abs() < 1e-12, "unit length");
            for i in 0..n {
                let av = dot(&a[i * n..(i + 1) * n], &v);
                assert!((av - lambda * v[i]).abs() < 1e-10, "A v = λ v, row {i}");
            }
        }
        assert!(symmetric_eigen(&[1.0, f64::NAN, f64::NAN, 1.0], 2).is_err());
    }

    #[test]
    fn the_recursive_factor_solves_like_the_plain_one() {
        // A random SPD matrix bigger than a block: B Bᵀ + n I.
        let n = LEAF * 5 + 37;
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
        // Deep in the recursion, the message names the pivot in the whole matrix.
        let n = LEAF * 2 + 5;
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            a[i * n + i] = if i == LEAF + 3 { 0.0 } else { 1.0 };
        }
        let err = CholeskyFactor::new(&Tensor::from_slice(&a, (n, n), &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("pivot {}", LEAF + 3)), "{err}");
    }

    #[test]
    fn the_inverse_of_a_lower_triangle_undoes_it() {
        let n = 37;
        let mut rng = crate::rng::SplitMix64::new(3);
        let mut l = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                l[i * n + j] = if i == j {
                    1.0 + rng.next_f64()
                } else {
                    rng.next_f64() - 0.5
                };
            }
        }
        let inv = invert_lower(&l, n);
        for i in 0..n {
            for j in 0..n {
                let p: f64 = (0..n).map(|k| l[i * n + k] * inv[k * n + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((p - want).abs() < 1e-12, "({i},{j}): {p}");
                if j > i {
                    assert_eq!(inv[i * n + j], 0.0);
                }
            }
        }
    }
}
