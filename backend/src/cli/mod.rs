//! Subcommands; each one loads, calls the core, and prints text or one JSON object.

mod bench;
mod device;
pub mod edit;
mod eval;
mod predict;
mod render;
mod results;
pub mod study;
pub mod trace;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use loci_core::{DType, Device, LoadedModel};

#[derive(Parser, Debug)]
#[command(
    name = "loci",
    version,
    about = "Find where a language model keeps a fact, and rewrite it."
)]
pub struct Cli {
    /// CPU threads for tensor kernels (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face folder (config.json, safetensors, tokenizer.json) or a .gguf file.
    /// Default: the fetched SmolLM2-135M (scripts/fetch-model.sh).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Weights and activations dtype.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub dtype: Precision,
    /// Instead of a model file: random weights in the shape of a known model (gpt2, gptj-6b),
    /// made on the device; for benchmarks.
    #[arg(long, conflicts_with = "model")]
    pub random: Option<String>,
    /// Apply saved edits (from `loci edit --save-edit`) before running, in order.
    #[arg(long = "apply-edit")]
    pub apply_edit: Vec<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }
}

impl ModelArgs {
    pub fn load(&self) -> Result<LoadedModel> {
        if let Some(preset) = &self.random {
            return Ok(loci_core::presets::random_model(
                preset,
                self.dtype.dtype(),
                &device()?,
            )?);
        }
        let path = match &self.model {
            Some(p) => p.clone(),
            None => default_model()?,
        };
        let dtype = self.dtype.dtype();
        let device = device()?;
        let mut lm = LoadedModel::load(&path, dtype, &device)
            .with_context(|| format!("loading {}", path.display()))?;
        for f in &self.apply_edit {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let edit = loci_core::edit::Edit::from_bytes(&bytes)?;
            lm.apply(&edit)
                .with_context(|| format!("applying {}", f.display()))?;
        }
        Ok(lm)
    }
}

/// The GPU when built with `cuda`, else the CPU.
pub fn device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        return Device::new_cuda(0).map_err(|e| {
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            anyhow::anyhow!(
                "cannot open CUDA device 0 ({first}); this loci is a cuda build and needs an NVIDIA GPU with the CUDA 13 libraries"
            )
        });
    }
    #[allow(unreachable_code)]
    Ok(Device::Cpu)
}

/// The default model: `$LOCI_MODELS` or `./models`, as `scripts/fetch-model.sh` lays it out.
pub fn default_model() -> Result<PathBuf> {
    let base = std::env::var_os("LOCI_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"));
    let p = base.join("smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.exists() {
        bail!(
            "no --model given and the default model is missing at {}; run scripts/fetch-model.sh",
            p.display()
        );
    }
    Ok(p)
}

pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

pub fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The most likely next tokens after a prompt.
    Predict(predict::PredictArgs),
    /// Continue a prompt.
    Generate(predict::GenerateArgs),
    /// Causal tracing: where in the network the answer is carried.
    Trace(Box<trace::TraceArgs>),
    /// Key statistics (E[k kᵀ] of MLP keys) for ROME, cached per model and layer.
    Stats(Box<edit::StatsArgs>),
    /// Rewrite a fact with ROME and show what changed.
    Edit(Box<edit::EditArgs>),
    /// Evaluate an editing method on CounterFact or zsRE cases (each edit applied, measured, undone; or kept, in sequence).
    Eval(Box<eval::EvalArgs>),
    /// Serve the web app and the JSON API.
    Serve(Box<crate::server::ServeArgs>),
    /// Hase et al.'s study: edit at many layers and ask whether tracing predicts success.
    #[command(subcommand)]
    Study(study::StudyCmd),
    /// Benchmarks (JSON with --json).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Compare the compute device (the GPU in a cuda build) with the CPU on the test models.
    CheckDevice(device::CheckDeviceArgs),
}

/// Threads this process may use (`--threads`, default all cores).
pub static WORKERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

pub fn workers() -> usize {
    WORKERS.get().copied().unwrap_or(1)
}

/// Threads a trace spreads its rows over: one per core on the CPU; one on a GPU, which runs
/// each row's whole batch itself.
pub fn trace_workers(device: &Device) -> usize {
    if device.is_cpu() {
        workers()
    } else {
        1
    }
}

impl Command {
    /// Commands that spread their work over their own worker threads (trace rows, v*'s row
    /// groups, statistics texts) rather than threading inside each matrix product.
    pub fn parallel_workers(&self) -> bool {
        matches!(
            self,
            Command::Trace(_)
                | Command::Stats(_)
                | Command::Edit(_)
                | Command::Eval(_)
                | Command::Study(study::StudyCmd::Run(_))
                | Command::Serve(_)
                | Command::Bench(bench::BenchCmd::Trace { .. } | bench::BenchCmd::Edit(_))
        )
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Command::Predict(a) => predict::predict(a),
        Command::Generate(a) => predict::generate(a),
        Command::Trace(a) => trace::run(*a),
        Command::Stats(a) => edit::stats(*a),
        Command::Edit(a) => edit::edit(*a),
        Command::Eval(a) => eval::eval(*a),
        Command::Serve(a) => crate::server::serve(*a),
        Command::Study(s) => study::study(s),
        Command::Bench(b) => bench::run(b),
        Command::CheckDevice(a) => device::run(a),
    }
}
