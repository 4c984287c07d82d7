//! The MLP, split at ROME's key: the key computation, then the down-projection that edits
//! rewrite.

use candle_core::{Tensor, D};

use super::Linear;
use crate::error::Result;

/// The MLP, split into the key computation and the down-projection that ROME edits.
#[derive(Clone, Debug)]
pub enum Mlp {
    /// GPT-2 / GPT-J: `proj(gelu_tanh(fc(x)))`; GPT-NeoX: `proj(gelu(fc(x)))` (exact, erf).
    Gelu {
        /// The up-projection, `[d_ff, d]`.
        fc: Linear,
        /// The down-projection, `[d, d_ff]`.
        proj: Linear,
        /// The exact GELU rather than its tanh approximation.
        exact: bool,
    },
    /// LLaMA: `down(silu(gate(x)) * up(x))`, gate and up fused into one `[2 d_ff, d]` map;
    /// Gemma's GeGLU: `down(gelu_tanh(gate(x)) * up(x))`.
    SwiGlu {
        /// Gate and up projections stacked, `[2 d_ff, d]`.
        gate_up: Linear,
        /// The down-projection, `[d, d_ff]`.
        down: Linear,
        /// The gate goes through GELU (tanh), not SiLU.
        gelu: bool,
    },
}

impl Mlp {
    /// ROME's key: the down-projection's input.
    pub fn key(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Gelu { fc, exact, .. } => {
                let h = fc.forward(x)?;
                if *exact {
                    return Ok(h.gelu_erf()?);
                }
                match crate::kernels::gelu_tanh(&h)? {
                    Some(key) => Ok(key),
                    None => Ok(h.gelu()?),
                }
            }
            Mlp::SwiGlu { gate_up, gelu, .. } => {
                let gu = gate_up.forward(x)?;
                if !gelu {
                    if let Some(key) = crate::kernels::silu_mul(&gu)? {
                        return Ok(key);
                    }
                }
                let d_ff = gate_up.out_dim() / 2;
                let gate = gu.narrow(D::Minus1, 0, d_ff)?;
                let up = gu.narrow(D::Minus1, d_ff, d_ff)?;
                let gate = if *gelu { gate.gelu()? } else { gate.silu()? };
                Ok((gate * up)?)
            }
        }
    }

    /// The down-projection, `[d_model, d_ff]`: the matrix edits rewrite.
    pub fn down(&self) -> &Linear {
        match self {
            Mlp::Gelu { proj, .. } => proj,
            Mlp::SwiGlu { down, .. } => down,
        }
    }

    /// The down-projection, to replace (edits and their undo).
    pub fn down_mut(&mut self) -> &mut Linear {
        match self {
            Mlp::Gelu { proj, .. } => proj,
            Mlp::SwiGlu { down, .. } => down,
        }
    }
}
