//! `loci check-device`: the same models on the CPU and on the compute device (the GPU in a
//! `cuda` build) must give the same answers. Run by tests/gpu/run.sh on a GPU machine.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use loci_core::edit::{
    Edit, FtHparams, KeyStats, MemitHparams, RewriteRequest, RomeHparams, StatsAccumulator,
};
use loci_core::predict::top_k;
use loci_core::trace::{NoiseSpec, Quiet, TraceKind, TraceRequest};
use loci_core::{DType, Device, LoadedModel};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct CheckDeviceArgs {
    /// Models to compare (HF folders or .gguf files). Default: the tiny test models.
    #[arg(long)]
    pub models: Vec<PathBuf>,
}

#[derive(Serialize)]
struct Check {
    model: String,
    dtype: String,
    what: &'static str,
    /// The largest absolute difference from the CPU (a count for "top-1 tokens differing").
    value: f32,
    tolerance: f32,
    pass: bool,
}

#[derive(Serialize)]
struct Report {
    device: String,
    checks: Vec<Check>,
    pass: bool,
}

const PROMPTS: [&str; 3] = [
    "The Eiffel Tower is located in the city of",
    "The mother tongue of Danielle Darrieux is",
    "Toko Yasuda, the",
];

/// Probability tolerances against the CPU in f32: reduced precision rounds every activation.
/// A few times what rounding alone gives on the CPU (SmolLM2's trace grid: 0.0027 in f16,
/// 0.018 in bf16; its next-token probabilities 0.0011 and 0.008).
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-3,
        DType::F16 => 1e-2,
        _ => 5e-2,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

/// Next-token probabilities of every prompt, one vector each.
fn probs(lm: &LoadedModel) -> Result<Vec<Vec<f32>>> {
    PROMPTS
        .iter()
        .map(|p| Ok(lm.next_probs(&lm.encode_prompt(p)?)?))
        .collect()
}

/// Prompts whose top-1 token differs from the CPU's, among those where the CPU's top-1 leads by
/// more than twice the tolerance (a near tie may flip in reduced precision without any fault).
fn top1_mismatches(want: &[Vec<f32>], got: &[Vec<f32>], tol: f32) -> f32 {
    want.iter()
        .zip(got)
        .filter(|(w, g)| {
            let (best, lead) = match top_k(w, 2)[..] {
                [(i, p1), (_, p2)] => (i, p1 - p2),
                _ => return false,
            };
            lead > 2.0 * tol && top_k(g, 1).first().map(|t| t.0) != Some(best)
        })
        .count() as f32
}

fn trace_grid(lm: &LoadedModel, full_answer: bool) -> Result<Vec<f32>> {
    let mut req = TraceRequest::new(PROMPTS[0], "Eiffel Tower");
    req.samples = 3;
    req.window = 2;
    req.noise = NoiseSpec::Fixed(0.1);
    if full_answer {
        // The study's quantity: a two-word answer, teacher-forced, MLP restored.
        req.answer = Some(" Paris, France".into());
        req.full_answer = true;
        req.kinds = vec![TraceKind::Mlp];
    } else {
        req.kinds = vec![TraceKind::Hidden, TraceKind::Mlp];
    }
    let r = lm.trace(&req, None, &mut Quiet, 1)?;
    Ok(r.scores.values().flatten().flatten().copied().collect())
}

/// Scaled to a largest entry of 1, so a comparison is relative.
fn unit(v: &[f32]) -> Vec<f32> {
    let m = v
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()))
        .max(f32::MIN_POSITIVE);
    v.iter().map(|x| x / m).collect()
}

fn eiffel() -> Result<RewriteRequest> {
    Ok(RewriteRequest::from_prompt(
        "The {} is located in the city of",
        "Eiffel Tower",
        "Rome",
    )?)
}

/// A ROME edit without key statistics (identity covariance): its two vectors, relative.
fn edit_vectors(lm: &LoadedModel) -> Result<Vec<f32>> {
    let mut hp = RomeHparams::at_layer(lm.model.n_layer() / 2);
    hp.mom2_adjustment = false;
    hp.v_num_grad_steps = 5;
    let e = lm.rome(&eiffel()?, &hp, None)?;
    Ok([unit(&e.left), unit(&e.right)].concat())
}

/// The two layers MEMIT edits here, around the middle.
fn memit_layers(lm: &LoadedModel) -> Vec<usize> {
    let mid = lm.model.n_layer() / 2;
    vec![mid.saturating_sub(1), mid]
}

/// Key statistics of MEMIT's layers over 400 bundled facts (in 10 texts: a sum per text costs
/// as much as a pass), made on the model's device.
fn key_stats(lm: &LoadedModel) -> Result<Vec<KeyStats>> {
    let max_len = lm.model.cfg.max_positions.min(1024);
    let mut acc = StatsAccumulator::new(lm, &memit_layers(lm), max_len)?;
    let facts = crate::workspace::bundled_fact_texts();
    let texts: Vec<String> = facts[..400].chunks(40).map(|c| c.join(" ")).collect();
    acc.add_texts(lm, &texts)?;
    Ok(acc.finish(lm, "bundled known_1000 facts")?)
}

/// The prompts' next-token probabilities with `edit` applied (then undone).
fn probs_after(lm: &mut LoadedModel, edit: &Edit) -> Result<Vec<f32>> {
    let applied = lm.apply(edit)?;
    let p = probs(lm);
    lm.undo_edit(applied)?;
    Ok(p?.concat())
}

/// MEMIT (two facts, two layers, 5 steps, with `stats`) and constrained fine-tuning (one fact,
/// 5 steps): the prompts' probabilities after each edit.
fn edited_probs(lm: &mut LoadedModel, stats: &[KeyStats]) -> Result<(Vec<f32>, Vec<f32>)> {
    let darrieux =
        RewriteRequest::from_prompt("The mother tongue of {} is", "Danielle Darrieux", "English")?;
    let mut hp = MemitHparams::at_layers(memit_layers(lm));
    hp.v_num_grad_steps = 5;
    let memit = Edit::Memit(lm.memit(&[eiffel()?, darrieux], &hp, stats, &mut |_| {})?);
    let mut ft = FtHparams::at_layers(vec![lm.model.n_layer() / 2], Some(5e-3));
    ft.steps = 5;
    let ft = Edit::Ft(lm.finetune(&eiffel()?, &ft)?);
    Ok((probs_after(lm, &memit)?, probs_after(lm, &ft)?))
}

fn default_models() -> Vec<PathBuf> {
    ["tiny-gpt2", "tiny-gptj", "tiny-llama"]
        .iter()
        .map(|n| PathBuf::from("tests/fixtures").join(n))
        .collect()
}

/// Compares every model on the device with the CPU and prints the report as JSON; any check
/// beyond its tolerance is an error.
pub fn run(a: CheckDeviceArgs) -> Result<()> {
    let device = super::device()?;
    let models = if a.models.is_empty() {
        default_models()
    } else {
        a.models
    };
    let mut checks = vec![];
    for path in &models {
        checks.extend(check_model(path, &device)?);
    }
    let pass = checks.iter().all(|c| c.pass);
    let report = Report {
        device: format!("{device:?}"),
        checks,
        pass,
    };
    super::print_json(&report)?;
    if !pass {
        anyhow::bail!("the device disagrees with the CPU beyond the tolerances");
    }
    Ok(())
}

/// The CPU's answers in f32, which the device must reproduce.
struct CpuAnswers {
    probs: Vec<Vec<f32>>,
    trace_grid: Vec<f32>,
    edit_vectors: Vec<f32>,
    whole_answer_grid: Vec<f32>,
    /// After a MEMIT edit and after a fine-tuning edit.
    edited_probs: (Vec<f32>, Vec<f32>),
}

/// One model's checks: the CPU's answers in f32 against the device's in f32, bf16 and f16.
fn check_model(path: &Path, device: &Device) -> Result<Vec<Check>> {
    let load = |dtype: DType, dev: &Device| {
        LoadedModel::load(path, dtype, dev).with_context(|| format!("loading {}", path.display()))
    };
    let mut cpu = load(DType::F32, &Device::Cpu)?;
    let cpu_stats = key_stats(&cpu)?;
    let want = CpuAnswers {
        probs: probs(&cpu)?,
        trace_grid: trace_grid(&cpu, false)?,
        edit_vectors: edit_vectors(&cpu)?,
        whole_answer_grid: trace_grid(&cpu, true)?,
        edited_probs: edited_probs(&mut cpu, &cpu_stats)?,
    };
    let mut checks = vec![];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut lm = load(dtype, device)?;
        let tol = tolerance(dtype);
        let mut found = forward_checks(&lm, &want, tol)?;
        // Half-precision activations move the edits' optimisations (also on the CPU): the
        // edits are compared in f32, where the device must reproduce the CPU.
        if dtype == DType::F32 {
            found.extend(edit_checks(&mut lm, &want, &cpu_stats, tol)?);
        }
        for (what, d, tolerance) in found {
            checks.push(Check {
                model: cpu.name.clone(),
                dtype: format!("{dtype:?}").to_lowercase(),
                what,
                value: d,
                tolerance,
                pass: d <= tolerance,
            });
        }
    }
    Ok(checks)
}

/// A check's name, its difference from the CPU and its tolerance.
type Found = (&'static str, f32, f32);

/// The forward passes' checks: next-token probabilities, top-1 tokens and the trace grid.
fn forward_checks(lm: &LoadedModel, want: &CpuAnswers, tol: f32) -> Result<Vec<Found>> {
    let got = probs(lm)?;
    Ok(vec![
        (
            "next-token probabilities",
            max_diff(&want.probs.concat(), &got.concat()),
            tol,
        ),
        (
            "top-1 tokens differing",
            top1_mismatches(&want.probs, &got, tol),
            0.0,
        ),
        (
            "trace grid",
            max_diff(&want.trace_grid, &trace_grid(lm, false)?),
            tol,
        ),
    ])
}

/// The edits' checks (in f32): the whole-answer trace grid, ROME's vectors, the key statistics
/// and the probabilities after a MEMIT and a fine-tuning edit.
fn edit_checks(
    lm: &mut LoadedModel,
    want: &CpuAnswers,
    cpu_stats: &[KeyStats],
    tol: f32,
) -> Result<Vec<Found>> {
    let mut found = vec![];
    // A whole answer's probability is a product of token probabilities (1e-20 on a
    // random model): compared relative to the grid's largest.
    found.push((
        "whole-answer trace grid (relative)",
        max_diff(
            &unit(&want.whole_answer_grid),
            &unit(&trace_grid(lm, true)?),
        ),
        tol,
    ));
    found.push((
        "ROME edit vectors (relative)",
        max_diff(&want.edit_vectors, &edit_vectors(lm)?),
        tol,
    ));
    let stats = key_stats(lm)?;
    let mom2 = |s: &[KeyStats]| -> Result<Vec<f32>> {
        let mut v = vec![];
        for k in s {
            v.extend(unit(&k.mom2.flatten_all()?.to_vec1::<f32>()?));
        }
        Ok(v)
    };
    found.push((
        "key statistics (relative)",
        max_diff(&mom2(cpu_stats)?, &mom2(&stats)?),
        tol,
    ));
    let (memit, ft) = edited_probs(lm, &stats)?;
    found.push((
        "probabilities after a MEMIT edit",
        max_diff(&want.edited_probs.0, &memit),
        tol,
    ));
    found.push((
        "probabilities after a fine-tuning edit",
        max_diff(&want.edited_probs.1, &ft),
        tol,
    ));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::top1_mismatches;

    #[test]
    fn a_changed_top1_counts_unless_the_cpu_had_a_near_tie() {
        let cpu = vec![vec![0.6, 0.3, 0.1], vec![0.41, 0.40, 0.19]];
        let same = cpu.clone();
        assert_eq!(top1_mismatches(&cpu, &same, 1e-3), 0.0);
        let flipped = vec![vec![0.3, 0.6, 0.1], vec![0.40, 0.41, 0.19]];
        // The first prompt's lead (0.3) is decided; the second's (0.01) is a near tie at 3e-2.
        assert_eq!(top1_mismatches(&cpu, &flipped, 3e-2), 1.0);
        assert_eq!(top1_mismatches(&cpu, &flipped, 1e-3), 2.0);
    }
}
