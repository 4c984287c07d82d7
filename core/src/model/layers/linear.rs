//! The linear map `y = x Wᵀ + b`, with a frozen-weights product for autograd, and how it loads.
//! A map may also carry a low-rank change added at forward time (a visitor's edits over a shared
//! model, without a copy of the weights) and a GRACE codebook that replaces the outputs of the
//! inputs it knows.

use candle_core::{DType, Tensor, D};

use super::Codebook;
use crate::error::Result;
use crate::kernels::gemm::{self, Lhs, Rhs};
use crate::model::load::Weights;

/// `y = x Wᵀ + b` with `W` stored `[out, in]` (GPT-2's Conv1D weights are transposed at load).
#[derive(Clone, Debug)]
pub struct Linear {
    /// `W`, `[out, in]`.
    pub weight: Tensor,
    /// `b`, `[out]`, when the map has one.
    pub bias: Option<Tensor>,
    /// `Σᵣ rightᵣ leftᵣᵀ` added to `W` at forward time, never stored into it.
    pub low_rank: Option<LowRankAdd>,
    /// GRACE's codebook: outputs for the inputs it knows, replacing the map's.
    pub codebook: Option<Codebook>,
}

/// A low-rank change of a map's weight, kept as its factors and applied to each input: `x` maps
/// to `x Wᵀ + (x leftᵀ) right` instead of `x (W + rightᵀ left)ᵀ`, which is the same map up to
/// float rounding and costs `rank × (in + out)` per row instead of a `[out, in]` copy.
#[derive(Clone, Debug)]
pub struct LowRankAdd {
    /// `[rank, in]` f32: the key-side vectors.
    pub left: Tensor,
    /// `[rank, out]` f32: the output-side vectors.
    pub right: Tensor,
}

impl LowRankAdd {
    /// `(x leftᵀ) right` for inputs `[rows, in]`, computed in f32, in `x`'s dtype.
    fn output(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let (rows, rank) = (x.elem_count() / x.dim(D::Minus1)?, self.left.dim(0)?);
        // Two products forward; under autograd, two more for the input's gradient.
        for _ in 0..if x.track_op() { 2 } else { 1 } {
            crate::flops::matmul(rows, rank, self.left.dim(1)?);
            crate::flops::matmul(rows, self.right.dim(1)?, rank);
        }
        let coef = x32.matmul(&self.left.t()?)?;
        Ok(coef.matmul(&self.right)?.to_dtype(x.dtype())?)
    }

    /// This change followed by `more` (the ranks add up).
    pub fn and(&self, more: &LowRankAdd) -> Result<LowRankAdd> {
        Ok(LowRankAdd {
            left: Tensor::cat(&[&self.left, &more.left], 0)?,
            right: Tensor::cat(&[&self.right, &more.right], 0)?,
        })
    }
}

impl Linear {
    /// A map from its weight `[out, in]` and optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            low_rank: None,
            codebook: None,
        }
    }

    /// The output width: the weight's rows.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x Wᵀ + b` over the last axis: `[.., in]` → `[.., out]`. Under autograd with frozen
    /// weights, only the input gets a gradient.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = *dims.last().expect("activations have a last dimension");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, d_in))?;
        let backend = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
        let frozen = !self.weight.track_op();
        let frozen_path = x.track_op() && frozen && backend && self.weight.dtype() == x.dtype();
        // The forward product, and under autograd candle's backward ones (with tracked weights
        // it computes both gradients); the frozen-weight product counts its backward when it
        // runs.
        let backward = match (frozen_path, frozen, x.track_op()) {
            (true, ..) => 0,
            (false, false, _) => 2,
            (false, true, tracked) => tracked as usize,
        };
        for _ in 0..1 + backward {
            crate::flops::matmul(rows, self.out_dim(), d_in);
        }
        let y = if frozen_path {
            // Under autograd, frozen weights need no gradient: skip candle's (as large as the
            // weights, allocated on every step) and backpropagate to the input only.
            x2.contiguous()?.apply_op1(FrozenMatmul {
                w: self.weight.clone(),
            })?
        } else if let Some(y) = gemm::linear(&x2, &self.weight)? {
            y
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        let y = match &self.low_rank {
            Some(a) => (y + a.output(&x2)?)?,
            None => y,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let y = match &self.codebook {
            Some(c) => c.replace(&x2, &y)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.out_dim();
        Ok(y.reshape(out)?)
    }
}

impl Linear {
    /// Loads `{prefix}.weight` (`[out, inp]`) and, with `bias`, `{prefix}.bias`.
    pub fn load(w: &Weights, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let b = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(
            w.get(&format!("{prefix}.weight"), &[out, inp])?,
            b,
        ))
    }

    /// Loads GPT-2's Conv1D, which stores its weight `[inp, out]`, as a linear map.
    pub fn load_conv1d(w: &Weights, prefix: &str, inp: usize, out: usize) -> Result<Self> {
        let weight = w
            .get(&format!("{prefix}.weight"), &[inp, out])?
            .t()?
            .contiguous()?;
        let bias = w.get(&format!("{prefix}.bias"), &[out])?;
        Ok(Linear::new(weight, Some(bias)))
    }

    /// One map whose outputs are the parts' outputs stacked (a fused q/k/v or gate/up).
    pub fn cat(parts: &[Linear]) -> Result<Self> {
        let weights: Vec<Tensor> = parts.iter().map(|l| l.weight.clone()).collect();
        let biases: Option<Vec<Tensor>> = parts.iter().map(|l| l.bias.clone()).collect();
        let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
        Ok(Linear::new(Tensor::cat(&weights, 0)?, bias))
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

impl FrozenMatmul {
    /// The forward product by Loci's CPU kernel (f32, enough rows, contiguous operands), or
    /// `None` for candle's.
    fn loci_product(
        &self,
        x: &candle_core::CpuStorage,
        x_layout: &candle_core::Layout,
    ) -> candle_core::Result<Option<(candle_core::CpuStorage, candle_core::Shape)>> {
        let (rows, d_in) = x_layout.shape().dims2()?;
        let (d_out, w_in) = self.w.dims2()?;
        let candle_core::CpuStorage::F32(xs) = x else {
            return Ok(None);
        };
        let Some((start, end)) = x_layout.contiguous_offsets() else {
            return Ok(None);
        };
        if rows < gemm::MIN_ROWS || w_in != d_in {
            return Ok(None);
        }
        let (threads, precision) = (crate::kernels::kernel_threads(), gemm::maps_precision());
        // The weights' values when Loci's kernels serve them (on, f32, CPU, frozen).
        let y = crate::kernels::with_cpu_f32(&self.w, |ws| {
            let (lhs, rhs) = (Lhs::Plain(&xs[start..end]), Rhs::Transposed(ws));
            gemm::product_in(precision, lhs, rows, d_in, rhs, d_out, threads)
        });
        Ok(y.flatten()
            .map(|y| (candle_core::CpuStorage::F32(y), (rows, d_out).into())))
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
        if let Some(y) = self.loci_product(storage, layout)? {
            return Ok(y);
        }
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
        let (d_out, d_in) = self.w.dims2()?;
        crate::flops::matmul(grad.elem_count() / d_out.max(1), d_in, d_out);
        match gemm::times(grad, &self.w).map_err(candle_core::Error::wrap)? {
            Some(g) => Ok(Some(g)),
            None => Ok(Some(grad.matmul(&self.w)?)),
        }
    }
}
