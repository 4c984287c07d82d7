//! ROME's edit as a value: the rank-one change `W ← W + right · leftᵀ` of one layer's
//! down-projection, its report, and its small file.

use serde::{Deserialize, Serialize};

use super::hparams::RomeHparams;
use crate::edit::delta::{LayerDelta, WeightChange};
use crate::error::{LociError, Result};
use crate::request::RewriteRequest;

/// An edit is a value: `W ← W + right · leftᵀ` on one layer's down-projection.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RomeEdit {
    /// The edited layer.
    pub layer: usize,
    /// u, `d_ff` wide (the key direction).
    pub left: Vec<f32>,
    /// `d_model` wide.
    pub right: Vec<f32>,
    /// The request the edit makes true.
    pub request: RewriteRequest,
    /// The settings it was computed with.
    pub hparams: RomeHparams,
    /// What the computation did.
    pub stats: RomeStats,
}

/// What the optimisation did, for reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RomeStats {
    /// v*'s loss at each step of its optimisation.
    pub losses: Vec<f32>,
    /// ‖δ‖: how far v* moved the layer's output from its original value.
    pub delta_norm: f32,
    /// k · u: the closed form's denominator.
    pub division_factor: f32,
    /// The context templates used, the bare `{}` first.
    pub templates: Vec<String>,
    /// v*, the value the edited layer now gives the key.
    pub target_value: Vec<f32>,
    /// Seconds per phase: templates, key (k* and u), value (v*), update.
    pub seconds: std::collections::BTreeMap<String, f64>,
}

/// The metadata stored beside an edit's vectors.
#[derive(Serialize, Deserialize)]
struct EditMeta {
    layer: usize,
    request: RewriteRequest,
    hparams: RomeHparams,
    stats: RomeStats,
}

impl RomeEdit {
    /// The rank-one change to the layer's weights.
    pub fn delta(&self) -> LayerDelta<'_> {
        LayerDelta {
            layer: self.layer,
            weight: WeightChange::LowRank {
                rank: 1,
                right: &self.right,
                left: &self.left,
            },
            bias: None,
        }
    }

    /// A small safetensors file: the two vectors, the request and settings in the metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let meta = EditMeta {
            layer: self.layer,
            request: self.request.clone(),
            hparams: self.hparams.clone(),
            stats: self.stats.clone(),
        };
        crate::edit::file::write(
            "loci_rome_edit",
            &meta,
            &[
                ("left".into(), vec![self.left.len()], &self.left),
                ("right".into(), vec![self.right.len()], &self.right),
            ],
        )
    }

    /// Reads an edit written by [`RomeEdit::to_bytes`]; rejects other files and non-finite
    /// vectors.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let bad = |e: String| LociError::input(format!("not a Loci edit file: {e}"));
        let (meta, file): (EditMeta, _) =
            crate::edit::file::read(data, "loci_rome_edit", "no edit metadata", bad)?;
        let vec = |name: &str| -> Result<Vec<f32>> {
            match file.f32(name)? {
                (v, shape) if shape.len() == 1 => Ok(v),
                _ => Err(file.bad(format!("{name} is not an f32 vector"))),
            }
        };
        let (left, right) = (vec("left")?, vec("right")?);
        if left.iter().chain(&right).any(|x| !x.is_finite()) {
            return Err(file.bad("NaN or infinite values".into()));
        }
        Ok(Self {
            layer: meta.layer,
            left,
            right,
            request: meta.request,
            hparams: meta.hparams,
            stats: meta.stats,
        })
    }
}
