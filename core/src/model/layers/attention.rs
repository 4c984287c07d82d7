//! Multi-head (and grouped-query) attention with a key/value cache, its causal masks, and
//! softmax.

use candle_core::{DType, Device, Tensor, D};

use super::super::fused;
use super::{Linear, Positions, Rotary};
use crate::error::Result;

/// Cached keys (f32) and values (the model's dtype) of one layer, `[b, kv_heads, t, head_dim]`.
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    /// Keys, f32 with rotary applied, `[b, kv_heads, t, head_dim]`.
    pub k: Option<Tensor>,
    /// Values in the model's dtype, `[b, kv_heads, t, head_dim]`.
    pub v: Option<Tensor>,
    /// Each row's own first position (rows whose cached prefixes differ in length).
    pub row_starts: Option<Vec<usize>>,
    /// Additive `[b, 1, 1, keys]` mask (0 or −∞) over cached and new keys: hides the padding
    /// inside prefixes of different lengths.
    pub key_mask: Option<Tensor>,
}

/// Multi-head attention with one fused q/k/v projection (grouped-query when `n_kv_head < n_head`).
#[derive(Clone, Debug)]
pub struct Attention {
    /// The fused query, key and value projection, `[(n_head + 2·n_kv_head)·head_dim, d]`.
    pub qkv: Linear,
    /// The output projection, `[d, n_head·head_dim]`.
    pub out: Linear,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (fewer than `n_head` with grouped-query attention).
    pub n_kv_head: usize,
    /// Width of each head.
    pub head_dim: usize,
    /// Rotary embedding of queries and keys; `None` with learned positions (GPT-2).
    pub rotary: Option<Rotary>,
    /// Causal masks, shared by all layers of the model.
    pub masks: CausalMasks,
    /// Sliding-window attention: each query sees only the last `w` positions, itself included
    /// (Mistral; some of Qwen2's layers).
    pub window: Option<usize>,
    /// Scores soft-capped to `c·tanh(s/c)` before the mask (Gemma-2).
    pub softcap: Option<f64>,
}

impl Attention {
    /// Keys (f32, as the cache keeps them) and values of block input `x` (`[b, t, d]`, already
    /// normed) at positions `pos0..`, `[b, kv_heads, t, head_dim]` with rotary applied: all that
    /// later positions read of them.
    pub fn keys_values(&self, x: &Tensor, pos0: usize) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let rows = |l: &Linear| -> Result<Linear> {
            Ok(Linear::new(
                l.weight.narrow(0, nh * hd, 2 * nkv * hd)?,
                l.bias
                    .as_ref()
                    .map(|b| b.narrow(0, nh * hd, 2 * nkv * hd))
                    .transpose()?,
            ))
        };
        let kv = rows(&self.qkv)?.forward(x)?;
        let heads = |start: usize| -> Result<Tensor> {
            Ok(kv
                .narrow(D::Minus1, start * hd, nkv * hd)?
                .reshape((b, t, nkv, hd))?
                .transpose(1, 2)?)
        };
        let k = match &self.rotary {
            Some(r) => r.apply(&heads(0)?, Positions::From(pos0))?,
            None => heads(0)?.to_dtype(DType::F32)?,
        };
        Ok((k.contiguous()?, heads(nkv)?.contiguous()?))
    }

    /// `x`: `[b, t, d]` at positions `pos0..pos0+t`; `cache` holds earlier positions.
    pub fn forward(
        &self,
        x: &Tensor,
        pos0: usize,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let qkv = self.qkv.forward(x)?;
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(D::Minus1, start * hd, n * hd)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?)
        };
        // Scores in f32, as the reference computes them for half-precision models: q and k are
        // cast first (the cast also lays them out), rotated and scaled in f32.
        let q = heads(0, nh)?.to_dtype(DType::F32)?;
        let k = heads(nh, nkv)?.to_dtype(DType::F32)?;
        let mut v = heads(nh + nkv, nkv)?.contiguous()?;
        let row_starts = cache.as_ref().and_then(|c| c.row_starts.clone());
        let pos = match &row_starts {
            Some(r) => Positions::PerRow(r),
            None => Positions::From(pos0),
        };
        let (q, mut k) = match &self.rotary {
            Some(r) => r.apply_qk(&q, &k, pos)?,
            None => ((q * (1.0 / (hd as f64).sqrt()))?, k),
        };
        let key_mask = cache.as_ref().and_then(|c| c.key_mask.clone());
        if let Some(c) = cache {
            if let (Some(pk), Some(pv)) = (&c.k, &c.v) {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            c.k = Some(k.clone());
            c.v = Some(v.clone());
        }
        // A window narrower than the keys hides the oldest ones; wider, it changes nothing.
        let window = self
            .window
            .filter(|&w| k.dim(2).is_ok_and(|t_all| t_all > w));
        // Grouped-query attention without copying keys: the `rep` query heads that share a key
        // head are stacked along the query axis, [b, nkv, rep·t, hd].
        let rep = nh / nkv;
        let q = q.contiguous()?.reshape((b, nkv, rep * t, hd))?;
        let v = v.contiguous()?;
        let y = match key_mask {
            // Rows at their own positions: the window counts each row's positions, not indices.
            key_mask if window.is_some() && row_starts.is_some() => {
                let starts = row_starts.as_deref().unwrap_or_default();
                let (t_all, w) = (k.dim(2)?, window.unwrap_or(usize::MAX));
                let mask = window_by_rows(key_mask.as_ref(), starts, (t, rep, t_all), w)?;
                self.mixed(&q, &k, &v, t, Some(mask.to_device(q.device())?), None)?
            }
            _ if window.is_some() => self.mixed(&q, &k, &v, t, key_mask, window)?,
            None if t >= Self::CAUSAL_BLOCK
                && q.device().is_cpu()
                && !q.track_op()
                && crate::kernels::fast() =>
            {
                self.causal_blocks(&q, &k, &v, t)?
            }
            key_mask => self.mixed(&q, &k, &v, t, key_mask, None)?,
        }
        .reshape((b, nh, t, hd))?;
        let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.out.forward(&y)
    }

    /// Queries per block of [`causal_blocks`](Self::causal_blocks), and the shortest prompt it
    /// serves.
    const CAUSAL_BLOCK: usize = 128;

    /// Attention of the stacked queries `[b, nkv, rep·t, hd]` over keys and values `[b, nkv,
    /// t_all, hd]`: scores (f32), masks (causal and `key_mask`), softmax, then the probabilities,
    /// cast to the values' dtype, times the values: `[b, nkv, rep·t, hd]`. `window`: the
    /// sliding window, where it hides keys.
    fn mixed(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        t: usize,
        key_mask: Option<Tensor>,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let (b, nkv, rows, hd) = q.dims4()?;
        let t_all = k.dim(2)?;
        let scores = match crate::kernels::gemm::batched(q, k, true)? {
            Some(s) => s,
            None => q.matmul(&k.contiguous()?.t()?)?,
        };
        count_products(q, b * nkv * rows, t_all, hd);
        let scores = match self.softcap {
            Some(c) => ((scores / c)?.tanh()? * c)?,
            None => scores,
        };
        // The fused kernel knows causal masks and one key mask per row only.
        let per_query = key_mask
            .as_ref()
            .is_some_and(|m| m.dim(2).is_ok_and(|n| n > 1));
        let fast = match window {
            None if !per_query => crate::kernels::causal_softmax(&scores, t, key_mask.as_ref())?,
            _ => None,
        };
        let probs = match fast {
            Some(p) => p,
            None => {
                let scores = if t > 1 || window.is_some() {
                    let rep = rows / t;
                    let mask = self.masks.get(t, t_all, rep, window, q.device())?;
                    scores.broadcast_add(&mask)?
                } else {
                    scores
                };
                let scores = match key_mask {
                    Some(m) => scores.broadcast_add(&m)?,
                    None => scores,
                };
                softmax_last(&scores)?
            }
        }
        .to_dtype(v.dtype())?;
        let y = match crate::kernels::gemm::batched(&probs, v, false)? {
            Some(y) => y,
            None => probs.matmul(v)?,
        };
        count_products(q, b * nkv * rows, hd, t_all);
        Ok(y)
    }

    /// Causal attention of a long prompt in blocks of queries, each over the keys it can see
    /// only: the same result as [`mixed`](Self::mixed) without computing the masked half of the
    /// scores (about half of attention's work at 1024 tokens).
    fn causal_blocks(&self, q: &Tensor, k: &Tensor, v: &Tensor, t: usize) -> Result<Tensor> {
        let (b, nkv, rows, hd) = q.dims4()?;
        let (rep, before) = (rows / t, k.dim(2)? - t);
        let q = q.reshape((b, nkv, rep, t, hd))?;
        let mut blocks = vec![];
        for start in (0..t).step_by(Self::CAUSAL_BLOCK) {
            let len = Self::CAUSAL_BLOCK.min(t - start);
            let seen = before + start + len;
            let qb = q.narrow(3, start, len)?.contiguous()?;
            let qb = qb.reshape((b, nkv, rep * len, hd))?;
            let (kb, vb) = (k.narrow(2, 0, seen)?, v.narrow(2, 0, seen)?.contiguous()?);
            let y = self.mixed(&qb, &kb, &vb, len, None, None)?;
            blocks.push(y.reshape((b, nkv, rep, len, hd))?);
        }
        Ok(Tensor::cat(&blocks, 3)?.reshape((b, nkv, rows, hd))?)
    }
}

/// The mask `[b, 1, rep·t, t_all]` of rows that sit at their own positions, through a sliding
/// window `w`: a key's position is the count of unmasked keys before it in its row (the
/// `key_mask`, `[b, 1, 1, t_all]`, hides padding), row `r`'s queries sit at `starts[r]..`; a
/// query sees the unmasked keys at its position and the `w − 1` before.
fn window_by_rows(
    key_mask: Option<&Tensor>,
    starts: &[usize],
    (t, rep, t_all): (usize, usize, usize),
    w: usize,
) -> Result<Tensor> {
    let b = starts.len();
    let hidden: Vec<bool> = match key_mask {
        Some(m) => m
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.is_infinite())
            .collect(),
        None => vec![false; b * t_all],
    };
    let mut mask = Vec::with_capacity(b * rep * t * t_all);
    for (r, &start) in starts.iter().enumerate() {
        let mut seen = 0;
        let positions: Vec<Option<usize>> = hidden[r * t_all..(r + 1) * t_all]
            .iter()
            .map(|&h| {
                (!h).then(|| {
                    seen += 1;
                    seen - 1
                })
            })
            .collect();
        for _ in 0..rep {
            for at in start..start + t {
                mask.extend(positions.iter().map(|p| match p {
                    Some(p) if *p <= at && at - p < w => 0.0,
                    _ => f32::NEG_INFINITY,
                }));
            }
        }
    }
    let mask = Tensor::from_vec(mask, (b, 1, rep * t, t_all), &Device::Cpu)?;
    Ok(mask)
}

/// Counts one of attention's products, `[m, k]·[k, n]`, with its backward's two when `q` is
/// tracked by autograd.
fn count_products(q: &Tensor, m: usize, n: usize, k: usize) {
    let passes = if q.track_op() { 3 } else { 1 };
    for _ in 0..passes {
        crate::flops::matmul(m, n, k);
    }
}

/// Additive causal masks, `[rep·t, t_all]` (0 or −∞): query i, at absolute position
/// t_all − t + i, sees keys up to itself (within a sliding window, only the last `w` of them).
/// Made once per shape and shared by all layers of a model (a GPU pass would otherwise upload
/// one per layer).
#[derive(Clone, Debug, Default)]
pub struct CausalMasks {
    made: std::sync::Arc<std::sync::Mutex<Vec<(MaskShape, Tensor)>>>,
}

/// `(t, t_all, rep, window)`.
type MaskShape = (usize, usize, usize, Option<usize>);

impl CausalMasks {
    /// Shapes kept; the oldest goes first (a trace uses a dozen, an edit two).
    const KEEP: usize = 64;

    /// The mask of `t` new queries (each repeated `rep` times) over `t_all` keys, `[rep·t, t_all]`,
    /// within a sliding `window` if any; made once per shape and device.
    pub fn get(
        &self,
        t: usize,
        t_all: usize,
        rep: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Tensor> {
        let key = (t, t_all, rep, window);
        let mut made = self.made.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = made
            .iter()
            .find(|(k, m)| *k == key && m.device().same_device(device))
        {
            return Ok(m.clone());
        }
        let offset = t_all - t;
        let row = |i: usize| {
            (0..t_all).map(move |j| {
                let at = i + offset;
                if j > at || window.is_some_and(|w| at - j >= w) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        };
        let mask: Vec<f32> = (0..rep).flat_map(|_| (0..t).flat_map(row)).collect();
        let mask = Tensor::from_vec(mask, (rep * t, t_all), device)?;
        if made.len() >= Self::KEEP {
            made.remove(0);
        }
        made.push((key, mask.clone()));
        Ok(mask)
    }
}

/// Softmax over the last axis; differentiable when its input is tracked by autograd.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(if x.track_op() && fused::supported(x) {
        fused::softmax_last(x)?
    } else if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(x)?
    })
}
