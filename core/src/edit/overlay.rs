//! Views of a model with edits added and the model itself unchanged: how a server gives each
//! visitor their own edits over one shared copy of the weights.
//!
//! A view is a clone of the [`LoadedModel`] (tensors are shared, not copied). Low-rank changes
//! (ROME's, MEMIT's) ride on the down-projections as factors, added to each input at forward
//! time — a hook on the edited layer, costing `rank × (d_ff + d_model)` per token and no copy of
//! the weights. Dense changes (fine-tuning) and bias changes are materialised in the view's own
//! copy of the layers they touch: that memory is the price of a dense edit.

use candle_core::{DType, Tensor};

use super::delta::WeightChange;
use super::saved::Edit;
use crate::error::Result;
use crate::loader::LoadedModel;
use crate::model::layers::LowRankAdd;

impl LoadedModel {
    /// A view with `edits` (oldest first) added: every forward pass, trace and score of the view
    /// sees them, within float rounding of the same edits applied to the weights. Nothing of
    /// `self` changes; a bad edit is refused before the view exists.
    pub fn with_edits(&self, edits: &[&Edit]) -> Result<LoadedModel> {
        let mut view = self.clone();
        for e in edits {
            if let Edit::Grace(g) = e {
                // The view's own copy of the layer gets the codebook.
                view.apply_grace(g)?;
                continue;
            }
            for d in e.deltas() {
                d.check(&view)?;
            }
            for d in e.deltas() {
                match d.weight {
                    WeightChange::LowRank { rank, right, left } if d.bias.is_none() => {
                        let m = &mut view.model;
                        let (dm, dff) = (m.cfg.d_model, m.cfg.d_ff);
                        let add = LowRankAdd {
                            left: Tensor::from_slice(left, (rank, dff), &m.device)?,
                            right: Tensor::from_slice(right, (rank, dm), &m.device)?,
                        };
                        let mut down = m.down_proj(d.layer)?.clone();
                        down.low_rank = Some(match &down.low_rank {
                            Some(before) => before.and(&add)?,
                            None => add,
                        });
                        m.set_down_proj(d.layer, down)?;
                    }
                    _ => {
                        view.add_layer_delta(&d)?;
                    }
                }
            }
        }
        Ok(view)
    }

    /// A copy with `edits` applied to its own weights (the layers they touch are copied), for
    /// work that reads the weights themselves: computing a further edit on top of them, or a
    /// study that edits and undoes. Nothing of `self` changes.
    pub fn with_edits_applied(&self, edits: &[&Edit]) -> Result<LoadedModel> {
        let mut copy = self.clone();
        for e in edits {
            copy.apply(e)?;
        }
        Ok(copy)
    }
}

/// The bytes a view holds of its own for `edit`: the factors of a low-rank change, a copy of the
/// layer for a dense or bias change (`layer_bytes` each), the keys an AlphaEdit edit records and
/// a GRACE edit's entries.
pub fn view_bytes(edit: &Edit, layer_bytes: usize) -> usize {
    let changes: usize = edit
        .deltas()
        .iter()
        .map(|d| match d.weight {
            WeightChange::LowRank { right, left, .. } if d.bias.is_none() => {
                (right.len() + left.len()) * DType::F32.size_in_bytes()
            }
            _ => layer_bytes,
        })
        .sum();
    let keys: usize = match edit {
        Edit::Memit(m) => m.layers.iter().map(|l| l.keys.len()).sum(),
        Edit::Grace(g) => {
            let entries = g.changed.iter().map(|(_, e)| e).chain(&g.added);
            entries.map(|e| e.key.len() + e.value.len()).sum()
        }
        _ => 0,
    };
    changes + keys * DType::F32.size_in_bytes()
}
