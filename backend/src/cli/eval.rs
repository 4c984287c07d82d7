//! `loci eval`: ROME, MEMIT or fine-tuning on CounterFact cases (ROME's and Hase's metrics) or
//! zsRE questions (token accuracy), each edit applied and undone — or kept, in sequence.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use loci_core::edit::{
    Edit, EditMethod, FtHparams, KeyStats, MemitHparams, RewriteRequest, RomeHparams,
};
use loci_core::eval::zsre::{
    summarize_zsre, ZsreCase, ZsreCaseRecord, ZsreMetrics, ZsreSummary, ZsreTarget,
};
use loci_core::eval::{
    parse_dataset, summarize, AttributeSnippets, CaseMetrics, CaseRecord, Consistency,
    CounterFactCase, Dataset, SequenceEval, SequenceOptions, SequenceRecord, Summary,
};
use loci_core::LoadedModel;

use super::render::save_plot;
use super::{print_json, ModelArgs};
use crate::workspace::{ft_hparams, memit_hparams, rome_hparams, FtSettings, StatsSource};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// CounterFact cases (ROME's format or EasyEdit's flattened records) or zsRE records
    /// (MEND's schema, as ROME's `zsre_mem_eval.json`).
    #[arg(long)]
    pub dataset: PathBuf,
    /// zsRE: write `answers[0]` (`answer`, ROME's and MEMIT's evaluation) or `alt` (MEND's and
    /// EasyEdit's).
    #[arg(long, default_value = "answer")]
    pub zsre_target: ZsreTarget,
    /// Editing method: rome or ft (one case at a time) or memit (`--batch` cases per edit).
    #[arg(long, default_value = "rome")]
    pub method: EditMethod,
    /// ROME's edited layer (default: Loci's shipped hyper-parameters for this model).
    #[arg(long)]
    pub layer: Option<usize>,
    /// MEMIT's or fine-tuning's layers, e.g. 3,4,5,6,7,8 (default: the shipped
    /// hyper-parameters).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    #[command(flatten)]
    pub ft: FtSettings,
    /// MEMIT: cases written by one edit (each batch is applied, scored and undone, or kept with
    /// --sequential).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Evaluate the first N cases.
    #[arg(long)]
    pub n: Option<usize>,
    /// Write one JSON line per case here; cases already in it are kept and skipped, so a
    /// stopped evaluation continues.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub summary: bool,
    #[command(flatten)]
    pub stats: StatsSource,
    /// Sequential editing: keep every edit (each computed on the model the earlier ones left) and
    /// score each case right after its own edit and again after the last one; all are undone
    /// at the end.
    #[arg(long)]
    pub sequential: bool,
    /// With --sequential: every K cases, score every case edited so far again (the retention
    /// curve: how earlier edits hold up as later ones arrive).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// With --checkpoint-every: draw the retention curve here (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Skip the generation (fluency) test, the slow part.
    #[arg(long)]
    pub no_generation: bool,
    /// ROME / MEMIT: v* optimisation steps (default: the model's settings).
    #[arg(long)]
    pub v_steps: Option<usize>,
    /// ROME's key in the update's denominator: `rrome` (the template-averaged key, r-ROME's
    /// fix) or `original` (the bare prompt's, as the paper's code; collapses in long
    /// sequences).
    #[arg(long, default_value = "rrome")]
    pub key_mode: String,
    /// ROME's attribute_snippets.json: adds generation consistency (TF-IDF similarity of the
    /// generations to Wikipedia texts about the new target; IDF fitted on --corpus).
    #[arg(long)]
    pub snippets: Option<PathBuf>,
}

/// The edited layers' weights, bit for bit.
fn bits(lm: &loci_core::LoadedModel, layers: &[usize]) -> Result<Vec<u32>> {
    let mut out = vec![];
    for &layer in layers {
        let w = lm
            .model
            .down_proj(layer)?
            .weight
            .to_dtype(loci_core::DType::F32)?;
        out.extend(
            w.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits()),
        );
    }
    Ok(out)
}

/// The configured method with its hyper-parameters and statistics.
enum Method {
    Rome(RomeHparams, KeyStats),
    Memit(MemitHparams, Vec<KeyStats>),
    Ft(FtHparams),
}

impl Method {
    fn layers(&self) -> Vec<usize> {
        match self {
            Method::Rome(hp, _) => vec![hp.layer],
            Method::Memit(hp, _) => hp.layers.clone(),
            Method::Ft(hp) => hp.layers.clone(),
        }
    }

    /// The edit of `reqs` (one request for ROME and fine-tuning).
    fn make(
        &self,
        lm: &mut loci_core::LoadedModel,
        reqs: &[loci_core::edit::RewriteRequest],
        progress: &mut dyn FnMut(&str),
    ) -> loci_core::Result<Edit> {
        Ok(match self {
            Method::Rome(hp, stats) => Edit::Rome(lm.rome(&reqs[0], hp, Some(stats))?),
            Method::Memit(hp, stats) => Edit::Memit(lm.memit(reqs, hp, stats, progress)?),
            Method::Ft(hp) => Edit::Ft(lm.finetune(&reqs[0], hp)?),
        })
    }

    fn describe(&self) -> String {
        match self {
            Method::Rome(hp, _) => format!(
                "ROME{} at layer {}",
                match hp.key_mode {
                    loci_core::edit::KeyMode::Original => " (the paper's key)",
                    loci_core::edit::KeyMode::Rrome => "",
                },
                hp.layer
            ),
            Method::Memit(hp, _) => format!("MEMIT at layers {:?}", hp.layers),
            Method::Ft(hp) => format!(
                "fine-tuning of layers {:?} (L∞ ε {}, {} objective)",
                hp.layers,
                hp.norm_constraint
                    .map_or("none".to_string(), |e| e.to_string()),
                serde_json::to_value(hp.objective)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            ),
        }
    }
}

/// The snippets, and IDF weights fitted on the corpus (one document per text).
fn consistency(snippets: &std::path::Path, src: &StatsSource) -> Result<Consistency> {
    let text = std::fs::read_to_string(snippets)
        .with_context(|| format!("reading {}", snippets.display()))?;
    let snippets = AttributeSnippets::parse(&text)?;
    let corpus = match &src.corpus {
        Some(c) => c.clone(),
        None => crate::workspace::default_corpus()?,
    };
    let texts = crate::workspace::corpus_texts(&corpus)?.collect::<Result<Vec<String>>>()?;
    let idf = loci_core::tfidf::Idf::fit(&texts);
    eprintln!(
        "consistency: IDF of {} words over {} texts of {}",
        idf.weights.len(),
        idf.documents,
        corpus.display()
    );
    Ok(Consistency { idf, snippets })
}

/// The first `n` (default: all) cases of a CounterFact file, or of a zsRE file as Hase et al.
/// pose it (a new answer drawn with `seed`: `ZsreSet::hase_cases`); none is an error.
pub fn read_study_cases(
    path: &std::path::Path,
    n: Option<usize>,
    seed: u64,
) -> Result<Vec<CounterFactCase>> {
    let mut cases = match read_dataset(path, None, ZsreTarget::Answer)? {
        Dataset::CounterFact(c) => c,
        Dataset::Zsre(set) => {
            eprintln!(
                "zsRE: {} questions posed as \"Question: … Answer:\", each with a new answer \
                 drawn from the others' ({} records skipped)",
                set.cases.len(),
                set.skipped.len()
            );
            set.hase_cases(seed)
        }
    };
    if let Some(n) = n {
        cases.truncate(n);
    }
    Ok(cases)
}

/// A benchmark file's first `n` (default: all) cases; none is an error.
fn read_dataset(path: &std::path::Path, n: Option<usize>, target: ZsreTarget) -> Result<Dataset> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut cases = parse_dataset(&text, target)?;
    if let Some(n) = n {
        cases.truncate(n);
    }
    if cases.is_empty() {
        bail!("no cases in {}", path.display());
    }
    Ok(cases)
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    match (a.checkpoint_every, a.sequential, &a.plot) {
        (Some(0), ..) => bail!("--checkpoint-every must be at least 1"),
        (Some(_), false, _) => bail!("--checkpoint-every is for --sequential"),
        (None, _, Some(_)) => bail!("--plot draws the checkpoints: add --checkpoint-every"),
        _ => {}
    }
    let mut lm = a.model.load()?;
    let dataset = read_dataset(&a.dataset, a.n, a.zsre_target)?;
    let method = match a.method {
        EditMethod::Rome => {
            if !a.layers.is_empty() || a.batch != 1 {
                bail!("--layers and --batch are for --method memit");
            }
            let mut hp = rome_hparams(&lm, a.layer)?;
            if let Some(s) = a.v_steps {
                hp.v_num_grad_steps = s;
            }
            hp.key_mode = crate::workspace::key_mode(&a.key_mode)?;
            let stats = a.stats.ensure(&lm, hp.layer)?;
            Method::Rome(hp, stats)
        }
        EditMethod::Memit => {
            if a.layer.is_some() {
                bail!("--layer is for ROME; MEMIT edits --layers L1,L2,...");
            }
            let mut hp = memit_hparams(&lm, &a.layers)?;
            if let Some(s) = a.v_steps {
                hp.v_num_grad_steps = s;
            }
            let stats = a.stats.ensure_layers(&lm, &hp.layers)?;
            Method::Memit(hp, stats)
        }
        EditMethod::Ft => {
            if a.layer.is_some() || a.batch != 1 {
                bail!("--layer is for ROME and --batch for MEMIT; fine-tuning trains --layers");
            }
            Method::Ft(ft_hparams(&lm, &a.layers, &a.ft)?)
        }
    };
    let layers = method.layers();
    let original = bits(&lm, &layers)?;
    match &dataset {
        Dataset::CounterFact(cases) => {
            let consistency = match &a.snippets {
                Some(p) if !a.no_generation => Some(consistency(p, &a.stats)?),
                Some(_) => bail!("--snippets scores generations: drop --no-generation"),
                None => None,
            };
            let bench = CounterFact {
                generate: !a.no_generation,
                consistency,
            };
            run(&bench, &mut lm, cases, &a, &method)?;
        }
        Dataset::Zsre(set) => {
            if a.snippets.is_some() {
                bail!("--snippets is for CounterFact: zsRE has no generation test");
            }
            if !set.skipped.is_empty() {
                eprintln!(
                    "skipped {} zsRE records that are no edit: {}",
                    set.skipped.len(),
                    set.skipped.join("; ")
                );
            }
            let bench = Zsre {
                target: a.zsre_target,
            };
            run(&bench, &mut lm, &set.cases, &a, &method)?;
        }
    }
    if bits(&lm, &layers)? != original {
        bail!("internal error: the model differs from the original after the evaluation");
    }
    Ok(())
}

type Make<'a> = dyn FnMut(&mut LoadedModel, &[RewriteRequest]) -> loci_core::Result<Edit> + 'a;

/// A benchmark's side of `eval`: how its cases are scored around an edit, and how its records
/// are summarised.
trait Benchmark {
    type Case: Clone;
    type Record: serde::Serialize + serde::de::DeserializeOwned;
    type Metrics: Clone;
    type Summary: serde::Serialize + Clone;
    /// What a record is, for messages.
    const RECORD: &'static str;
    /// Settings of the benchmark itself that a record depends on (for `run`).
    fn settings(&self) -> String {
        String::new()
    }
    fn case_id(c: &Self::Case) -> u64;
    fn record_id(r: &Self::Record) -> u64;
    /// A record's metrics after its own edit and, in a sequence, after the last.
    fn metrics(r: &Self::Record) -> (&Self::Metrics, Option<&Self::Metrics>);
    fn summarize(ms: &[Self::Metrics]) -> Self::Summary;
    /// The progress bar's message after a case.
    fn describe(m: &Self::Metrics) -> String;
    fn print(title: &str, post: &Self::Summary, last: Option<&Self::Summary>);
    /// The summary's main numbers (×100), for the retention curve.
    fn headline(s: &Self::Summary) -> Vec<(&'static str, f32)>;
    /// One edit of `cases`, scored before and after, then undone.
    fn undone(
        &self,
        lm: &mut LoadedModel,
        cases: &[Self::Case],
        make: &mut Make,
    ) -> loci_core::Result<Vec<Self::Record>>;
    /// Edits kept in sequence (`edit_in_sequence`).
    fn in_sequence(
        &self,
        lm: &mut LoadedModel,
        cases: &[Self::Case],
        opts: SequenceOptions,
        make: &mut Make,
        progress: &mut dyn FnMut(usize),
    ) -> loci_core::Result<SequenceEval<Self::Record, Self::Metrics>>;
}

struct CounterFact {
    generate: bool,
    consistency: Option<Consistency>,
}

impl Benchmark for CounterFact {
    type Case = CounterFactCase;
    type Record = CaseRecord;
    type Metrics = CaseMetrics;
    type Summary = Summary;
    const RECORD: &'static str = "a CounterFact record";

    fn case_id(c: &CounterFactCase) -> u64 {
        c.case_id
    }
    fn record_id(r: &CaseRecord) -> u64 {
        r.case_id
    }
    fn metrics(r: &CaseRecord) -> (&CaseMetrics, Option<&CaseMetrics>) {
        (&r.metrics, r.last_metrics.as_ref())
    }
    fn summarize(ms: &[CaseMetrics]) -> Summary {
        summarize(ms)
    }
    fn describe(m: &CaseMetrics) -> String {
        format!(
            "ES {:.0} PS {:.0} NS {:.0}",
            m.efficacy_score * 100.0,
            m.paraphrase_score * 100.0,
            m.neighborhood_score * 100.0
        )
    }
    fn print(title: &str, post: &Summary, last: Option<&Summary>) {
        match last {
            None => print_counterfact(title, &[("value", post)]),
            Some(last) => print_counterfact(
                title,
                &[("after its edit", post), ("after all edits", last)],
            ),
        }
    }
    fn undone(
        &self,
        lm: &mut LoadedModel,
        cases: &[CounterFactCase],
        make: &mut Make,
    ) -> loci_core::Result<Vec<CaseRecord>> {
        lm.eval_cases_with(cases, self.generate, self.consistency.as_ref(), make)
    }
    fn headline(s: &Summary) -> Vec<(&'static str, f32)> {
        vec![
            ("efficacy score", s.efficacy_score),
            ("paraphrase score", s.paraphrase_score),
            ("neighborhood score", s.neighborhood_score),
        ]
    }
    fn in_sequence(
        &self,
        lm: &mut LoadedModel,
        cases: &[CounterFactCase],
        opts: SequenceOptions,
        make: &mut Make,
        progress: &mut dyn FnMut(usize),
    ) -> loci_core::Result<SequenceEval<CaseRecord, CaseMetrics>> {
        lm.eval_sequence(
            cases,
            opts,
            self.generate,
            self.consistency.as_ref(),
            make,
            &mut |done, _| progress(done),
        )
    }
}

struct Zsre {
    target: ZsreTarget,
}

impl Benchmark for Zsre {
    type Case = ZsreCase;
    type Record = ZsreCaseRecord;
    type Metrics = ZsreMetrics;
    type Summary = ZsreSummary;
    const RECORD: &'static str = "a zsRE record";

    fn settings(&self) -> String {
        match self.target {
            ZsreTarget::Answer => ", writing answers[0]".into(),
            ZsreTarget::Alt => ", writing alt".into(),
        }
    }

    fn case_id(c: &ZsreCase) -> u64 {
        c.case_id
    }
    fn record_id(r: &ZsreCaseRecord) -> u64 {
        r.case_id
    }
    fn metrics(r: &ZsreCaseRecord) -> (&ZsreMetrics, Option<&ZsreMetrics>) {
        (&r.metrics, r.last_metrics.as_ref())
    }
    fn summarize(ms: &[ZsreMetrics]) -> ZsreSummary {
        summarize_zsre(ms)
    }
    fn describe(m: &ZsreMetrics) -> String {
        format!(
            "efficacy {:.0} paraphrase {:.0} specificity {:.0}",
            m.efficacy * 100.0,
            m.paraphrase * 100.0,
            m.specificity * 100.0
        )
    }
    fn print(title: &str, post: &ZsreSummary, last: Option<&ZsreSummary>) {
        print_zsre(title, post, last)
    }
    fn undone(
        &self,
        lm: &mut LoadedModel,
        cases: &[ZsreCase],
        make: &mut Make,
    ) -> loci_core::Result<Vec<ZsreCaseRecord>> {
        lm.eval_zsre_with(cases, make)
    }
    fn headline(s: &ZsreSummary) -> Vec<(&'static str, f32)> {
        vec![
            ("efficacy", s.efficacy),
            ("paraphrase", s.paraphrase),
            ("specificity", s.specificity),
            ("locality", s.locality),
        ]
    }
    fn in_sequence(
        &self,
        lm: &mut LoadedModel,
        cases: &[ZsreCase],
        opts: SequenceOptions,
        make: &mut Make,
        progress: &mut dyn FnMut(usize),
    ) -> loci_core::Result<SequenceEval<ZsreCaseRecord, ZsreMetrics>> {
        lm.eval_zsre_sequence(cases, opts, make, &mut |done, _| progress(done))
    }
}

/// Evaluates the cases not yet in `--out` (`--batch` per edit; each edit undone, or all kept
/// with `--sequential`) under a progress bar, appending each record as it is made, then prints
/// the summary of every record in `--out`.
fn run<B: Benchmark>(
    bench: &B,
    lm: &mut LoadedModel,
    cases: &[B::Case],
    a: &EvalArgs,
    method: &Method,
) -> Result<()> {
    let batch = match method {
        Method::Memit(..) => format!(", {} per edit", a.batch),
        Method::Rome(..) | Method::Ft(..) => String::new(),
    };
    let run_label = format!(
        "{}: {}{batch}{}",
        lm.name,
        method.describe(),
        bench.settings()
    );
    let before: Vec<B::Record> = previous(a, B::RECORD, &run_label)?;
    let cases = not_done(cases, &before, B::case_id, B::record_id);
    let pb = ProgressBar::new(cases.len() as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "cases {bar:40} {pos}/{len} [{elapsed_precise} < {eta}] {msg}",
        )
        .expect("template"),
    );
    let mut sink = Records::new(a.out.as_deref(), before, run_label)?;
    let mut make = |lm: &mut LoadedModel, reqs: &[RewriteRequest]| {
        method.make(lm, reqs, &mut |m| pb.set_message(m.to_string()))
    };
    let mut checkpoints = vec![];
    if a.sequential {
        let opts = SequenceOptions {
            batch: a.batch,
            checkpoint_every: a.checkpoint_every.unwrap_or(0),
        };
        let seq = bench.in_sequence(lm, &cases, opts, &mut make, &mut |done| {
            pb.set_position(done as u64)
        })?;
        pb.suspend(|| sink.take_all(&cases, seq.records, B::case_id))?;
        checkpoints = seq.checkpoints;
    } else {
        for chunk in cases.chunks(a.batch) {
            let records: Vec<SequenceRecord<B::Record>> = match bench.undone(lm, chunk, &mut make) {
                Ok(records) => records.into_iter().map(Ok).collect(),
                Err(e) => chunk.iter().map(|_| Err(e.to_string())).collect(),
            };
            if let Some(Ok(r)) = records.last() {
                pb.set_message(B::describe(B::metrics(r).0));
            }
            pb.suspend(|| sink.take_all(chunk, records, B::case_id))?;
            pb.inc(chunk.len() as u64);
        }
    }
    pb.finish_and_clear();
    let post: Vec<B::Metrics> = sink.kept.iter().map(|r| B::metrics(r).0.clone()).collect();
    let last = a.sequential.then(|| {
        let last: Vec<B::Metrics> = sink
            .kept
            .iter()
            .filter_map(|r| B::metrics(r).1.cloned())
            .collect();
        B::summarize(&last)
    });
    let post = B::summarize(&post);
    // The retention curve: the checkpoints, then the end of the sequence.
    let mut curve: Vec<(usize, B::Summary)> = checkpoints
        .iter()
        .map(|(done, ms)| (*done, B::summarize(ms)))
        .collect();
    if let (Some(last), Some(_)) = (&last, a.checkpoint_every) {
        curve.push((cases.len(), last.clone()));
    }
    if let Some(p) = &a.plot {
        save_plot(p, &retention_svg::<B>(&curve, &method.describe()))?;
    }
    if a.summary {
        return match last {
            None => print_json(&post),
            Some(last) => print_json(&serde_json::json!({
                "after_own_edit": post,
                "after_all_edits": last,
                "checkpoints": curve
                    .iter()
                    .map(|(done, s)| serde_json::json!({"cases_done": done, "summary": s}))
                    .collect::<Vec<_>>(),
            })),
        };
    }
    let title = format!(
        "{} on {} cases of {}{batch}{}",
        method.describe(),
        sink.kept.len(),
        a.dataset.display(),
        if a.sequential {
            " (in sequence: each edit kept, scored after its own and after the last)"
        } else {
            ""
        }
    );
    B::print(&title, &post, last.as_ref());
    if !curve.is_empty() {
        let names: Vec<&str> = B::headline(&curve[0].1).iter().map(|h| h.0).collect();
        println!(
            "\nCases edited so far, scored after N cases (×100):\n| N | {} |\n|---|{}",
            names.join(" | "),
            "---|".repeat(names.len())
        );
        for (done, s) in &curve {
            let cells: Vec<String> = B::headline(s)
                .iter()
                .map(|(_, v)| format!("{v:.1}"))
                .collect();
            println!("| {done} | {} |", cells.join(" | "));
        }
    }
    Ok(())
}

/// The retention curve: each headline number of the cases edited so far, over the cases the
/// sequence has reached.
fn retention_svg<B: Benchmark>(curve: &[(usize, B::Summary)], method: &str) -> String {
    let xs: Vec<usize> = curve.iter().map(|c| c.0).collect();
    let names: Vec<&str> = curve
        .first()
        .map(|c| B::headline(&c.1).iter().map(|h| h.0).collect())
        .unwrap_or_default();
    let series = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let ys = curve.iter().map(|c| B::headline(&c.1)[i].1).collect();
            (name.to_string(), ys)
        })
        .collect();
    loci_core::plot::curves_svg(
        &format!("{method}: sequential edits (×100)"),
        "cases edited",
        &xs,
        (xs.len() / 8).max(1),
        &[("cases edited so far".to_string(), series)],
    )
}

/// Where an evaluation's records go: appended to `--out` as they are made (whole, flushed
/// lines: a stopped run continues after them) and kept, after those already there, for the
/// summary. A case without a record is reported on stderr.
struct Records<R> {
    file: Option<std::fs::File>,
    kept: Vec<R>,
    /// The model and settings, stamped on each line (`run`) so a continuation can check them.
    run: String,
}

impl<R: serde::Serialize> Records<R> {
    fn new(out: Option<&Path>, before: Vec<R>, run: String) -> Result<Self> {
        Ok(Self {
            file: out.map(super::results::open_for_append).transpose()?,
            kept: before,
            run,
        })
    }

    fn take_all<C>(
        &mut self,
        cases: &[C],
        records: Vec<SequenceRecord<R>>,
        id: impl Fn(&C) -> u64,
    ) -> Result<()> {
        for (case, r) in cases.iter().zip(records) {
            match r {
                Ok(r) => {
                    if let Some(f) = self.file.as_mut() {
                        let mut line = serde_json::to_value(&r)?;
                        line["run"] = self.run.clone().into();
                        super::results::append_lines(f, &[line.to_string()])?;
                    }
                    self.kept.push(r);
                }
                Err(e) => eprintln!("case {}: {e}", id(case)),
            }
        }
        Ok(())
    }
}

/// The records already in `--out`: a stopped evaluation continues after them, if they were
/// made by the same model and settings (`run`; a sequence of edits cannot continue: it starts
/// from the unedited model).
fn previous<R: serde::de::DeserializeOwned>(a: &EvalArgs, what: &str, run: &str) -> Result<Vec<R>> {
    let Some(p) = &a.out else {
        return Ok(vec![]);
    };
    let lines: Vec<serde_json::Value> = super::results::read_records(p, what)?;
    if lines.is_empty() {
        return Ok(vec![]);
    }
    if a.sequential {
        bail!(
            "{} already holds results, and a sequence of edits starts from the unedited model: \
             remove it or choose another --out",
            p.display()
        );
    }
    if let Some(other) = lines
        .iter()
        .filter_map(|l| l["run"].as_str())
        .find(|r| *r != run)
    {
        bail!(
            "{} holds results of another run ({other}), not of this one ({run}): remove it or \
             choose another --out",
            p.display()
        );
    }
    eprintln!(
        "{} cases already in {} are kept (delete it to start over)",
        lines.len(),
        p.display()
    );
    lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_value(l)
                .with_context(|| format!("{} record {}: not {what}", p.display(), i + 1))
        })
        .collect()
}

/// The cases without a record yet.
fn not_done<C: Clone, R>(
    cases: &[C],
    done: &[R],
    case_id: impl Fn(&C) -> u64,
    record_id: impl Fn(&R) -> u64,
) -> Vec<C> {
    let done: std::collections::HashSet<u64> = done.iter().map(record_id).collect();
    cases
        .iter()
        .filter(|c| !done.contains(&case_id(c)))
        .cloned()
        .collect()
}

type CfField = fn(&loci_core::eval::Summary) -> f32;

fn print_counterfact(title: &str, columns: &[(&str, &loci_core::eval::Summary)]) {
    println!("{title}");
    let heads: Vec<&str> = columns.iter().map(|c| c.0).collect();
    println!(
        "| metric | {} |\n|---|{}",
        heads.join(" | "),
        "---|".repeat(columns.len())
    );
    let row = |name: &str, f: &dyn Fn(&loci_core::eval::Summary) -> String| {
        let cells: Vec<String> = columns.iter().map(|c| f(c.1)).collect();
        println!("| {name} | {} |", cells.join(" | "));
    };
    let fields: [(&str, CfField); 11] = [
        ("Score S (hmean ES, PS, NS)", |s| s.score),
        ("Efficacy score ES", |s| s.efficacy_score),
        ("Efficacy magnitude EM", |s| s.efficacy_magnitude),
        ("Paraphrase score PS", |s| s.paraphrase_score),
        ("Paraphrase magnitude PM", |s| s.paraphrase_magnitude),
        ("Neighborhood score NS", |s| s.neighborhood_score),
        ("Neighborhood magnitude NM", |s| s.neighborhood_magnitude),
        ("Hase rewrite score", |s| s.hase_rewrite),
        ("Hase paraphrase score", |s| s.hase_paraphrase),
        ("Hase neighborhood score", |s| s.hase_neighborhood),
        ("Hase target score (per-case hmean)", |s| {
            s.hase_target_score
        }),
    ];
    for (name, v) in fields {
        row(name, &|s| format!("{:.1}", v(s)));
    }
    let pair = |a: Option<f32>, b: Option<f32>, digits: usize| match (a, b) {
        (Some(a), Some(b)) => format!("{a:.digits$} → {b:.digits$}"),
        _ => "—".into(),
    };
    if columns.iter().any(|c| c.1.fluency_post.is_some()) {
        row("Fluency (n-gram entropy ×100) pre → post", &|s| {
            pair(s.fluency_pre, s.fluency_post, 0)
        });
    }
    if columns.iter().any(|c| c.1.consistency_post.is_some()) {
        row("Consistency (TF-IDF ×100) pre → post", &|s| {
            pair(s.consistency_pre, s.consistency_post, 1)
        });
    }
}

type ZsreField = fn(&ZsreSummary) -> f32;

fn print_zsre(title: &str, s: &ZsreSummary, last: Option<&ZsreSummary>) {
    println!("{title}");
    let (head, rule) = match last {
        Some(_) => ("before | after its edit | after all edits", "---|---|---|"),
        None => ("before | after", "---|---|"),
    };
    println!("| metric (token accuracy ×100) | {head} |\n|---|{rule}");
    let after_all = |f: ZsreField| last.map_or(String::new(), |l| format!(" {:.1} |", f(l)));
    let fields: [(&str, f32, ZsreField); 3] = [
        ("Efficacy (new answer)", s.efficacy_pre, |s| s.efficacy),
        ("Paraphrase (new answer)", s.paraphrase_pre, |s| {
            s.paraphrase
        }),
        ("Specificity (NQ answer)", s.specificity_pre, |s| {
            s.specificity
        }),
    ];
    for (name, pre, post) in fields {
        println!("| {name} | {pre:.1} | {:.1} |{}", post(s), after_all(post));
    }
    println!(
        "| Locality (NQ top-1 unchanged) | | {:.1} |{}",
        s.locality,
        after_all(|s| s.locality)
    );
}
