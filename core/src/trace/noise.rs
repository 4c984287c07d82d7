//! How strong tracing's corruption is: the noise spec of a trace request, and the subject
//! embeddings' standard deviation that relative noise is measured in (docs/tracing.md#the-noise).
//! The noise hooks themselves are `hooks::noise`.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::rng::SplitMix64;

/// How strong the noise is.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum NoiseSpec {
    /// Gaussian, σ = factor × the standard deviation of subject-token embeddings (ROME's "s3").
    Relative(f64),
    /// Gaussian with a fixed σ (ROME's figures: GPT-2 XL 0.1, GPT-J 0.025).
    Fixed(f64),
    /// Uniform in [−x, x] (ROME's `u<x>`).
    Uniform(f64),
}

impl Default for NoiseSpec {
    fn default() -> Self {
        NoiseSpec::Relative(3.0)
    }
}

impl std::str::FromStr for NoiseSpec {
    type Err = LociError;
    /// `3x` (relative), `0.1` (fixed σ), `u0.1` (uniform).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || LociError::input(format!("noise {s:?}: use e.g. 3x, 0.1 or u0.1"));
        let v = if let Some(f) = s.strip_suffix('x') {
            NoiseSpec::Relative(f.parse().map_err(|_| bad())?)
        } else if let Some(u) = s.strip_prefix('u') {
            NoiseSpec::Uniform(u.parse().map_err(|_| bad())?)
        } else {
            NoiseSpec::Fixed(s.parse().map_err(|_| bad())?)
        };
        let x = match v {
            NoiseSpec::Relative(x) | NoiseSpec::Fixed(x) | NoiseSpec::Uniform(x) => x,
        };
        if !x.is_finite() || x <= 0.0 {
            return Err(bad());
        }
        Ok(v)
    }
}

impl NoiseSpec {
    /// The noise scale in embedding units, given the model's subject-embedding std.
    pub fn scale(&self, embedding_std: Option<f64>) -> Result<f64> {
        match self {
            NoiseSpec::Relative(f) => embedding_std.map(|s| f * s).ok_or_else(|| {
                LociError::input("relative noise needs the embedding standard deviation")
            }),
            NoiseSpec::Fixed(x) | NoiseSpec::Uniform(x) => Ok(*x),
        }
    }

    /// `[samples, n_tokens, d]` noise, drawn in C order from a fresh generator seeded with `seed`,
    /// so every cell of a trace sees the same corruption.
    pub fn draw(
        &self,
        scale: f64,
        samples: usize,
        n_tokens: usize,
        d: usize,
        seed: u64,
    ) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let n = samples * n_tokens * d;
        match self {
            NoiseSpec::Uniform(_) => (0..n)
                .map(|_| (scale * (2.0 * rng.next_f64() - 1.0)) as f32)
                .collect(),
            _ => (0..n)
                .map(|_| (scale * rng.next_gaussian()) as f32)
                .collect(),
        }
    }
}

/// The standard deviation (unbiased) of all elements of the token embeddings of `subjects`, each
/// tokenized alone — ROME's `collect_embedding_std`.
pub fn embedding_std<S: AsRef<str>>(lm: &LoadedModel, subjects: &[S]) -> Result<f64> {
    let mut ids = Vec::new();
    for s in subjects {
        ids.extend(lm.tokenizer.encode(s.as_ref())?);
    }
    if ids.is_empty() {
        return Err(LociError::input(
            "no subject tokens to estimate the noise from",
        ));
    }
    let t = Tensor::new(ids.as_slice(), &lm.model.device)?;
    let e = lm
        .model
        .wte
        .index_select(&t, 0)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    let n = e.dim(0)? as f64;
    let mean = e.mean_all()?.to_scalar::<f64>()?;
    let ss = e.affine(1.0, -mean)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((ss / (n - 1.0)).sqrt())
}
