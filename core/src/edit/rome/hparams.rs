//! ROME's hyper-parameters: the paper's values (Meng et al. 2022, GPT-2 XL and GPT-J), the
//! per-model files shipped in `core/hparams/rome/`, and what v*'s optimisation takes of them.

use serde::{Deserialize, Serialize};

use crate::error::{LociError, Result};
use crate::hooks::noise::SubjectNoise;
use crate::hooks::Site;

/// Which key the closed-form update divides by (docs/rome.md#r-romes-key).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyMode {
    /// The paper's code: the bare prompt's key in the denominator (can blow up).
    Original,
    /// r-ROME: the template-averaged k* everywhere.
    #[default]
    Rrome,
}

/// ROME's hyper-parameters (docs/rome.md), as the shipped per-model files spell them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RomeHparams {
    /// The layer whose MLP down-projection is edited.
    pub layer: usize,
    /// Most steps of v*'s optimisation (raising edits stop once the loss is below 0.05).
    pub v_num_grad_steps: usize,
    /// Adam's learning rate in v*'s optimisation.
    pub v_lr: f64,
    /// Weight of the penalty on ‖δ‖ (over the original value's squared norm) in v*'s loss.
    pub v_weight_decay: f64,
    /// δ's norm is clamped to this many times the original value's norm.
    pub clamp_norm_factor: f64,
    /// Weight of the KL term that keeps the model's predictions for "{subject} is a" in place.
    pub kl_factor: f64,
    /// Divides the key by the key statistics C (u = C⁻¹k*); needs
    /// [`KeyStats`](crate::edit::KeyStats) for the layer.
    pub mom2_adjustment: bool,
    /// `(new tokens, count)` per group of context templates; ROME: 4×10 and 9×10.
    pub context_templates: Vec<(usize, usize)>,
    /// Which key the closed-form update divides by.
    pub key_mode: KeyMode,
    /// Seed of the context templates' sampling and of any subject noise.
    pub seed: u64,
    /// Fact erasure lowers the target; fact forcing noises the subject while k* is read and v*
    /// optimised.
    #[serde(flatten)]
    pub goal: crate::edit::EditGoal,
}

/// Per-model defaults shipped with Loci (`core/hparams/rome/*.json`).
const HPARAM_FILES: [&str; 6] = [
    include_str!("../../../hparams/rome/gpt2.json"),
    include_str!("../../../hparams/rome/gpt2-medium.json"),
    include_str!("../../../hparams/rome/gpt2-large.json"),
    include_str!("../../../hparams/rome/gpt2-xl.json"),
    include_str!("../../../hparams/rome/gpt-j-6b.json"),
    include_str!("../../../hparams/rome/smollm2-135m.json"),
];

impl RomeHparams {
    /// The shipped hyper-parameters for a model of this shape, if Loci has them.
    pub fn for_model(cfg: &crate::config::ModelConfig) -> Option<Self> {
        crate::edit::method::shipped_for(&HPARAM_FILES, cfg)
    }

    /// The defaults for this model: its shipped settings (at `layer` when given), else the
    /// paper's values at `layer`; without either, an error asking for a layer.
    pub fn defaults(cfg: &crate::config::ModelConfig, layer: Option<usize>) -> Result<Self> {
        if let Some(l) = layer {
            crate::edit::method::check_layers(&[l], cfg.n_layer)?;
        }
        match (Self::for_model(cfg), layer) {
            (Some(mut hp), Some(l)) => {
                hp.layer = l;
                Ok(hp)
            }
            (Some(hp), None) => Ok(hp),
            (None, Some(l)) => Ok(Self::at_layer(l)),
            (None, None) => Err(LociError::input(
                "Loci has no default layer for this model; pass --layer",
            )),
        }
    }

    /// The official values (GPT-2 XL / GPT-J) at `layer`.
    pub fn at_layer(layer: usize) -> Self {
        Self {
            layer,
            v_num_grad_steps: 20,
            v_lr: 0.5,
            v_weight_decay: 0.5,
            clamp_norm_factor: 4.0,
            kl_factor: 0.0625,
            mom2_adjustment: true,
            context_templates: vec![(4, 10), (9, 10)],
            key_mode: KeyMode::Rrome,
            seed: 1,
            goal: crate::edit::EditGoal::default(),
        }
    }
}

/// What v*'s optimisation needs to know: where δ goes and how it is optimised.
#[derive(Clone, Debug)]
pub(crate) struct ValueSpec {
    /// ROME: the MLP output of its layer; MEMIT: the block output of its last layer.
    pub site: Site,
    pub steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub clamp_norm_factor: f64,
    pub kl_factor: f64,
    pub direction: crate::edit::Direction,
    /// The noise on the rewrite rows' subject embeddings.
    pub subject_noise: Option<SubjectNoise>,
}

impl RomeHparams {
    pub(crate) fn value_spec(&self) -> ValueSpec {
        ValueSpec {
            site: Site::Mlp(self.layer),
            steps: self.v_num_grad_steps,
            lr: self.v_lr,
            weight_decay: self.v_weight_decay,
            clamp_norm_factor: self.clamp_norm_factor,
            kl_factor: self.kl_factor,
            direction: self.goal.direction,
            subject_noise: self.goal.noise(self.seed),
        }
    }
}
