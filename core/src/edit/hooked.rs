//! Edits as a hook instead of changed weights: each batch row sees its own low-rank edit of the
//! down-projections, so one forward pass scores many edits at once (the study's batched
//! scoring). A low-rank change `ΔW = Σᵣ rightᵣ leftᵣᵀ` of a down-projection adds
//! `Σᵣ rightᵣ (leftᵣ · k)` to its output for the key `k` it reads: the hook reads each row's
//! keys at `MlpKey(l)` and adds its edit's terms at `Mlp(l)`. The same as applying the weights,
//! up to float rounding.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::delta::WeightChange;
use super::saved::Edit;
use crate::error::{LociError, Result};
use crate::hooks::{Hook, Site};

/// One layer's per-row terms: `left` `[rows, rank, d_ff]` and `right` `[rows, rank, d_model]`,
/// zero for rows without an edit there (and beyond a row's own rank).
struct LayerTerms {
    left: Tensor,
    right: Tensor,
    /// `(left · k)` of the pass under way, `[rows, t, rank]`, read at `MlpKey`.
    coef: Option<Tensor>,
}

/// One edit's terms at one layer: its rank, `right` `[rank, d_model]`, `left` `[rank, d_ff]`.
type Terms = (usize, Vec<f32>, Vec<f32>);

/// A hook giving batch row `i` the edit `edits[row_edit[i]]` (none for `None`).
pub struct RowEdits {
    layers: BTreeMap<usize, LayerTerms>,
}

impl RowEdits {
    /// Whether every change of `edit` is low-rank with no bias change (ROME's and MEMIT's
    /// are; fine-tuning's are dense), so that it can be hooked.
    pub fn can_hook(edit: &Edit) -> bool {
        edit.deltas()
            .iter()
            .all(|d| d.bias.is_none() && matches!(d.weight, WeightChange::LowRank { .. }))
    }

    /// The hook for rows whose edits `row_edit` names (indices into `edits`).
    pub fn new(edits: &[&Edit], row_edit: &[Option<usize>], device: &Device) -> Result<Self> {
        // Per layer, per edit: its terms there.
        let mut per_layer: BTreeMap<usize, Vec<Option<Terms>>> = BTreeMap::new();
        let (mut d_model, mut d_ff) = (0, 0);
        for (e, edit) in edits.iter().enumerate() {
            for d in edit.deltas() {
                let WeightChange::LowRank { rank, right, left } = d.weight else {
                    return Err(LociError::input("a dense edit cannot be hooked"));
                };
                if d.bias.is_some() {
                    return Err(LociError::input("an edit of a bias cannot be hooked"));
                }
                (d_model, d_ff) = (right.len() / rank, left.len() / rank);
                let slot = per_layer
                    .entry(d.layer)
                    .or_insert_with(|| vec![None; edits.len()]);
                slot[e] = Some((rank, right.to_vec(), left.to_vec()));
            }
        }
        let rows = row_edit.len();
        let mut layers = BTreeMap::new();
        for (l, terms) in per_layer {
            let rank = terms.iter().flatten().map(|t| t.0).max().unwrap_or(1);
            let mut left = vec![0f32; rows * rank * d_ff];
            let mut right = vec![0f32; rows * rank * d_model];
            for (i, e) in row_edit.iter().enumerate() {
                let Some((r, rt, lt)) = e.and_then(|e| terms[e].as_ref()) else {
                    continue;
                };
                left[i * rank * d_ff..][..r * d_ff].copy_from_slice(lt);
                right[i * rank * d_model..][..r * d_model].copy_from_slice(rt);
            }
            layers.insert(
                l,
                LayerTerms {
                    left: Tensor::from_vec(left, (rows, rank, d_ff), device)?,
                    right: Tensor::from_vec(right, (rows, rank, d_model), device)?,
                    coef: None,
                },
            );
        }
        Ok(Self { layers })
    }
}

impl Hook for RowEdits {
    fn wants(&self, site: Site) -> bool {
        matches!(site, Site::MlpKey(l) | Site::Mlp(l) if self.layers.contains_key(&l))
    }

    fn at(&mut self, site: Site, x: &Tensor) -> Result<Option<Tensor>> {
        match site {
            Site::MlpKey(l) => {
                if let Some(t) = self.layers.get_mut(&l) {
                    // [rows, t, d_ff] × [rows, d_ff, rank] → [rows, t, rank]
                    let k = x.to_dtype(DType::F32)?;
                    t.coef = Some(k.matmul(&t.left.transpose(1, 2)?.contiguous()?)?);
                }
                Ok(None)
            }
            Site::Mlp(l) => {
                let Some(t) = self.layers.get_mut(&l) else {
                    return Ok(None);
                };
                let coef = t
                    .coef
                    .take()
                    .ok_or_else(|| LociError::model("an edited MLP's key was not read"))?;
                let add = coef.matmul(&t.right)?.to_dtype(x.dtype())?;
                Ok(Some((x + add)?))
            }
            _ => Ok(None),
        }
    }
}
