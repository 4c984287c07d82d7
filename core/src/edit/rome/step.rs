//! One step of the v* optimisation, for a group of rows: the forward pass from the edited layer
//! up with δ added at each row's subject-last token, and the group's share of the loss.

use candle_core::{DType, IndexOp, Tensor, D};

use super::key::gather;
use crate::error::{LociError, Result};
use crate::hooks::{FnHook, Site};
use crate::loader::LoadedModel;
use crate::model::layers::LayerCache;

/// The rows of v*'s batch that one thread runs: a contiguous slice of every per-row tensor.
pub(super) struct ValueGroup {
    pub(super) first_row: bool,
    pub(super) resid_in: Tensor,
    pub(super) caches: Vec<LayerCache>,
    pub(super) mask: Tensor,
    pub(super) labels: Tensor,
    pub(super) n_labels: usize,
    /// Label cells (row within the group, suffix position), then the KL cell when `kl`.
    pub(super) cells: Vec<(usize, usize)>,
    pub(super) kl: bool,
}

/// What one group's forward pass gives: its part of the loss (a graph to differentiate) and
/// the read-outs the optimisation keeps from the first step.
pub(super) struct GroupOut {
    /// The group's share of the mean NLL (a graph).
    pub(super) nll: Tensor,
    pub(super) nll_value: f32,
    /// The KL term, scaled, when the group holds the KL row (a graph).
    pub(super) kl: Option<Tensor>,
    pub(super) kl_value: f32,
    /// The optimised site's activation at row 0's subject-last token, before δ.
    pub(super) value_at_row0: Option<Tensor>,
    pub(super) kl_logp: Option<Tensor>,
}

/// The state one v* step shares with every group.
pub(super) struct ValueStep<'a> {
    pub(super) lm: &'a LoadedModel,
    pub(super) site: Site,
    pub(super) delta: &'a Tensor,
    pub(super) n_labels_total: usize,
    pub(super) kl_init: Option<&'a Tensor>,
    pub(super) kl_factor: f64,
}

impl ValueStep<'_> {
    /// The group's rows from the site's layer up with δ added at the site at each row's
    /// subject-last token: Σ NLL / (all labels) + the KL term when the group holds the KL row.
    pub(super) fn forward(&self, g: &ValueGroup) -> Result<GroupOut> {
        let m = &self.lm.model;
        let (site, d) = (self.site, m.cfg.d_model);
        let l = site.layer().expect("v* sites are in a layer");
        let mut value_at_row0: Option<Tensor> = None;
        let mut hook = FnHook(|s: Site, x: &Tensor| -> Result<Option<Tensor>> {
            if s != site {
                return Ok(None);
            }
            if g.first_row && value_at_row0.is_none() {
                value_at_row0 = Some(x.i((0, 0))?.to_dtype(DType::F32)?.detach());
            }
            let add = g
                .mask
                .broadcast_mul(&self.delta.to_dtype(x.dtype())?.reshape((1, 1, d))?)?;
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
        let nll = (logp
            .narrow(0, 0, g.n_labels)?
            .gather(&g.labels, 1)?
            .neg()?
            .sum_all()?
            / self.n_labels_total as f64)?;
        let mut kl_logp = None;
        let mut kl = None;
        if g.kl {
            let cur = logp.narrow(0, g.n_labels, 1)?;
            let init = self.kl_init.cloned().unwrap_or_else(|| cur.detach());
            kl = Some(((cur.exp()? * (&cur - &init)?)?.sum_all()? * self.kl_factor)?);
            kl_logp = Some(cur.detach());
        }
        Ok(GroupOut {
            nll_value: nll.to_scalar::<f32>()?,
            nll,
            kl_value: match &kl {
                Some(k) => k.to_scalar::<f32>()?,
                None => 0.0,
            },
            kl,
            value_at_row0,
            kl_logp,
        })
    }
}

/// Row groups for v*: one per worker thread, with at least two rows each (so the group that
/// holds the KL row, the last, also holds a rewrite row and its labels).
pub(super) fn value_groups(rows: usize) -> usize {
    crate::threads::workers().clamp(1, (rows / 2).max(1))
}
