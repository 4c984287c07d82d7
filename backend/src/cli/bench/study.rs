//! `loci bench study`: the study's edits per hour, one at a time and batched, in one run. Each
//! edit is computed as the sweep computes it (`StudyConfig::edits`) and scored as the sweep
//! scores it (p(target) on the prompt, a paraphrase and a neighbour; each edit a hook on its own
//! rows, a batch's in one pass); only the edits' work is timed (the key statistics are
//! computed first, apart).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use loci_core::edit::RowEdits;
use loci_core::eval::CounterFactCase;
use loci_core::study::{EditProblem, ProblemProbs, Scored, StudyConfig, StudyMethod};
use loci_core::trace::NoiseSpec;
use loci_core::LoadedModel;
use serde::Serialize;

use super::{peak_rss_mib, print_json, threads, ModelArgs};
use crate::workspace::{study_config, FtSettings};

#[derive(clap::Args, Debug)]
pub struct StudyBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// CounterFact cases in ROME's format (default: the sample next to the project).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Cases edited by each method (the first of the dataset).
    #[arg(long, default_value_t = 8)]
    cases: usize,
    /// Cases per batch in the batched run (default: all of them).
    #[arg(long)]
    batch: Option<usize>,
    /// The central layer (default: ROME's layer for this model).
    #[arg(long)]
    layer: Option<usize>,
    /// Methods timed (comma-separated: rome, memit, alphaedit, emmet, ft-1, ft-5).
    #[arg(long, default_value = "rome,memit")]
    methods: String,
    /// v* optimisation steps (default: the model's settings).
    #[arg(long)]
    v_steps: Option<usize>,
    /// Tokens of key statistics (computed first, not timed with the edits).
    #[arg(long, default_value_t = 20_000)]
    stats_tokens: u64,
    #[arg(long)]
    corpus: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// One method's run both ways.
#[derive(Serialize)]
struct MethodRun {
    method: String,
    edits: usize,
    batch: usize,
    seconds_one_at_a_time: f64,
    seconds_batched: f64,
    edits_per_hour_one_at_a_time: f64,
    edits_per_hour_batched: f64,
    speedup: f64,
    /// The largest |p(target) batched − p(target) alone| over the edits' prompts.
    max_prob_difference: f32,
    failed_edits: usize,
}

#[derive(Serialize)]
struct StudyBench {
    bench: &'static str,
    model: String,
    dtype: String,
    device: String,
    threads: usize,
    layer: usize,
    stats_tokens: u64,
    stats_seconds: f64,
    methods: Vec<MethodRun>,
    peak_rss_mib: Option<f64>,
}

pub fn study_bench(a: StudyBenchArgs) -> Result<()> {
    if a.cases == 0 || a.batch == Some(0) {
        bail!("--cases and --batch must be positive");
    }
    let corpus = crate::workspace::corpus_file(a.corpus.as_deref())?;
    let dataset = match &a.dataset {
        Some(d) => d.clone(),
        None => default_dataset()?,
    };
    let cases = super::super::eval::read_study_cases(&dataset, Some(a.cases), 1)?;
    let mut lm = a.model.load()?;
    let methods = a
        .methods
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<StudyMethod>, _>>()?;
    let layers: Vec<usize> = a.layer.into_iter().collect();
    let mut cfg = study_config(
        &lm,
        methods.clone(),
        vec![EditProblem::ErrorInjection],
        &layers,
        NoiseSpec::Fixed(0.1),
        &FtSettings::default(),
    )?;
    if let Some(s) = a.v_steps {
        cfg.rome.v_num_grad_steps = s;
        cfg.memit.v_num_grad_steps = s;
    }
    let layer = a.layer.unwrap_or(cfg.rome.layer);
    let n_layer = lm.model.n_layer();
    let stat_layers: Vec<usize> = StudyMethod::Memit.layers(layer, n_layer);
    let s = Instant::now();
    let mut acc = loci_core::edit::StatsAccumulator::new(&lm, &stat_layers, 1024)?;
    crate::workspace::feed(&mut acc, &lm, &corpus, a.stats_tokens, |_| true)?;
    let stats = acc
        .finish(&lm, &corpus.display().to_string())
        .context("key statistics for the benchmark")?;
    let stats_seconds = s.elapsed().as_secs_f64();
    let batch = a.batch.unwrap_or(cases.len());
    let mut runs = vec![];
    for method in methods {
        let mine: Vec<_> = method
            .layers(layer, n_layer)
            .iter()
            .map(|l| stats[stat_layers.iter().position(|x| x == l).expect("window")].clone())
            .collect();
        let st = if method.needs_stats() { mine } else { vec![] };
        let bench = Bench {
            cfg: &cfg,
            method,
            layer,
            stats: &st,
        };
        runs.push(bench.run(&mut lm, &cases, batch)?);
    }
    let r = StudyBench {
        bench: "study",
        model: lm.name.clone(),
        dtype: lm.info.dtype.clone(),
        device: lm.info.device.clone(),
        threads: threads(),
        layer,
        stats_tokens: a.stats_tokens,
        stats_seconds,
        methods: runs,
        peak_rss_mib: peak_rss_mib(),
    };
    if a.json {
        return print_json(&r);
    }
    for m in &r.methods {
        println!(
            "{} {}: {:.0} edits/hour one at a time, {:.0} batched ({} per batch): {:.2}x",
            r.model,
            m.method,
            m.edits_per_hour_one_at_a_time,
            m.edits_per_hour_batched,
            m.batch,
            m.speedup
        );
    }
    Ok(())
}

/// The CounterFact sample next to the project, when no dataset is named.
fn default_dataset() -> Result<PathBuf> {
    let name = "counterfact/counterfact_rome_format_sample500.json";
    let candidates = [
        std::env::var_os("LOCI_DATA").map(|d| PathBuf::from(d).join(name)),
        Some(PathBuf::from("../shared/data").join(name)),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .context("no dataset given and no CounterFact sample found; pass --dataset FILE")
}

/// One method's edits at one layer.
struct Bench<'a> {
    cfg: &'a StudyConfig,
    method: StudyMethod,
    layer: usize,
    stats: &'a [loci_core::edit::KeyStats],
}

impl Bench<'_> {
    /// A warm-up edit, then the cases one at a time, then `batch` at a time.
    fn run(
        &self,
        lm: &mut LoadedModel,
        cases: &[CounterFactCase],
        batch: usize,
    ) -> Result<MethodRun> {
        self.edit_and_score(lm, &cases[..1])?;
        let s = Instant::now();
        let mut alone = vec![];
        for c in cases {
            alone.extend(self.edit_and_score(lm, std::slice::from_ref(c))?);
        }
        let seconds_one = s.elapsed().as_secs_f64();
        let s = Instant::now();
        let mut batched = vec![];
        for chunk in cases.chunks(batch) {
            batched.extend(self.edit_and_score(lm, chunk)?);
        }
        let seconds_batched = s.elapsed().as_secs_f64();
        let mut max_diff = 0f32;
        let mut failed = 0;
        for (a, b) in alone.iter().zip(&batched) {
            match (a, b) {
                (Some(a), Some(b)) => {
                    for (x, y) in a.iter().zip(b) {
                        max_diff = max_diff.max((x - y).abs());
                    }
                }
                _ => failed += 1,
            }
        }
        let n = cases.len();
        let per_hour = |s: f64| n as f64 * 3600.0 / s;
        Ok(MethodRun {
            method: self.method.name().to_string(),
            edits: n,
            batch,
            seconds_one_at_a_time: seconds_one,
            seconds_batched,
            edits_per_hour_one_at_a_time: per_hour(seconds_one),
            edits_per_hour_batched: per_hour(seconds_batched),
            speedup: seconds_one / seconds_batched,
            max_prob_difference: max_diff,
            failed_edits: failed,
        })
    }

    /// The edits of `cases` computed together and scored as the study scores them: in one
    /// batch, each a hook on its own rows (one the hook cannot carry applied, scored, undone).
    /// Per case, its target's probabilities after the prompt, paraphrase and neighbour (`None`:
    /// refused).
    fn edit_and_score(
        &self,
        lm: &mut LoadedModel,
        cases: &[CounterFactCase],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let reqs: Vec<_> = cases.iter().map(|c| c.requested_rewrite.clone()).collect();
        let layers = self.method.layers(self.layer, lm.model.n_layer());
        let problem = (self.method, EditProblem::ErrorInjection);
        let edits = self.cfg.edits(lm, problem, &layers, &reqs, self.stats)?;
        let mut out: Vec<Option<Vec<f32>>> = vec![None; cases.len()];
        let mut hooked = vec![];
        for (i, (case, edit)) in cases.iter().zip(edits).enumerate() {
            let Ok(edit) = edit else { continue };
            if RowEdits::can_hook_on(lm, &edit) {
                hooked.push((i, edit));
                continue;
            }
            let applied = lm.apply(&edit)?;
            let probs = lm.problem_probs(case, &case.requested_rewrite.target_new.str, None);
            lm.undo_edit(applied)?;
            out[i] = Some(read(&probs?));
        }
        let items: Vec<Scored> = hooked
            .iter()
            .map(|(i, e)| {
                let c = &cases[*i];
                (c, c.requested_rewrite.target_new.str.as_str(), Some(e))
            })
            .collect();
        if !items.is_empty() {
            for ((i, _), p) in hooked.iter().zip(lm.problem_probs_batch(&items, None)?) {
                out[*i] = Some(read(&p));
            }
        }
        lm.model.device.synchronize()?;
        Ok(out)
    }
}

/// The probabilities read, in order.
fn read(p: &ProblemProbs) -> Vec<f32> {
    [Some(p.rewrite), p.paraphrase, p.neighborhood]
        .into_iter()
        .flatten()
        .collect()
}
