//! `loci check-device`: the same models on the CPU and on the compute device (the GPU in a
//! `cuda` build) must give the same answers. Run by tests/gpu/run.sh on a GPU machine.

use std::path::PathBuf;

use anyhow::{Context, Result};
use loci_core::edit::{RewriteRequest, RomeHparams};
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

fn trace_grid(lm: &LoadedModel) -> Result<Vec<f32>> {
    let mut req = TraceRequest::new(PROMPTS[0], "Eiffel Tower");
    req.samples = 3;
    req.window = 2;
    req.noise = NoiseSpec::Fixed(0.1);
    req.kinds = vec![TraceKind::Hidden, TraceKind::Mlp];
    let r = lm.trace(&req, None, &mut Quiet, 1)?;
    Ok(r.scores.values().flatten().flatten().copied().collect())
}

/// A ROME edit without key statistics (identity covariance): its two vectors, each scaled to a
/// largest entry of 1, so the comparison is relative.
fn edit_vectors(lm: &LoadedModel) -> Result<Vec<f32>> {
    let req =
        RewriteRequest::from_prompt("The {} is located in the city of", "Eiffel Tower", "Rome")?;
    let mut hp = RomeHparams::at_layer(lm.model.n_layer() / 2);
    hp.mom2_adjustment = false;
    hp.v_num_grad_steps = 5;
    let e = lm.rome(&req, &hp, None)?;
    let unit = |v: &[f32]| {
        let m = v
            .iter()
            .fold(0f32, |m, x| m.max(x.abs()))
            .max(f32::MIN_POSITIVE);
        v.iter().map(|x| x / m).collect::<Vec<f32>>()
    };
    Ok([unit(&e.left), unit(&e.right)].concat())
}

fn default_models() -> Vec<PathBuf> {
    ["tiny-gpt2", "tiny-gptj", "tiny-llama"]
        .iter()
        .map(|n| PathBuf::from("tests/fixtures").join(n))
        .collect()
}

pub fn run(a: CheckDeviceArgs) -> Result<()> {
    let device = super::device()?;
    let models = if a.models.is_empty() {
        default_models()
    } else {
        a.models
    };
    let mut checks = vec![];
    for path in &models {
        let load = |dtype: DType, dev: &Device| {
            LoadedModel::load(path, dtype, dev)
                .with_context(|| format!("loading {}", path.display()))
        };
        let cpu = load(DType::F32, &Device::Cpu)?;
        let want = (probs(&cpu)?, trace_grid(&cpu)?, edit_vectors(&cpu)?);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let lm = load(dtype, &device)?;
            let tol = tolerance(dtype);
            let got = probs(&lm)?;
            let mut found = vec![
                (
                    "next-token probabilities",
                    max_diff(&want.0.concat(), &got.concat()),
                    tol,
                ),
                (
                    "top-1 tokens differing",
                    top1_mismatches(&want.0, &got, tol),
                    0.0,
                ),
                ("trace grid", max_diff(&want.1, &trace_grid(&lm)?), tol),
            ];
            // Half-precision activations move v*'s optimisation (also on the CPU): the edit is
            // compared in f32, where the device must reproduce the CPU.
            if dtype == DType::F32 {
                found.push((
                    "ROME edit vectors (relative)",
                    max_diff(&want.2, &edit_vectors(&lm)?),
                    tol,
                ));
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
