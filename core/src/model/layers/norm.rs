//! LayerNorm and RMSNorm, and how they load.

use candle_core::{DType, Tensor};

use super::super::fused;
use crate::error::Result;
use crate::model::load::Weights;

/// LayerNorm / RMSNorm, computed in f32 whatever the activations' dtype (candle's fused kernels
/// work in f32 inside); the weights are in the model's dtype, as the reference's are after
/// `.half()`, so a half-precision pass normalises without casting its activations twice.
#[derive(Clone, Debug)]
pub enum Norm {
    /// LayerNorm: `(x − mean) / √(var + eps) · w + b`.
    Layer {
        /// Gain, `[d]`.
        w: Tensor,
        /// Bias, `[d]`.
        b: Tensor,
        /// Added to the variance.
        eps: f32,
    },
    /// RMSNorm: `x / √(mean(x²) + eps) · w`.
    Rms {
        /// Gain, `[d]`.
        w: Tensor,
        /// Added to the mean square.
        eps: f32,
    },
}

impl Norm {
    /// Loads a LayerNorm's `{prefix}.weight` and `{prefix}.bias`, `[d]`.
    pub fn load_layer(w: &Weights, prefix: &str, d: usize, eps: f64) -> Result<Self> {
        Ok(Norm::Layer {
            w: w.get(&format!("{prefix}.weight"), &[d])?,
            b: w.get(&format!("{prefix}.bias"), &[d])?,
            eps: eps as f32,
        })
    }

    /// Loads an RMSNorm's `{prefix}.weight`, `[d]`.
    pub fn load_rms(w: &Weights, prefix: &str, d: usize, eps: f64) -> Result<Self> {
        Ok(Norm::Rms {
            w: w.get(&format!("{prefix}.weight"), &[d])?,
            eps: eps as f32,
        })
    }

    /// Loads Gemma's RMSNorm, which scales by `1 + w`: the one is added here and the gain kept
    /// in f32, as transformers applies it (in f32, then casts) whatever the model's dtype.
    pub fn load_rms_plus_one(w: &Weights, prefix: &str, d: usize, eps: f64) -> Result<Self> {
        let g = w.get(&format!("{prefix}.weight"), &[d])?;
        Ok(Norm::Rms {
            w: (g.to_dtype(DType::F32)? + 1.0)?,
            eps: eps as f32,
        })
    }

    /// Normalises `x` over its last axis; under autograd in f32, with the input's gradient.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if !x.track_op() {
            let like = |t: &Tensor| t.to_dtype(x.dtype());
            return Ok(match self {
                Norm::Layer { w, b, eps } => {
                    candle_nn::ops::layer_norm(&x, &like(w)?, &like(b)?, *eps)?
                }
                // An f32 gain over half-precision activations (Gemma's) scales in f32.
                Norm::Rms { w, eps } if w.dtype() == DType::F32 && x.dtype() != DType::F32 => {
                    let xf = x.to_dtype(DType::F32)?;
                    candle_nn::ops::rms_norm(&xf, w, *eps)?.to_dtype(x.dtype())?
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
