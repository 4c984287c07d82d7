//! What ROME and MEMIT edits are: low-rank additions to MLP down-projections, made where the
//! weights live (only the factors travel to a GPU) and undone bit for bit.

use candle_core::{DType, Tensor};

use crate::error::{LociError, Result};
use crate::loader::LoadedModel;

/// `W ← W + Σᵣ rightᵣ leftᵣᵀ` on one layer's down-projection; `right` is `[rank, d_model]` and
/// `left` `[rank, d_ff]`, row-major.
#[derive(Clone, Copy, Debug)]
pub struct LayerDelta<'a> {
    pub layer: usize,
    pub rank: usize,
    pub right: &'a [f32],
    pub left: &'a [f32],
}

/// An applied edit and the weights it replaced: undo is exact.
#[derive(Clone, Debug)]
pub struct AppliedEdit {
    /// `(layer, original weight)` in the order they were changed.
    pub originals: Vec<(usize, Tensor)>,
}

impl LayerDelta<'_> {
    fn check(&self, lm: &LoadedModel) -> Result<()> {
        let (dm, dff) = (lm.model.cfg.d_model, lm.model.cfg.d_ff);
        if self.layer >= lm.model.n_layer() {
            return Err(LociError::input(format!(
                "the edit changes layer {}, but the model has {} layers",
                self.layer,
                lm.model.n_layer()
            )));
        }
        if self.rank == 0
            || self.left.len() != self.rank * dff
            || self.right.len() != self.rank * dm
        {
            return Err(LociError::input(format!(
                "the edit is for a model with d_model {} and d_ff {}, not {dm} and {dff}",
                self.right.len() / self.rank.max(1),
                self.left.len() / self.rank.max(1)
            )));
        }
        if self.left.iter().chain(self.right).any(|x| !x.is_finite()) {
            return Err(LociError::input("the edit holds NaN or infinite values"));
        }
        Ok(())
    }
}

impl LoadedModel {
    /// Adds one layer's delta and returns the weight it replaced.
    pub(crate) fn add_layer_delta(&mut self, d: &LayerDelta) -> Result<Tensor> {
        d.check(self)?;
        let m = &mut self.model;
        let (dm, dff) = (m.cfg.d_model, m.cfg.d_ff);
        let original = m.down_proj(d.layer)?.weight.clone();
        let right = Tensor::from_slice(d.right, (d.rank, dm), &m.device)?;
        let left = Tensor::from_slice(d.left, (d.rank, dff), &m.device)?;
        let delta = right.t()?.matmul(&left)?;
        let new = (original.to_dtype(DType::F32)? + delta)?.to_dtype(original.dtype())?;
        m.set_down_proj_weight(d.layer, new)?;
        Ok(original)
    }

    /// Applies the deltas in order (all are checked first: a bad one changes nothing); keep the
    /// result to undo them exactly.
    pub fn apply_deltas(&mut self, deltas: &[LayerDelta]) -> Result<AppliedEdit> {
        for d in deltas {
            d.check(self)?;
        }
        let mut applied = AppliedEdit { originals: vec![] };
        for d in deltas {
            match self.add_layer_delta(d) {
                Ok(w) => applied.originals.push((d.layer, w)),
                Err(e) => {
                    self.undo_edit(applied)?;
                    return Err(e);
                }
            }
        }
        Ok(applied)
    }

    /// Restores the weights an edit replaced, bit for bit.
    pub fn undo_edit(&mut self, applied: AppliedEdit) -> Result<()> {
        for (layer, w) in applied.originals.into_iter().rev() {
            self.model.set_down_proj_weight(layer, w)?;
        }
        Ok(())
    }
}
