//! Attribution patching (AtP; Nanda 2023, Syed et al. 2023): the first-order estimate of every
//! cell of a causal trace from one corrupted forward pass and one backward pass
//! (docs/tracing.md#attribution-patching).
//!
//! With m the answer's probability averaged over the corrupted rows (what tracing reports),
//! restoring the clean state a_clean at one site moves m by about
//! `Σ_rows (a_clean − a_row) · ∂m/∂a_row`, the gradient taken on the corrupted run. A zero
//! variable added at every hidden, MLP and attention site gives all those gradients in one
//! backward pass; windowed kinds sum their layers' estimates (first-order terms add). Tokens
//! before the subject get exactly zero, as in tracing: the corruption does not reach them.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor, Var, D};

use super::prepare::{
    answer_prob, clean_and_noise, finish, header_of, readout_logits, window_layers, Clean,
};
use super::types::{TraceKind, TraceMethod, TraceObserver, TraceRequest, TraceResult, TraceWork};
use crate::error::{LociError, Result};
use crate::hooks::noise::embed_noise;
use crate::hooks::{Chain, Hook, Site};
use crate::loader::LoadedModel;

/// Adds a zero variable at each wanted site (so the backward pass yields ∂m/∂activation there)
/// and keeps the activation it saw.
struct Attribute {
    wanted: Vec<Site>,
    vars: HashMap<Site, Var>,
    seen: HashMap<Site, Tensor>,
}

impl Hook for Attribute {
    fn wants(&self, site: Site) -> bool {
        self.wanted.contains(&site)
    }

    fn at(&mut self, site: Site, x: &Tensor) -> Result<Option<Tensor>> {
        let var = Var::zeros(x.shape(), x.dtype(), x.device())?;
        let out = (x + var.as_tensor())?;
        self.seen.insert(site, x.detach());
        self.vars.insert(site, var);
        Ok(Some(out))
    }
}

/// The answer's probability (the whole answer's with several tokens) averaged over the rows,
/// from `[rows, reads, vocab]` logits, as a differentiable scalar.
fn mean_answer_prob(logits: &Tensor, answer: &[u32]) -> Result<Tensor> {
    let (rows, reads, _) = logits.dims3()?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let idx = Tensor::new(answer, logits.device())?
        .reshape((1, reads, 1))?
        .repeat((rows, 1, 1))?;
    Ok(logp.gather(&idx, 2)?.sum((1, 2))?.exp()?.mean_all()?)
}

impl LoadedModel {
    /// A causal trace estimated by attribution patching: the same grid as
    /// [`LoadedModel::trace`] (`low` plus each cell's estimated change), from the clean run and
    /// one corrupted pass with its backward (which also gives `low`). `obs` hears the header,
    /// then every row, at the end (returning `false` cancels).
    pub fn trace_attribution(
        &self,
        req: &TraceRequest,
        embedding_std: Option<f64>,
        obs: &mut dyn TraceObserver,
    ) -> Result<TraceResult> {
        let started = crate::clock::now_seconds();
        let (base, noise, scale) = clean_and_noise(self, req, embedding_std)?;
        let (low, estimates) = self.attributions(req, &base, &noise)?;
        let head = header_of(self, req, &base, low, scale)?;
        obs.on_start(&head);
        let (n, big_t) = (self.model.n_layer(), base.prompt_len);
        let mut grids = BTreeMap::new();
        for &kind in &req.kinds {
            let per_layer = &estimates[&kind];
            let grid: Vec<Vec<f32>> = (0..big_t)
                .map(|t| {
                    (0..n)
                        .map(|l| {
                            let (lo, hi) = match kind {
                                TraceKind::Hidden => (l, l + 1),
                                _ => window_layers(l, req.window, n),
                            };
                            low + (lo..hi).map(|j| per_layer[j][t]).sum::<f32>()
                        })
                        .collect()
                })
                .collect();
            for (t, row) in grid.iter().enumerate() {
                if !obs.on_row(kind, t, row) {
                    return Err(LociError::Cancelled);
                }
            }
            grids.insert(kind, grid);
        }
        let rows = (req.samples * base.ids.len() * n) as u64;
        let work = TraceWork {
            // The clean run, then the corrupted pass and its backward (about two passes' work).
            token_layers: (base.ids.len() * n) as u64 + 3 * rows,
            naive_token_layers: super::naive::naive_work(req, big_t, n),
        };
        let mut r = finish(self, req, &head, grids, work, started);
        r.method = TraceMethod::Attribution;
        Ok(r)
    }

    /// The corrupted answer probability `low` (m itself), and per kind, per layer, per prompt
    /// token: Σ_rows (a_clean − a_row) · ∂m/∂a_row.
    #[allow(clippy::type_complexity)]
    fn attributions(
        &self,
        req: &TraceRequest,
        base: &Clean,
        noise: &Tensor,
    ) -> Result<(f32, BTreeMap<TraceKind, Vec<Vec<f32>>>)> {
        let m = &self.model;
        let n = m.n_layer();
        let mut attribute = Attribute {
            wanted: req
                .kinds
                .iter()
                .flat_map(|&k| (0..n).map(move |l| k.site(l)))
                .collect(),
            vars: HashMap::new(),
            seen: HashMap::new(),
        };
        let rows: Vec<Vec<u32>> = vec![base.ids.clone(); req.samples];
        let logits = {
            let mut noise = embed_noise(noise, base.range, 0);
            let mut chain = Chain(vec![&mut noise, &mut attribute]);
            let ids = m.ids_tensor(&rows)?;
            readout_logits(m, &ids, &mut chain, None, base.answer.len())?
        };
        // The corrupted run's answer probability, as the exact trace reads it.
        let low = answer_prob(&logits.detach(), &base.answer, 1)?[0];
        let metric = mean_answer_prob(&logits, &base.answer)?;
        let grads = metric.backward()?;
        let mut out = BTreeMap::new();
        for &kind in &req.kinds {
            let mut per_layer = Vec::with_capacity(n);
            for l in 0..n {
                let s = kind.site(l);
                let var = &attribute.vars[&s];
                let grad = grads.get(var.as_tensor()).ok_or_else(|| {
                    LociError::model(format!("no gradient reached {s:?} of the trace"))
                })?;
                let f32s = |t: &Tensor| t.to_dtype(DType::F32);
                let clean = f32s(base.states.get(s)?)?;
                let diff = clean.broadcast_sub(&f32s(&attribute.seen[&s])?)?;
                let mut atp: Vec<f32> = (diff * f32s(grad)?)?
                    .sum(2)?
                    .sum(0)?
                    .narrow(0, 0, base.prompt_len)?
                    .to_vec1()?;
                // Before the subject the clean and corrupted states are equal; the two passes
                // (one row untracked, several tracked) may round them apart in half precision.
                atp[..base.range.0].fill(0.0);
                if atp.iter().any(|x| !x.is_finite()) {
                    return Err(LociError::model("NaN or infinite attributions"));
                }
                per_layer.push(atp);
            }
            out.insert(kind, per_layer);
        }
        Ok((low, out))
    }
}
