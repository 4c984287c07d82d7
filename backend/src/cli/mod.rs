//! Subcommands; each one loads, calls the core, and prints text or one JSON object.

mod bench;
mod device;
pub mod edit;
pub mod embedded;
mod eval;
mod info;
mod predict;
mod render;
mod results;
pub mod study;
pub mod trace;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use loci_core::LoadedModel;

use loci_core::edit::EditMethod;

use crate::workspace::{
    default_model, device, open_model, FtSettings, Precision, RuleSettings, StatsSource,
};

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

/// The editing method and its settings, as `edit` and `eval` take them.
#[derive(clap::Args, Debug)]
pub struct MethodArgs {
    /// rome (one fact, one layer); memit, alphaedit or emmet (many facts over several layers;
    /// `eval` writes `--batch` cases per edit); ft (constrained fine-tuning of one fact at
    /// --layers); or grace (a codebook entry at one --layer, the weights untouched).
    #[arg(long, default_value = "rome")]
    pub method: EditMethod,
    /// ROME's edited layer, or GRACE's (default: Loci's shipped hyper-parameters for this
    /// model).
    #[arg(long)]
    pub layer: Option<usize>,
    /// MEMIT's or fine-tuning's layers, e.g. 3,4,5,6,7,8 (default: the shipped
    /// hyper-parameters).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    #[command(flatten)]
    pub ft: FtSettings,
    #[command(flatten)]
    pub rule: RuleSettings,
    #[command(flatten)]
    pub stats: StatsSource,
    /// ROME's key in the update's denominator: `rrome` (the template-averaged key, r-ROME's
    /// fix; default) or `original` (the bare prompt's, as the paper's code; collapses in long
    /// sequences).
    #[arg(long, default_value = "rrome")]
    pub key_mode: String,
    /// ROME / MEMIT: v* optimisation steps (default: the model's settings).
    #[arg(long)]
    pub v_steps: Option<usize>,
    /// Any of the method's settings, as a JSON object (or a file holding one) changing the
    /// shipped defaults: e.g. '{"v_lr": 0.5, "kl_factor": 0.0625}' (docs/rome.md and
    /// docs/memit.md list them). Applied after the other flags.
    #[arg(long)]
    pub hparams: Option<String>,
}

impl MethodArgs {
    /// `settings` with `--hparams`' changes (none without it).
    pub fn changed<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        settings: T,
    ) -> Result<T> {
        match &self.hparams {
            None => Ok(settings),
            Some(arg) => crate::workspace::with_changes(
                settings,
                &crate::workspace::read_changes(arg)?,
                self.method.label(),
            ),
        }
    }
}

impl ModelArgs {
    /// Opens the model these arguments name, with their edits applied.
    pub fn load(&self) -> Result<LoadedModel> {
        if let Some((lm, _)) = embedded::given() {
            if self.model.is_some() || self.random.is_some() || !self.apply_edit.is_empty() {
                anyhow::bail!("--model, --random and --apply-edit: the held model is used");
            }
            return Ok(lm);
        }
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
        let unedited = open_model(&path, self.dtype.dtype(), &device()?, &[])?;
        if self.apply_edit.is_empty() {
            return Ok(unedited);
        }
        // Key statistics computed on the way come from the model as its files hold it.
        crate::workspace::keep_unedited(unedited.clone());
        let mut lm = unedited;
        crate::workspace::apply_edit_files(&mut lm, &self.apply_edit)?;
        Ok(lm)
    }
}

/// Prints `v` as one line of JSON (or hands it to the program running the command).
pub fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    if embedded::capturing() {
        embedded::keep(serde_json::to_string(v)?);
    } else {
        println!("{}", serde_json::to_string(v)?);
    }
    Ok(())
}

pub fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    crate::workspace::write_atomic(path, serde_json::to_string_pretty(v)?.as_bytes())
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
    /// Rewrite facts (ROME, MEMIT or fine-tuning) and show what changed.
    Edit(Box<edit::EditArgs>),
    /// Evaluate an editing method on CounterFact or zsRE cases (each edit applied, measured,
    /// undone; or kept, in sequence).
    Eval(Box<eval::EvalArgs>),
    /// Hase et al.'s study: edit at many layers and ask whether tracing predicts success.
    #[command(subcommand)]
    Study(study::StudyCmd),
    /// Benchmarks (JSON with --json).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Compare the compute device (the GPU in a cuda build) with the CPU on the test models.
    CheckDevice(device::CheckDeviceArgs),
    /// What a model is, from its headers: family, shapes, stored types and quantisation, the
    /// edited matrix, and the memory it needs on the CPU, a GPU and in a tab.
    Info(info::InfoArgs),
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
                | Command::Bench(
                    bench::BenchCmd::Trace(_)
                        | bench::BenchCmd::Edit(_)
                        | bench::BenchCmd::Stats(_)
                        | bench::BenchCmd::Study(_)
                )
        )
    }
}

/// Runs one subcommand.
pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Predict(a) => predict::predict(a),
        Command::Generate(a) => predict::generate(a),
        Command::Trace(a) => trace::run(*a),
        Command::Stats(a) => edit::stats(*a),
        Command::Edit(a) => edit::edit(*a),
        Command::Eval(a) => eval::eval(*a),
        Command::Study(s) => study::study(s),
        Command::Bench(b) => bench::run(b),
        Command::CheckDevice(a) => device::run(a),
        Command::Info(a) => info::run(a),
    }
}
