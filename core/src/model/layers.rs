//! The per-family pieces of the transformer skeleton: linear maps, norms, attention, MLPs.

use candle_core::{DType, Device, Tensor, D};

use super::fused;
use crate::error::{LociError, Result};

/// `y = x Wᵀ + b` with `W` stored `[out, in]` (GPT-2's Conv1D weights are transposed at load).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = *dims.last().expect("activations have a last dimension");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, d_in))?;
        let backend = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
        let frozen = !self.weight.track_op();
        let y = if x.track_op() && frozen && backend && self.weight.dtype() == x.dtype() {
            // Under autograd, frozen weights need no gradient: skip candle's (as large as the
            // weights, allocated on every step) and backpropagate to the input only.
            x2.contiguous()?.apply_op1(FrozenMatmul {
                w: self.weight.clone(),
            })?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.out_dim();
        Ok(y.reshape(out)?)
    }
}

/// `x Wᵀ` whose backward pass gives the input's gradient only.
struct FrozenMatmul {
    w: Tensor,
}

impl FrozenMatmul {
    /// The product straight from the two storages (the input's may start at an offset): the
    /// same GEMM as `Tensor::matmul`, with no copy of the input or the output.
    fn product<S: candle_core::backend::BackendStorage>(
        &self,
        x: &S,
        x_layout: &candle_core::Layout,
        w: &S,
        w_layout: &candle_core::Layout,
    ) -> candle_core::Result<(S, candle_core::Shape)> {
        let (rows, d_in) = x_layout.shape().dims2()?;
        let (d_out, w_in) = w_layout.shape().dims2()?;
        if w_in != d_in {
            candle_core::bail!("frozen-matmul: input width {d_in}, weights [{d_out}, {w_in}]")
        }
        let y = x.matmul(
            w,
            (1, rows, d_out, d_in),
            x_layout,
            &w_layout.transpose(0, 1)?,
        )?;
        Ok((y, (rows, d_out).into()))
    }
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (w, w_layout) = self.w.storage_and_layout();
        match &*w {
            candle_core::Storage::Cpu(w) => self.product(storage, layout, w, w_layout),
            _ => candle_core::bail!("frozen-matmul: the weights are not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (w, w_layout) = self.w.storage_and_layout();
        match &*w {
            candle_core::Storage::Cuda(w) => self.product(storage, layout, w, w_layout),
            _ => candle_core::bail!("frozen-matmul: the weights are not on the GPU"),
        }
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

/// LayerNorm / RMSNorm, computed in f32 whatever the activations' dtype (candle's fused kernels
/// work in f32 inside); the weights are in the model's dtype, as the reference's are after
/// `.half()`, so a half-precision pass normalises without casting its activations twice.
#[derive(Clone, Debug)]
pub enum Norm {
    Layer { w: Tensor, b: Tensor, eps: f32 },
    Rms { w: Tensor, eps: f32 },
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if !x.track_op() {
            let like = |t: &Tensor| t.to_dtype(x.dtype());
            return Ok(match self {
                Norm::Layer { w, b, eps } => {
                    candle_nn::ops::layer_norm(&x, &like(w)?, &like(b)?, *eps)?
                }
                Norm::Rms { w, eps } => candle_nn::ops::rms_norm(&x, &like(w)?, *eps)?,
            });
        }
        // Under autograd, in f32; candle's fused kernels get a backward pass from fused.rs.
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let fast = fused::supported(&xf);
        let y = match self {
            Norm::Layer { w, b, eps } if fast => fused::layer_norm(&xf, &f32(w)?, &f32(b)?, *eps)?,
            Norm::Layer { w, b, eps } => {
                candle_nn::ops::layer_norm_slow(&xf, &f32(w)?, &f32(b)?, *eps)?
            }
            Norm::Rms { w, eps } if fast => fused::rms_norm(&xf, &f32(w)?, *eps)?,
            Norm::Rms { w, eps } => candle_nn::ops::rms_norm_slow(&xf, &f32(w)?, *eps)?,
        };
        Ok(y.to_dtype(dtype)?)
    }
}

/// Rotary position embedding on the first `dim` dimensions of each head, in f32 (as GPT-J's
/// reference computes it: its f32 tables promote half-precision keys and queries).
#[derive(Clone, Debug)]
pub struct Rotary {
    /// How many leading dimensions of a head the tables turn: `dim`, or the whole head when
    /// pairs are interleaved — pairs past `dim` turn by angle 0 (cos 1, sin 0: exactly the
    /// identity), which spares GPT-J a split and a concatenation of q and k in every layer.
    span: usize,
    /// GPT-J rotates adjacent pairs (2i, 2i+1); LLaMA rotates halves (i, i + dim/2).
    pub interleaved: bool,
    /// cos and sin of every position's angles, `[positions, span/2]` f32 on the model's device:
    /// made once (shared by all layers) so a pass uploads nothing.
    cos: Tensor,
    sin: Tensor,
    /// The same tables times the attention's score scale `q_scale` (1/√head_dim), for queries:
    /// rotating and scaling them is then one kernel.
    cos_q: Tensor,
    sin_q: Tensor,
    q_scale: f64,
    /// Per-row tables gathered before (cos, sin, cos_q, sin_q), by row positions and length: a
    /// v* optimisation asks for the same ones in every layer of every step. Shared by all layers.
    gathered: std::sync::Arc<std::sync::Mutex<Vec<Gathered>>>,
}

/// `((each row's first position, positions per row), [cos, sin, cos_q, sin_q])`.
type Gathered = ((Vec<usize>, usize), [Tensor; 4]);

/// Where a batch sits in the sequence: all rows from one position, or each row from its own.
#[derive(Clone, Copy, Debug)]
pub enum Positions<'a> {
    From(usize),
    PerRow(&'a [usize]),
}

impl Rotary {
    pub fn new(
        dim: usize,
        head_dim: usize,
        interleaved: bool,
        theta: f64,
        positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let span = if interleaved { head_dim } else { dim };
        // Same float32 formula as transformers: inv_freq in f32, then the f32 product.
        let inv: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / dim as f32))
            .chain(std::iter::repeat_n(0.0, (span - dim) / 2))
            .collect();
        let angles: Vec<f32> = (0..positions)
            .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
            .collect();
        let table = |f: fn(f32) -> f32| -> Result<Tensor> {
            let v: Vec<f32> = angles.iter().map(|&a| f(a)).collect();
            Ok(Tensor::from_vec(v, (positions, span / 2), device)?)
        };
        let (cos, sin) = (table(f32::cos)?, table(f32::sin)?);
        let q_scale = 1.0 / (head_dim as f64).sqrt();
        Ok(Self {
            span,
            interleaved,
            cos_q: (&cos * q_scale)?,
            sin_q: (&sin * q_scale)?,
            cos,
            sin,
            q_scale,
            gathered: Default::default(),
        })
    }

    /// Gatherings kept; the oldest goes first.
    const KEEP: usize = 8;

    /// `(cos, sin)` `[t, span/2]` of positions `p..p+t`, or `[b, t, span/2]` per row; `scaled`:
    /// the queries' tables.
    fn tables(&self, pos: Positions, t: usize, scaled: bool) -> Result<(Tensor, Tensor)> {
        let positions = self.cos.dim(0)?;
        let beyond = |p: usize| {
            LociError::input(format!(
                "position {} is beyond the model's {positions} rotary positions",
                p + t
            ))
        };
        let pick = |all: &[Tensor; 4]| {
            let i = if scaled { 2 } else { 0 };
            (all[i].clone(), all[i + 1].clone())
        };
        match pos {
            Positions::From(p) => {
                if p + t > positions {
                    return Err(beyond(p));
                }
                let (cos, sin) = if scaled {
                    (&self.cos_q, &self.sin_q)
                } else {
                    (&self.cos, &self.sin)
                };
                Ok((cos.narrow(0, p, t)?, sin.narrow(0, p, t)?))
            }
            Positions::PerRow(rows) => {
                let mut kept = self.gathered.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((_, all)) = kept.iter().find(|((r, n), _)| *n == t && r == rows) {
                    return Ok(pick(all));
                }
                let mut idx = Vec::with_capacity(rows.len() * t);
                for &p in rows {
                    if p + t > positions {
                        return Err(beyond(p));
                    }
                    idx.extend((p..p + t).map(|q| q as u32));
                }
                let idx = Tensor::from_vec(idx, rows.len() * t, self.cos.device())?;
                let half = self.span / 2;
                let gather = |tab: &Tensor| -> Result<Tensor> {
                    Ok(tab.index_select(&idx, 0)?.reshape((rows.len(), t, half))?)
                };
                let all = [
                    gather(&self.cos)?,
                    gather(&self.sin)?,
                    gather(&self.cos_q)?,
                    gather(&self.sin_q)?,
                ];
                let out = pick(&all);
                if kept.len() >= Self::KEEP {
                    kept.remove(0);
                }
                kept.push(((rows.to_vec(), t), all));
                Ok(out)
            }
        }
    }

    /// Turns `x` (`[b, heads, t, head_dim]`, f32) by the tables' angles.
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hd = x.dim(3)?;
        let rot = |y: &Tensor| -> Result<Tensor> {
            let y = y.contiguous()?;
            if y.track_op() {
                // candle's fused kernels have no backward pass: fused.rs gives them one.
                return if fused::supported(&y) {
                    Ok(fused::rope(&y, cos, sin, self.interleaved)?)
                } else {
                    rope_composed(&y, cos, sin, self.interleaved)
                };
            }
            Ok(if self.interleaved {
                candle_nn::rotary_emb::rope_i(&y, cos, sin)?
            } else {
                candle_nn::rotary_emb::rope(&y, cos, sin)?
            })
        };
        if self.span == hd {
            rot(x)
        } else {
            let head = rot(&x.narrow(D::Minus1, 0, self.span)?)?;
            let tail = x.narrow(D::Minus1, self.span, hd - self.span)?;
            Ok(Tensor::cat(&[head, tail], D::Minus1)?)
        }
    }

    /// Keys `[b, heads, t, head_dim]` at positions `pos`, rotated in f32.
    pub fn apply(&self, k: &Tensor, pos: Positions) -> Result<Tensor> {
        let (cos, sin) = self.tables(pos, k.dim(2)?, false)?;
        self.rotate(&k.to_dtype(DType::F32)?, &cos, &sin)
    }

    /// Queries and keys (f32) at positions `pos`, rotated; the queries also scaled by
    /// 1/√head_dim, which the scores then need no more.
    pub fn apply_qk(&self, q: &Tensor, k: &Tensor, pos: Positions) -> Result<(Tensor, Tensor)> {
        let t = q.dim(2)?;
        let (cos, sin) = self.tables(pos, t, false)?;
        let k = self.rotate(k, &cos, &sin)?;
        // Scaled tables where they cover the whole head; else one product.
        let q = if self.span == q.dim(3)? {
            let (cq, sq) = self.tables(pos, t, true)?;
            self.rotate(q, &cq, &sq)?
        } else {
            (self.rotate(q, &cos, &sin)? * self.q_scale)?
        };
        Ok((q, k))
    }
}

/// Rotary embedding from differentiable operations; `cos`/`sin` are `[t, d/2]` or `[b, t, d/2]`.
pub(crate) fn rope_composed(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let half = d / 2;
    let (cos, sin) = match cos.rank() {
        2 => (cos.reshape((1, 1, t, half))?, sin.reshape((1, 1, t, half))?),
        _ => (cos.unsqueeze(1)?, sin.unsqueeze(1)?),
    };
    let (x1, x2) = if interleaved {
        let pairs = x.reshape((b, h, t, half, 2))?;
        (
            pairs.narrow(4, 0, 1)?.squeeze(4)?,
            pairs.narrow(4, 1, 1)?.squeeze(4)?,
        )
    } else {
        (x.narrow(3, 0, half)?, x.narrow(3, half, half)?)
    };
    let o1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let o2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Ok(if interleaved {
        Tensor::stack(&[o1, o2], 4)?.reshape((b, h, t, d))?
    } else {
        Tensor::cat(&[o1, o2], 3)?
    })
}

/// Cached keys (f32) and values (the model's dtype) of one layer, `[b, kv_heads, t, head_dim]`.
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    pub k: Option<Tensor>,
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
    pub qkv: Linear,
    pub out: Linear,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rotary: Option<Rotary>,
    pub masks: CausalMasks,
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
        let t_all = k.dim(2)?;
        // Grouped-query attention without copying keys: the `rep` query heads that share a key
        // head are stacked along the query axis, [b, nkv, rep·t, hd].
        let rep = nh / nkv;
        let dtype = x.dtype();
        let q = q.contiguous()?.reshape((b, nkv, rep * t, hd))?;
        let scores = q.matmul(&k.contiguous()?.t()?)?;
        let scores = if t > 1 {
            scores.broadcast_add(&self.masks.get(t, t_all, rep, x.device())?)?
        } else {
            scores
        };
        let scores = match key_mask {
            Some(m) => scores.broadcast_add(&m)?,
            None => scores,
        };
        let probs = softmax_last(&scores)?.to_dtype(dtype)?;
        let y = probs.matmul(&v.contiguous()?)?.reshape((b, nh, t, hd))?;
        let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.out.forward(&y)
    }
}

/// Additive causal masks, `[rep·t, t_all]` (0 or −∞): query i, at absolute position
/// t_all − t + i, sees keys up to itself. Made once per shape and shared by all layers of a
/// model (a GPU pass would otherwise upload one per layer).
#[derive(Clone, Debug, Default)]
pub struct CausalMasks {
    made: std::sync::Arc<std::sync::Mutex<Vec<(MaskShape, Tensor)>>>,
}

/// `(t, t_all, rep)`.
type MaskShape = (usize, usize, usize);

impl CausalMasks {
    /// Shapes kept; the oldest goes first (a trace uses a dozen, an edit two).
    const KEEP: usize = 64;

    pub fn get(&self, t: usize, t_all: usize, rep: usize, device: &Device) -> Result<Tensor> {
        let key = (t, t_all, rep);
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
                if j > i + offset {
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

/// The MLP, split into the key computation and the down-projection that ROME edits.
#[derive(Clone, Debug)]
pub enum Mlp {
    /// GPT-2 / GPT-J: `proj(gelu_tanh(fc(x)))`.
    Gelu { fc: Linear, proj: Linear },
    /// LLaMA: `down(silu(gate(x)) * up(x))`, gate and up fused into one `[2 d_ff, d]` map.
    SwiGlu { gate_up: Linear, down: Linear },
}

impl Mlp {
    /// ROME's key: the down-projection's input.
    pub fn key(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Gelu { fc, .. } => Ok(fc.forward(x)?.gelu()?),
            Mlp::SwiGlu { gate_up, .. } => {
                let gu = gate_up.forward(x)?;
                let d_ff = gate_up.out_dim() / 2;
                let gate = gu.narrow(D::Minus1, 0, d_ff)?;
                let up = gu.narrow(D::Minus1, d_ff, d_ff)?;
                Ok((gate.silu()? * up)?)
            }
        }
    }

    pub fn down(&self) -> &Linear {
        match self {
            Mlp::Gelu { proj, .. } => proj,
            Mlp::SwiGlu { down, .. } => down,
        }
    }

    pub fn down_mut(&mut self) -> &mut Linear {
        match self {
            Mlp::Gelu { proj, .. } => proj,
            Mlp::SwiGlu { down, .. } => down,
        }
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

pub fn check_shape(name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(LociError::model(format!(
            "tensor {name} has shape {:?}, the config implies {want:?}",
            t.dims()
        )));
    }
    Ok(())
}
