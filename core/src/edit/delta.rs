//! What edits are: changes to MLP down-projections — low-rank (ROME, MEMIT) or dense (fine-tuning),
//! made where the weights live (a low-rank change sends only its factors to a GPU) and undone bit
//! for bit.

use candle_core::{DType, Tensor};

use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::model::layers::Linear;

/// How a down-projection's weight (`[d_model, d_ff]`) changes.
#[derive(Clone, Copy, Debug)]
pub enum WeightChange<'a> {
    /// `Σᵣ rightᵣ leftᵣᵀ`: `right` is `[rank, d_model]`, `left` `[rank, d_ff]`, row-major.
    LowRank {
        /// Number of rank-one terms (1 for ROME).
        rank: usize,
        /// The `rank` output-side vectors, `[rank, d_model]` f32.
        right: &'a [f32],
        /// The `rank` input-side (key-side) vectors, `[rank, d_ff]` f32.
        left: &'a [f32],
    },
    /// The whole `[d_model, d_ff]` difference, row-major.
    Dense(&'a [f32]),
}

/// One layer's change: its weight, and its bias (`d_model`) when it has one and it changes.
#[derive(Clone, Copy, Debug)]
pub struct LayerDelta<'a> {
    /// Index of the transformer block whose MLP down-projection changes.
    pub layer: usize,
    /// The change added to the down-projection's weight.
    pub weight: WeightChange<'a>,
    /// The change added to its bias (`d_model` f32); `None` leaves the bias as it is.
    pub bias: Option<&'a [f32]>,
}

/// An applied edit and the down-projections it replaced: undo is exact.
#[derive(Clone, Debug, Default)]
pub struct AppliedEdit {
    /// `(layer, original down-projection)` in the order they were changed.
    pub originals: Vec<(usize, Linear)>,
}

impl AppliedEdit {
    /// This edit followed by `later` (applied on top of it), as one: undoing it restores what
    /// was there before this one. Only the first original of a layer is kept, so a long
    /// sequence of edits holds one copy of each layer it changed, not one per edit.
    pub fn then(mut self, later: AppliedEdit) -> AppliedEdit {
        for (layer, w) in later.originals {
            if !self.originals.iter().any(|(l, _)| *l == layer) {
                self.originals.push((layer, w));
            }
        }
        self
    }
}

impl LayerDelta<'_> {
    pub(crate) fn check(&self, lm: &LoadedModel) -> Result<()> {
        let (dm, dff) = (lm.model.cfg.d_model, lm.model.cfg.d_ff);
        let down = lm.model.down_proj(self.layer).map_err(|_| {
            LociError::input(format!(
                "the edit changes layer {}, but the model has {} layers",
                self.layer,
                lm.model.n_layer()
            ))
        })?;
        let mismatch = |what: String| {
            LociError::input(format!(
                "the edit is for a model with {what}, not d_model {dm} and d_ff {dff}"
            ))
        };
        let values: Vec<&[f32]> = match self.weight {
            WeightChange::LowRank { rank, right, left } => {
                if rank == 0 || left.len() != rank * dff || right.len() != rank * dm {
                    return Err(mismatch(format!(
                        "d_model {} and d_ff {}",
                        right.len() / rank.max(1),
                        left.len() / rank.max(1)
                    )));
                }
                vec![right, left]
            }
            WeightChange::Dense(w) => {
                if w.len() != dm * dff {
                    return Err(mismatch(format!("{} weights per layer", w.len())));
                }
                vec![w]
            }
        };
        if let Some(b) = self.bias {
            if down.bias.is_none() {
                return Err(LociError::input(
                    "the edit changes a bias this model's MLP does not have",
                ));
            }
            if b.len() != dm {
                return Err(mismatch(format!("a bias of {}", b.len())));
            }
        }
        if values
            .iter()
            .copied()
            .chain(self.bias)
            .flatten()
            .any(|x| !x.is_finite())
        {
            return Err(LociError::input("the edit holds NaN or infinite values"));
        }
        Ok(())
    }

    /// The weight change as an f32 `[d_model, d_ff]` tensor on `device`.
    fn weight_tensor(&self, dm: usize, dff: usize, device: &candle_core::Device) -> Result<Tensor> {
        Ok(match self.weight {
            WeightChange::LowRank { rank, right, left } => {
                let right = Tensor::from_slice(right, (rank, dm), device)?;
                let left = Tensor::from_slice(left, (rank, dff), device)?;
                right.t()?.matmul(&left)?
            }
            WeightChange::Dense(w) => Tensor::from_slice(w, (dm, dff), device)?,
        })
    }
}

/// `original + change`, computed in f32 and stored in the original's dtype.
fn add_f32(original: &Tensor, change: &Tensor) -> Result<Tensor> {
    Ok((original.to_dtype(DType::F32)? + change)?.to_dtype(original.dtype())?)
}

impl LoadedModel {
    /// Adds one layer's delta and returns the down-projection it replaced.
    pub(crate) fn add_layer_delta(&mut self, d: &LayerDelta) -> Result<Linear> {
        d.check(self)?;
        let m = &mut self.model;
        let (dm, dff) = (m.cfg.d_model, m.cfg.d_ff);
        let original = m.down_proj(d.layer)?.clone();
        let weight = add_f32(&original.weight, &d.weight_tensor(dm, dff, &m.device)?)?;
        let bias = match (&original.bias, d.bias) {
            (Some(b), Some(db)) => Some(add_f32(b, &Tensor::from_slice(db, dm, &m.device)?)?),
            (b, _) => b.clone(),
        };
        let mut changed = Linear::new(weight, bias);
        // A view's low-rank changes and a GRACE codebook stay on the layer.
        changed.low_rank = original.low_rank.clone();
        changed.codebook = original.codebook.clone();
        m.set_down_proj(d.layer, changed)?;
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

    /// Restores the down-projections an edit replaced, bit for bit.
    pub fn undo_edit(&mut self, applied: AppliedEdit) -> Result<()> {
        for (layer, original) in applied.originals.into_iter().rev() {
            self.model.set_down_proj(layer, original)?;
        }
        Ok(())
    }
}

/// ‖ΔW‖_F of a layer's weight change; a low-rank one from the two Gram matrices (no
/// d_model × d_ff product).
pub fn delta_norm(d: &LayerDelta) -> f32 {
    match d.weight {
        WeightChange::Dense(w) => {
            w.iter().map(|x| *x as f64 * *x as f64).sum::<f64>().sqrt() as f32
        }
        WeightChange::LowRank { rank, right, left } => {
            let (wr, wl) = (right.len() / rank, left.len() / rank);
            let gram = |v: &[f32], w: usize, i: usize, j: usize| -> f64 {
                v[i * w..(i + 1) * w]
                    .iter()
                    .zip(&v[j * w..(j + 1) * w])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum()
            };
            let mut s = 0f64;
            for i in 0..rank {
                for j in 0..rank {
                    s += gram(right, wr, i, j) * gram(left, wl, i, j);
                }
            }
            s.max(0.0).sqrt() as f32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_norm_equals_the_dense_frobenius_norm() {
        let right = [1.0f32, 2.0, -1.0, 0.5, 0.0, 3.0];
        let left = [0.5f32, -2.0, 1.0, 4.0];
        let mut dense = vec![0f32; 6];
        for r in 0..3 {
            for c in 0..2 {
                dense[r * 2 + c] = (0..2).map(|i| right[i * 3 + r] * left[i * 2 + c]).sum();
            }
        }
        let low = LayerDelta {
            layer: 0,
            weight: WeightChange::LowRank {
                rank: 2,
                right: &right,
                left: &left,
            },
            bias: None,
        };
        let full = LayerDelta {
            weight: WeightChange::Dense(&dense),
            ..low
        };
        let want = dense.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((delta_norm(&low) - want).abs() < 1e-5);
        assert!((delta_norm(&full) - want).abs() < 1e-6);
    }
}
