//! How a MEMIT-family edit writes one layer (docs/memit.md#update-rules). MEMIT, EMMET and
//! AlphaEdit share everything else — the targets z, the template-averaged keys, the spread of
//! `z − h` over the layers — and differ only in the left vectors `aᵢ` of the layer's update
//! `ΔW = Σᵢ rᵢ aᵢᵀ` (rᵢ: the layer's share of request i's gap):
//!
//! - MEMIT, least squares: `A = (λC + KKᵀ)⁻¹K`, other keys keep their outputs on average.
//! - EMMET, equality constraints: `A = C⁻¹K (KᵀC⁻¹K + λμI)⁻¹`, so `aᵢ·kⱼ = δᵢⱼ` (exactly when
//!   μ = 0 or the batch is one fact): every edited key gets exactly its share.
//! - AlphaEdit, null-space projection: `A = Û (Ûᵀ(KKᵀ + K_pK_pᵀ)Û + L2·I)⁻¹ ÛᵀK`, with Û the
//!   eigenvectors of C whose eigenvalues are small (the keys the corpus almost never produces)
//!   and `K_p` the keys of earlier edits: the update is zero on every key in C's principal
//!   subspace, so what the model knew is untouched however many edits follow.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::linalg::CholeskyFactor;
use super::memit::spread_keys;
use super::saved::Edit;
use super::stats::KeyStats;
use super::EditMethod;
use crate::error::{LociError, Result};

/// Which eigen-directions of the key statistics C = E\[kkᵀ\] AlphaEdit writes into.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum NullSpace {
    /// The directions whose eigenvalue is below this (the paper: 2e-2, absolute, so it depends
    /// on the activations' scale).
    Below(f64),
    /// The smallest directions that together hold at most this fraction of C's trace (a
    /// scale-free choice, the AlphaEdit authors' suggestion for models whose spectrum sits
    /// wholly on one side of 2e-2).
    Energy(f64),
}

impl NullSpace {
    /// How many of the ascending eigenvalues `values` lie in the null space.
    pub fn rank(self, values: &[f64]) -> usize {
        match self {
            NullSpace::Below(t) => values.iter().take_while(|&&v| v < t).count(),
            NullSpace::Energy(f) => {
                let total: f64 = values.iter().map(|v| v.max(0.0)).sum();
                let mut held = 0.0;
                values
                    .iter()
                    .take_while(|&&v| {
                        held += v.max(0.0);
                        held <= f * total
                    })
                    .count()
            }
        }
    }

    fn check(self) -> Result<()> {
        match self {
            NullSpace::Below(t) if !(t > 0.0 && t.is_finite()) => Err(LociError::input(format!(
                "the null-space threshold must be a positive number, not {t}"
            ))),
            NullSpace::Energy(f) if !(f > 0.0 && f <= 1.0) => Err(LociError::input(format!(
                "the null-space energy must be in (0, 1], not {f}"
            ))),
            _ => Ok(()),
        }
    }
}

/// `"2e-2"`: eigenvalues below 0.02; `"30%"`: the directions holding 30% of the trace.
impl std::str::FromStr for NullSpace {
    type Err = LociError;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = || {
            LociError::input(format!(
                "null space {s:?}: a threshold (e.g. 2e-2) or a share of the trace (e.g. 30%)"
            ))
        };
        let ns = match s.strip_suffix('%') {
            Some(pct) => NullSpace::Energy(pct.trim().parse::<f64>().map_err(|_| bad())? / 100.0),
            None => NullSpace::Below(s.parse().map_err(|_| bad())?),
        };
        ns.check()?;
        Ok(ns)
    }
}

impl std::fmt::Display for NullSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NullSpace::Below(t) => write!(f, "eigenvalues below {t:e}"),
            NullSpace::Energy(e) => write!(f, "the smallest directions holding {e} of the trace"),
        }
    }
}

/// How a MEMIT-family edit turns a layer's keys into its update (see the module's notes).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UpdateRule {
    /// MEMIT: least squares against the corpus keys, weighted by `mom2_update_weight` (λ).
    #[default]
    LeastSquares,
    /// EMMET: every edited key's output set exactly; a ridge λ·`emmet_lambda` on the batch's
    /// n × n system when the batch has more than one fact (as the authors' code does).
    Equality {
        /// μ: the ridge, relative to λ = `mom2_update_weight` (EMMET: 0.1).
        emmet_lambda: f64,
    },
    /// AlphaEdit: the update confined to the statistics' null space, earlier edits' keys kept.
    NullSpace {
        /// Which directions are the null space (AlphaEdit: eigenvalues below 2e-2).
        null_space: NullSpace,
        /// The ridge on the projected system (AlphaEdit: 10).
        l2: f64,
    },
}

impl UpdateRule {
    /// The method this rule makes a MEMIT-family edit.
    pub fn method(&self) -> EditMethod {
        match self {
            UpdateRule::LeastSquares => EditMethod::Memit,
            UpdateRule::Equality { .. } => EditMethod::Emmet,
            UpdateRule::NullSpace { .. } => EditMethod::Alphaedit,
        }
    }

    /// Refuses settings the rule cannot use.
    pub(crate) fn check(&self) -> Result<()> {
        match *self {
            UpdateRule::LeastSquares => Ok(()),
            UpdateRule::Equality { emmet_lambda } => {
                match emmet_lambda.is_finite() && emmet_lambda >= 0.0 {
                    true => Ok(()),
                    false => Err(LociError::input(format!(
                        "emmet_lambda must be ≥ 0, not {emmet_lambda}"
                    ))),
                }
            }
            UpdateRule::NullSpace { null_space, l2 } => {
                null_space.check()?;
                if !(l2 > 0.0 && l2.is_finite()) {
                    return Err(LociError::input(format!("L2 must be positive, not {l2}")));
                }
                Ok(())
            }
        }
    }

    /// The solver of layer `layer` for a batch of `n` facts: `lambda` is `mom2_update_weight`,
    /// `preserved` the keys earlier edits asked to keep there (AlphaEdit only).
    pub(crate) fn solver<'s>(
        &self,
        stats: &'s KeyStats,
        lambda: f64,
        (layer, n): (usize, usize),
        preserved: &Preserved,
        device: &Device,
    ) -> Result<LayerSolver<'s>> {
        let d_ff = stats.provenance.d_ff;
        match *self {
            UpdateRule::LeastSquares => Ok(LayerSolver::Whitened {
                factor: stats.factor(device)?,
                ridge: lambda,
                equality: false,
            }),
            UpdateRule::Equality { emmet_lambda } => {
                if n > d_ff {
                    return Err(LociError::input(format!(
                        "EMMET's equality constraints need the batch's keys to be independent: \
                         {n} facts need rank {n}, but layer {layer}'s keys have {d_ff} dimensions"
                    )));
                }
                let ridge = if n > 1 { lambda * emmet_lambda } else { 0.0 };
                Ok(LayerSolver::Whitened {
                    factor: stats.factor(device)?,
                    ridge,
                    equality: true,
                })
            }
            UpdateRule::NullSpace { null_space, l2 } => {
                let eigen = stats.eigen()?;
                let rank = null_space.rank(&eigen.values);
                if rank == 0 {
                    return Err(LociError::input(format!(
                        "AlphaEdit: {null_space} leaves no null space at layer {layer} (the \
                         smallest eigenvalue of its key statistics is {:.3e}); raise the threshold",
                        eigen.values[0]
                    )));
                }
                if n > rank {
                    return Err(LociError::input(format!(
                        "AlphaEdit: {n} facts need a null space of rank {n}, but {null_space} \
                         leaves rank {rank} at layer {layer}; raise the threshold or split the batch"
                    )));
                }
                let cols: Vec<f64> = eigen
                    .vectors
                    .chunks_exact(d_ff)
                    .flat_map(|row| row[..rank].iter().copied())
                    .collect();
                let basis = Tensor::from_vec(cols, (d_ff, rank), device)?;
                let mut base = (Tensor::eye(rank, DType::F64, device)? * l2)?;
                if let Some(kp) = preserved.matrix(layer, d_ff, device)? {
                    let bp = kp.matmul(&basis)?;
                    crate::flops::matmul(kp.dim(0)?, rank, d_ff);
                    crate::flops::matmul(rank, rank, kp.dim(0)?);
                    base = (base + bp.t()?.matmul(&bp)?)?;
                }
                Ok(LayerSolver::Projected { basis, base, rank })
            }
        }
    }
}

/// One layer's solver: turns the batch's keys into the update's left vectors.
pub(crate) enum LayerSolver<'s> {
    /// MEMIT and EMMET: `C⁻¹K (ridge·I + KᵀC⁻¹K)⁻¹` with C's cached Cholesky factor.
    Whitened {
        factor: &'s CholeskyFactor,
        ridge: f64,
        /// EMMET: a failed n × n factor means dependent keys, not a bad covariance.
        equality: bool,
    },
    /// AlphaEdit: the null space's basis Û (`[d_ff, rank]` f64) and `ÛᵀK_pK_pᵀÛ + L2·I`.
    Projected {
        basis: Tensor,
        base: Tensor,
        rank: usize,
    },
}

impl LayerSolver<'_> {
    /// The left vectors `aᵢ` (each `d_ff`) of the keys `kᵢ` at `layer`.
    pub(crate) fn lefts(&self, keys: &[Vec<f64>], layer: usize) -> Result<Vec<Vec<f64>>> {
        match self {
            LayerSolver::Whitened {
                factor,
                ridge,
                equality,
            } => {
                let dependent = |why: String| {
                    LociError::input(format!(
                        "EMMET: the batch's keys at layer {layer} are not independent, so its \
                         equality constraints cannot all hold (repeated subjects?); split the \
                         batch or set emmet_lambda ({why})"
                    ))
                };
                let lefts = spread_keys(factor, keys, *ridge).map_err(|e| match (equality, e) {
                    (true, LociError::Input(why)) => dependent(why),
                    (_, e) => e,
                })?;
                // Without a ridge the constraints must hold: aᵢ · kⱼ = δᵢⱼ. Nearly dependent
                // keys can pass the factor with a tiny positive pivot and a useless update.
                if *equality && *ridge == 0.0 {
                    let worst = constraint_error(&lefts, keys);
                    if worst.is_nan() || worst >= 1e-4 {
                        return Err(dependent(format!("aᵢ·kⱼ misses δᵢⱼ by {worst:.1e}")));
                    }
                }
                Ok(lefts)
            }
            LayerSolver::Projected { basis, base, rank } => {
                let (n, d) = (keys.len(), basis.dim(0)?);
                let flat: Vec<f64> = keys.iter().flatten().copied().collect();
                let k = Tensor::from_vec(flat, (n, d), basis.device())?;
                // B = KÛ: the keys' coordinates in the null space.
                let b = k.matmul(basis)?;
                crate::flops::matmul(n, *rank, d);
                crate::flops::matmul(*rank, *rank, n);
                let system = (base + b.t()?.matmul(&b)?)?;
                let coords = CholeskyFactor::new(&system)?
                    .solve_many(&b.to_vec2::<f64>()?)?
                    .into_iter()
                    .flatten()
                    .collect();
                let coords = Tensor::from_vec(coords, (n, *rank), basis.device())?;
                crate::flops::matmul(n, d, *rank);
                Ok(coords.matmul(&basis.t()?)?.to_vec2::<f64>()?)
            }
        }
    }
}

/// The largest |aᵢ · kⱼ − δᵢⱼ|: how far left vectors miss EMMET's equality constraints.
fn constraint_error(lefts: &[Vec<f64>], keys: &[Vec<f64>]) -> f64 {
    let mut worst = 0f64;
    for (i, a) in lefts.iter().enumerate() {
        for (j, k) in keys.iter().enumerate() {
            let dot: f64 = a.iter().zip(k).map(|(x, y)| x * y).sum();
            let want = if i == j { 1.0 } else { 0.0 };
            worst = worst.max((dot - want).abs());
        }
    }
    worst
}

/// The keys that earlier edits ask later ones to keep, by layer (AlphaEdit's `K_p`: each
/// AlphaEdit edit records its facts' keys as the edited model reads them).
#[derive(Default)]
pub struct Preserved<'a> {
    by_layer: BTreeMap<usize, Vec<&'a [f32]>>,
}

impl<'a> Preserved<'a> {
    /// The keys recorded by `edits` (those applied before the one to compute).
    pub fn of(edits: impl IntoIterator<Item = &'a Edit>) -> Self {
        let mut by_layer: BTreeMap<usize, Vec<&'a [f32]>> = BTreeMap::new();
        for e in edits {
            if let Edit::Memit(m) = e {
                for l in m.layers.iter().filter(|l| !l.keys.is_empty()) {
                    by_layer.entry(l.layer).or_default().push(&l.keys);
                }
            }
        }
        Self { by_layer }
    }

    /// Keys gathered by layer (flat `[keys, d_ff]`; see [`Preserved::gather`]), as a long
    /// sequence keeps them instead of every edit.
    pub fn of_keys(keys: &'a BTreeMap<usize, Vec<f32>>) -> Self {
        let by_layer = keys.iter().map(|(l, k)| (*l, vec![k.as_slice()])).collect();
        Self { by_layer }
    }

    /// Appends the keys `edit` records (an AlphaEdit edit's; none for others) to `keys`.
    pub fn gather(keys: &mut BTreeMap<usize, Vec<f32>>, edit: &Edit) {
        if let Edit::Memit(m) = edit {
            for l in m.layers.iter().filter(|l| !l.keys.is_empty()) {
                keys.entry(l.layer).or_default().extend_from_slice(&l.keys);
            }
        }
    }

    /// How many keys are kept at `layer`, for keys `d_ff` wide.
    pub fn count(&self, layer: usize, d_ff: usize) -> usize {
        self.by_layer
            .get(&layer)
            .map_or(0, |v| v.iter().map(|k| k.len() / d_ff).sum())
    }

    /// `[keys, d_ff]` f64 of `layer`'s kept keys, or None when there are none.
    fn matrix(&self, layer: usize, d_ff: usize, device: &Device) -> Result<Option<Tensor>> {
        let count = self.count(layer, d_ff);
        let Some(parts) = self.by_layer.get(&layer).filter(|_| count > 0) else {
            return Ok(None);
        };
        if parts.iter().any(|k| k.len() % d_ff != 0) {
            return Err(LociError::input(format!(
                "an earlier edit's keys at layer {layer} are not {d_ff} wide"
            )));
        }
        let flat: Vec<f64> = parts
            .iter()
            .flat_map(|k| k.iter())
            .map(|&x| x as f64)
            .collect();
        Ok(Some(Tensor::from_vec(flat, (count, d_ff), device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// A random SPD `d × d` matrix with eigenvalues spread over four decades.
    fn spd(d: usize, rng: &mut SplitMix64) -> Vec<f64> {
        let b: Vec<f64> = (0..d * d).map(|_| rng.next_f64() - 0.5).collect();
        let mut c = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] = (0..d)
                    .map(|k| b[i * d + k] * b[j * d + k] * 10f64.powi(k as i32 % 4 - 2))
                    .sum();
            }
        }
        c
    }

    fn stats(c: &[f64], d: usize) -> KeyStats {
        let mom2 =
            Tensor::from_vec(c.iter().map(|&x| x as f32).collect(), (d, d), &Device::Cpu).unwrap();
        KeyStats::for_tests(mom2)
    }

    fn keys(n: usize, d: usize, rng: &mut SplitMix64) -> Vec<Vec<f64>> {
        (0..n)
            .map(|_| (0..d).map(|_| rng.next_f64() * 2.0 - 1.0).collect())
            .collect()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn emmet_writes_each_key_exactly_its_share() {
        let (d, n) = (24, 4);
        let mut rng = SplitMix64::new(11);
        let st = stats(&spd(d, &mut rng), d);
        let k = keys(n, d, &mut rng);
        let rule = UpdateRule::Equality { emmet_lambda: 0.0 };
        let solver = rule
            .solver(&st, 5.0, (0, n), &Preserved::default(), &Device::Cpu)
            .unwrap();
        let a = solver.lefts(&k, 0).unwrap();
        for (i, ai) in a.iter().enumerate() {
            for (j, kj) in k.iter().enumerate() {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot(ai, kj) - want).abs() < 1e-6, "a{i}·k{j}");
            }
        }
        // Repeated keys cannot all be met: refused, naming the cause.
        let twice = vec![k[0].clone(), k[0].clone()];
        let err = solver.lefts(&twice, 0).unwrap_err().to_string();
        assert!(err.contains("not independent"), "{err}");
        let wide = rule.solver(&st, 5.0, (3, d + 1), &Preserved::default(), &Device::Cpu);
        assert!(wide.err().unwrap().to_string().contains("need rank 25"));
    }

    #[test]
    fn alphaedit_never_touches_the_preserved_directions() {
        let (d, n) = (32, 3);
        let mut rng = SplitMix64::new(5);
        let c = spd(d, &mut rng);
        let st = stats(&c, d);
        let eigen = st.eigen().unwrap();
        let ns = NullSpace::Below(eigen.values[d / 2]);
        let rank = ns.rank(&eigen.values);
        assert_eq!(rank, d / 2);
        let earlier: Vec<f32> = keys(2, d, &mut rng)
            .into_iter()
            .flatten()
            .map(|x| x as f32)
            .collect();
        let mut preserved = Preserved::default();
        preserved.by_layer.insert(0, vec![&earlier]);
        let rule = UpdateRule::NullSpace {
            null_space: ns,
            l2: 0.5,
        };
        let solver = rule
            .solver(&st, 1.0, (0, n), &preserved, &Device::Cpu)
            .unwrap();
        let k = keys(n, d, &mut rng);
        let a = solver.lefts(&k, 0).unwrap();
        // Every eigenvector at or above the threshold: aᵢ·v = 0.
        for col in rank..d {
            let v: Vec<f64> = (0..d).map(|i| eigen.vectors[i * d + col]).collect();
            for ai in &a {
                let norm = dot(ai, ai).sqrt();
                assert!(dot(ai, &v).abs() < 1e-9 * norm, "direction {col}");
            }
        }
        // The solve: (Ûᵀ(KKᵀ + K_pK_pᵀ)Û + L2·I) Ûᵀaᵢ = Ûᵀkᵢ.
        let u = |j: usize| -> Vec<f64> { (0..d).map(|i| eigen.vectors[i * d + j]).collect() };
        let all: Vec<Vec<f64>> = k
            .iter()
            .cloned()
            .chain(
                earlier
                    .chunks(d)
                    .map(|r| r.iter().map(|&x| x as f64).collect()),
            )
            .collect();
        for (ai, ki) in a.iter().zip(&k) {
            let x: Vec<f64> = (0..rank).map(|j| dot(&u(j), ai)).collect();
            for p in 0..rank {
                let up = u(p);
                let lhs: f64 = (0..rank)
                    .map(|q| {
                        let m: f64 = all.iter().map(|kk| dot(kk, &up) * dot(kk, &u(q))).sum();
                        (m + if p == q { 0.5 } else { 0.0 }) * x[q]
                    })
                    .sum();
                let rhs = dot(&up, ki);
                assert!(
                    (lhs - rhs).abs() < 1e-8 * (1.0 + rhs.abs()),
                    "{lhs} vs {rhs}"
                );
            }
        }
        // Too big a batch for the space, and a threshold that leaves none, are refused.
        let big = rule.solver(&st, 1.0, (2, rank + 1), &preserved, &Device::Cpu);
        assert!(big
            .err()
            .unwrap()
            .to_string()
            .contains("need a null space of rank"));
        let none = UpdateRule::NullSpace {
            null_space: NullSpace::Below(eigen.values[0] * 0.5),
            l2: 1.0,
        };
        let err = none.solver(&st, 1.0, (0, 1), &preserved, &Device::Cpu);
        assert!(err
            .err()
            .unwrap()
            .to_string()
            .contains("leaves no null space"));
    }

    #[test]
    fn the_energy_rule_counts_the_smallest_directions() {
        let values = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(NullSpace::Energy(0.1).rank(&values), 2);
        assert_eq!(NullSpace::Energy(0.3).rank(&values), 3);
        assert_eq!(NullSpace::Below(2.5).rank(&values), 3);
        assert!(NullSpace::Energy(1.5).check().is_err());
        assert_eq!("2e-2".parse::<NullSpace>().unwrap(), NullSpace::Below(0.02));
        assert_eq!(
            " 30 %".parse::<NullSpace>().unwrap(),
            NullSpace::Energy(0.3)
        );
        assert!("150%".parse::<NullSpace>().is_err());
        assert!("lots".parse::<NullSpace>().is_err());
        assert!(NullSpace::Below(f64::NAN).check().is_err());
    }
}
