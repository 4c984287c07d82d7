//! A model's edited layers as they are now, saved to one file and put back exactly: what a long
//! sequence of edits writes at each checkpoint so that a stopped run continues where it was,
//! without replaying (or keeping) a thousand edit files. It holds each layer's down-projection
//! (weight in f32 — f16/bf16 weights round-trip through f32 exactly — and bias), its GRACE
//! codebook, the keys AlphaEdit keeps for later edits, and the run's own JSON.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::delta::AppliedEdit;
use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::model::layers::{Codebook, CodebookEntry};

const FILE_KEY: &str = "loci_snapshot";

/// One layer's down-projection as it is now.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerState {
    /// The block whose MLP down-projection this is.
    pub layer: usize,
    /// `[d_model, d_ff]`, row-major, f32.
    pub weight: Vec<f32>,
    /// `d_model`, when the map has a bias.
    pub bias: Option<Vec<f32>>,
    /// GRACE's codebook entries, oldest first (none: no codebook).
    pub codebook: Vec<CodebookEntry>,
}

/// The edited layers, the keys AlphaEdit keeps by layer (`[keys, d_ff]` flat), and the JSON of
/// whoever saved them.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Each saved layer.
    pub layers: Vec<LayerState>,
    /// AlphaEdit's kept keys by layer, flat `[keys, d_ff]`.
    pub preserved: BTreeMap<usize, Vec<f32>>,
    /// The saver's own state (a sequence's settings and scores so far).
    pub meta: serde_json::Value,
}

/// What the file says besides the vectors: a tensor of its own (JSON bytes), not the header, so
/// that the digest covers it and it may outgrow the header's size limit.
#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    layers: Vec<LayerMeta>,
    preserved: Vec<usize>,
    meta: serde_json::Value,
}

/// The tensor holding [`Meta`]'s JSON.
const META_TENSOR: &str = "meta.json";

/// The format's version, under the header's key.
const VERSION: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
struct LayerMeta {
    layer: usize,
    bias: bool,
    /// Each codebook entry's radius and label.
    codebook: Vec<(f32, Vec<u32>)>,
}

impl LoadedModel {
    /// The down-projections of `layers` as they are now.
    pub fn layer_states(&self, layers: &[usize]) -> Result<Vec<LayerState>> {
        layers
            .iter()
            .map(|&layer| {
                let down = self.model.down_proj(layer)?;
                if down.low_rank.is_some() {
                    return Err(LociError::input(format!(
                        "layer {layer} is a view's low-rank overlay, not the model's own weights"
                    )));
                }
                let flat = |t: &Tensor| -> Result<Vec<f32>> {
                    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
                };
                Ok(LayerState {
                    layer,
                    weight: flat(&down.weight)?,
                    bias: down.bias.as_ref().map(flat).transpose()?,
                    codebook: down.codebook.as_ref().map_or(vec![], |c| {
                        c.entries().iter().map(|e| (**e).clone()).collect()
                    }),
                })
            })
            .collect()
    }

    /// Puts the layers back as `states` hold them (all are checked first: a state that does
    /// not fit this model changes nothing); keep the result to undo it exactly.
    pub fn restore_layers(&mut self, states: &[LayerState]) -> Result<AppliedEdit> {
        let built = states
            .iter()
            .map(|s| self.layer_of_state(s).map(|lin| (s.layer, lin)))
            .collect::<Result<Vec<_>>>()?;
        let mut applied = AppliedEdit::default();
        for (layer, lin) in built {
            let original = self.model.down_proj(layer)?.clone();
            if let Err(e) = self.model.set_down_proj(layer, lin) {
                self.undo_edit(applied)?;
                return Err(e);
            }
            applied.originals.push((layer, original));
        }
        Ok(applied)
    }

    /// The down-projection `s` describes, in this model's dtype, checked against its shape.
    fn layer_of_state(&self, s: &LayerState) -> Result<crate::model::layers::Linear> {
        let down = self.model.down_proj(s.layer).map_err(|_| {
            LociError::input(format!(
                "the snapshot holds layer {}, but the model has {} layers",
                s.layer,
                self.model.n_layer()
            ))
        })?;
        let (dm, dff) = (self.model.cfg.d_model, self.model.cfg.d_ff);
        let bias_fits = match (&down.bias, &s.bias) {
            (None, None) => true,
            (Some(_), Some(b)) => b.len() == dm,
            _ => false,
        };
        let book_fits = s
            .codebook
            .iter()
            .all(|e| e.key.len() == dff && e.value.len() == dm && e.radius >= 0.0);
        let values = s.weight.iter().chain(s.bias.iter().flatten());
        let entries = s.codebook.iter().flat_map(|e| e.key.iter().chain(&e.value));
        let values = values
            .chain(entries)
            .chain(s.codebook.iter().map(|e| &e.radius));
        if s.weight.len() != dm * dff || !bias_fits || !book_fits {
            return Err(LociError::input(format!(
                "the snapshot's layer {} is not a down-projection of this model \
                 (d_model {dm}, d_ff {dff})",
                s.layer
            )));
        }
        if values.clone().any(|x| !x.is_finite()) {
            return Err(LociError::input(
                "the snapshot holds NaN or infinite values",
            ));
        }
        let device = &self.model.device;
        let as_model = |v: &[f32], shape: &[usize], like: &Tensor| -> Result<Tensor> {
            Ok(Tensor::from_slice(v, shape, device)?.to_dtype(like.dtype())?)
        };
        let weight = as_model(&s.weight, &[dm, dff], &down.weight)?;
        let bias = match (&down.bias, &s.bias) {
            (Some(like), Some(b)) => Some(as_model(b, &[dm], like)?),
            _ => None,
        };
        let mut lin = crate::model::layers::Linear::new(weight, bias);
        if !s.codebook.is_empty() {
            let entries = s.codebook.iter().cloned().map(Arc::new).collect();
            lin.codebook = Some(Codebook::new(entries, device)?);
        }
        Ok(lin)
    }
}

impl Snapshot {
    /// The snapshot as a safetensors file (with a digest: a file cut short is refused).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = vec![];
        let mut layers = vec![];
        for s in &self.layers {
            let l = s.layer;
            tensors.push((format!("layer.{l}.weight"), vec![s.weight.len()], &s.weight));
            if let Some(b) = &s.bias {
                tensors.push((format!("layer.{l}.bias"), vec![b.len()], b));
            }
            for (i, e) in s.codebook.iter().enumerate() {
                tensors.push((
                    format!("layer.{l}.entry.{i}.key"),
                    vec![e.key.len()],
                    &e.key,
                ));
                let value = &e.value;
                tensors.push((
                    format!("layer.{l}.entry.{i}.value"),
                    vec![value.len()],
                    value,
                ));
            }
            layers.push(LayerMeta {
                layer: l,
                bias: s.bias.is_some(),
                codebook: s
                    .codebook
                    .iter()
                    .map(|e| (e.radius, e.label.clone()))
                    .collect(),
            });
        }
        for (l, keys) in &self.preserved {
            tensors.push((format!("preserved.{l}"), vec![keys.len()], keys));
        }
        let meta = Meta {
            layers,
            preserved: self.preserved.keys().copied().collect(),
            meta: self.meta.clone(),
        };
        let json = serde_json::to_vec(&meta).map_err(|e| LociError::model(e.to_string()))?;
        let blobs = [(META_TENSOR.to_string(), json.as_slice())];
        super::file::write_with_blobs(FILE_KEY, &VERSION, &tensors, &blobs)
    }

    /// Reads a file written by [`Snapshot::to_bytes`], refusing anything else.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let bad = |e: String| LociError::input(format!("not a Loci snapshot: {e}"));
        let (version, file): (u32, _) =
            super::file::read(data, FILE_KEY, "no snapshot header", bad)?;
        if version != VERSION {
            return Err(bad(format!("format {version}, not {VERSION}")));
        }
        let json = file.bytes(META_TENSOR)?;
        let meta: Meta = serde_json::from_slice(json).map_err(|e| file.bad(e.to_string()))?;
        let values = |name: String| file.f32(&name).map(|(v, _)| v);
        let mut layers = vec![];
        for m in meta.layers {
            let l = m.layer;
            let mut codebook = vec![];
            for (i, (radius, label)) in m.codebook.into_iter().enumerate() {
                codebook.push(CodebookEntry {
                    key: values(format!("layer.{l}.entry.{i}.key"))?,
                    value: values(format!("layer.{l}.entry.{i}.value"))?,
                    radius,
                    label,
                });
            }
            layers.push(LayerState {
                layer: l,
                weight: values(format!("layer.{l}.weight"))?,
                bias: m
                    .bias
                    .then(|| values(format!("layer.{l}.bias")))
                    .transpose()?,
                codebook,
            });
        }
        let preserved = meta
            .preserved
            .into_iter()
            .map(|l| Ok((l, values(format!("preserved.{l}"))?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            preserved,
            meta: meta.meta,
        })
    }
}
