//! The fast path of tracing: every cell of one token batched into one pass through the model.
//!
//! A restoration at (token t, layer l) changes nothing below its first changed layer and
//! nothing before t, so a cell joins the batch at that layer with only positions t.. (the
//! corrupted run lends the earlier positions' keys and values). All cells of a token share each
//! layer's matrix products; the last layer is computed only where the answer is read out.

use candle_core::Tensor;

use super::prepare::{answer_prob, window_layers, Prepared};
use super::types::TraceKind;
use crate::error::{LociError, Result};
use crate::hooks::{Hook, NoHook, Site};
use crate::loader::LoadedModel;
use crate::model::layers::LayerCache;

/// The share of a block's FLOPs that computing only keys and values costs.
fn kv_only_share(cfg: &crate::config::ModelConfig) -> f64 {
    let w = cfg.block_weights();
    w.kv as f64 / w.total() as f64
}

/// One restoration, as the batched pass sees it: its kind, the layer whose input it first
/// changes, that input (positions t..), and the layers whose module output at t it still
/// overwrites.
struct Cell {
    kind: TraceKind,
    layer: usize,
    start: usize,
    restore: (usize, usize),
}

/// Every cell of `kinds` at one token, ordered by the layer where it joins the batch. A restored
/// module output at layer lo changes nothing at later positions of layer lo (they read that
/// layer's inputs), so windowed cells enter at lo + 1 with only position t changed.
fn cells(kinds: &[TraceKind], n: usize, window: usize) -> Vec<Cell> {
    let mut cells: Vec<Cell> = kinds
        .iter()
        .flat_map(|&kind| (0..n).map(move |l| (kind, l)))
        .map(|(kind, layer)| match kind {
            TraceKind::Hidden => Cell {
                kind,
                layer,
                start: layer + 1,
                restore: (0, 0),
            },
            _ => {
                let (lo, hi) = window_layers(layer, window, n);
                Cell {
                    kind,
                    layer,
                    start: lo + 1,
                    restore: (lo + 1, hi),
                }
            }
        })
        .collect();
    cells.sort_by_key(|c| c.start);
    cells
}

/// One token's batched pass: the trace's shared runs and the token's cells.
struct TokenPass<'a> {
    lm: &'a LoadedModel,
    p: &'a Prepared,
    kinds: &'a [TraceKind],
    t: usize,
    samples: usize,
    /// Positions t.. of the prompt (and answer).
    suffix: usize,
    /// Positions read out at the end: the answer's.
    reads: usize,
    cells: Vec<Cell>,
}

impl TokenPass<'_> {
    fn at_t(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.narrow(1, self.t, 1)?)
    }

    /// The clean run's activation at `site`, position t, for every sample row.
    fn clean_at(&self, site: Site) -> Result<Tensor> {
        let d = self.lm.model.cfg.d_model;
        Ok(self
            .at_t(self.p.base.states.get(site)?)?
            .broadcast_as((self.samples, 1, d))?
            .contiguous()?)
    }

    /// The residual entering layer `c.start` at positions t..: corrupted, except at t.
    fn entry(&self, c: &Cell) -> Result<Tensor> {
        let (m, p) = (&self.lm.model, self.p);
        let changed = match c.kind {
            TraceKind::Hidden => self.clean_at(Site::Block(c.layer))?,
            kind => {
                let lo = c.start - 1;
                let block = &m.blocks[lo];
                let x = self.at_t(&p.resid_in[lo])?;
                let (a, mo) = if kind == TraceKind::Mlp {
                    let a = self.at_t(p.corrupt.get(Site::Attn(lo))?)?;
                    (a, self.clean_at(Site::Mlp(lo))?)
                } else {
                    let a = self.clean_at(Site::Attn(lo))?;
                    let mo = block.mlp_output(&x, &a)?;
                    (a, mo)
                };
                block.combine(&x, &a, &mo)?
            }
        };
        if self.suffix == 1 {
            return Ok(changed);
        }
        let rest = p.resid_in[c.start].narrow(1, self.t + 1, self.suffix - 1)?;
        Ok(Tensor::cat(&[changed, rest], 1)?)
    }

    /// Layer `j`'s keys and values of positions before t, from the corrupted run, repeated for
    /// `groups` cells.
    fn prefix_cache(&self, j: usize, groups: usize) -> Result<LayerCache> {
        let mut cache = LayerCache::default();
        if self.t == 0 {
            return Ok(cache);
        }
        let prefix = |c: &Option<Tensor>| -> Result<Option<Tensor>> {
            let c = c
                .as_ref()
                .ok_or_else(|| LociError::input("missing corrupted cache"))?;
            let c = c.narrow(2, 0, self.t)?;
            Ok(Some(if groups > 1 {
                c.repeat((groups, 1, 1, 1))?
            } else {
                c
            }))
        };
        cache.k = prefix(&self.p.kv.layers[j].k)?;
        cache.v = prefix(&self.p.kv.layers[j].v)?;
        Ok(cache)
    }

    /// The last layer, computed only at the read-out positions; the positions before them just
    /// lend their keys and values (a restoration at t before them changes neither).
    fn last_layer(&self, cur: Tensor, mut cache: LayerCache, work: &mut f64) -> Result<Tensor> {
        let m = &self.lm.model;
        let (j, reads, suffix) = (m.n_layer() - 1, self.reads, self.suffix);
        let head = cur.narrow(1, 0, suffix - reads)?;
        let (k, v) = m.blocks[j].keys_values(&head, self.t)?;
        let join = |prev: Option<Tensor>, new: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match prev {
                Some(p) => Tensor::cat(&[p, new], 2)?,
                None => new,
            }))
        };
        cache.k = join(cache.k.take(), k)?;
        cache.v = join(cache.v.take(), v)?;
        let rows = cur.dim(0)? as f64;
        let kv_only = kv_only_share(&m.cfg);
        *work += rows * (reads as f64 + (suffix - reads) as f64 * kv_only);
        let last = cur.narrow(1, suffix - reads, reads)?;
        let pos0 = self.p.base.ids.len() - reads;
        m.run_layers(
            last,
            j..j + 1,
            pos0,
            Some(std::slice::from_mut(&mut cache)),
            &mut NoHook,
        )?
        .ok_or_else(|| LociError::input("forward pass stopped early"))
    }

    /// The windowed restorations that cover layer `j`: per kind, which rows of the batch
    /// (cells in `order`) take the clean module output at t.
    fn restores(&self, j: usize, order: &[usize]) -> Result<Vec<Restore>> {
        let mut out = Vec::new();
        for kind in [TraceKind::Attn, TraceKind::Mlp] {
            if !self.kinds.contains(&kind) {
                continue;
            }
            let rows: Vec<bool> = order
                .iter()
                .map(|&ci| {
                    let c = &self.cells[ci];
                    c.kind == kind && (c.restore.0..c.restore.1).contains(&j)
                })
                .collect();
            if rows.iter().any(|r| *r) {
                let site = kind.site(j);
                let clean = self.at_t(self.p.base.states.get(site)?)?;
                out.push(Restore { site, rows, clean });
            }
        }
        Ok(out)
    }

    /// Runs layer `j` on the batch `cur` (the cells in `order`), restoring windowed cells.
    fn layer(&self, j: usize, cur: Tensor, order: &[usize], work: &mut f64) -> Result<Tensor> {
        let rows = cur.dim(0)?;
        let mut cache = self.prefix_cache(j, rows / self.samples)?;
        if j == self.lm.model.n_layer() - 1 && self.suffix > self.reads {
            return self.last_layer(cur, cache, work);
        }
        let mut hook = Restores {
            list: self.restores(j, order)?,
            samples: self.samples,
            suffix: self.suffix,
        };
        *work += (rows * self.suffix) as f64;
        let slot = std::slice::from_mut(&mut cache);
        self.lm
            .model
            .run_layers(cur, j..j + 1, self.t, Some(slot), &mut hook)?
            .ok_or_else(|| LociError::input("forward pass stopped early"))
    }
}

/// One kind's restoration at one layer: which batch rows take the clean output at t.
struct Restore {
    site: Site,
    rows: Vec<bool>,
    /// The clean module output at t, `[1, 1, d]`.
    clean: Tensor,
}

/// Writes the clean module output at position t (the suffix's first) into the chosen rows.
struct Restores {
    list: Vec<Restore>,
    samples: usize,
    suffix: usize,
}

impl Hook for Restores {
    fn wants(&self, site: Site) -> bool {
        self.list.iter().any(|r| r.site == site)
    }

    fn at(&mut self, site: Site, a: &Tensor) -> Result<Option<Tensor>> {
        let Some(r) = self.list.iter().find(|r| r.site == site) else {
            return Ok(None);
        };
        let rows = a.dim(0)?;
        let mask: Vec<u8> = r
            .rows
            .iter()
            .flat_map(|&on| std::iter::repeat_n(on as u8, self.samples))
            .collect();
        let mask =
            Tensor::from_vec(mask, (rows, 1, 1), a.device())?.broadcast_as((rows, 1, a.dim(2)?))?;
        let first = a.narrow(1, 0, 1)?;
        let clean = r.clean.to_dtype(a.dtype())?.broadcast_as(first.shape())?;
        let first = mask.where_cond(&clean, &first)?;
        Ok(Some(if self.suffix > 1 {
            Tensor::cat(&[first, a.narrow(1, 1, self.suffix - 1)?], 1)?
        } else {
            first
        }))
    }
}

/// Scores of all layers' cells at token `t` for each of `kinds` (in that order), batched in one
/// pass: the kinds' cells share every layer's matrix products. Adds the computation done, in
/// token-layers, to `work`.
pub(super) fn trace_token(
    lm: &LoadedModel,
    p: &Prepared,
    kinds: &[TraceKind],
    t: usize,
    window: usize,
    work: &mut f64,
) -> Result<Vec<Vec<f32>>> {
    let n = lm.model.n_layer();
    if t < p.base.range.0 {
        // Before the subject the corrupted run equals the clean one: nothing to restore.
        return Ok(vec![vec![p.low; n]; kinds.len()]);
    }
    let pass = TokenPass {
        lm,
        p,
        kinds,
        t,
        samples: p.noise.dim(0)?,
        suffix: p.base.ids.len() - t,
        reads: p.base.answer.len(),
        cells: cells(kinds, n, window),
    };
    let mut order: Vec<usize> = Vec::with_capacity(pass.cells.len());
    let mut x: Option<Tensor> = None;
    for j in 0..n {
        let mut parts: Vec<Tensor> = x.take().into_iter().collect();
        while order.len() < pass.cells.len() && pass.cells[order.len()].start == j {
            parts.push(pass.entry(&pass.cells[order.len()])?);
            order.push(order.len());
        }
        if parts.is_empty() {
            continue;
        }
        let cur = Tensor::cat(&parts, 0)?;
        x = Some(pass.layer(j, cur, &order, work)?);
    }
    pass.scores(x, order)
}

impl TokenPass<'_> {
    /// Reads the answer's probability out of every cell: the batch's read-out positions, and
    /// the cells that enter after the last layer changed directly.
    fn scores(&self, x: Option<Tensor>, mut order: Vec<usize>) -> Result<Vec<Vec<f32>>> {
        let m = &self.lm.model;
        let reads = self.reads;
        let last_of = |y: &Tensor| -> Result<Tensor> { Ok(y.narrow(1, y.dim(1)? - reads, reads)?) };
        let mut finals: Vec<Tensor> = x.iter().map(last_of).collect::<Result<_>>()?;
        while order.len() < self.cells.len() {
            finals.push(last_of(&self.entry(&self.cells[order.len()])?)?);
            order.push(order.len());
        }
        let last = Tensor::cat(&finals, 0)?;
        let probs = answer_prob(&m.final_logits(&last)?, &self.p.base.answer, order.len())?;
        let mut scores = vec![vec![0f32; m.n_layer()]; self.kinds.len()];
        for (slot, &ci) in order.iter().enumerate() {
            let c = &self.cells[ci];
            let k = self
                .kinds
                .iter()
                .position(|&k| k == c.kind)
                .expect("a requested kind");
            scores[k][c.layer] = probs[slot];
        }
        Ok(scores)
    }
}
