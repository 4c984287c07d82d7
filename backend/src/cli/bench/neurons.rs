//! `loci bench trace --neurons N`: Hase et al.'s whole-answer MLP trace and knowledge neurons
//! of the same known facts, in one run — their costs, and how well the neurons' per-layer
//! effect follows tracing's (Spearman's ρ per fact, over layers, the way the study joins
//! them: at the best token, and at the subject's last).

use anyhow::Result;
use loci_core::study::regress::spearman;
use loci_core::trace::{Quiet, TraceKind, TraceMethod, TraceRequest, TraceResult};
use loci_core::LoadedModel;
use serde::Serialize;

use super::known::both_ways;

/// The comparison over the facts localised both ways.
#[derive(Serialize)]
pub struct NeuronsBench {
    /// Facts localised both ways (the first bundled known facts the model predicts right).
    facts: usize,
    /// The tracing's corruption: 3 × the subjects' embedding standard deviation.
    noise_sigma: f64,
    /// Points of the integrated-gradient path.
    steps: usize,
    exact_seconds: f64,
    neurons_seconds: f64,
    /// Per fact, Spearman's ρ over layers of the two per-layer effects (max over tokens), its
    /// mean over the facts and the lowest…
    spearman_mean: f64,
    spearman_min: f64,
    /// …and the same at the subject's last token.
    spearman_subject_last_mean: f64,
    /// Knowledge neurons found per fact, on average.
    neurons_per_fact: f64,
}

impl NeuronsBench {
    /// One line for the terminal.
    pub fn describe(&self) -> String {
        format!(
            "knowledge neurons on {} known facts: {:.1} s vs exact MLP tracing's {:.1} s; Spearman ρ of the per-layer effects {:.2} (min {:.2}), at the subject's last token {:.2}; {:.1} neurons per fact",
            self.facts,
            self.neurons_seconds,
            self.exact_seconds,
            self.spearman_mean,
            self.spearman_min,
            self.spearman_subject_last_mean,
            self.neurons_per_fact
        )
    }
}

/// Localises the first `n` bundled known facts `lm` predicts right both ways: a whole-answer
/// MLP trace with `base`'s samples and window, and knowledge neurons with `steps` points.
pub fn run(
    lm: &LoadedModel,
    base: &TraceRequest,
    (n, steps): (usize, usize),
    workers: usize,
) -> Result<NeuronsBench> {
    let mut base = base.clone();
    base.kinds = vec![TraceKind::Mlp];
    let neurons = |req: &TraceRequest| {
        let req = TraceRequest {
            samples: steps,
            ..req.clone()
        };
        lm.trace_by(TraceMethod::Neurons, &req, None, &mut Quiet, 1)
    };
    let both = both_ways(lm, &base, (n, workers), &neurons)?;
    let per_layer = |r: &TraceResult, last: bool| -> Vec<f64> {
        let e = if last {
            &r.tracing_effect_subject_last
        } else {
            &r.tracing_effect
        };
        e[&TraceKind::Mlp].iter().map(|&v| v as f64).collect()
    };
    let rho = |last: bool| -> Vec<f64> {
        let corr = |(exact, kn): &(TraceResult, TraceResult)| {
            spearman(&per_layer(exact, last), &per_layer(kn, last)).map_or(0.0, |c| c.r)
        };
        both.facts.iter().map(corr).collect()
    };
    let (best, last) = (rho(false), rho(true));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let found: usize = both.facts.iter().map(|(_, kn)| kn.neurons.len()).sum();
    Ok(NeuronsBench {
        facts: both.facts.len(),
        noise_sigma: both.noise_sigma,
        steps,
        exact_seconds: both.exact_seconds,
        neurons_seconds: both.other_seconds,
        spearman_mean: mean(&best),
        spearman_min: best.iter().copied().fold(f64::INFINITY, f64::min),
        spearman_subject_last_mean: mean(&last),
        neurons_per_fact: found as f64 / both.facts.len() as f64,
    })
}
