//! GPT-2: learned positions, sequential blocks (attention, then the MLP, each after its own
//! LayerNorm), Conv1D weights, a GELU MLP, and the head tied to the token embeddings.

use super::layers::{Attention, CausalMasks, Linear, Mlp, Norm};
use super::load::Weights;
use super::{Block, Model};
use crate::config::ModelConfig;
use crate::error::Result;

/// Block `l`'s weights under `transformer.h.{l}`.
fn block(w: &Weights, cfg: &ModelConfig, l: usize, masks: &CausalMasks) -> Result<Block> {
    let (d, ff, eps) = (cfg.d_model, cfg.d_ff, cfg.norm_eps);
    let p = format!("transformer.h.{l}");
    Ok(Block {
        ln1: Norm::load_layer(w, &format!("{p}.ln_1"), d, eps)?,
        ln2: Some(Norm::load_layer(w, &format!("{p}.ln_2"), d, eps)?),
        parallel: false,
        post_attn: None,
        post_mlp: None,
        attn: Attention {
            qkv: Linear::load_conv1d(w, &format!("{p}.attn.c_attn"), d, 3 * d)?,
            out: Linear::load_conv1d(w, &format!("{p}.attn.c_proj"), d, d)?,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_head,
            head_dim: cfg.head_dim,
            rotary: None,
            masks: masks.clone(),
            window: None,
            softcap: None,
        },
        mlp: Mlp::Gelu {
            fc: Linear::load_conv1d(w, &format!("{p}.mlp.c_fc"), d, ff)?,
            proj: Linear::load_conv1d(w, &format!("{p}.mlp.c_proj"), ff, d)?,
            exact: false,
        },
    })
}

/// Loads a GPT-2 model (Hugging Face's `GPT2LMHeadModel` names).
pub(super) fn load(w: &Weights, cfg: &ModelConfig) -> Result<Model> {
    let d = cfg.d_model;
    let masks = CausalMasks::default();
    let wte = w.get("transformer.wte.weight", &[cfg.vocab_size, d])?;
    let wpe = w.get("transformer.wpe.weight", &[cfg.max_positions, d])?;
    let blocks = (0..cfg.n_layer)
        .map(|l| block(w, cfg, l, &masks))
        .collect::<Result<Vec<_>>>()?;
    Ok(Model {
        cfg: cfg.clone(),
        lm_head: Linear::new(wte.clone(), None),
        wte,
        wpe: Some(wpe),
        blocks,
        ln_f: Norm::load_layer(w, "transformer.ln_f", d, cfg.norm_eps)?,
        dtype: w.dtype,
        device: w.device.clone(),
    })
}
