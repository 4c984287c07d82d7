//! One step of the v* optimisation, for a group of rows: the forward pass from the edited layer
//! up with each request's δ added at its rows' subject-last tokens, and the group's share of
//! every request's loss.

use candle_core::{DType, IndexOp, Tensor, D};

use super::key::gather;
use super::value::{Prefix, ValueRows};
use crate::error::{LociError, Result};
use crate::hooks::{FnHook, Site};
use crate::loader::LoadedModel;
use crate::model::layers::LayerCache;

/// The rows of v*'s batch that one thread runs, taken from the rows of the requests still
/// optimising. Requests are named by their place among those (`slot`), which is their row of
/// the stacked δ.
pub(super) struct ValueGroup {
    resid_in: Tensor,
    caches: Vec<LayerCache>,
    mask: Tensor,
    /// Each row's slot, `[rows]`: picks its δ.
    slot_of_row: Tensor,
    /// `(row, slot)` of the rows whose value before δ is read (each request's first row).
    first_rows: Vec<(usize, usize)>,
    /// Label cells (group row, suffix position), then one KL cell per `kl_slots`.
    cells: Vec<(usize, usize)>,
    labels: Tensor,
    /// Each label's slot.
    pub(super) label_slots: Vec<usize>,
    /// The slots whose KL row is in this group.
    pub(super) kl_slots: Vec<usize>,
}

/// What one group's forward pass gives: its parts of the losses (graphs to differentiate) and
/// the read-outs the optimisation keeps from the first step.
pub(super) struct GroupOut {
    /// Each label's NLL, `[labels]` (a graph), when the group has labels.
    pub(super) nll: Option<Tensor>,
    pub(super) nll_values: Vec<f32>,
    /// Σ p·(log p − log p₀) of each KL row, times the KL factor, `[kl rows]` (a graph).
    pub(super) kl: Option<Tensor>,
    pub(super) kl_values: Vec<f32>,
    /// The KL rows' log-probabilities, `[kl rows, vocab]`.
    pub(super) kl_logp: Option<Tensor>,
    /// `(slot, the site's activation at the request's first row before δ)`, when asked.
    pub(super) values_before: Vec<(usize, Tensor)>,
}

/// Splits the rows of the requests `active` (batch indices, in order; slot = place in it) into
/// `n` contiguous groups (fewer when there are fewer rows): one per worker thread, or per tab
/// worker (threaded kernels barely use two cores on matrices this small). Builds the groups
/// `only` names (all of them with `None`) and returns them with the number of groups in all.
pub(super) fn value_groups(
    lm: &LoadedModel,
    r: &ValueRows,
    p: &Prefix,
    active: &[usize],
    n: usize,
    only: Option<usize>,
) -> Result<(Vec<ValueGroup>, usize)> {
    let mut slot_of_case = vec![None; r.cases()];
    for (slot, &c) in active.iter().enumerate() {
        slot_of_case[c] = Some(slot);
    }
    let rows: Vec<usize> = (0..r.rows())
        .filter(|&i| slot_of_case[r.case_of_row[i]].is_some())
        .collect();
    let n_groups = n.clamp(1, rows.len().max(1));
    let per = rows.len().div_ceil(n_groups).max(1);
    let chunks: Vec<&[usize]> = rows.chunks(per).collect();
    let built = chunks
        .iter()
        .enumerate()
        .filter(|&(i, _)| only.is_none_or(|o| o == i))
        .map(|(_, mine)| group(lm, r, p, mine, &slot_of_case))
        .collect::<Result<_>>()?;
    Ok((built, chunks.len()))
}

/// The group of batch rows `mine`.
fn group(
    lm: &LoadedModel,
    r: &ValueRows,
    p: &Prefix,
    mine: &[usize],
    slot_of_case: &[Option<usize>],
) -> Result<ValueGroup> {
    let dev = &lm.model.device;
    // Each batch row's place in this group, if it is in it.
    let mut place = vec![None; r.rows()];
    for (g, &row) in mine.iter().enumerate() {
        place[row] = Some(g);
    }
    let local = |row: usize| place[row];
    let slot = |row: usize| slot_of_case[r.case_of_row[row]].expect("an active row");
    let idx = Tensor::new(
        mine.iter()
            .map(|&i| i as u32)
            .collect::<Vec<_>>()
            .as_slice(),
        dev,
    )?;
    let pick = |x: &Option<Tensor>| -> Result<Option<Tensor>> {
        Ok(match x {
            Some(x) => Some(x.index_select(&idx, 0)?),
            None => None,
        })
    };
    let caches = p
        .caches
        .iter()
        .map(|c| {
            Ok(LayerCache {
                k: pick(&c.k)?,
                v: pick(&c.v)?,
                row_starts: Some(mine.iter().map(|&i| r.starts[i]).collect()),
                key_mask: pick(&c.key_mask)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut cells = vec![];
    let mut labels = vec![];
    let mut label_slots = vec![];
    for ((&(row, pos), &lab), _) in r.cells.iter().zip(&r.labels).zip(&r.label_case) {
        if let Some(g) = local(row) {
            cells.push((g, pos));
            labels.push(lab);
            label_slots.push(slot(row));
        }
    }
    let mut kl_slots = vec![];
    for &row in r.kl_row.iter() {
        if let (Some(g), true) = (local(row), slot_of_case[r.case_of_row[row]].is_some()) {
            cells.push((g, 0));
            kl_slots.push(slot(row));
        }
    }
    let first_rows = r
        .first_row
        .iter()
        .filter_map(|&row| Some((local(row)?, slot_of_case[r.case_of_row[row]]?)))
        .collect();
    let slots: Vec<u32> = mine.iter().map(|&i| slot(i) as u32).collect();
    Ok(ValueGroup {
        resid_in: p.resid_in.index_select(&idx, 0)?,
        caches,
        mask: p.mask.index_select(&idx, 0)?,
        slot_of_row: Tensor::new(slots.as_slice(), dev)?,
        first_rows,
        cells,
        labels: Tensor::new(labels.as_slice(), dev)?.unsqueeze(1)?,
        label_slots,
        kl_slots,
    })
}

/// The state one v* step shares with every group.
pub(super) struct ValueStep<'a> {
    pub(super) lm: &'a LoadedModel,
    pub(super) site: Site,
    /// The active requests' δ, `[slots, d]`.
    pub(super) delta: &'a Tensor,
    /// Each slot's KL log-probabilities at the first step, where this process holds its KL row
    /// (`None` at the first step).
    pub(super) kl_init: Option<&'a [Option<Tensor>]>,
    pub(super) kl_factor: f64,
    /// Read each request's value before δ (the first step).
    pub(super) read_values: bool,
}

impl ValueStep<'_> {
    /// The group's rows from the site's layer up with each row's δ added at the site at its
    /// subject-last token: each label's NLL and each KL row's term.
    pub(super) fn forward(&self, g: &ValueGroup) -> Result<GroupOut> {
        let m = &self.lm.model;
        let site = self.site;
        let l = site.layer().expect("v* sites are in a layer");
        let mut values_before = vec![];
        let row_deltas = self.delta.index_select(&g.slot_of_row, 0)?.unsqueeze(1)?;
        let mut hook = FnHook(|s: Site, x: &Tensor| -> Result<Option<Tensor>> {
            if s != site {
                return Ok(None);
            }
            if self.read_values && values_before.is_empty() {
                for &(row, slot) in &g.first_rows {
                    values_before.push((slot, x.i((row, 0))?.to_dtype(DType::F32)?.detach()));
                }
            }
            let add = g.mask.broadcast_mul(&row_deltas.to_dtype(x.dtype())?)?;
            Ok(Some((x + add)?))
        });
        let mut caches = g.caches.clone();
        let x = m
            .run_layers(
                g.resid_in.clone(),
                l..m.n_layer(),
                0,
                Some(&mut caches),
                &mut hook,
            )?
            .ok_or_else(|| LociError::input("forward pass stopped early"))?;
        let logp =
            candle_nn::ops::log_softmax(&m.final_logits(&gather(&x, &g.cells)?)?, D::Minus1)?;
        let n_labels = g.label_slots.len();
        let nll = match n_labels {
            0 => None,
            n => Some(
                logp.narrow(0, 0, n)?
                    .gather(&g.labels, 1)?
                    .neg()?
                    .squeeze(1)?,
            ),
        };
        let (mut kl, mut kl_logp) = (None, None);
        if !g.kl_slots.is_empty() {
            let cur = logp.narrow(0, n_labels, g.kl_slots.len())?;
            let init = match self.kl_init {
                Some(all) => {
                    let mine = g
                        .kl_slots
                        .iter()
                        .map(|&s| all[s].clone())
                        .collect::<Option<Vec<Tensor>>>()
                        .ok_or_else(|| LociError::model("a KL row without its first step"))?;
                    Tensor::cat(&mine, 0)?
                }
                None => cur.detach(),
            };
            kl = Some(((cur.exp()? * (&cur - &init)?)?.sum(1)? * self.kl_factor)?);
            kl_logp = Some(cur.detach());
        }
        Ok(GroupOut {
            nll_values: values(&nll)?,
            nll,
            kl_values: values(&kl)?,
            kl,
            kl_logp,
            values_before,
        })
    }
}

/// A graph's values, read back.
fn values(x: &Option<Tensor>) -> Result<Vec<f32>> {
    Ok(match x {
        Some(x) => x.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        None => vec![],
    })
}
