//! The bundled known facts a model predicts right, traced exactly and by another localization:
//! what the benchmarks comparing a localization with exact tracing (`--attribution`,
//! `--neurons`) measure on.

use std::time::Instant;

use anyhow::{bail, Result};
use loci_core::trace::{NoiseSpec, Quiet, TraceRequest, TraceResult};
use loci_core::LoadedModel;

/// The facts traced both ways, and what each way took.
pub(super) struct BothWays {
    /// `(exact, other)` per fact, in the file's order.
    pub facts: Vec<(TraceResult, TraceResult)>,
    /// The corruption: tracing's default, 3 × the subjects' embedding standard deviation.
    pub noise_sigma: f64,
    pub exact_seconds: f64,
    pub other_seconds: f64,
}

/// The first `n` bundled known facts `lm` predicts right, each traced exactly (with `base`'s
/// settings and tracing's default noise, rows over `workers` threads) and by `other`. A fact
/// exact tracing refuses (say, a subject the tokenizer splits oddly) is skipped.
pub(super) fn both_ways(
    lm: &LoadedModel,
    base: &TraceRequest,
    (n, workers): (usize, usize),
    other: &dyn Fn(&TraceRequest) -> loci_core::Result<TraceResult>,
) -> Result<BothWays> {
    let noise_sigma = 3.0 * crate::workspace::cached_embedding_std(lm, None)?;
    let mut out = BothWays {
        facts: vec![],
        noise_sigma,
        exact_seconds: 0.0,
        other_seconds: 0.0,
    };
    for f in crate::workspace::bundled_facts() {
        if out.facts.len() == n {
            break;
        }
        if lm.predict(&f.prompt, 1)?.top[0].token.trim() != f.attribute.trim() {
            continue;
        }
        let req = TraceRequest {
            prompt: f.prompt,
            subject: f.subject,
            noise: NoiseSpec::Fixed(noise_sigma),
            ..base.clone()
        };
        let s = Instant::now();
        let Ok(exact) = lm.trace(&req, None, &mut Quiet, workers) else {
            continue;
        };
        out.exact_seconds += s.elapsed().as_secs_f64();
        let s = Instant::now();
        let traced = other(&req)?;
        out.other_seconds += s.elapsed().as_secs_f64();
        out.facts.push((exact, traced));
    }
    if out.facts.is_empty() {
        bail!("the model predicts none of the bundled known facts");
    }
    Ok(out)
}
