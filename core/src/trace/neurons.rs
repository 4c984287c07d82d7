//! Knowledge neurons (Dai et al. 2022) as a localization: integrated gradients of the answer's
//! probability over one layer's MLP neurons at one token (docs/tracing.md#knowledge-neurons).
//!
//! F(w) is p(answer) with layer l's neuron activations at token t (the down-projection's input,
//! ROME's key) overwritten by w, everything downstream recomputed. Neuron i's attribution is
//! `w̄ᵢ · (1/m) Σₖ ∂F(αₖ w̄)/∂wᵢ`, αₖ = k/m for k = 0..m−1 (the authors' Riemann sum; m is the
//! request's `samples`). By completeness the attributions add up to about F(w̄) − F(0): the
//! probability the cell's neurons carry. That sum is the grid's cell, with `low` = 0 (the
//! baseline of no activation), so the study reads a layer's effect as the fraction of p(answer)
//! its neurons hold.
//!
//! Two tokens are attributed: the prompt's last (Dai et al.'s prediction position) and the
//! subject's last (where causal tracing finds the MLP's effect); the other rows are 0. Positions
//! before t are the clean run's, so a cell runs its m rows over positions t.. and layers l..
//! only, reading the clean run's keys and values before t.

use candle_core::{DType, IndexOp, Tensor, Var, D};

use super::prepare::{clean, finish, header_of, Clean};
use super::types::{
    KnowledgeNeuron, TraceKind, TraceMethod, TraceObserver, TraceRequest, TraceResult, TraceWork,
};
use crate::error::{LociError, Result};
use crate::hooks::{SetFirst, Site};
use crate::loader::LoadedModel;
use crate::model::split::SplitRun;

/// A knowledge neuron's attribution passes this fraction of the largest at its token (Dai et
/// al.'s coarse threshold).
pub const NEURON_THRESHOLD: f32 = 0.2;

impl LoadedModel {
    /// Knowledge neurons' localization of the answer (MLP kind only): per layer, the
    /// probability integrated gradients give the neurons at the subject's last token and at the
    /// prompt's last, and the neurons past the coarse threshold. `obs` hears the header, then
    /// each row as it is done (returning `false` cancels).
    pub fn trace_neurons(
        &self,
        req: &TraceRequest,
        obs: &mut dyn TraceObserver,
    ) -> Result<TraceResult> {
        let started = crate::clock::now_seconds();
        if req.kinds != [TraceKind::Mlp] {
            return Err(LociError::input(
                "knowledge neurons are MLP neurons: trace them with the mlp kind only",
            ));
        }
        let c = clean(self, req)?;
        let head = header_of(self, req, &c, 0.0, 0.0)?;
        obs.on_start(&head);
        let n = self.model.n_layer();
        let mut sites = vec![c.range.1 - 1, c.prompt_len - 1];
        sites.dedup();
        let mut grid = vec![vec![0f32; n]; c.prompt_len];
        let (mut neurons, mut work) = (vec![], 0u64);
        for (t, row) in grid.iter_mut().enumerate() {
            if sites.contains(&t) {
                let (attr, cost) = self.token_attributions(&c, t, req.samples)?;
                *row = attr.iter().map(|a| a.iter().sum()).collect();
                neurons.extend(knowledge_neurons(t, &attr));
                work += cost;
            }
            if !obs.on_row(TraceKind::Mlp, t, row) {
                return Err(LociError::Cancelled);
            }
        }
        neurons.sort_by(|a, b| b.attribution.total_cmp(&a.attribution));
        let len = c.ids.len() as u64;
        let work = TraceWork {
            token_layers: work + len * n as u64,
            // Dai et al.'s way: every point of the path a whole pass, forward and backward.
            naive_token_layers: 3 * req.samples as u64 * len * (n * n * sites.len()) as u64,
        };
        let grids = [(TraceKind::Mlp, grid)].into_iter().collect();
        let mut r = finish(self, req, &head, grids, work, started);
        r.method = TraceMethod::Neurons;
        r.neurons = neurons;
        Ok(r)
    }

    /// Every layer's neuron attributions at token `t` (`[n_layer][d_ff]`) from `steps` points
    /// of the path, and the token-layers computed (a backward pass counted as two).
    fn token_attributions(
        &self,
        c: &Clean,
        t: usize,
        steps: usize,
    ) -> Result<(Vec<Vec<f32>>, u64)> {
        let n = self.model.n_layer();
        let keys: Vec<Site> = (0..n).map(Site::MlpKey).collect();
        let split = self.model.split_at(&c.ids, t, &keys)?;
        let mut attr = Vec::with_capacity(n);
        let mut work = 0u64;
        for l in 0..n {
            attr.push(self.cell_attributions(&split, l, &c.answer, steps)?);
            work += 3 * (steps * (c.ids.len() - t) * (n - l)) as u64;
            crate::progress::report("neurons", l + 1, n, &[])?;
        }
        Ok((attr, work))
    }

    /// Layer `l`'s neuron attributions at the split's token: one pass of `steps` rows, each a
    /// point αₖ w̄ of the path, and its backward.
    fn cell_attributions(
        &self,
        split: &SplitRun,
        l: usize,
        answer: &[u32],
        steps: usize,
    ) -> Result<Vec<f32>> {
        let m = &self.model;
        let dev = &m.device;
        let w = split
            .captured
            .get(Site::MlpKey(l))?
            .i((0, 0))?
            .to_dtype(DType::F32)?;
        let alphas: Vec<f32> = (0..steps).map(|k| k as f32 / steps as f32).collect();
        let alphas = Tensor::new(alphas.as_slice(), dev)?.unsqueeze(1)?;
        let scaled = Var::from_tensor(&alphas.broadcast_mul(&w.unsqueeze(0)?)?)?;
        let mut hook = SetFirst {
            site: Site::MlpKey(l),
            rows: scaled.as_tensor().clone(),
        };
        let out = m.run_from_split(split, l, steps, &mut hook)?;
        let (len, reads) = (out.dim(1)?, answer.len());
        let logits = m.final_logits(&out.narrow(1, len - reads, reads)?)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let idx = Tensor::new(answer, dev)?
            .reshape((1, reads, 1))?
            .repeat((steps, 1, 1))?;
        let p = logp.gather(&idx, 2)?.sum((1, 2))?.exp()?;
        let grads = p.sum_all()?.backward()?;
        let grad = grads
            .get(scaled.as_tensor())
            .ok_or_else(|| LociError::model(format!("no gradient reached layer {l}'s neurons")))?;
        let attr: Vec<f32> = (grad.mean(0)? * &w)?.to_vec1()?;
        if attr.iter().any(|a| !a.is_finite()) {
            return Err(LociError::model("NaN or infinite neuron attributions"));
        }
        Ok(attr)
    }
}

/// The neurons at token `t` whose attribution passes [`NEURON_THRESHOLD`] of the largest there.
fn knowledge_neurons(t: usize, attr: &[Vec<f32>]) -> Vec<KnowledgeNeuron> {
    let max = attr.iter().flatten().copied().fold(0f32, f32::max);
    if max <= 0.0 {
        return vec![];
    }
    let mut out = vec![];
    for (layer, a) in attr.iter().enumerate() {
        for (neuron, &attribution) in a.iter().enumerate() {
            if attribution > NEURON_THRESHOLD * max {
                out.push(KnowledgeNeuron {
                    token: t,
                    layer,
                    neuron,
                    attribution,
                });
            }
        }
    }
    out
}
