//! `loci bench trace --attribution N`: exact causal tracing and attribution patching of the
//! same known facts, in one run — how much faster the estimate is, and how well it follows
//! (per kind, Pearson's r between the two grids' cell effects, fact by fact).

use std::collections::BTreeMap;

use anyhow::Result;
use loci_core::study::regress::pearson;
use loci_core::trace::{Quiet, TraceKind, TraceRequest};
use loci_core::LoadedModel;
use serde::Serialize;

use super::known::both_ways;

/// The comparison over the facts traced.
#[derive(Serialize)]
pub struct AttributionBench {
    /// Facts traced both ways (the first bundled known facts the model predicts right).
    facts: usize,
    /// The corruption: tracing's default, 3 × the subjects' embedding standard deviation.
    noise_sigma: f64,
    exact_seconds: f64,
    attribution_seconds: f64,
    /// Exact tracing's seconds over attribution patching's.
    speedup: f64,
    /// Per kind, Pearson's r of the cells' effects (p − low), averaged over the facts…
    pearson_mean: BTreeMap<String, f64>,
    /// …and the lowest fact's.
    pearson_min: BTreeMap<String, f64>,
}

impl AttributionBench {
    /// One line for the terminal.
    pub fn describe(&self) -> String {
        let rs: Vec<String> = self
            .pearson_mean
            .iter()
            .map(|(k, r)| format!("{k} {r:.2} (min {:.2})", self.pearson_min[k]))
            .collect();
        format!(
            "attribution patching on {} known facts: {:.1}x faster than exact tracing ({:.1} s vs {:.1} s); Pearson r per kind {}",
            self.facts,
            self.speedup,
            self.attribution_seconds,
            self.exact_seconds,
            rs.join(", ")
        )
    }
}

/// Traces the first `n` bundled known facts `lm` predicts right both ways, with `base`'s
/// settings (kinds, samples, window) and tracing's default noise.
pub fn run(
    lm: &LoadedModel,
    base: &TraceRequest,
    n: usize,
    workers: usize,
) -> Result<AttributionBench> {
    let atp = |req: &TraceRequest| lm.trace_attribution(req, None, &mut Quiet);
    let both = both_ways(lm, base, (n, workers), &atp)?;
    let mut rs: BTreeMap<TraceKind, Vec<f64>> = BTreeMap::new();
    for (exact, atp) in &both.facts {
        for &kind in &base.kinds {
            if let Some(c) = pearson(&exact.cell_effects(kind), &atp.cell_effects(kind)) {
                rs.entry(kind).or_default().push(c.r);
            }
        }
    }
    let by_kind = |f: fn(&[f64]) -> f64| -> BTreeMap<String, f64> {
        rs.iter()
            .map(|(k, v)| (k.name().to_string(), f(v)))
            .collect()
    };
    Ok(AttributionBench {
        facts: both.facts.len(),
        noise_sigma: both.noise_sigma,
        exact_seconds: both.exact_seconds,
        attribution_seconds: both.other_seconds,
        speedup: both.exact_seconds / both.other_seconds.max(1e-9),
        pearson_mean: by_kind(|v| v.iter().sum::<f64>() / v.len() as f64),
        pearson_min: by_kind(|v| v.iter().copied().fold(f64::INFINITY, f64::min)),
    })
}
