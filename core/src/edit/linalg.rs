//! The little dense linear algebra ROME needs, in f64 on the host: Cholesky factor and solve.

use crate::error::{LociError, Result};

/// Lower-triangular `L` with `A = L Lᵀ`, for a symmetric positive-definite row-major `a` (n × n).
pub fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>> {
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
                "the key covariance is singular (pivot {j} is {d:.3e}); collect statistics over more tokens"
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(cholesky(&singular, 2)
            .unwrap_err()
            .to_string()
            .contains("singular"));
    }
}
