//! What a model is, before it is loaded: the matrix edits rewrite in each family and the memory
//! its weights take, for `loci info`.

use serde::Serialize;

use crate::config::{Family, ModelConfig};

/// The matrix every editing method rewrites in a family, and what its key (input) is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EditSite {
    /// The edited matrix's Hugging Face name, `{l}` standing for the layer.
    pub matrix: &'static str,
    /// What the matrix reads: ROME's key.
    pub key: &'static str,
    /// Whether the matrix has a bias (fine-tuning trains it too).
    pub bias: bool,
}

/// The edit site of `cfg`'s family: always an MLP's down-projection.
pub fn edit_site(cfg: &ModelConfig) -> EditSite {
    let (matrix, key, bias) = match cfg.family {
        Family::Gpt2 => ("transformer.h.{l}.mlp.c_proj", "gelu(c_fc(ln_2(h)))", true),
        Family::Gptj => ("transformer.h.{l}.mlp.fc_out", "gelu(fc_in(ln_1(h)))", true),
        Family::Neox => (
            "gpt_neox.layers.{l}.mlp.dense_4h_to_h",
            "gelu(dense_h_to_4h(post_attention_layernorm(h)))",
            true,
        ),
        Family::Llama | Family::Phi3 => (
            "model.layers.{l}.mlp.down_proj",
            "silu(gate_proj(x)) ⊙ up_proj(x)",
            false,
        ),
        Family::Gemma => (
            "model.layers.{l}.mlp.down_proj",
            "gelu_tanh(gate_proj(x)) ⊙ up_proj(x)",
            false,
        ),
    };
    EditSite { matrix, key, bias }
}

/// Bytes of `cfg`'s weights at `bytes_per_weight` each (matrices, embeddings, learned
/// positions; norms and biases, a fraction of a percent, left out).
pub fn weight_bytes(cfg: &ModelConfig, bytes_per_weight: usize) -> u64 {
    cfg.n_params() as u64 * bytes_per_weight as u64
}
