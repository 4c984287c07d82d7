//! Edits as a hook instead of changed weights: each batch row sees its own edit of the
//! down-projections, so one forward pass scores many edits at once (the study's batched
//! scoring). The hook reads each row's keys `k` at `MlpKey(l)` and adds its edit's change of
//! the layer's output at `Mlp(l)` — the same as applying the weights, up to float rounding:
//!
//! - a low-rank change `ΔW = Σᵣ rightᵣ leftᵣᵀ` (ROME, MEMIT) adds `Σᵣ rightᵣ (leftᵣ · k)`; the
//!   low-rank edits of a batch are stacked per row and computed in two batched products;
//! - a dense change `ΔW`, `Δb` (fine-tuning) adds `ΔW k + Δb`, computed on its edit's rows only
//!   (one product per edit: a dense difference per row would not fit a large model).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::delta::WeightChange;
use super::saved::Edit;
use crate::error::{LociError, Result};
use crate::hooks::{Hook, Site};

/// The low-rank edits' per-row terms at one layer: `left` `[rows, rank, d_ff]` and `right`
/// `[rows, rank, d_model]`, zero for rows without one there (and beyond a row's own rank).
struct Stacked {
    left: Tensor,
    right: Tensor,
}

/// A dense edit at one layer: its rows (`[n]` u32), `ΔW` `[d_model, d_ff]` and `Δb`.
struct Dense {
    rows: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
}

/// Everything added at one layer, and the keys of the pass under way.
#[derive(Default)]
struct LayerTerms {
    stacked: Option<Stacked>,
    dense: Vec<Dense>,
    /// The keys read at `MlpKey`, f32 `[rows, t, d_ff]`.
    key: Option<Tensor>,
}

/// One low-rank edit's terms at one layer: its rank, `right` `[rank, d_model]`, `left`
/// `[rank, d_ff]`.
type Terms = (usize, Vec<f32>, Vec<f32>);

/// A hook giving each batch row its own edits (see [`RowEdits::new`], [`RowEdits::per_row`]).
pub struct RowEdits {
    layers: BTreeMap<usize, LayerTerms>,
}

impl RowEdits {
    /// Whether `edit` can be hooked on `lm`: it can be hooked at all, and no layer it changes
    /// carries a GRACE codebook (which replaces that layer's outputs before the hook adds to
    /// them).
    pub fn can_hook_on(lm: &crate::loader::LoadedModel, edit: &Edit) -> bool {
        Self::can_hook(edit)
            && edit
                .layers()
                .iter()
                .all(|&l| lm.model.down_proj(l).is_ok_and(|d| d.codebook.is_none()))
    }

    /// Whether `edit` can be hooked: every change is dense, or low-rank without a bias change
    /// (ROME's, MEMIT's and fine-tuning's all are; GRACE's codebook is not a weight change).
    pub fn can_hook(edit: &Edit) -> bool {
        !matches!(edit, Edit::Grace(_))
            && edit.deltas().iter().all(|d| match d.weight {
                WeightChange::LowRank { .. } => d.bias.is_none(),
                WeightChange::Dense(_) => true,
            })
    }

    /// The hook for rows whose edits `row_edit` names (indices into `edits`), in a model of
    /// width `d_model`.
    pub fn new(
        edits: &[&Edit],
        row_edit: &[Option<usize>],
        (d_model, device): (usize, &Device),
    ) -> Result<Self> {
        let rows: Vec<Vec<usize>> = row_edit
            .iter()
            .map(|e| e.iter().copied().collect())
            .collect();
        Self::per_row(edits, &rows, (d_model, device))
    }

    /// The hook giving batch row `i` all the edits `row_edits[i]` names (indices into `edits`;
    /// a visitor's stack of edits), in a model of width `d_model`. The changes add up as the
    /// weights would: `W + ΔW₁ + ΔW₂ + …`.
    pub fn per_row(
        edits: &[&Edit],
        row_edits: &[Vec<usize>],
        (d_model, device): (usize, &Device),
    ) -> Result<Self> {
        let mut low_rank: BTreeMap<usize, Vec<Option<Terms>>> = BTreeMap::new();
        let mut layers: BTreeMap<usize, LayerTerms> = BTreeMap::new();
        for (e, edit) in edits.iter().enumerate() {
            let rows: Vec<u32> = (0..row_edits.len())
                .filter(|&i| row_edits[i].contains(&e))
                .map(|i| i as u32)
                .collect();
            for d in edit.deltas() {
                match d.weight {
                    WeightChange::LowRank { rank, right, left } => {
                        if d.bias.is_some() {
                            return Err(LociError::input(
                                "a low-rank edit that changes a bias cannot be hooked",
                            ));
                        }
                        let slot = low_rank
                            .entry(d.layer)
                            .or_insert_with(|| vec![None; edits.len()]);
                        slot[e] = Some((rank, right.to_vec(), left.to_vec()));
                    }
                    WeightChange::Dense(w) if !rows.is_empty() => {
                        let weight = dense_weight(w, d_model, d.layer, device)?;
                        layers.entry(d.layer).or_default().dense.push(Dense {
                            rows: Tensor::new(rows.as_slice(), device)?,
                            weight,
                            bias: d.bias.map(|b| Tensor::new(b, device)).transpose()?,
                        });
                    }
                    WeightChange::Dense(_) => {}
                }
            }
        }
        for (l, terms) in low_rank {
            if row_edits
                .iter()
                .flatten()
                .any(|&e| terms.get(e).is_some_and(Option::is_some))
            {
                layers.entry(l).or_default().stacked = Some(stack(&terms, row_edits, device)?);
            }
        }
        Ok(Self { layers })
    }
}

/// A dense `ΔW` of a model of width `d_model`, as `[d_model, d_ff]`.
fn dense_weight(w: &[f32], d_model: usize, layer: usize, device: &Device) -> Result<Tensor> {
    if d_model == 0 || !w.len().is_multiple_of(d_model) {
        return Err(LociError::input(format!(
            "layer {layer}: a dense change of {} values does not fit a width of {d_model}",
            w.len()
        )));
    }
    Ok(Tensor::from_vec(
        w.to_vec(),
        (d_model, w.len() / d_model),
        device,
    )?)
}

/// The low-rank edits' terms of one layer, stacked per row: a row with several edits there
/// holds their ranks one after the other.
fn stack(terms: &[Option<Terms>], row_edits: &[Vec<usize>], device: &Device) -> Result<Stacked> {
    let mine = |row: &[usize]| -> Vec<&Terms> {
        row.iter().filter_map(|&e| terms.get(e)?.as_ref()).collect()
    };
    let rank = row_edits
        .iter()
        .map(|r| mine(r).iter().map(|t| t.0).sum::<usize>())
        .max()
        .unwrap_or(0)
        .max(1);
    let (d_model, d_ff) = terms
        .iter()
        .flatten()
        .map(|(r, rt, lt)| (rt.len() / r, lt.len() / r))
        .next()
        .unwrap_or((1, 1));
    let rows = row_edits.len();
    let mut left = vec![0f32; rows * rank * d_ff];
    let mut right = vec![0f32; rows * rank * d_model];
    for (i, row) in row_edits.iter().enumerate() {
        let mut at = 0;
        for (r, rt, lt) in mine(row) {
            left[(i * rank + at) * d_ff..][..r * d_ff].copy_from_slice(lt);
            right[(i * rank + at) * d_model..][..r * d_model].copy_from_slice(rt);
            at += r;
        }
    }
    Ok(Stacked {
        left: Tensor::from_vec(left, (rows, rank, d_ff), device)?,
        right: Tensor::from_vec(right, (rows, rank, d_model), device)?,
    })
}

impl Hook for RowEdits {
    fn wants(&self, site: Site) -> bool {
        matches!(site, Site::MlpKey(l) | Site::Mlp(l) if self.layers.contains_key(&l))
    }

    fn at(&mut self, site: Site, x: &Tensor) -> Result<Option<Tensor>> {
        match site {
            Site::MlpKey(l) => {
                if let Some(t) = self.layers.get_mut(&l) {
                    t.key = Some(x.to_dtype(DType::F32)?);
                }
                Ok(None)
            }
            Site::Mlp(l) => {
                let Some(t) = self.layers.get_mut(&l) else {
                    return Ok(None);
                };
                let k = t
                    .key
                    .take()
                    .ok_or_else(|| LociError::model("an edited MLP's key was not read"))?;
                let (rows, len, _) = k.dims3()?;
                let mut add = Tensor::zeros((rows, len, x.dim(2)?), DType::F32, x.device())?;
                if let Some(s) = &t.stacked {
                    // [rows, t, d_ff] × [rows, d_ff, rank] × [rows, rank, d_model]
                    let coef = k.matmul(&s.left.transpose(1, 2)?.contiguous()?)?;
                    let rank = s.left.dim(1)?;
                    crate::flops::matmul(rows * len, rank, k.dim(2)?);
                    crate::flops::matmul(rows * len, x.dim(2)?, rank);
                    add = (add + coef.matmul(&s.right)?)?;
                }
                for d in &t.dense {
                    let mine = k.index_select(&d.rows, 0)?;
                    let mut part = mine.broadcast_matmul(&d.weight.t()?)?;
                    let (d_out, d_in) = d.weight.dims2()?;
                    crate::flops::matmul(mine.elem_count() / d_in, d_out, d_in);
                    if let Some(b) = &d.bias {
                        part = part.broadcast_add(b)?;
                    }
                    add = add.index_add(&d.rows, &part, 0)?;
                }
                Ok(Some((x + add.to_dtype(x.dtype())?)?))
            }
            _ => Ok(None),
        }
    }
}
