//! Each method's settings as the CLI and the server start from them: core's defaults for the
//! model, with the user's changes (fine-tuning's constraint and objective, ROME's key mode), and
//! the study's defaults.

use anyhow::{bail, Result};
use loci_core::edit::{
    EditMethod, FtHparams, FtObjective, KeyMode, MemitHparams, NullSpace, RomeHparams, UpdateRule,
};
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

/// The MEMIT family's settings beyond the layers (AlphaEdit's and EMMET's update rules).
#[derive(clap::Args, Debug, Default, Clone, serde::Deserialize)]
#[serde(default)]
pub struct RuleSettings {
    /// AlphaEdit: the null space is the key statistics' eigenvalues below this (paper: 2e-2).
    #[arg(long, conflicts_with = "null_energy")]
    pub null_threshold: Option<f64>,
    /// AlphaEdit: the null space is the smallest eigen-directions holding at most this
    /// fraction of the statistics' trace (scale-free; instead of --null-threshold).
    #[arg(long)]
    pub null_energy: Option<f64>,
    /// AlphaEdit: the ridge L2 of the projected system (paper: 10).
    #[arg(long)]
    pub l2: Option<f64>,
    /// EMMET: the batch's ridge μ, relative to λ (paper: 0.1).
    #[arg(long)]
    pub emmet_lambda: Option<f64>,
    /// MEMIT and EMMET: λ, the weight of the corpus keys (default: the model's settings).
    #[arg(long)]
    pub mom2_weight: Option<f64>,
}

impl RuleSettings {
    /// The settings' names, as JSON and Python's keyword arguments spell them.
    pub const KEYS: [&'static str; 5] = [
        "null_threshold",
        "null_energy",
        "l2",
        "emmet_lambda",
        "mom2_weight",
    ];

    /// The settings that belong to `method` (for runs of several methods with one set).
    pub fn of(&self, method: EditMethod) -> RuleSettings {
        let alpha = method == EditMethod::Alphaedit;
        RuleSettings {
            null_threshold: self.null_threshold.filter(|_| alpha),
            null_energy: self.null_energy.filter(|_| alpha),
            l2: self.l2.filter(|_| alpha),
            emmet_lambda: self.emmet_lambda.filter(|_| method == EditMethod::Emmet),
            mom2_weight: self
                .mom2_weight
                .filter(|_| method.takes_many_facts() && !alpha),
        }
    }

    /// Refuses settings given for a method that has none of them (ROME, fine-tuning).
    pub fn check_for(&self, method: EditMethod) -> Result<()> {
        let given = [
            self.null_threshold,
            self.null_energy,
            self.l2,
            self.emmet_lambda,
            self.mom2_weight,
        ];
        if !method.takes_many_facts() && given.iter().any(Option::is_some) {
            bail!(
                "the null space, L2, emmet_lambda and mom2 weight are settings of the MEMIT \
                 family (memit, alphaedit, emmet), not of {}",
                method.label()
            );
        }
        Ok(())
    }
}

/// The defaults of a MEMIT-family `method` for this model (core's: shipped, or the paper's),
/// at `layers` when given, with the command line's or request's rule settings; a setting of
/// another method is refused.
pub fn memit_hparams(
    lm: &LoadedModel,
    method: EditMethod,
    layers: &[usize],
    rule: &RuleSettings,
) -> Result<MemitHparams> {
    if rule.null_threshold.is_some() && rule.null_energy.is_some() {
        bail!("give AlphaEdit's null space as a threshold or as an energy, not both");
    }
    let mut hp = MemitHparams::for_method(method, &lm.model.cfg, layers)?;
    if let Some(w) = rule.mom2_weight {
        if method == EditMethod::Alphaedit {
            bail!("AlphaEdit does not weigh the corpus keys (mom2 weight); set its null space");
        }
        hp.mom2_update_weight = w;
    }
    match &mut hp.update {
        UpdateRule::NullSpace { null_space, l2 } => {
            if let Some(t) = rule.null_threshold {
                *null_space = NullSpace::Below(t);
            }
            if let Some(f) = rule.null_energy {
                *null_space = NullSpace::Energy(f);
            }
            *l2 = rule.l2.unwrap_or(*l2);
        }
        UpdateRule::Equality { emmet_lambda } => {
            *emmet_lambda = rule.emmet_lambda.unwrap_or(*emmet_lambda)
        }
        UpdateRule::LeastSquares => {}
    }
    let alpha = [rule.null_threshold, rule.null_energy, rule.l2];
    if method != EditMethod::Alphaedit && alpha.iter().any(Option::is_some) {
        bail!("the null space and L2 are AlphaEdit's settings (--method alphaedit)");
    }
    if method != EditMethod::Emmet && rule.emmet_lambda.is_some() {
        bail!("emmet_lambda is EMMET's setting (--method emmet)");
    }
    Ok(hp)
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

/// A method's settings changed key by key (`--hparams`, Python's keyword arguments): each key
/// must be one the settings have (an unknown one is refused, naming those there are), and each
/// value of its type.
pub fn with_changes<T: serde::Serialize + serde::de::DeserializeOwned>(
    settings: T,
    changes: &serde_json::Map<String, serde_json::Value>,
    method: &str,
) -> Result<T> {
    let serde_json::Value::Object(mut all) = serde_json::to_value(settings)? else {
        bail!("internal error: {method}'s settings are not an object");
    };
    for (k, v) in changes {
        if !all.contains_key(k) {
            let known: Vec<&str> = all.keys().map(String::as_str).collect();
            bail!(
                "{method} has no setting {k:?} (its settings: {})",
                known.join(", ")
            );
        }
        all.insert(k.clone(), v.clone());
    }
    serde_json::from_value(serde_json::Value::Object(all))
        .map_err(|e| anyhow::anyhow!("{method}'s settings: {e}"))
}

/// `--hparams`: a JSON object, or a file holding one.
pub fn read_changes(arg: &str) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = if std::path::Path::new(arg).is_file() {
        std::fs::read_to_string(arg)?
    } else {
        arg.to_string()
    };
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        _ => bail!("--hparams: a JSON object of settings (or a file holding one), e.g. '{{\"v_lr\": 0.5}}'"),
    }
}
