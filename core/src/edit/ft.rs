//! Constrained fine-tuning, the editing baseline of ROME and Hase et al. (docs/finetune.md): Adam
//! on the down-projection weight and bias of chosen layers, every step clamped into an L∞ ball of
//! radius ε around the original values (Zhu et al.'s FT-L).

use candle_core::{DType, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use super::delta::{LayerDelta, WeightChange};
use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::model::layers::Linear;
use crate::model::LogitsAt;
use crate::request::{spaced, RewriteRequest};

/// What the fine-tuning minimises.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FtObjective {
    /// ROME's FT: −mean log p of every target token at the prompt's last position (a bag of
    /// tokens at one position, as the reference code does).
    #[default]
    LastToken,
    /// Hase et al.'s FT: the target sequence's NLL with teacher forcing.
    Sequence,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FtHparams {
    pub layers: Vec<usize>,
    pub lr: f64,
    pub steps: usize,
    /// ε of the L∞ constraint around the original weights; `None`: unconstrained.
    pub norm_constraint: Option<f64>,
    #[serde(default)]
    pub objective: FtObjective,
    /// Fact erasure minimises p(target) itself, without early stop; fact forcing noises the
    /// subject, each step training on a batch of `noise_samples` fresh draws.
    #[serde(flatten)]
    pub goal: super::EditGoal,
    #[serde(default = "default_noise_samples")]
    pub noise_samples: usize,
}

fn default_noise_samples() -> usize {
    10
}

/// Per-model defaults shipped with Loci (`core/hparams/ft/*.json`).
const HPARAM_FILES: [&str; 5] = [
    include_str!("../../hparams/ft/gpt2-medium.json"),
    include_str!("../../hparams/ft/gpt2-large.json"),
    include_str!("../../hparams/ft/gpt2-xl.json"),
    include_str!("../../hparams/ft/gpt-j-6b.json"),
    include_str!("../../hparams/ft/smollm2-135m.json"),
];

impl FtHparams {
    /// The shipped hyper-parameters for a model of this shape, if Loci has them.
    pub fn for_model(cfg: &crate::config::ModelConfig) -> Option<Self> {
        super::method::shipped_for(&HPARAM_FILES, cfg)
    }

    /// The defaults for this model: its shipped settings (at `layers` when given), else ROME's
    /// constrained FT (ε = 5e-4) at `layers`; without either, an error asking for layers.
    pub fn defaults(cfg: &crate::config::ModelConfig, layers: &[usize]) -> Result<Self> {
        super::method::check_layers(layers, cfg.n_layer)?;
        match (Self::for_model(cfg), layers.is_empty()) {
            (Some(hp), true) => Ok(hp),
            (Some(mut hp), false) => {
                hp.layers = layers.to_vec();
                Ok(hp)
            }
            (None, false) => Ok(Self::at_layers(layers.to_vec(), Some(5e-4))),
            (None, true) => Err(LociError::input(
                "Loci has no default fine-tuning layers for this model; pass --layers",
            )),
        }
    }

    /// ROME's constrained FT (FT-L: lr 5e-4, 25 steps) at `layers` with L∞ radius `eps`.
    pub fn at_layers(layers: Vec<usize>, eps: Option<f64>) -> Self {
        Self {
            layers,
            lr: 5e-4,
            steps: 25,
            norm_constraint: eps,
            objective: FtObjective::LastToken,
            goal: super::EditGoal::default(),
            noise_samples: default_noise_samples(),
        }
    }
}

/// One layer's change: the whole weight difference and the bias difference.
#[derive(Clone, Debug, PartialEq)]
pub struct FtLayer {
    pub layer: usize,
    /// `[d_model, d_ff]`, row-major.
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FtStats {
    pub losses: Vec<f32>,
    /// Largest |Δw| over the trained weights (≤ ε when constrained).
    pub max_abs_change: f32,
    pub seconds: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FtEdit {
    pub d_model: usize,
    pub layers: Vec<FtLayer>,
    pub request: RewriteRequest,
    pub hparams: FtHparams,
    pub stats: FtStats,
}

#[derive(Serialize, Deserialize)]
struct EditMeta {
    d_model: usize,
    layers: Vec<(usize, bool)>,
    request: RewriteRequest,
    hparams: FtHparams,
    stats: FtStats,
}

pub(crate) const FILE_KEY: &str = "loci_ft_edit";

impl FtEdit {
    pub fn deltas(&self) -> Vec<LayerDelta<'_>> {
        self.layers
            .iter()
            .map(|l| LayerDelta {
                layer: l.layer,
                weight: WeightChange::Dense(&l.weight),
                bias: l.bias.as_deref(),
            })
            .collect()
    }

    /// A safetensors file: each layer's weight (and bias) difference, the rest in the metadata.
    /// Dense: d_model × d_ff floats per layer (3.5 MB for SmolLM2, 268 MB for GPT-J).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let d_model = self.d_model;
        let meta = EditMeta {
            d_model,
            layers: self
                .layers
                .iter()
                .map(|l| (l.layer, l.bias.is_some()))
                .collect(),
            request: self.request.clone(),
            hparams: self.hparams.clone(),
            stats: self.stats.clone(),
        };
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = vec![];
        for l in &self.layers {
            let d_ff = l.weight.len() / d_model.max(1);
            tensors.push((
                format!("weight.{}", l.layer),
                vec![d_model, d_ff],
                &l.weight,
            ));
            if let Some(b) = &l.bias {
                tensors.push((format!("bias.{}", l.layer), vec![d_model], b));
            }
        }
        super::file::write(FILE_KEY, &meta, &tensors)
    }

    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let bad = |e: String| LociError::input(format!("not a Loci fine-tuning edit file: {e}"));
        let (meta, file): (EditMeta, _) =
            super::file::read(data, FILE_KEY, "no fine-tuning metadata", bad)?;
        let mut layers = vec![];
        for &(layer, has_bias) in &meta.layers {
            let (weight, shape) = file.f32(&format!("weight.{layer}"))?;
            if shape.len() != 2 || shape[0] != meta.d_model {
                return Err(file.bad(format!(
                    "weight.{layer} is not a [{}, d_ff] matrix",
                    meta.d_model
                )));
            }
            let bias = if has_bias {
                Some(file.f32(&format!("bias.{layer}"))?.0)
            } else {
                None
            };
            if weight
                .iter()
                .chain(bias.iter().flatten())
                .any(|x| !x.is_finite())
            {
                return Err(file.bad("NaN or infinite values".into()));
            }
            layers.push(FtLayer {
                layer,
                weight,
                bias,
            });
        }
        Ok(Self {
            d_model: meta.d_model,
            layers,
            request: meta.request,
            hparams: meta.hparams,
            stats: meta.stats,
        })
    }
}

/// The trainable copy of one layer's down-projection (f32, whatever the model's dtype).
struct Trained {
    layer: usize,
    original: Linear,
    w0: Tensor,
    b0: Option<Tensor>,
    w: Var,
    b: Option<Var>,
}

impl Trained {
    /// Pulls the parameters back into `[x₀ − ε, x₀ + ε]`.
    fn clamp(&self, eps: f64) -> Result<()> {
        let pull = |v: &Var, x0: &Tensor| -> Result<()> {
            let lo = (x0 - eps)?;
            let hi = (x0 + eps)?;
            v.set(&v.as_tensor().maximum(&lo)?.minimum(&hi)?)?;
            Ok(())
        };
        pull(&self.w, &self.w0)?;
        if let (Some(b), Some(b0)) = (&self.b, &self.b0) {
            pull(b, b0)?;
        }
        Ok(())
    }
}

impl LoadedModel {
    /// Fine-tunes the chosen down-projections towards the request's new target and returns the
    /// change (the model is left as it was, also on error).
    pub fn finetune(&mut self, req: &RewriteRequest, hp: &FtHparams) -> Result<FtEdit> {
        req.validate()?;
        let n_layer = self.model.n_layer();
        if hp.layers.is_empty() || hp.layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(LociError::input(
                "fine-tuning needs one or more layers, ascending and distinct",
            ));
        }
        if let Some(&l) = hp.layers.iter().find(|&&l| l >= n_layer) {
            return Err(LociError::input(format!(
                "layer {l} out of range (the model has {n_layer} layers)"
            )));
        }
        if hp.lr.is_nan() || hp.lr <= 0.0 || hp.steps == 0 {
            return Err(LociError::input(
                "fine-tuning needs a positive learning rate and at least one step",
            ));
        }
        if hp.norm_constraint.is_some_and(|e| e.is_nan() || e < 0.0) {
            return Err(LociError::input("the norm constraint must be ≥ 0"));
        }
        if hp
            .goal
            .subject_noise
            .is_some_and(|s| !s.is_finite() || s <= 0.0)
            || hp.noise_samples == 0
        {
            return Err(LociError::input(
                "subject noise needs a positive σ and at least one sample",
            ));
        }
        let target = self.tokenizer.encode_plain(&spaced(&req.target_new.str))?;
        if target.is_empty() {
            return Err(LociError::input(format!(
                "the target {:?} tokenizes to nothing",
                req.target_new.str
            )));
        }
        let started = crate::clock::now_seconds();
        let prompt = self.encode_prompt(&req.filled())?;
        let m = &self.model;
        // Teacher forcing feeds the target but its last token; the last-token objective reads
        // the prompt's last position only.
        let (ids, positions): (Vec<u32>, Vec<usize>) = match hp.objective {
            FtObjective::LastToken => (prompt.clone(), vec![prompt.len() - 1; target.len()]),
            FtObjective::Sequence => {
                let mut ids = prompt.clone();
                ids.extend(&target[..target.len() - 1]);
                let first = prompt.len() - 1;
                (ids, (first..first + target.len()).collect())
            }
        };
        if ids.len() > m.cfg.max_positions {
            return Err(LociError::input(format!(
                "the prompt and target have {} tokens, more than the model's context of {}",
                ids.len(),
                m.cfg.max_positions
            )));
        }
        let rows = if hp.goal.subject_noise.is_some() {
            hp.noise_samples
        } else {
            1
        };
        let subject = match hp.goal.subject_noise {
            Some(_) => crate::request::subject_span(self, &req.prompt, &req.subject)?,
            None => (0, 0),
        };
        let input = m.ids_tensor(&vec![ids; rows])?;
        let pos = Tensor::new(
            positions
                .iter()
                .map(|&p| p as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            &m.device,
        )?;
        let labels = Tensor::new(target.as_slice(), &m.device)?
            .reshape((1, target.len(), 1))?
            .repeat((rows, 1, 1))?;

        let mut trained = vec![];
        for &l in &hp.layers {
            let original = m.down_proj(l)?.clone();
            let w0 = original.weight.to_dtype(DType::F32)?;
            let b0 = match &original.bias {
                Some(b) => Some(b.to_dtype(DType::F32)?),
                None => None,
            };
            trained.push(Trained {
                layer: l,
                w: Var::from_tensor(&w0)?,
                b: b0.as_ref().map(Var::from_tensor).transpose()?,
                w0,
                b0,
                original,
            });
        }
        let params: Vec<Var> = trained
            .iter()
            .flat_map(|t| std::iter::once(t.w.clone()).chain(t.b.clone()))
            .collect();
        let mut opt = AdamW::new(
            params,
            ParamsAdamW {
                lr: hp.lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
        )?;
        let dtype = m.dtype;
        let mut losses = vec![];
        let result = (|| -> Result<()> {
            for step in 0..hp.steps {
                // The model computes with the trainable copies (cast to its dtype: the cast is
                // differentiable, so gradients reach the f32 values).
                for t in &trained {
                    let w = t.w.as_tensor().to_dtype(dtype)?;
                    let b = match &t.b {
                        Some(b) => Some(b.as_tensor().to_dtype(dtype)?),
                        None => None,
                    };
                    self.model.set_down_proj(t.layer, Linear::new(w, b))?;
                }
                // Fresh noise every step, as the reference draws it.
                let mut noise = crate::hooks::noise::subject_noise(
                    &(0..rows)
                        .map(|r| (r, subject.0, subject.1))
                        .collect::<Vec<_>>(),
                    // Fresh draws every step.
                    hp.goal.noise(step as u64 + 1),
                    &self.model,
                )?;
                let logits = self
                    .model
                    .run(&input, &mut noise, None, LogitsAt::All)?
                    .ok_or_else(|| LociError::input("forward pass stopped early"))?;
                let logp = candle_nn::ops::log_softmax(&logits.index_select(&pos, 1)?, D::Minus1)?;
                // Per row: the objective's NLL; the loss averages rows.
                let picked = logp.gather(&labels, 2)?.neg()?.squeeze(2)?;
                let nll = match hp.objective {
                    FtObjective::LastToken => picked.mean(1)?,
                    FtObjective::Sequence => picked.sum(1)?,
                };
                let loss = if hp.goal.direction.is_raise() {
                    nll.mean_all()?
                } else {
                    nll.neg()?.exp()?.mean_all()?
                };
                let value = loss.to_scalar::<f32>()?;
                if !value.is_finite() {
                    return Err(LociError::model(format!(
                        "fine-tuning diverged (loss {value})"
                    )));
                }
                losses.push(value);
                if hp.goal.direction.is_raise() && value < 1e-2 {
                    break;
                }
                opt.step(&loss.backward()?)?;
                if let Some(eps) = hp.norm_constraint {
                    for t in &trained {
                        t.clamp(eps)?;
                    }
                }
            }
            Ok(())
        })();
        for t in &trained {
            self.model.set_down_proj(t.layer, t.original.clone())?;
        }
        result?;

        let mut layers = vec![];
        let mut max_abs_change = 0f32;
        for t in &trained {
            let dw = (t.w.as_tensor() - &t.w0)?;
            max_abs_change = max_abs_change.max(dw.abs()?.max_all()?.to_scalar::<f32>()?);
            let bias = match (&t.b, &t.b0) {
                (Some(b), Some(b0)) => Some((b.as_tensor() - b0)?.to_vec1::<f32>()?),
                _ => None,
            };
            layers.push(FtLayer {
                layer: t.layer,
                weight: dw.flatten_all()?.to_vec1::<f32>()?,
                bias,
            });
        }
        Ok(FtEdit {
            d_model: self.model.cfg.d_model,
            layers,
            request: req.clone(),
            hparams: hp.clone(),
            stats: FtStats {
                losses,
                max_abs_change,
                seconds: crate::clock::now_seconds() - started,
            },
        })
    }
}
