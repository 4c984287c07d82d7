//! `loci trace`: one fact's heatmap, or the average curves over many facts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use indicatif::ProgressBar;
use loci_core::plot;
use loci_core::trace::{
    AggregateCurves, NoiseSpec, TraceKind, TraceMethod, TraceObserver, TraceRequest, TraceResult,
};
use loci_core::LoadedModel;
use serde::Serialize;

use super::render::save_plot;
use super::{print_json, write_json, ModelArgs};
use crate::workspace::{cached_embedding_std, read_facts};

#[derive(clap::Args, Debug)]
pub struct TraceArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt, subject included.
    #[arg(long, required_unless_present = "facts")]
    pub prompt: Option<String>,
    #[arg(long, required_unless_present = "facts")]
    pub subject: Option<String>,
    /// hidden, mlp, attn or all (default: all; mlp with --method neurons).
    #[arg(long)]
    pub kind: Option<String>,
    /// Noise draws averaged per cell (default 10); with --method neurons, the points of the
    /// integrated-gradient path (default 20, as Dai et al.).
    #[arg(long)]
    pub samples: Option<usize>,
    #[arg(long, default_value_t = 10)]
    pub window: usize,
    /// `3x` (3 × the subject-embedding std), a fixed σ such as `0.1`, or uniform `u0.1`.
    #[arg(long, default_value = "3x")]
    pub noise: String,
    /// The traced answer token (default: the model's top-1).
    #[arg(long)]
    pub answer: Option<String>,
    /// Trace the probability of the whole --answer, all its tokens (Hase et al.'s variant).
    #[arg(long, requires = "answer")]
    pub full_answer: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// `exact` (causal tracing: every cell run), `attribution` (attribution patching: every
    /// cell's first-order estimate from one backward pass) or `neurons` (knowledge neurons:
    /// integrated gradients over the MLP neurons at the subject's last token and the last).
    #[arg(long, default_value = "exact")]
    pub method: TraceMethod,
    /// Write JSON here (`-` or no value: standard output).
    #[arg(long, num_args = 0..=1, default_missing_value = "-")]
    pub json: Option<String>,
    /// Write the plot here (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Trace many facts (known_1000.json format) and report the average curves.
    #[arg(long, conflicts_with_all = ["prompt", "subject"])]
    pub facts: Option<PathBuf>,
    /// How many correctly predicted facts to trace with --facts.
    #[arg(long, default_value_t = 100)]
    pub n: usize,
    /// Subjects for the noise estimate (known_1000.json format); default: the bundled copy.
    #[arg(long)]
    pub known: Option<PathBuf>,
}

struct Bar(ProgressBar);

impl TraceObserver for Bar {
    fn on_start(&mut self, header: &loci_core::trace::TraceHeader) {
        self.0.set_length(header.total_rows as u64);
        self.0.set_position(0);
    }
    fn on_row(&mut self, kind: TraceKind, token: usize, _: &[f32]) -> bool {
        self.0.set_message(format!("{} token {token}", kind.name()));
        self.0.inc(1);
        true
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    crate::workspace::bar(
        len,
        &format!("{what} {{bar:40}} {{pos}}/{{len}} {{msg}} [{{elapsed_precise}} < {{eta}}]"),
    )
}

pub fn request(a: &TraceArgs, prompt: String, subject: String) -> Result<TraceRequest> {
    let neurons = a.method == TraceMethod::Neurons;
    let kinds = match a.kind.as_deref() {
        None if neurons => vec![TraceKind::Mlp],
        None | Some("all") => TraceKind::ALL.to_vec(),
        Some(k) => k
            .split(',')
            .map(|k| k.trim().parse())
            .collect::<Result<Vec<TraceKind>, _>>()?,
    };
    Ok(TraceRequest {
        prompt,
        subject,
        answer: a.answer.clone(),
        kinds,
        samples: a.samples.unwrap_or(if neurons { 20 } else { 10 }),
        window: a.window,
        noise: a.noise.parse::<NoiseSpec>()?,
        seed: a.seed,
        full_answer: a.full_answer,
    })
}

fn emit<T: Serialize>(json: &Option<String>, v: &T) -> Result<()> {
    match json.as_deref() {
        Some("-") => print_json(v),
        Some(p) => write_json(Path::new(p), v),
        None => Ok(()),
    }
}

pub fn run(a: TraceArgs) -> Result<()> {
    let lm = a.model.load()?;
    let noise: NoiseSpec = a.noise.parse()?;
    let std = match noise {
        NoiseSpec::Relative(_) => Some(cached_embedding_std(&lm, a.known.as_deref())?),
        _ => None,
    };
    if let Some(facts) = &a.facts {
        return run_facts(&a, &lm, facts, std);
    }
    let req = request(
        &a,
        a.prompt.clone().unwrap_or_default(),
        a.subject.clone().unwrap_or_default(),
    )?;
    let mut obs = Bar(bar(0, "tracing"));
    let r = traced(&lm, a.method, &req, std, &mut obs)?;
    obs.0.finish_and_clear();
    emit(&a.json, &r)?;
    if let Some(p) = &a.plot {
        save_plot(p, &plot::trace_heatmap_svg(&r))?;
    }
    if a.json.as_deref() != Some("-") {
        summary(&r);
    }
    Ok(())
}

/// The trace of `req` by `method` (exact tracing's rows go to `obs` as they finish).
fn traced(
    lm: &LoadedModel,
    method: TraceMethod,
    req: &TraceRequest,
    std: Option<f64>,
    obs: &mut dyn TraceObserver,
) -> Result<TraceResult> {
    let workers = crate::workspace::trace_workers(&lm.model.device);
    Ok(lm.trace_by(method, req, std, obs, workers)?)
}

fn summary(r: &TraceResult) {
    if r.method == TraceMethod::Neurons {
        return neuron_summary(r);
    }
    println!(
        "{:?} → {:?}: clean p = {:.4}, corrupted p = {:.4} (noise σ {:.4}, {} samples) in {:.1} s{}",
        r.prompt,
        r.answer.token,
        r.high,
        r.low,
        r.noise,
        r.samples,
        r.seconds,
        match r.method {
            TraceMethod::Attribution => " (attribution patching: first-order estimates)",
            _ => "",
        }
    );
    for (kind, eff) in &r.tracing_effect {
        let (best, v) = eff
            .iter()
            .enumerate()
            .fold((0, 0f32), |b, (l, v)| if *v > b.1 { (l, *v) } else { b });
        println!(
            "  {:<6} strongest tracing effect {:.2} at layer {best}",
            kind.name(),
            v
        );
    }
}

fn neuron_summary(r: &TraceResult) {
    println!(
        "{:?} → {:?}: clean p = {:.4}; {} knowledge neurons (integrated gradients, {} points) in {:.1} s",
        r.prompt,
        r.answer.token,
        r.high,
        r.neurons.len(),
        r.samples,
        r.seconds,
    );
    for n in r.neurons.iter().take(10) {
        println!(
            "  token {:>2} {:<14} layer {:>2} neuron {:>5}  {:+.4}",
            n.token,
            format!("{:?}", r.tokens[n.token]),
            n.layer,
            n.neuron,
            n.attribution
        );
    }
    for (token, name) in [
        (r.subject_range[1] - 1, "subject's last"),
        (r.tokens.len() - 1, "last"),
    ] {
        let row = &r.scores[&TraceKind::Mlp][token];
        let (best, v) =
            row.iter().enumerate().fold(
                (0, f32::MIN),
                |b, (l, v)| if *v > b.1 { (l, *v) } else { b },
            );
        println!("  at the {name} token the neurons of layer {best} carry the most: p {v:.4}");
    }
}

#[derive(Serialize)]
struct FactsReport {
    model: String,
    /// Exact tracing or attribution patching.
    method: TraceMethod,
    facts_file: String,
    n_requested: usize,
    n_traced: usize,
    n_skipped_wrong: usize,
    aggregate: AggregateCurves,
    traces: Vec<TraceResult>,
}

fn run_facts(a: &TraceArgs, lm: &LoadedModel, path: &Path, std: Option<f64>) -> Result<()> {
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    let facts = read_facts(path)?;
    let pb = bar(a.n as u64, "facts");
    let mut traces = Vec::new();
    let mut skipped = 0;
    for f in &facts {
        if traces.len() >= a.n {
            break;
        }
        let top = lm.predict(&f.prompt, 1)?;
        if top.top[0].token.trim() != f.attribute.trim() {
            skipped += 1;
            continue;
        }
        let req = request(a, f.prompt.clone(), f.subject.clone())?;
        match traced(lm, a.method, &req, std, &mut loci_core::trace::Quiet) {
            Ok(r) => traces.push(r),
            Err(e) => {
                // Through `suspend`: `println` is silent when stderr is not a terminal.
                pb.suspend(|| eprintln!("skipping {:?}: {e}", f.prompt));
                skipped += 1;
                continue;
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let aggregate = AggregateCurves::from_traces(&traces);
    let report = FactsReport {
        model: lm.name.clone(),
        method: a.method,
        facts_file: path.display().to_string(),
        n_requested: a.n,
        n_traced: traces.len(),
        n_skipped_wrong: skipped,
        aggregate,
        traces,
    };
    emit(&a.json, &report)?;
    if let Some(p) = &a.plot {
        save_plot(p, &plot::aggregate_svg(&report.aggregate))?;
    }
    if a.json.as_deref() != Some("-") {
        println!(
            "traced {} facts ({} skipped, method {}); average total effect {:.3}",
            report.n_traced,
            skipped,
            a.method.name(),
            report.aggregate.average_total_effect
        );
        for (kind, curve) in &report.aggregate.last_subject_token {
            let fmt = |c: &[f32]| {
                c.iter()
                    .map(|v| format!("{v:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            println!(
                "  {:<6} AIE last subject token: {}",
                kind.name(),
                fmt(curve)
            );
            println!(
                "  {:<6} AIE last token:         {}",
                kind.name(),
                fmt(&report.aggregate.last_token[kind])
            );
        }
    }
    Ok(())
}
