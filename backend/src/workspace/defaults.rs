//! Each method's settings as the CLI and the server start from them: core's defaults for the
//! model, with the user's changes (fine-tuning's constraint and objective, ROME's key mode), and
//! the study's defaults.

use anyhow::{bail, Result};
use loci_core::edit::{FtHparams, FtObjective, KeyMode, MemitHparams, RomeHparams};
use loci_core::study::{EditProblem, StudyConfig, StudyMethod};
use loci_core::trace::NoiseSpec;
use loci_core::LoadedModel;

/// ROME's defaults for this model (core's: shipped, or the paper's), at `layer` when given.
pub fn rome_hparams(lm: &LoadedModel, layer: Option<usize>) -> Result<RomeHparams> {
    Ok(RomeHparams::defaults(&lm.model.cfg, layer)?)
}

/// Fine-tuning's settings beyond the layers.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct FtSettings {
    /// Fine-tuning: ε of the L∞ constraint around the original weights, or "none".
    #[arg(long)]
    pub norm_constraint: Option<String>,
    /// Fine-tuning: last_token (ROME's baseline) or sequence (Hase et al.'s).
    #[arg(long)]
    pub ft_objective: Option<String>,
}

/// Fine-tuning's shipped hyper-parameters for this model, with the command line's changes.
pub fn ft_hparams(lm: &LoadedModel, layers: &[usize], a: &FtSettings) -> Result<FtHparams> {
    let mut hp = FtHparams::defaults(&lm.model.cfg, layers)?;
    match a.norm_constraint.as_deref() {
        None => {}
        Some("none") => hp.norm_constraint = None,
        Some(e) => {
            hp.norm_constraint = Some(
                e.parse()
                    .map_err(|_| anyhow::anyhow!("--norm-constraint {e:?}: a number or none"))?,
            )
        }
    }
    match a.ft_objective.as_deref() {
        None => {}
        Some("last_token") => hp.objective = FtObjective::LastToken,
        Some("sequence") => hp.objective = FtObjective::Sequence,
        Some(o) => bail!("--ft-objective {o:?}: use last_token or sequence"),
    }
    Ok(hp)
}

/// MEMIT's defaults for this model (core's: shipped, or the paper's), at `layers` when given.
pub fn memit_hparams(lm: &LoadedModel, layers: &[usize]) -> Result<MemitHparams> {
    Ok(MemitHparams::defaults(&lm.model.cfg, layers)?)
}

/// ROME's `--key-mode`.
pub fn key_mode(name: &str) -> Result<KeyMode> {
    Ok(match name {
        "rrome" => KeyMode::Rrome,
        "original" => KeyMode::Original,
        other => bail!("--key-mode {other:?}: use original or rrome"),
    })
}

/// A study of `lm` with the paper's defaults: the model's shipped settings of each method
/// (ROME's layer, or the middle one, and the window around it where Loci has none), every fourth
/// layer, ROME's and the last unless `layers` are given, 10 trace samples, the 0.02 and
/// correctness filters, essence drift, and fine-tuning with Hase et al.'s sequence objective
/// unless `ft` names another.
pub fn study_config(
    lm: &LoadedModel,
    methods: Vec<StudyMethod>,
    problems: Vec<EditProblem>,
    layers: &[usize],
    noise: NoiseSpec,
    ft: &FtSettings,
) -> Result<StudyConfig> {
    let noise = match noise {
        NoiseSpec::Relative(f) => f * super::known::cached_embedding_std(lm, None)?,
        NoiseSpec::Fixed(s) => s,
        NoiseSpec::Uniform(_) => bail!("the study's noise is Gaussian: 3x or a σ"),
    };
    let mut cfg = StudyConfig::defaults(lm, methods, problems, layers, noise)?;
    if ft.norm_constraint.is_some() || ft.ft_objective.is_some() {
        let objective = cfg.ft.objective;
        cfg.ft = ft_hparams(lm, &[cfg.rome.layer], ft)?;
        if ft.ft_objective.is_none() {
            // Hase et al.'s FT: the target sequence's NLL, teacher-forced.
            cfg.ft.objective = objective;
        }
    }
    Ok(cfg)
}
