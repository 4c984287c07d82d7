//! `loci study`: Hase et al.'s layer sweep on CounterFact (`run`, resumable JSONL), its
//! regressions and charts (`analyze`), and a run's cases localised another way (`relocalize`).

mod relocalize;
mod report;
mod shards;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use indicatif::ProgressBar;
use loci_core::eval::CounterFactCase;
use loci_core::study::{
    analyze, analyze_window, CaseResult, EditLine, EditProblem, Shard, StudyConfig, StudyLine,
    StudyMethod, StudyObserver,
};
use loci_core::LoadedModel;

use self::report::report;
use self::shards::read_results;
use super::ModelArgs;
use crate::workspace::{study_config, FtSettings, StatsCache, StatsSource};

#[derive(clap::Subcommand, Debug)]
pub enum StudyCmd {
    /// Trace and edit CounterFact cases at many layers; one JSON line per case and per edit.
    Run(Box<StudyRunArgs>),
    /// Regressions and charts from the JSONL of one or more runs.
    Analyze(StudyAnalyzeArgs),
    /// A run's cases localised again another way (exact, attribution, neurons), its edits kept:
    /// a new JSONL and its analysis.
    Relocalize(Box<relocalize::StudyRelocalizeArgs>),
}

#[derive(clap::Args, Debug)]
pub struct StudyRunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// CounterFact cases (ROME's format: paraphrase and neighbourhood prompts are scored), or
    /// zsRE records (posed as Hase et al. pose them: "Question: … Answer:", a new answer drawn
    /// from the other records').
    #[arg(long)]
    pub dataset: PathBuf,
    /// Study the first N cases of the dataset.
    #[arg(long)]
    pub n: Option<usize>,
    /// Study only part I of N of those cases (I/N: every Nth case from the Ith), for array
    /// jobs; each part writes its own --out, and `study analyze` takes them all (or their
    /// folder).
    #[arg(long)]
    pub shard: Option<Shard>,
    /// Results (JSONL). Cases already in it are skipped, so an interrupted run continues.
    #[arg(long, required_unless_present = "stats_only")]
    pub out: Option<PathBuf>,
    /// Editing methods: rome, memit, alphaedit, emmet, ft-1, ft-5 (comma-separated, or all).
    #[arg(long, default_value = "rome")]
    pub methods: String,
    /// Problems: error_injection, tracing_reversal, fact_erasure, fact_amplification,
    /// fact_forcing (comma-separated, or all).
    #[arg(long, default_value = "error_injection")]
    pub problems: String,
    /// Central layers (default: every fourth, ROME's layer and the last).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// Subject noise for tracing, tracing reversal and fact forcing: `3x` (3 × the subject
    /// embeddings' std, as the paper's 0.094 is for GPT-J) or a fixed σ.
    #[arg(long, default_value = "3x")]
    pub noise: String,
    /// Tracing windows (Hase et al. trace 10,5,3,1): the first is joined to the edits, the
    /// others are recorded for `study analyze --window`.
    #[arg(long, value_delimiter = ',', default_value = "5")]
    pub trace_windows: Vec<usize>,
    /// Noise samples of the trace (default 10); with `--localization neurons`, the points of
    /// the integrated-gradient path (default 20).
    #[arg(long)]
    pub samples: Option<usize>,
    /// How each case is localised: `exact` (Hase et al.'s causal tracing), `attribution`
    /// (attribution patching's estimate of the same trace) or `neurons` (knowledge neurons:
    /// the probability integrated gradients give each layer's MLP neurons). `study relocalize`
    /// localises a finished run's cases again, its edits kept.
    #[arg(long, default_value = "exact")]
    pub localization: loci_core::trace::TraceMethod,
    /// Leave out cases whose true object is less likely than this.
    #[arg(long, default_value_t = 0.02)]
    pub min_prob: f32,
    /// Keep cases the model gets wrong too (by default only those whose greedy continuation
    /// contains the true object are studied, as in the paper's analysis).
    #[arg(long)]
    pub all_cases: bool,
    /// Skip the essence-drift score (5 generated texts per case, rescored after every edit).
    #[arg(long)]
    pub no_essence: bool,
    /// Seed of the subject noise, of the essence texts and of zsRE's drawn answers.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// ROME / MEMIT: v* optimisation steps (default: the model's settings).
    #[arg(long)]
    pub v_steps: Option<usize>,
    #[command(flatten)]
    pub ft: FtSettings,
    #[command(flatten)]
    pub stats: StatsSource,
    /// Cases edited together: each cell's edits of this many cases are computed in one batch
    /// (ROME's v*, MEMIT's z, fine-tuning's steps) and scored in one pass; the same results,
    /// meant for GPUs. A batch's lines are written when all its cases are done.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub batch: u32,
    /// Only compute the key statistics the run needs (every layer its ROME and MEMIT edits
    /// touch) into --stats, then stop: the step an array job runs once before its tasks.
    #[arg(long)]
    pub stats_only: bool,
    /// When done, write the analysis chart here (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// When done, print the analysis as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct StudyAnalyzeArgs {
    /// JSONL files written by `loci study run`, or folders of them (the shards of one run).
    #[arg(required = true)]
    pub results: Vec<PathBuf>,
    /// Regress the effects of this tracing window (one the run traced: `--trace-windows`)
    /// instead of the one joined to the edits.
    #[arg(long)]
    pub window: Option<usize>,
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn study(cmd: StudyCmd) -> Result<()> {
    match cmd {
        StudyCmd::Run(a) => run(*a),
        StudyCmd::Relocalize(a) => relocalize::relocalize(*a),
        StudyCmd::Analyze(a) => {
            let lines = read_results(&a.results)?;
            let an = match a.window {
                Some(w) => analyze_window(&lines, w).map_err(anyhow::Error::msg)?,
                None => analyze(&lines),
            };
            report(&an, a.plot.as_deref(), a.json)
        }
    }
}

/// A comma-separated list of names, or `all`.
fn list<T>(s: &str, all: &[T]) -> Result<Vec<T>>
where
    T: Clone + std::str::FromStr<Err = loci_core::LociError>,
{
    if s.trim() == "all" {
        return Ok(all.to_vec());
    }
    Ok(s.split(',')
        .map(|x| x.parse())
        .collect::<Result<Vec<T>, _>>()?)
}

/// The progress bar follows the edits.
struct Progress<'a>(&'a ProgressBar);

impl StudyObserver for Progress<'_> {
    fn on_edit(&mut self, e: &EditLine) -> bool {
        self.0.inc(1);
        self.0.set_message(format!(
            "case {} {} {} layer {}: rewrite {:.2}",
            e.case_id,
            e.method.name(),
            e.problem.name(),
            e.layer,
            e.scores.rewrite
        ));
        true
    }
}

/// Studies the cases not yet in `--out`, appending each case's lines, then reports the
/// analysis of every line there.
fn run(a: StudyRunArgs) -> Result<()> {
    let mut lm = a.model.load()?;
    let n_layer = lm.model.n_layer();
    let all = super::eval::read_study_cases(&a.dataset, a.n, a.seed)?;
    let cases = a.shard.unwrap_or(Shard::WHOLE).of(&all);
    let cfg = config(&a, &lm, n_layer)?;

    if a.stats_only {
        prepare_stats(&a, &lm, &cfg, n_layer, true)?;
        eprintln!("study: key statistics ready; no case studied");
        return Ok(());
    }
    let out = a.out.clone().expect("clap: --out unless --stats-only");
    // Each case line names the run that made it, so a continuation with other settings is
    // refused instead of mixing results.
    let run = serde_json::json!({ "model": lm.name, "config": cfg });
    let done = done_cases(&out, &run)?;
    let todo: Vec<_> = cases
        .iter()
        .copied()
        .filter(|c| !done.contains(&c.case_id))
        .collect();
    print_plan(&out, &cfg, cases.len(), todo.len());
    let stats = prepare_stats(&a, &lm, &cfg, n_layer, !todo.is_empty())?;
    let batch = a.batch as usize;
    let (kept, skipped) = study_cases(&mut lm, &todo, &cfg, (&stats, batch), &run, &out)?;
    eprintln!(
        "study: {kept} cases studied, {skipped} left out; results in {}",
        out.display()
    );
    let lines = read_results(std::slice::from_ref(&out))?;
    report(&analyze(&lines), a.plot.as_deref(), a.json)
}

/// The study's configuration: the shipped defaults for the model, with the arguments'
/// methods, problems, layers, noise and settings; validated for `n_layer` layers.
fn config(a: &StudyRunArgs, lm: &LoadedModel, n_layer: usize) -> Result<StudyConfig> {
    let mut cfg = study_config(
        lm,
        list(&a.methods, &StudyMethod::ALL)?,
        list(&a.problems, &EditProblem::ALL)?,
        &a.layers,
        a.noise.parse()?,
        &a.ft,
    )?;
    if let Some(s) = a.v_steps {
        cfg.rome.v_num_grad_steps = s;
        cfg.memit.v_num_grad_steps = s;
    }
    let neurons = a.localization == loci_core::trace::TraceMethod::Neurons;
    cfg.trace_samples = a.samples.unwrap_or(if neurons { 20 } else { 10 });
    cfg.trace_windows = a.trace_windows.clone();
    cfg.localization = a.localization;
    cfg.min_prob = a.min_prob;
    cfg.correct_only = !a.all_cases;
    cfg.essence = !a.no_essence;
    cfg.seed = a.seed;
    cfg.validate(n_layer)?;
    Ok(cfg)
}

/// The cases already in `out`; a case line of another `run` is an error.
fn done_cases(out: &Path, run: &serde_json::Value) -> Result<BTreeSet<u64>> {
    let mut done = BTreeSet::new();
    for line in super::results::read_records::<serde_json::Value>(out, "a study record")? {
        if line["record"] != "case" {
            continue;
        }
        if !line["run"].is_null() && line["run"] != *run {
            bail!(
                "{} holds a study run with other settings (case {}): remove it or choose \
                 another --out",
                out.display(),
                line["case_id"]
            );
        }
        if let Some(id) = line["case_id"].as_u64() {
            done.insert(id);
        }
    }
    Ok(done)
}

/// Says on stderr how many cases are to do and which edits each gets.
fn print_plan(out: &Path, cfg: &StudyConfig, n_cases: usize, n_todo: usize) {
    eprintln!(
        "study: {} cases ({} already in {}), {} edits each: {} × {} at layers {:?}; noise σ {:.4}",
        n_todo,
        n_cases - n_todo,
        out.display(),
        cfg.cells().len(),
        cfg.methods
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(","),
        cfg.problems
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(","),
        cfg.layers,
        cfg.noise
    );
}

/// The key statistics' cache; with cases to do, the statistics of every layer a ROME or MEMIT
/// edit will touch are computed up front in one pass.
fn prepare_stats(
    a: &StudyRunArgs,
    lm: &LoadedModel,
    cfg: &StudyConfig,
    n_layer: usize,
    any_todo: bool,
) -> Result<StatsCache> {
    let stat_layers: BTreeSet<usize> = cfg
        .methods
        .iter()
        .filter(|m| m.needs_stats())
        .flat_map(|m| cfg.layers.iter().flat_map(|&c| m.layers(c, n_layer)))
        .collect();
    let stat_layers: Vec<usize> = stat_layers.into_iter().collect();
    let stats = StatsCache::new(a.stats.clone());
    if !stat_layers.is_empty() && any_todo {
        a.stats.collect_missing(lm, &stat_layers)?;
    }
    Ok(stats)
}

/// Studies the cases `batch` at a time under a progress bar, appending each case's lines to
/// `out_path`; returns how many cases were studied and how many left out.
fn study_cases(
    lm: &mut LoadedModel,
    todo: &[&CounterFactCase],
    cfg: &StudyConfig,
    (stats, batch): (&StatsCache, usize),
    run: &serde_json::Value,
    out_path: &Path,
) -> Result<(usize, usize)> {
    let mut out = super::results::open_for_append(out_path)?;
    let pb = crate::workspace::bar(
        (todo.len() * cfg.cells().len()) as u64,
        "edits {bar:40} {pos}/{len} [{elapsed_precise} < {eta}] {msg}",
    );
    let (mut kept, mut skipped) = (0, 0);
    for chunk in todo.chunks(batch) {
        let ids: Vec<String> = chunk.iter().map(|c| c.case_id.to_string()).collect();
        pb.set_message(format!("cases {}", ids.join(",")));
        let results = lm.study_cases(
            chunk,
            cfg,
            &mut |lm, layers| {
                stats
                    .get(lm, layers)
                    .map_err(|e| loci_core::LociError::input(format!("{e:#}")))
            },
            &mut Progress(&pb),
        )?;
        for result in results {
            if result.case.skipped.is_some() {
                skipped += 1;
                pb.inc(cfg.cells().len() as u64);
            } else {
                kept += 1;
            }
            // A case's lines are written together, so a resumed run never sees half a case.
            let lines = case_lines(result, run)?;
            super::results::append_lines(&mut out, &lines)?;
        }
    }
    pb.finish_and_clear();
    Ok((kept, skipped))
}

/// A studied case's lines as JSON text: its edits, then its case line stamped with `run`. The
/// case line goes last: a stop in the middle of writing leaves the case without it, so a
/// resumed run studies the case again and no analysis counts half of it.
fn case_lines(result: CaseResult, run: &serde_json::Value) -> Result<Vec<String>> {
    let mut lines = result.lines();
    lines.rotate_left(1);
    Ok(lines
        .iter()
        .map(|l| {
            let mut v = serde_json::to_value(l)?;
            if let StudyLine::Case(_) = l {
                v["run"] = run.clone();
            }
            Ok(v.to_string())
        })
        .collect::<Result<Vec<_>, serde_json::Error>>()?)
}
