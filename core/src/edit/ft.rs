//! Constrained fine-tuning, the editing baseline of ROME and Hase et al. (docs/finetune.md): Adam
//! on the down-projection weight and bias of chosen layers, every step clamped into an L∞ ball of
//! radius ε around the original values (Zhu et al.'s FT-L).

use serde::{Deserialize, Serialize};

use super::delta::{LayerDelta, WeightChange};
use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::request::RewriteRequest;

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
    /// Largest |Δ| over the trained weights and biases (≤ ε when constrained).
    pub max_abs_change: f32,
    /// Wall-clock seconds it took (trained in a batch: the batch's).
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

impl FtHparams {
    /// Refuses settings that cannot train: no layers or unordered ones, layers past the model,
    /// a bad learning rate, constraint or noise.
    pub(super) fn validate(&self, n_layer: usize) -> Result<()> {
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

impl LoadedModel {
    /// Fine-tunes the chosen down-projections towards the request's new target and returns the
    /// change (the model is not changed): a batch of one (`ft_train`).
    pub fn finetune(&mut self, req: &RewriteRequest, hp: &FtHparams) -> Result<FtEdit> {
        req.validate()?;
        self.finetune_batch(std::slice::from_ref(req), hp)?
            .remove(0)
    }
}
