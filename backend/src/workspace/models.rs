//! Opening models as the CLI and the server do: the device (the GPU in a cuda build), the
//! precision, the default model, saved edits applied on load, and the threads work may use.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use loci_core::{DType, Device, LoadedModel};

/// Opens a model file or folder on `device` in `dtype`, then applies `edits` (saved edit files)
/// in order.
pub fn open_model(
    path: &Path,
    dtype: DType,
    device: &Device,
    edits: &[PathBuf],
) -> Result<LoadedModel> {
    let mut lm = LoadedModel::load(path, dtype, device)
        .with_context(|| format!("loading {}", path.display()))?;
    apply_edit_files(&mut lm, edits)?;
    Ok(lm)
}

/// Applies saved edit files to `lm`, in order.
pub fn apply_edit_files(lm: &mut LoadedModel, edits: &[PathBuf]) -> Result<()> {
    for f in edits {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        lm.apply_file(&bytes)
            .with_context(|| format!("applying {}", f.display()))?;
    }
    Ok(())
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
