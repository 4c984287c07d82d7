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
    Memit(MemitHparams, Vec<KeyStats>),
    Ft(FtHparams),
    Grace(GraceHparams),
}

impl Method {
    /// The method `--method` names, with the hyper-parameters and statistics the other
    /// arguments give; arguments of another method are an error.
    pub(super) fn from_args(a: &EvalArgs, lm: &LoadedModel) -> Result<Self> {
        a.edit.rule.check_for(a.edit.method)?;
        Ok(match a.edit.method {
            EditMethod::Rome => {
                if !a.edit.layers.is_empty() || a.batch != 1 {
                    bail!(
                        "--layers and --batch are for the MEMIT family (memit, alphaedit, emmet)"
                    );
                }
                let mut hp = rome_hparams(lm, a.edit.layer)?;
                if let Some(s) = a.edit.v_steps {
                    hp.v_num_grad_steps = s;
                }
                hp.key_mode = crate::workspace::key_mode(&a.edit.key_mode)?;
                let hp = a.edit.changed(hp)?;
                let stats = a.edit.stats.ensure(lm, hp.layer)?;
                Method::Rome(hp, stats)
            }
            m @ (EditMethod::Memit | EditMethod::Alphaedit | EditMethod::Emmet) => {
                if a.edit.layer.is_some() {
                    bail!(
                        "--layer is for ROME; {} edits --layers L1,L2,...",
                        m.label()
                    );
                }
                let mut hp = memit_hparams(lm, m, &a.edit.layers, &a.edit.rule)?;
                if let Some(s) = a.edit.v_steps {
                    hp.v_num_grad_steps = s;
                }
                let hp = a.edit.changed(hp)?;
                let stats = a.edit.stats.ensure_layers(lm, &hp.layers)?;
                Method::Memit(hp, stats)
            }
            EditMethod::Ft => {
                if a.edit.layer.is_some() || a.batch != 1 {
                    bail!(
                        "--layer is for ROME and --batch for the MEMIT family; fine-tuning \
                         trains --layers"
                    );
                }
                Method::Ft(
                    a.edit
                        .changed(ft_hparams(lm, &a.edit.layers, &a.edit.ft)?)?,
                )
            }
            EditMethod::Grace => {
                if !a.edit.layers.is_empty() || a.batch != 1 {
                    bail!("GRACE edits one fact at a time at one --layer");
                }
                let hp = GraceHparams::defaults(&lm.model.cfg, a.edit.layer)?;
                Method::Grace(a.edit.changed(hp)?)
            }
        })
    }

    /// The layers the method edits.
    pub(super) fn layers(&self) -> Vec<usize> {
        match self {
            Method::Rome(hp, _) => vec![hp.layer],
            Method::Memit(hp, _) => hp.layers.clone(),
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
            Method::Memit(hp, stats) => {
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
            Method::Memit(hp, _) => format!("{} at layers {:?}", hp.method().label(), hp.layers),
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
