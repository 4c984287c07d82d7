//! `loci bench trace --neurons N`: Hase et al.'s whole-answer MLP trace and knowledge neurons
//! of the same known facts, in one run — their costs, and how well the neurons' per-layer
//! effect follows tracing's (Spearman's ρ per fact, over layers, the way the study joins
//! them: at the best token, and at the subject's last).

use std::time::Instant;

use anyhow::{bail, Result};
use loci_core::study::regress::spearman;
use loci_core::trace::{Quiet, TraceKind, TraceMethod, TraceRequest, TraceResult};
use loci_core::LoadedModel;
use serde::Serialize;

use super::attribution::known_requests;

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
    let noise_sigma = 3.0 * crate::workspace::cached_embedding_std(lm, None)?;
    let mut base = base.clone();
    base.kinds = vec![TraceKind::Mlp];
    let (mut exact_seconds, mut neurons_seconds) = (0.0, 0.0);
    let (mut rho, mut rho_last, mut neurons) = (vec![], vec![], 0);
    for req in known_requests(lm, &base, noise_sigma) {
        if rho.len() == n {
            break;
        }
        let req = req?;
        let s = Instant::now();
        let Ok(exact) = lm.trace(&req, None, &mut Quiet, workers) else {
            continue;
        };
        exact_seconds += s.elapsed().as_secs_f64();
        let s = Instant::now();
        let kn_req = TraceRequest {
            samples: steps,
            ..req
        };
        let kn = lm.trace_by(TraceMethod::Neurons, &kn_req, None, &mut Quiet, 1)?;
        neurons_seconds += s.elapsed().as_secs_f64();
        let per_layer = |r: &TraceResult, last: bool| -> Vec<f64> {
            let e = if last {
                &r.tracing_effect_subject_last
            } else {
                &r.tracing_effect
            };
            e[&TraceKind::Mlp].iter().map(|&v| v as f64).collect()
        };
        let corr = |last| spearman(&per_layer(&exact, last), &per_layer(&kn, last));
        rho.push(corr(false).map_or(0.0, |c| c.r));
        rho_last.push(corr(true).map_or(0.0, |c| c.r));
        neurons += kn.neurons.len();
    }
    if rho.is_empty() {
        bail!("the model predicts none of the bundled known facts");
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok(NeuronsBench {
        facts: rho.len(),
        noise_sigma,
        steps,
        exact_seconds,
        neurons_seconds,
        spearman_mean: mean(&rho),
        spearman_min: rho.iter().copied().fold(f64::INFINITY, f64::min),
        spearman_subject_last_mean: mean(&rho_last),
        neurons_per_fact: neurons as f64 / rho.len() as f64,
    })
}
