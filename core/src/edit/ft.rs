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

/// Constrained fine-tuning's settings (docs/finetune.md#hyper-parameters).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FtHparams {
    /// The trained down-projections' layers, ascending.
    pub layers: Vec<usize>,
    /// Adam's learning rate.
    pub lr: f64,
    /// The most optimisation steps (fewer when the loss falls below 0.01).
    pub steps: usize,
    /// ε of the L∞ constraint around the original weights; `None`: unconstrained.
    pub norm_constraint: Option<f64>,
    /// What the loss reads: the prompt's last position or the whole target.
    #[serde(default)]
    pub objective: FtObjective,
    /// Fact erasure minimises p(target) itself, without early stop; fact forcing noises the
    /// subject, each step training on a batch of `noise_samples` fresh draws.
    #[serde(flatten)]
    pub goal: super::EditGoal,
    /// Rows per step under subject noise, each with its own draw.
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
        super::method::layered_defaults(
            Self::for_model(cfg),
            layers,
            cfg.n_layer,
            "fine-tuning",
            |l| Self::at_layers(l, Some(5e-4)),
            |hp, l| hp.layers = l,
        )
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
    /// The layer whose down-projection changed.
    pub layer: usize,
    /// `[d_model, d_ff]`, row-major.
    pub weight: Vec<f32>,
    /// The bias difference, `d_model` wide, when the layer has a bias.
    pub bias: Option<Vec<f32>>,
}

/// What the fine-tuning did, for reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FtStats {
    /// The loss after each step.
    pub losses: Vec<f32>,
    /// Largest |Δw| over the trained weights (≤ ε when constrained).
    pub max_abs_change: f32,
    /// Wall-clock seconds it took.
    pub seconds: f64,
}

/// A fine-tuning edit: dense weight (and bias) differences of its layers, undone exactly.
#[derive(Clone, Debug, PartialEq)]
pub struct FtEdit {
    /// The model's width (each weight difference is `[d_model, d_ff]`).
    pub d_model: usize,
    /// Each trained layer's change.
    pub layers: Vec<FtLayer>,
    /// The fact it teaches.
    pub request: RewriteRequest,
    /// The settings it was trained with.
    pub hparams: FtHparams,
    /// What the training did.
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
    /// The changes to apply, one per layer.
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

    /// Reads a file written by `to_bytes`, refusing anything else or non-finite values.
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
    /// An f32 trainable copy of layer `l`'s down-projection, beside the original.
    fn new(m: &crate::model::Model, l: usize) -> Result<Self> {
        let original = m.down_proj(l)?.clone();
        let w0 = original.weight.to_dtype(DType::F32)?;
        let b0 = original
            .bias
            .as_ref()
            .map(|b| b.to_dtype(DType::F32))
            .transpose()?;
        Ok(Trained {
            layer: l,
            w: Var::from_tensor(&w0)?,
            b: b0.as_ref().map(Var::from_tensor).transpose()?,
            w0,
            b0,
            original,
        })
    }

    /// The trainable values as a layer of the model's `dtype`.
    fn current(&self, dtype: DType) -> Result<Linear> {
        let w = self.w.as_tensor().to_dtype(dtype)?;
        let b = self
            .b
            .as_ref()
            .map(|b| b.as_tensor().to_dtype(dtype))
            .transpose()?;
        Ok(Linear::new(w, b))
    }

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

impl FtHparams {
    /// Refuses settings that cannot train: no layers or unordered ones, layers past the model,
    /// a bad learning rate, constraint or noise.
    fn validate(&self, n_layer: usize) -> Result<()> {
        if self.layers.is_empty() || self.layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(LociError::input(
                "fine-tuning needs one or more layers, ascending and distinct",
            ));
        }
        super::method::check_layers(&self.layers, n_layer)?;
        if self.lr.is_nan() || self.lr <= 0.0 || self.steps == 0 {
            return Err(LociError::input(
                "fine-tuning needs a positive learning rate and at least one step",
            ));
        }
        if self.norm_constraint.is_some_and(|e| e.is_nan() || e < 0.0) {
            return Err(LociError::input("the norm constraint must be ≥ 0"));
        }
        let bad_noise = self
            .goal
            .subject_noise
            .is_some_and(|s| !s.is_finite() || s <= 0.0);
        if bad_noise || self.noise_samples == 0 {
            return Err(LociError::input(
                "subject noise needs a positive σ and at least one sample",
            ));
        }
        Ok(())
    }
}

/// What every step trains on: the rows (one, or one per noise draw), the positions read out
/// and the labels there.
struct FtBatch {
    input: Tensor,
    /// Positions whose next-token distributions the loss reads.
    pos: Tensor,
    /// The target's tokens, `[rows, targets, 1]`.
    labels: Tensor,
    rows: usize,
    /// The subject's tokens, noised when the goal asks.
    subject: (usize, usize),
}

impl LoadedModel {
    /// Fine-tunes the chosen down-projections towards the request's new target and returns the
    /// change (the model is left as it was, also on error).
    pub fn finetune(&mut self, req: &RewriteRequest, hp: &FtHparams) -> Result<FtEdit> {
        req.validate()?;
        hp.validate(self.model.n_layer())?;
        let started = crate::clock::now_seconds();
        let batch = self.ft_batch(req, hp)?;
        let trained = hp
            .layers
            .iter()
            .map(|&l| Trained::new(&self.model, l))
            .collect::<Result<Vec<_>>>()?;
        let result = self.ft_train(hp, &batch, &trained);
        for t in &trained {
            self.model.set_down_proj(t.layer, t.original.clone())?;
        }
        let losses = result?;
        let (layers, max_abs_change) = changes(&trained)?;
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

    /// The rows the objective reads: teacher forcing feeds the target but its last token; the
    /// last-token objective reads the prompt's last position only.
    fn ft_batch(&self, req: &RewriteRequest, hp: &FtHparams) -> Result<FtBatch> {
        let target = self.tokenizer.encode_plain(&spaced(&req.target_new.str))?;
        if target.is_empty() {
            return Err(LociError::input(format!(
                "the target {:?} tokenizes to nothing",
                req.target_new.str
            )));
        }
        let prompt = self.encode_prompt(&req.filled())?;
        let m = &self.model;
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
        let rows = match hp.goal.subject_noise {
            Some(_) => hp.noise_samples,
            None => 1,
        };
        let subject = match hp.goal.subject_noise {
            Some(_) => crate::request::subject_span(self, &req.prompt, &req.subject)?,
            None => (0, 0),
        };
        let pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let labels = Tensor::new(target.as_slice(), &m.device)?
            .reshape((1, target.len(), 1))?
            .repeat((rows, 1, 1))?;
        Ok(FtBatch {
            input: m.ids_tensor(&vec![ids; rows])?,
            pos: Tensor::new(pos.as_slice(), &m.device)?,
            labels,
            rows,
            subject,
        })
    }

    /// Adam on the trainable copies, each step clamped into the L∞ ball; returns the losses.
    /// The model computes with the copies and is not restored here.
    fn ft_train(
        &mut self,
        hp: &FtHparams,
        batch: &FtBatch,
        trained: &[Trained],
    ) -> Result<Vec<f32>> {
        let params: Vec<Var> = trained
            .iter()
            .flat_map(|t| std::iter::once(t.w.clone()).chain(t.b.clone()))
            .collect();
        let adam = ParamsAdamW {
            lr: hp.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(params, adam)?;
        let mut losses = vec![];
        for step in 0..hp.steps {
            for t in trained {
                // Cast to the model's dtype: the cast is differentiable, so gradients reach the
                // f32 values.
                self.model
                    .set_down_proj(t.layer, t.current(self.model.dtype)?)?;
            }
            let loss = self.ft_loss(hp, batch, step)?;
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
                for t in trained {
                    t.clamp(eps)?;
                }
            }
        }
        Ok(losses)
    }

    /// One step's loss (a graph): per row the objective's NLL, averaged over rows; erasure
    /// minimises p = exp(−NLL) instead. The subject gets fresh noise every step, as the
    /// reference draws it.
    fn ft_loss(&self, hp: &FtHparams, batch: &FtBatch, step: usize) -> Result<Tensor> {
        let spans: Vec<(usize, usize, usize)> = (0..batch.rows)
            .map(|r| (r, batch.subject.0, batch.subject.1))
            .collect();
        let noise = hp.goal.noise(step as u64 + 1);
        let mut noise =
            crate::hooks::noise::subject_noise(&spans, noise, self.model.width_on_device())?;
        let logits = self
            .model
            .run(&batch.input, &mut noise, None, LogitsAt::All)?
            .ok_or_else(|| LociError::input("forward pass stopped early"))?;
        let logp = candle_nn::ops::log_softmax(&logits.index_select(&batch.pos, 1)?, D::Minus1)?;
        let picked = logp.gather(&batch.labels, 2)?.neg()?.squeeze(2)?;
        let nll = match hp.objective {
            FtObjective::LastToken => picked.mean(1)?,
            FtObjective::Sequence => picked.sum(1)?,
        };
        Ok(if hp.goal.direction.is_raise() {
            nll.mean_all()?
        } else {
            nll.neg()?.exp()?.mean_all()?
        })
    }
}

/// Each trained layer's change from its original values, and the largest |Δw|.
fn changes(trained: &[Trained]) -> Result<(Vec<FtLayer>, f32)> {
    let mut layers = vec![];
    let mut max_abs_change = 0f32;
    for t in trained {
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
    Ok((layers, max_abs_change))
}
