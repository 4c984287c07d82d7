//! `loci check-device`: the same models on the CPU and on the compute device (the GPU in a
//! `cuda` build) must give the same answers. Run by tests/gpu/run.sh on a GPU machine.

use std::path::PathBuf;

use anyhow::{Context, Result};
use loci_core::edit::{RewriteRequest, RomeHparams};
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
    max_abs_diff: f32,
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
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-3,
        DType::F16 => 5e-3,
        _ => 3e-2,
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

/// Next-token probabilities of every prompt, concatenated.
fn probs(lm: &LoadedModel) -> Result<Vec<f32>> {
    let mut out = vec![];
    for p in PROMPTS {
        let ids = lm.encode_prompt(p)?;
        out.extend(lm.next_probs(&ids)?);
    }
    Ok(out)
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
            let mut found = vec![
                ("next-token probabilities", max_diff(&want.0, &probs(&lm)?)),
                ("trace grid", max_diff(&want.1, &trace_grid(&lm)?)),
            ];
            // Half-precision activations move v*'s optimisation (also on the CPU): the edit is
            // compared in f32, where the device must reproduce the CPU.
            if dtype == DType::F32 {
                found.push((
                    "ROME edit vectors (relative)",
                    max_diff(&want.2, &edit_vectors(&lm)?),
                ));
            }
            for (what, d) in found {
                checks.push(Check {
                    model: cpu.name.clone(),
                    dtype: format!("{dtype:?}").to_lowercase(),
                    what,
                    max_abs_diff: d,
                    tolerance: tol,
                    pass: d <= tol,
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
