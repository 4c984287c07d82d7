//! The editing method `loci eval` applies: its hyper-parameters and statistics from the
//! arguments, the edit it makes, and the edited layers' weights (to check they are restored).

use anyhow::{bail, Result};
use loci_core::edit::{
    Edit, EditMethod, FtHparams, GraceHparams, KeyStats, MemitHparams, Preserved, RomeHparams,
};
use loci_core::LoadedModel;

use super::EvalArgs;
use crate::workspace::{ft_hparams, memit_hparams, rome_hparams};

/// The edited layers' weights (and GRACE codebooks), bit for bit.
pub(super) fn bits(lm: &loci_core::LoadedModel, layers: &[usize]) -> Result<Vec<u32>> {
    let mut out = vec![];
    for &layer in layers {
        let down = lm.model.down_proj(layer)?;
        out.extend(down.codebook.as_ref().map(|c| c.bits()).unwrap_or_default());
        let w = down.weight.to_dtype(loci_core::DType::F32)?;
        out.extend(
            w.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits()),
        );
    }
    Ok(out)
}

/// The configured method with its hyper-parameters and statistics.
pub(super) enum Method {
    Rome(RomeHparams, KeyStats),
    /// The MEMIT family, with its cases per edit (`--batch`).
    Memit(MemitHparams, Vec<KeyStats>, usize),
    Ft(FtHparams),
    Grace(GraceHparams),
}

impl Method {
    /// The methods the run edits with: `--methods` (a sequence of each in turn), else
    /// `--method`; each with its hyper-parameters and statistics.
    pub(super) fn all_from_args(a: &EvalArgs, lm: &LoadedModel) -> Result<Vec<Self>> {
        if a.methods.is_empty() {
            return Ok(vec![Self::from_args(a, lm, a.edit.method, true)?]);
        }
        if a.edit.hparams.is_some() {
            bail!("--hparams changes one method's settings: give it with --method, not --methods");
        }
        for (i, m) in a.methods.iter().enumerate() {
            if a.methods[..i].contains(m) {
                bail!("--methods names {} twice", m.label());
            }
        }
        a.methods
            .iter()
            .map(|&m| Self::from_args(a, lm, m, false))
            .collect()
    }

    /// Method `m` with the hyper-parameters and statistics the arguments give. `alone`: the
    /// run's only method, and arguments of another method are an error; else each argument
    /// goes to the methods it belongs to (`--layer` to ROME and GRACE, `--layers` to the MEMIT
    /// family and fine-tuning, `--batch` to the MEMIT family).
    fn from_args(a: &EvalArgs, lm: &LoadedModel, m: EditMethod, alone: bool) -> Result<Self> {
        if alone {
            a.edit.rule.check_for(m)?;
            check_flags_for(a, m)?;
        }
        let (layer, layers) = match m {
            EditMethod::Rome | EditMethod::Grace => (a.edit.layer, &[][..]),
            _ => (None, &a.edit.layers[..]),
        };
        Ok(match m {
            EditMethod::Rome => {
                let mut hp = rome_hparams(lm, layer)?;
                if let Some(s) = a.edit.v_steps {
                    hp.v_num_grad_steps = s;
                }
                hp.key_mode = crate::workspace::key_mode(&a.edit.key_mode)?;
                let hp = a.edit.changed(hp)?;
                let stats = a.edit.stats.ensure(lm, hp.layer)?;
                Method::Rome(hp, stats)
            }
            _ if m.takes_many_facts() => {
                let mut hp = memit_hparams(lm, m, layers, &a.edit.rule.of(m))?;
                if let Some(s) = a.edit.v_steps {
                    hp.v_num_grad_steps = s;
                }
                let hp = a.edit.changed(hp)?;
                let stats = a.edit.stats.ensure_layers(lm, &hp.layers)?;
                Method::Memit(hp, stats, a.batch)
            }
            EditMethod::Ft => Method::Ft(a.edit.changed(ft_hparams(lm, layers, &a.edit.ft)?)?),
            _ => {
                let hp = GraceHparams::defaults(&lm.model.cfg, layer)?;
                Method::Grace(a.edit.changed(hp)?)
            }
        })
    }

    /// Cases written by one edit: `--batch` for the MEMIT family, else one.
    pub(super) fn batch(&self) -> usize {
        match self {
            Method::Memit(.., batch) => *batch,
            _ => 1,
        }
    }

    /// The method's name (`rome`, `memit`, …).
    pub(super) fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Which method this is.
    fn kind(&self) -> EditMethod {
        match self {
            Method::Rome(..) => EditMethod::Rome,
            Method::Memit(hp, ..) => hp.method(),
            Method::Ft(_) => EditMethod::Ft,
            Method::Grace(_) => EditMethod::Grace,
        }
    }

    /// Every hyper-parameter and where the key statistics came from, as JSON: what a
    /// continued run must share with the one it continues.
    pub(super) fn settings(&self) -> String {
        let from = |s: &KeyStats| serde_json::to_value(&s.provenance).unwrap_or_default();
        let v = match self {
            Method::Rome(hp, s) => serde_json::json!({"hparams": hp, "stats": [from(s)]}),
            Method::Memit(hp, s, _) => {
                serde_json::json!({"hparams": hp, "stats": s.iter().map(from).collect::<Vec<_>>()})
            }
            Method::Ft(hp) => serde_json::json!({ "hparams": hp }),
            Method::Grace(hp) => serde_json::json!({ "hparams": hp }),
        };
        v.to_string()
    }

    /// The layers the method edits.
    pub(super) fn layers(&self) -> Vec<usize> {
        match self {
            Method::Rome(hp, _) => vec![hp.layer],
            Method::Memit(hp, ..) => hp.layers.clone(),
            Method::Ft(hp) => hp.layers.clone(),
            Method::Grace(hp) => vec![hp.layer],
        }
    }

    /// The edit of `reqs` (one request for ROME and fine-tuning), after the edits whose keys
    /// AlphaEdit keeps (`preserved`).
    pub(super) fn make(
        &self,
        lm: &mut loci_core::LoadedModel,
        reqs: &[loci_core::edit::RewriteRequest],
        preserved: &Preserved,
        progress: &mut dyn FnMut(&str),
    ) -> loci_core::Result<Edit> {
        Ok(match self {
            Method::Rome(hp, stats) => Edit::Rome(lm.rome(&reqs[0], hp, Some(stats))?),
            Method::Memit(hp, stats, _) => {
                Edit::Memit(lm.memit_preserving(reqs, hp, stats, preserved, progress)?)
            }
            Method::Ft(hp) => Edit::Ft(lm.finetune(&reqs[0], hp)?),
            Method::Grace(hp) => Edit::Grace(lm.grace(&reqs[0], hp)?),
        })
    }

    /// The method and its settings, for titles and run labels.
    pub(super) fn describe(&self) -> String {
        match self {
            Method::Rome(hp, _) => format!(
                "ROME{} at layer {}",
                match hp.key_mode {
                    loci_core::edit::KeyMode::Original => " (the paper's key)",
                    loci_core::edit::KeyMode::Rrome => "",
                },
                hp.layer
            ),
            Method::Memit(hp, ..) => format!("{} at layers {:?}", hp.method().label(), hp.layers),
            Method::Ft(hp) => format!(
                "fine-tuning of layers {:?} (L∞ ε {}, {} objective)",
                hp.layers,
                hp.norm_constraint
                    .map_or("none".to_string(), |e| e.to_string()),
                serde_json::to_value(hp.objective)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            ),
            Method::Grace(hp) => format!("GRACE at layer {} (ε {})", hp.layer, hp.eps),
        }
    }
}

/// Refuses the arguments that belong to other methods than `m`, the run's only one.
fn check_flags_for(a: &EvalArgs, m: EditMethod) -> Result<()> {
    let one = !a.edit.layers.is_empty() || a.batch != 1;
    match m {
        EditMethod::Rome if one => {
            bail!("--layers and --batch are for the MEMIT family (memit, alphaedit, emmet)")
        }
        EditMethod::Memit | EditMethod::Alphaedit | EditMethod::Emmet if a.edit.layer.is_some() => {
            bail!(
                "--layer is for ROME; {} edits --layers L1,L2,...",
                m.label()
            )
        }
        EditMethod::Ft if a.edit.layer.is_some() || a.batch != 1 => bail!(
            "--layer is for ROME and --batch for the MEMIT family; fine-tuning trains --layers"
        ),
        EditMethod::Grace if one => bail!("GRACE edits one fact at a time at one --layer"),
        _ => Ok(()),
    }
}
