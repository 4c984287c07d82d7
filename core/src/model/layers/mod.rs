//! The pieces of the transformer skeleton, one file each: linear maps (and GRACE's codebook on
//! them), norms, rotary embeddings, attention and MLPs. Each loads itself from named weights beside its forward pass.

mod attention;
mod codebook;
mod linear;
mod mlp;
mod norm;
mod rotary;

pub use attention::{softmax_last, Attention, CausalMasks, LayerCache};
pub use codebook::{Codebook, CodebookEntry};
pub use linear::{Linear, LowRankAdd};
pub use mlp::Mlp;
pub use norm::Norm;
#[cfg(test)]
pub(crate) use rotary::rope_composed;
pub use rotary::{Positions, Rotary};

use candle_core::Tensor;

use crate::error::{LociError, Result};

/// Errors unless tensor `name` has shape `want`, the shape the model's config implies.
pub fn check_shape(name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(LociError::model(format!(
            "tensor {name} has shape {:?}, the config implies {want:?}",
            t.dims()
        )));
    }
    Ok(())
}
