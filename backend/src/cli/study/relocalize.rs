//! `loci study relocalize`: a finished run's cases localised again another way (exact tracing,
//! attribution patching, knowledge neurons) with its edits kept as they are, so Hase et al.'s
//! question is asked of each localization on the very same edits — the edits are the costly
//! part, the localizations are not.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use loci_core::study::{CaseLine, CaseTrace, StudyConfig};
use loci_core::trace::TraceMethod;
use serde_json::Value;

use super::report::report;
use super::shards::read_results;
use crate::cli::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct StudyRelocalizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A run's JSONL, as `loci study run --out` wrote it.
    pub input: PathBuf,
    /// The new localization: `exact`, `attribution` or `neurons`.
    #[arg(long)]
    pub localization: TraceMethod,
    /// Noise samples of the trace (default: the run's); with `neurons`, the points of the
    /// integrated-gradient path (default 20).
    #[arg(long)]
    pub samples: Option<usize>,
    /// Where the relocalised run goes (JSONL; `study analyze` and a resumed `study run` with
    /// the new localization read it).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Localises every kept case of the run again, rewrites its lines with the new effects and
/// reports the analysis of the new file.
pub fn relocalize(a: StudyRelocalizeArgs) -> Result<()> {
    let lines: Vec<Value> =
        crate::cli::results::read_records(&a.input, "a study record").context("reading the run")?;
    let lm = a.model.load()?;
    let (run, cfg) = relocalized_run(&lines, &lm, &a)?;
    let cases: Vec<CaseLine> = lines
        .iter()
        .filter(|l| l["record"] == "case")
        .map(|l| serde_json::from_value(l.clone()))
        .collect::<Result<_, _>>()
        .context("a case line of the run")?;
    let kept: Vec<&CaseLine> = cases.iter().filter(|c| c.trace.is_some()).collect();
    let bar = crate::workspace::bar(
        kept.len() as u64,
        "localising {bar:40} {pos}/{len} cases [{elapsed_precise} < {eta}]",
    );
    let mut traces: BTreeMap<u64, CaseTrace> = BTreeMap::new();
    for case in kept {
        traces.insert(case.case_id, lm.case_trace(case, &cfg)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut text = String::new();
    for mut line in lines {
        relocalize_line(&mut line, &traces, &run)?;
        text.push_str(&serde_json::to_string(&line)?);
        text.push('\n');
    }
    std::fs::write(&a.out, text).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "study: {} cases localised by {}; results in {}",
        traces.len(),
        a.localization.name(),
        a.out.display()
    );
    let relocalized = read_results(std::slice::from_ref(&a.out))?;
    report(
        &loci_core::study::analyze(&relocalized),
        a.plot.as_deref(),
        a.json,
    )
}

/// The run's record (`{model, config}`) with the new localization, and that configuration:
/// the run must be one run, made on this model.
fn relocalized_run(
    lines: &[Value],
    lm: &loci_core::LoadedModel,
    a: &StudyRelocalizeArgs,
) -> Result<(Value, StudyConfig)> {
    let mut runs = lines
        .iter()
        .filter(|l| l["record"] == "case")
        .map(|l| &l["run"]);
    let Some(run) = runs.next().filter(|r| !r.is_null()) else {
        bail!("{} holds no case of a study run", a.input.display());
    };
    if runs.any(|r| r != run) {
        bail!(
            "{} mixes study runs of different settings",
            a.input.display()
        );
    }
    if run["model"] != lm.name.as_str() {
        bail!(
            "the run was made on model {}, not {}: relocalise it with that model",
            run["model"],
            lm.name
        );
    }
    let mut cfg: StudyConfig =
        serde_json::from_value(run["config"].clone()).context("the run's settings")?;
    let neurons = a.localization == TraceMethod::Neurons;
    cfg.trace_samples = match (a.samples, neurons, cfg.localization) {
        (Some(s), ..) => s,
        (None, true, _) => 20,
        (None, false, TraceMethod::Neurons) => 10,
        (None, false, _) => cfg.trace_samples,
    };
    cfg.localization = a.localization;
    if neurons {
        cfg.trace_windows.truncate(1);
    }
    cfg.validate(lm.model.n_layer())?;
    let run = serde_json::json!({ "model": lm.name, "config": cfg });
    Ok((run, cfg))
}

/// A line of the run with its case's new trace: every case line the new run, a kept case's
/// line its trace, an edit line its effects at its layer.
fn relocalize_line(line: &mut Value, traces: &BTreeMap<u64, CaseTrace>, run: &Value) -> Result<()> {
    if line["record"] == "case" {
        line["run"] = run.clone();
    }
    let Some(trace) = line["case_id"].as_u64().and_then(|id| traces.get(&id)) else {
        return Ok(());
    };
    if line["record"] == "case" {
        line["trace"] = serde_json::to_value(trace)?;
    } else if let Some(layer) = line["layer"].as_u64() {
        let at = |v: &[f32]| {
            v.get(layer as usize).copied().ok_or_else(|| {
                anyhow::anyhow!(
                    "an edit at layer {layer}, past the new trace's {} layers",
                    v.len()
                )
            })
        };
        line["tracing_effect"] = at(&trace.max_fraction_restored)?.into();
        line["subject_last_effect"] = at(&trace.subject_last_fraction)?.into();
    }
    Ok(())
}
