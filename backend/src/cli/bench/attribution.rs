//! `loci bench trace --attribution N`: exact causal tracing and attribution patching of the
//! same known facts, in one run — how much faster the estimate is, and how well it follows
//! (per kind, Pearson's r between the two grids' cell effects, fact by fact).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Result};
use loci_core::study::regress::pearson;
use loci_core::trace::{NoiseSpec, Quiet, TraceKind, TraceRequest};
use loci_core::LoadedModel;
use serde::Serialize;

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

/// Trace requests with `base`'s settings and a fixed noise σ for the bundled known facts `lm`
/// predicts right, in the file's order (an error where a prediction fails).
pub(super) fn known_requests<'a>(
    lm: &'a LoadedModel,
    base: &'a TraceRequest,
    sigma: f64,
) -> impl Iterator<Item = Result<TraceRequest>> + 'a {
    crate::workspace::bundled_facts()
        .into_iter()
        .filter_map(move |f| match lm.predict(&f.prompt, 1) {
            Ok(p) if p.top[0].token.trim() == f.attribute.trim() => Some(Ok(TraceRequest {
                prompt: f.prompt,
                subject: f.subject,
                noise: NoiseSpec::Fixed(sigma),
                ..base.clone()
            })),
            Ok(_) => None,
            Err(e) => Some(Err(e.into())),
        })
}

/// Traces the first `n` bundled known facts `lm` predicts right both ways, with `base`'s
/// settings (kinds, samples, window) and tracing's default noise.
pub fn run(
    lm: &LoadedModel,
    base: &TraceRequest,
    n: usize,
    workers: usize,
) -> Result<AttributionBench> {
    let (mut exact_seconds, mut attribution_seconds) = (0.0, 0.0);
    let mut rs: BTreeMap<TraceKind, Vec<f64>> = BTreeMap::new();
    let mut facts = 0;
    let noise_sigma = 3.0 * crate::workspace::cached_embedding_std(lm, None)?;
    for req in known_requests(lm, base, noise_sigma) {
        if facts == n {
            break;
        }
        let req = req?;
        // A fact tracing refuses (say, a subject the tokenizer splits oddly) is skipped.
        let s = Instant::now();
        let Ok(exact) = lm.trace(&req, None, &mut Quiet, workers) else {
            continue;
        };
        exact_seconds += s.elapsed().as_secs_f64();
        let s = Instant::now();
        let atp = lm.trace_attribution(&req, None, &mut Quiet)?;
        attribution_seconds += s.elapsed().as_secs_f64();
        for &kind in &req.kinds {
            if let Some(c) = pearson(&exact.cell_effects(kind), &atp.cell_effects(kind)) {
                rs.entry(kind).or_default().push(c.r);
            }
        }
        facts += 1;
    }
    if facts == 0 {
        bail!("the model predicts none of the bundled known facts");
    }
    let by_kind = |f: fn(&[f64]) -> f64| -> BTreeMap<String, f64> {
        rs.iter()
            .map(|(k, v)| (k.name().to_string(), f(v)))
            .collect()
    };
    Ok(AttributionBench {
        facts,
        noise_sigma,
        exact_seconds,
        attribution_seconds,
        speedup: exact_seconds / attribution_seconds.max(1e-9),
        pearson_mean: by_kind(|v| v.iter().sum::<f64>() / v.len() as f64),
        pearson_min: by_kind(|v| v.iter().copied().fold(f64::INFINITY, f64::min)),
    })
}
