//! `loci stats` and `loci edit`: key statistics and edits of every method from the command
//! line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use loci_core::edit::{
    Edit, EditMethod, EditReport, EditSide, Preserved, Probes, RewriteRequest, TargetStr,
};
use loci_core::eval::parse_cases;
use loci_core::LoadedModel;

use super::{print_json, MethodArgs, ModelArgs};
use crate::workspace::{
    collect, default_corpus, ft_hparams, key_mode, memit_hparams, rome_hparams, stats_dir,
};

#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Layers, comma-separated (default: the layers ROME and MEMIT edit by default for this
    /// model).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// JSONL with a "text" field per line, or a plain text file (one text per paragraph).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Stop after this many tokens.
    #[arg(long, default_value_t = 100_000)]
    pub tokens: u64,
    /// Each text is truncated to this many tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_len: usize,
    /// Folder for the statistics (default: the model's cache folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn stats(a: StatsArgs) -> Result<()> {
    let lm = a.model.load()?;
    let corpus = match a.corpus {
        Some(c) => c,
        None => default_corpus()?,
    };
    let dir = stats_dir(&lm, a.out.as_deref());
    let layers = if a.layers.is_empty() {
        default_edit_layers(&lm)?
    } else {
        a.layers
    };
    let lm = crate::workspace::statistics_model(&lm);
    collect(&lm, &layers, &corpus, a.tokens, a.max_len, &dir)
}

/// ROME's default layer and MEMIT's default layers (where the model has MEMIT defaults).
pub fn default_edit_layers(lm: &loci_core::LoadedModel) -> Result<Vec<usize>> {
    let mut layers = vec![crate::workspace::rome_hparams(lm, None)?.layer];
    let memit = crate::workspace::memit_hparams(lm, EditMethod::Memit, &[], &Default::default());
    if let Ok(hp) = memit {
        layers.extend(hp.layers);
    }
    layers.sort_unstable();
    layers.dedup();
    Ok(layers)
}

#[derive(clap::Args, Debug)]
pub struct EditArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A CounterFact `requested_rewrite` object, a list of them, or CounterFact records (JSON
    /// text or a file holding it); repeatable. MEMIT edits them all at once.
    #[arg(long, conflicts_with_all = ["prompt", "subject", "target"])]
    pub request: Vec<String>,
    /// The prompt with the subject in it (or `{}` where the subject goes).
    #[arg(long, requires_all = ["subject", "target"])]
    pub prompt: Option<String>,
    #[arg(long)]
    pub subject: Option<String>,
    /// The new target.
    #[arg(long)]
    pub target: Option<String>,
    /// The old target (default: the model's current top-1).
    #[arg(long)]
    pub target_true: Option<String>,
    #[command(flatten)]
    pub edit: MethodArgs,
    /// Prompts that should change too.
    #[arg(long)]
    pub paraphrase: Vec<String>,
    /// Prompts that should not change.
    #[arg(long)]
    pub neighborhood: Vec<String>,
    /// Save the edit (a small safetensors file) here.
    #[arg(long)]
    pub save_edit: Option<PathBuf>,
    /// Write the edited model as a Hugging Face folder.
    #[arg(long)]
    pub save_model: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Requests from JSON: one `requested_rewrite`, a list of them, or CounterFact records.
pub fn parse_requests(text: &str) -> Result<Vec<RewriteRequest>> {
    if let Ok(r) = serde_json::from_str::<RewriteRequest>(text) {
        return Ok(vec![r]);
    }
    if let Ok(rs) = serde_json::from_str::<Vec<RewriteRequest>>(text) {
        return Ok(rs);
    }
    let cases = parse_cases(text)
        .context("not a requested_rewrite object, a list of them, or CounterFact records")?;
    Ok(cases.into_iter().map(|c| c.requested_rewrite).collect())
}

fn requests(a: &EditArgs, lm: &LoadedModel) -> Result<Vec<RewriteRequest>> {
    let mut reqs = vec![];
    for r in &a.request {
        let text = if Path::new(r).exists() {
            std::fs::read_to_string(r).with_context(|| format!("reading {r}"))?
        } else {
            r.clone()
        };
        reqs.extend(parse_requests(&text).context("--request")?);
    }
    if a.request.is_empty() {
        let mut req = RewriteRequest::from_prompt(
            a.prompt.as_deref().unwrap_or_default(),
            a.subject.as_deref().unwrap_or_default(),
            a.target.as_deref().unwrap_or_default(),
        )?;
        req.target_true = a.target_true.clone().map(TargetStr::new);
        reqs.push(req);
    }
    if reqs.is_empty() {
        bail!("no request to edit");
    }
    reqs.into_iter()
        .map(|r| Ok(lm.complete_request(r)?))
        .collect()
}

pub fn edit(a: EditArgs) -> Result<()> {
    a.edit.rule.check_for(a.edit.method)?;
    match a.edit.method {
        EditMethod::Rome => rome(a),
        EditMethod::Memit | EditMethod::Alphaedit | EditMethod::Emmet => memit(a),
        EditMethod::Ft => ft(a),
        EditMethod::Grace => grace(a),
    }
}

fn probes(a: &EditArgs) -> Probes {
    Probes {
        paraphrase: a.paraphrase.clone(),
        neighborhood: a.neighborhood.clone(),
        generate_tokens: 20,
    }
}

/// Writes the edit (`--save-edit`) and the edited model (`--save-model`) where asked.
fn save(a: &EditArgs, lm: &LoadedModel, e: &Edit) -> Result<()> {
    if let Some(p) = &a.save_edit {
        crate::workspace::write_atomic(p, &e.to_file(lm)?)?;
    }
    if let Some(dir) = &a.save_model {
        lm.save_hf_folder(dir)?;
    }
    Ok(())
}

/// The one fact ROME and fine-tuning edit.
fn one_request(a: &EditArgs, lm: &LoadedModel) -> Result<RewriteRequest> {
    let mut reqs = requests(a, lm)?;
    if reqs.len() != 1 {
        bail!(
            "{} edits one fact at a time ({} given); use --method memit, alphaedit or emmet \
             to edit them together",
            a.edit.method.name().to_uppercase(),
            reqs.len()
        );
    }
    Ok(reqs.remove(0))
}

fn ft(a: EditArgs) -> Result<()> {
    let started = Instant::now();
    if a.edit.layer.is_some() {
        bail!("--layer is for ROME; fine-tuning trains --layers L1,L2,...");
    }
    let mut lm = a.model.load()?;
    let req = one_request(&a, &lm)?;
    let hp = a
        .edit
        .changed(ft_hparams(&lm, &a.edit.layers, &a.edit.ft)?)?;
    let (e, _applied, mut report) = lm.ft_with_report(req, &hp, &probes(&a))?;
    save(&a, &lm, &Edit::Ft(e))?;
    report.seconds = started.elapsed().as_secs_f64();
    if a.json {
        return print_json(&report);
    }
    print_report(&report, &format!("fine-tuned layers {:?}", hp.layers))
}

fn grace(a: EditArgs) -> Result<()> {
    let started = Instant::now();
    if !a.edit.layers.is_empty() {
        bail!("--layers is for MEMIT and fine-tuning; GRACE's codebook sits at one --layer");
    }
    if a.save_model.is_some() {
        bail!(
            "a GRACE edit is not in the weights: --save-edit its file and apply it with \
             --apply-edit instead of --save-model"
        );
    }
    let mut lm = a.model.load()?;
    let req = one_request(&a, &lm)?;
    let hp = loci_core::edit::GraceHparams::defaults(&lm.model.cfg, a.edit.layer)?;
    let hp = a.edit.changed(hp)?;
    let (e, _applied, mut report) = lm.grace_with_report(req, &hp, &probes(&a))?;
    let what = match e.stats.nearest_distance {
        Some(d) => format!(
            "GRACE at layer {}: entry {} (the nearest key was {d:.3} away)",
            hp.layer, e.stats.action
        ),
        None => format!("GRACE at layer {}: the codebook's first entry", hp.layer),
    };
    save(&a, &lm, &Edit::Grace(e))?;
    report.seconds = started.elapsed().as_secs_f64();
    if a.json {
        return print_json(&report);
    }
    print_report(&report, &what)
}

fn rome(a: EditArgs) -> Result<()> {
    let started = Instant::now();
    if !a.edit.layers.is_empty() {
        bail!("--layers is for --method memit; ROME edits one --layer");
    }
    let mut lm = a.model.load()?;
    let req = one_request(&a, &lm)?;
    let mut hp = rome_hparams(&lm, a.edit.layer)?;
    hp.key_mode = key_mode(&a.edit.key_mode)?;
    if let Some(s) = a.edit.v_steps {
        hp.v_num_grad_steps = s;
    }
    let hp = a.edit.changed(hp)?;
    let layer = hp.layer;
    if layer >= lm.model.n_layer() {
        bail!(
            "layer {layer} out of range (the model has {} layers)",
            lm.model.n_layer()
        );
    }
    let stats = a.edit.stats.ensure(&lm, layer)?;
    let (e, _applied, mut report) = lm.rome_with_report(req, &hp, Some(&stats), &probes(&a))?;
    save(&a, &lm, &Edit::Rome(e))?;
    report.seconds = started.elapsed().as_secs_f64();
    if a.json {
        return print_json(&report);
    }
    print_report(&report, &format!("ROME at layer {}", report.layer))
}

/// A one-fact edit's before/after, as text.
fn print_report(report: &EditReport, what: &str) -> Result<()> {
    println!("{what}");
    let show = |name: &str, s: &EditSide| {
        println!(
            "{name}: p(new {:?}) = {:.4}, p(true {:?}) = {:.4}",
            report.request.target_new.str,
            s.rewrite.target_new,
            report
                .request
                .target_true
                .as_ref()
                .map(|t| t.str.as_str())
                .unwrap_or(""),
            s.rewrite.target_true
        );
        for p in s.paraphrase.iter().chain(&s.neighborhood) {
            println!(
                "  {:?}: new {:.4}, true {:.4}",
                p.prompt, p.target_new, p.target_true
            );
        }
    };
    show("before", &report.before);
    show("after ", &report.after);
    for (b, a) in report
        .generations
        .before
        .iter()
        .zip(&report.generations.after)
    {
        println!("before: {b}\nafter:  {a}");
    }
    println!("‖ΔW‖ = {:.3}, {:.1} s", report.delta_norm, report.seconds);
    Ok(())
}

/// The edits `--apply-edit` applies, read again: the keys earlier AlphaEdit edits keep.
pub(crate) fn applied_edits(model: &super::ModelArgs) -> Result<Vec<Edit>> {
    if let Some((_, edits)) = super::embedded::given() {
        return Ok(edits);
    }
    model
        .apply_edit
        .iter()
        .map(|f| Ok(Edit::from_bytes(&std::fs::read(f)?)?))
        .collect()
}

fn memit(a: EditArgs) -> Result<()> {
    let started = Instant::now();
    let name = a.edit.method.label();
    if a.edit.layer.is_some() {
        bail!("--layer is for ROME; {name} edits --layers L1,L2,...");
    }
    let mut lm = a.model.load()?;
    let reqs = requests(&a, &lm)?;
    let mut hp = memit_hparams(&lm, a.edit.method, &a.edit.layers, &a.edit.rule)?;
    if let Some(s) = a.edit.v_steps {
        hp.v_num_grad_steps = s;
    }
    let hp = a.edit.changed(hp)?;
    let stats = a.edit.stats.ensure_layers(&lm, &hp.layers)?;
    let earlier = applied_edits(&a.model)?;
    let pb = crate::workspace::spinner();
    let preserved = Preserved::of(&earlier);
    let (e, _applied, mut report) =
        lm.memit_with_report(reqs, &hp, &stats, &preserved, &probes(&a), &mut |m| {
            pb.set_message(format!("{name}: {m}"))
        })?;
    pb.finish_and_clear();
    save(&a, &lm, &Edit::Memit(e))?;
    report.seconds = started.elapsed().as_secs_f64();
    if a.json {
        return print_json(&report);
    }
    println!(
        "{name}: {} facts over layers {:?}",
        report.requests.len(),
        report.layers
    );
    for r in &report.requests {
        let old = r
            .request
            .target_true
            .as_ref()
            .map(|t| t.str.as_str())
            .unwrap_or("");
        println!(
            "{:?}: p(new {:?}) {:.4} → {:.4}, p(true {old:?}) {:.4} → {:.4}",
            r.request.filled(),
            r.request.target_new.str,
            r.before.rewrite.target_new,
            r.after.rewrite.target_new,
            r.before.rewrite.target_true,
            r.after.rewrite.target_true
        );
        for (b, af) in r.before.neighborhood.iter().zip(&r.after.neighborhood) {
            println!(
                "  {:?}: new {:.4} → {:.4}, true {:.4} → {:.4}",
                b.prompt, b.target_new, af.target_new, b.target_true, af.target_true
            );
        }
        for g in &r.generations.after {
            println!("  after: {g}");
        }
    }
    let norms: Vec<String> = report
        .delta_norms
        .iter()
        .map(|n| format!("{n:.3}"))
        .collect();
    println!(
        "‖ΔW‖ per layer: {}, {:.1} s",
        norms.join(", "),
        report.seconds
    );
    Ok(())
}
