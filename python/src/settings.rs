//! A method's settings from Python keyword arguments: the model's shipped defaults (as the CLI
//! starts from them), the MEMIT family's update-rule settings as the CLI's flags, the rest
//! changed key by key as `--hparams` changes them (an unknown key refused by name).

use anyhow::{bail, Result};
use loci_backend::workspace::{
    ft_hparams, memit_hparams, rome_hparams, with_changes, RuleSettings,
};
use loci_core::edit::{EditMethod, FtHparams, GraceHparams, MemitHparams, RomeHparams};
use loci_core::LoadedModel;
use serde_json::{Map, Value};

/// A method's settings, ready to edit with.
pub enum Hparams {
    Rome(RomeHparams),
    Memit(MemitHparams),
    Ft(FtHparams),
    Grace(GraceHparams),
}

/// The settings of `method` for `lm`: defaults at `layer`/`layers`, then `changes`.
pub fn hparams(
    lm: &LoadedModel,
    method: EditMethod,
    layer: Option<usize>,
    layers: &[usize],
    mut changes: Map<String, Value>,
) -> Result<Hparams> {
    let mut rule = Map::new();
    // The MEMIT family's update-rule settings, taken by name before the rest.
    for k in RuleSettings::KEYS {
        if let Some(v) = changes.remove(k) {
            rule.insert(k.to_string(), v);
        }
    }
    let rule: RuleSettings = serde_json::from_value(Value::Object(rule))?;
    if method == EditMethod::Alphaedit && changes.contains_key("mom2_update_weight") {
        bail!("AlphaEdit does not weigh the corpus keys (mom2_update_weight); set its null space");
    }
    rule.check_for(method)?;
    let name = method.label();
    match method {
        EditMethod::Rome => {
            if !layers.is_empty() {
                bail!("layers is for the MEMIT family and fine-tuning; ROME edits one layer");
            }
            let hp = rome_hparams(lm, layer)?;
            check_layer(lm, hp.layer)?;
            Ok(Hparams::Rome(with_changes(hp, &changes, name)?))
        }
        EditMethod::Grace => {
            if !layers.is_empty() {
                bail!("layers is for the MEMIT family and fine-tuning; GRACE edits one layer");
            }
            let hp = GraceHparams::defaults(&lm.model.cfg, layer)?;
            Ok(Hparams::Grace(with_changes(hp, &changes, name)?))
        }
        EditMethod::Ft | EditMethod::Memit | EditMethod::Alphaedit | EditMethod::Emmet
            if layer.is_some() =>
        {
            bail!("layer is for ROME; {name} edits layers=[…]")
        }
        EditMethod::Ft => Ok(Hparams::Ft(with_changes(
            ft_hparams(lm, layers, &Default::default())?,
            &changes,
            name,
        )?)),
        _ => Ok(Hparams::Memit(with_changes(
            memit_hparams(lm, method, layers, &rule)?,
            &changes,
            name,
        )?)),
    }
}

fn check_layer(lm: &LoadedModel, layer: usize) -> Result<()> {
    let n = lm.model.n_layer();
    if layer >= n {
        bail!("layer {layer} out of range (the model has {n} layers)");
    }
    Ok(())
}
