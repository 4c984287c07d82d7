//! GRACE (Hartvigsen et al. 2023): an edit is an entry of a codebook on one layer's MLP
//! down-projection — the edited prompt's key there, the output to give instead, and a radius —
//! and the weights never change (docs/grace.md). Sequential edits share the layer's codebook;
//! undo restores the codebook as it was.

use std::sync::Arc;

use candle_core::{DType, IndexOp, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::delta::AppliedEdit;
use super::EditGoal;
use crate::error::{LociError, Result};
use crate::hooks::{SetFirst, Site};
use crate::loader::LoadedModel;
use crate::model::layers::{Codebook, CodebookEntry};
use crate::model::split::SplitRun;
use crate::request::{target_ids, RewriteRequest};

/// How a new entry's value starts its training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueInit {
    /// Uniform on [0, 1) in every coordinate (the paper's `cold`).
    #[default]
    Cold,
    /// The layer's output for the prompt as it is (`warm`).
    Warm,
}

/// GRACE's settings (the paper's defaults: ε 1, learning rate 1, 100 steps, cold values).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GraceHparams {
    /// The layer whose MLP down-projection carries the codebook.
    pub layer: usize,
    /// A new entry's radius, ε_init, in the down-projection's input units.
    pub eps: f64,
    /// Adam's learning rate on the value.
    pub edit_lr: f64,
    /// Optimisation steps (no early stop, as the paper's code).
    pub n_iter: usize,
    /// How a new value starts.
    #[serde(default)]
    pub init: ValueInit,
    /// Seed of a cold value.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Fact erasure minimises p(target); subject noise is not supported (GRACE keys on the
    /// prompt the model reads).
    #[serde(flatten)]
    pub goal: EditGoal,
}

fn default_seed() -> u64 {
    1
}

impl GraceHparams {
    /// The paper's settings at `layer`, or by default about six sevenths of the way up (EasyEdit
    /// edits layer 27 of LLaMA-2-7B's 32, 25 of GPT-J's 28).
    pub fn defaults(cfg: &crate::config::ModelConfig, layer: Option<usize>) -> Result<Self> {
        let layer = layer.unwrap_or(((cfg.n_layer * 6 + 3) / 7).min(cfg.n_layer.max(1) - 1));
        let hp = Self {
            layer,
            eps: 1.0,
            edit_lr: 1.0,
            n_iter: 100,
            init: ValueInit::Cold,
            seed: 1,
            goal: EditGoal::default(),
        };
        hp.validate(cfg.n_layer)?;
        Ok(hp)
    }

    fn validate(&self, n_layer: usize) -> Result<()> {
        super::method::check_layers(&[self.layer], n_layer)?;
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(LociError::input("GRACE's radius eps must be positive"));
        }
        if !(self.edit_lr.is_finite() && self.edit_lr > 0.0) || self.n_iter == 0 {
            return Err(LociError::input(
                "GRACE needs a positive learning rate and at least one step",
            ));
        }
        if self.goal.subject_noise.is_some() {
            return Err(LociError::input(
                "GRACE keys on the prompt as the model reads it: it cannot edit under subject noise",
            ));
        }
        Ok(())
    }
}

/// What GRACE did, for reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GraceStats {
    /// The loss after each step.
    pub losses: Vec<f32>,
    /// The query's distance to the nearest key before the edit (none: an empty codebook).
    pub nearest_distance: Option<f32>,
    /// `added`, `split` (added, halving the radius of a nearby entry of another label) or
    /// `reused` (the nearest entry has the same label: its value retrained, its radius grown
    /// to cover the query when needed).
    pub action: String,
}

/// A GRACE edit: the codebook entries it adds or changes at its layer.
#[derive(Clone, Debug, PartialEq)]
pub struct GraceEdit {
    /// The fact it teaches.
    pub request: RewriteRequest,
    /// The settings it was made with (its layer among them).
    pub hparams: GraceHparams,
    /// How many entries the layer's codebook had when it was made (for reports: it applies
    /// wherever the entries it changes are, found by their keys).
    pub base: usize,
    /// Existing entries it changes: their index and what they become.
    pub changed: Vec<(usize, CodebookEntry)>,
    /// The entry it adds, if any.
    pub added: Option<CodebookEntry>,
    /// What it did.
    pub stats: GraceStats,
}

/// Where the query goes in the codebook.
enum Placement {
    /// A new entry of this radius (and, splitting, entry `j`'s radius cut to `r`).
    Add {
        radius: f32,
        split: Option<(usize, f32)>,
    },
    /// Entry `j`, its radius set to `radius`.
    Reuse { j: usize, radius: f32 },
}

/// GRACE's rule for a query `q` of label `label` among `entries` (`eps` the new radius).
fn place(
    entries: &[Arc<CodebookEntry>],
    q: &[f32],
    label: &[u32],
    eps: f32,
) -> (Placement, Option<f32>) {
    let dist = |k: &[f32]| -> f32 {
        k.iter()
            .zip(q)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt()
    };
    let Some((j, d)) = entries
        .iter()
        .enumerate()
        .map(|(j, e)| (j, dist(&e.key)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
    else {
        return (
            Placement::Add {
                radius: eps,
                split: None,
            },
            None,
        );
    };
    let near = &entries[j];
    let placement = if d > eps + near.radius {
        Placement::Add {
            radius: eps,
            split: None,
        }
    } else if near.label != label {
        // Two facts claim the same region: each gets half of the way between them.
        Placement::Add {
            radius: d / 2.0,
            split: Some((j, d / 2.0 - 1e-5)),
        }
    } else {
        Placement::Reuse {
            j,
            radius: near.radius.max(d),
        }
    };
    (placement, Some(d))
}

impl LoadedModel {
    /// A GRACE edit of `req` at `hp.layer`, on top of the layer's codebook as it is now (the
    /// model is not changed; apply the edit to change it).
    pub fn grace(&self, req: &RewriteRequest, hp: &GraceHparams) -> Result<GraceEdit> {
        req.validate()?;
        hp.validate(self.model.n_layer())?;
        let target = target_ids(self, req)?;
        let mut ids = self.encode_prompt(&req.filled())?;
        let p = ids.len() - 1;
        ids.extend(&target[..target.len() - 1]);
        if ids.len() > self.model.cfg.max_positions {
            return Err(LociError::input(
                "the prompt and target exceed the model's context",
            ));
        }
        let l = hp.layer;
        let split = self
            .model
            .split_at(&ids, p, &[Site::MlpKey(l), Site::Mlp(l)])?;
        let read = |site| -> Result<Vec<f32>> {
            Ok(split
                .captured
                .get(site)?
                .i((0, 0))?
                .to_dtype(DType::F32)?
                .to_vec1()?)
        };
        let (query, output) = (read(Site::MlpKey(l))?, read(Site::Mlp(l))?);
        let entries = match &self.model.down_proj(l)?.codebook {
            Some(c) => c.entries().to_vec(),
            None => vec![],
        };
        let (placement, nearest_distance) = place(&entries, &query, &target, hp.eps as f32);
        let start = match (&placement, hp.init) {
            (Placement::Reuse { j, .. }, _) => entries[*j].value.clone(),
            (_, ValueInit::Warm) => output,
            (_, ValueInit::Cold) => {
                let mut rng = crate::rng::SplitMix64::new(hp.seed);
                (0..output.len()).map(|_| rng.next_f64() as f32).collect()
            }
        };
        let (value, losses) = self.train_value(&split, hp, start, &target)?;
        let entry = |key: Vec<f32>, radius: f32| CodebookEntry {
            key,
            value: value.clone(),
            radius,
            label: target.clone(),
        };
        let (changed, added, action) = match placement {
            Placement::Add { radius, split } => {
                let cut = split.map(|(j, r)| {
                    let mut e = (*entries[j]).clone();
                    e.radius = r;
                    (j, e)
                });
                let action = if cut.is_some() { "split" } else { "added" };
                (
                    cut.into_iter().collect(),
                    Some(entry(query, radius)),
                    action,
                )
            }
            Placement::Reuse { j, radius } => {
                let e = entry(entries[j].key.clone(), radius);
                (vec![(j, e)], None, "reused")
            }
        };
        Ok(GraceEdit {
            request: req.clone(),
            hparams: hp.clone(),
            base: entries.len(),
            changed,
            added,
            stats: GraceStats {
                losses,
                nearest_distance,
                action: action.into(),
            },
        })
    }

    /// The value that, given as layer `hp.layer`'s MLP output at the prompt's last token, makes
    /// the model say `target` (or, lowering, not say it): Adam from `start`, `hp.n_iter` steps.
    fn train_value(
        &self,
        split: &SplitRun,
        hp: &GraceHparams,
        start: Vec<f32>,
        target: &[u32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let m = &self.model;
        let dev = &m.device;
        let labels = Tensor::new(target, dev)?.reshape((1, target.len(), 1))?;
        let mut adam = Adam::new(start, hp.edit_lr);
        let mut losses = vec![];
        for it in 0..hp.n_iter {
            let v = Var::from_slice(&adam.param, adam.param.len(), dev)?;
            let mut hook = SetFirst {
                site: Site::Mlp(hp.layer),
                rows: v.as_tensor().unsqueeze(0)?,
            };
            let out = m.run_from_split(split, hp.layer, 1, &mut hook)?;
            let logp = candle_nn::ops::log_softmax(&m.final_logits(&out)?, D::Minus1)?;
            let nll = logp.gather(&labels, 2)?.sum_all()?.neg()?;
            let loss = if hp.goal.direction.is_raise() {
                (nll / target.len() as f64)?
            } else {
                nll.neg()?.exp()?
            };
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(LociError::model(format!(
                    "GRACE's value optimisation diverged (loss {value}) at step {it}"
                )));
            }
            losses.push(value);
            let grad = loss.backward()?;
            let grad = grad
                .get(v.as_tensor())
                .ok_or_else(|| LociError::model("no gradient reached GRACE's value"))?
                .to_vec1::<f32>()?;
            adam.step(&grad);
            crate::progress::report("grace", it + 1, hp.n_iter, &[value])?;
        }
        Ok((adam.param, losses))
    }

    /// Adds a GRACE edit's entries to its layer's codebook and changes the entries it changes
    /// (found by their keys: other entries may have come or gone since it was made); keep the
    /// result to undo it exactly. Refused, changing nothing, when an entry it changes is not
    /// there.
    pub(crate) fn apply_grace(&mut self, e: &GraceEdit) -> Result<AppliedEdit> {
        let l = e.hparams.layer;
        let current = self.model.down_proj(l)?.clone();
        let mut entries = match &current.codebook {
            Some(c) => c.entries().to_vec(),
            None => vec![],
        };
        let (d_model, d_ff) = (self.model.cfg.d_model, self.model.cfg.d_ff);
        for (i, entry) in &e.changed {
            let at = match entries.get(*i) {
                Some(x) if x.key == entry.key => Some(*i),
                _ => entries.iter().position(|x| x.key == entry.key),
            };
            let Some(at) = at else {
                return Err(LociError::input(format!(
                    "this GRACE edit changes an entry an earlier edit made at layer {l}, and \
                     this model's codebook there does not hold it: apply the edits made before \
                     it first"
                )));
            };
            entries[at] = Arc::new(entry.clone());
        }
        entries.extend(e.added.clone().map(Arc::new));
        if entries
            .iter()
            .any(|x| x.key.len() != d_ff || x.value.len() != d_model)
        {
            return Err(LociError::input(format!(
                "the GRACE edit is for another model: its entries do not fit d_ff {d_ff} and \
                 d_model {d_model}"
            )));
        }
        let mut changed = current.clone();
        changed.codebook = Some(Codebook::new(entries, &self.model.device)?);
        self.model.set_down_proj(l, changed)?;
        // The undo record keeps the entries as pointers, not the lookup's tensors.
        let mut original = current;
        original.codebook = original.codebook.map(|c| c.detached());
        Ok(AppliedEdit {
            originals: vec![(l, original)],
        })
    }
}

/// Adam on one vector (β = 0.9, 0.999; ε = 1e-8), as torch's.
struct Adam {
    param: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    lr: f64,
    t: i32,
}

impl Adam {
    fn new(param: Vec<f32>, lr: f64) -> Self {
        let n = param.len();
        Self {
            param,
            m: vec![0.0; n],
            v: vec![0.0; n],
            lr,
            t: 0,
        }
    }

    fn step(&mut self, grad: &[f32]) {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        self.t += 1;
        let (c1, c2) = (1.0 - B1.powi(self.t), 1.0 - B2.powi(self.t));
        for (((p, m), v), &g) in self
            .param
            .iter_mut()
            .zip(&mut self.m)
            .zip(&mut self.v)
            .zip(grad)
        {
            *m = (B1 * *m as f64 + (1.0 - B1) * g as f64) as f32;
            *v = (B2 * *v as f64 + (1.0 - B2) * (g as f64).powi(2)) as f32;
            let step = self.lr * (*m as f64 / c1) / ((*v as f64 / c2).sqrt() + 1e-8);
            *p = (*p as f64 - step) as f32;
        }
    }
}

/// An entry's radius and label, in an edit file's metadata (its key and value are tensors).
#[derive(Serialize, Deserialize)]
struct EntryMeta {
    radius: f32,
    label: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
struct EditMeta {
    request: RewriteRequest,
    hparams: GraceHparams,
    base: usize,
    /// `(index, radius and label)` of each changed entry.
    changed: Vec<(usize, EntryMeta)>,
    added: Option<EntryMeta>,
    stats: GraceStats,
}

pub(crate) const FILE_KEY: &str = "loci_grace_edit";

impl GraceEdit {
    /// A safetensors file: the keys and values of the entries it adds or changes
    /// (`added.key`, `changed.{i}.value`, …), the rest in the metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let meta_of = |e: &CodebookEntry| EntryMeta {
            radius: e.radius,
            label: e.label.clone(),
        };
        let meta = EditMeta {
            request: self.request.clone(),
            hparams: self.hparams.clone(),
            base: self.base,
            changed: self.changed.iter().map(|(i, e)| (*i, meta_of(e))).collect(),
            added: self.added.as_ref().map(meta_of),
            stats: self.stats.clone(),
        };
        let named = self
            .changed
            .iter()
            .map(|(i, e)| (format!("changed.{i}"), e))
            .chain(self.added.iter().map(|e| ("added".to_string(), e)));
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = vec![];
        for (name, e) in named {
            tensors.push((format!("{name}.key"), vec![e.key.len()], &e.key));
            tensors.push((format!("{name}.value"), vec![e.value.len()], &e.value));
        }
        super::file::write(FILE_KEY, &meta, &tensors)
    }

    /// Reads a file written by `to_bytes`, refusing anything else or non-finite values.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let bad = |e: String| LociError::input(format!("not a Loci GRACE edit file: {e}"));
        let (meta, file): (EditMeta, _) =
            super::file::read(data, FILE_KEY, "no GRACE metadata", bad)?;
        let entry = |name: &str, m: EntryMeta| -> Result<CodebookEntry> {
            let key = file.f32(&format!("{name}.key"))?.0;
            let value = file.f32(&format!("{name}.value"))?.0;
            if key.iter().chain(&value).any(|x| !x.is_finite()) || !m.radius.is_finite() {
                return Err(file.bad(format!("{name} holds NaN or infinite values")));
            }
            Ok(CodebookEntry {
                key,
                value,
                radius: m.radius,
                label: m.label,
            })
        };
        let changed = meta
            .changed
            .into_iter()
            .map(|(i, m)| Ok((i, entry(&format!("changed.{i}"), m)?)))
            .collect::<Result<Vec<_>>>()?;
        let added = meta.added.map(|m| entry("added", m)).transpose()?;
        Ok(Self {
            request: meta.request,
            hparams: meta.hparams,
            base: meta.base,
            changed,
            added,
            stats: meta.stats,
        })
    }
}
