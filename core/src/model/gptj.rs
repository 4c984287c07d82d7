//! GPT-J: rotary embeddings on interleaved pairs of the first `rotary_dim` dimensions, parallel
//! blocks (attention and the MLP both read one LayerNorm's output), separate q/k/v projections
//! without biases (fused here), and an untied head with a bias.

use super::layers::{Attention, CausalMasks, Linear, Mlp, Norm, Rotary};
use super::load::Weights;
use super::{Block, Model};
use crate::config::ModelConfig;
use crate::error::Result;

/// Block `l`'s weights under `transformer.h.{l}`.
fn block(
    w: &Weights,
    cfg: &ModelConfig,
    l: usize,
    shared: &(Rotary, CausalMasks),
) -> Result<Block> {
    let (d, ff) = (cfg.d_model, cfg.d_ff);
    let p = format!("transformer.h.{l}");
    let proj = |n: &str| Linear::load(w, &format!("{p}.attn.{n}"), d, d, false);
    Ok(Block {
        ln1: Norm::load_layer(w, &format!("{p}.ln_1"), d, cfg.norm_eps)?,
        ln2: None,
        parallel: true,
        post_attn: None,
        post_mlp: None,
        attn: Attention {
            qkv: Linear::cat(&[proj("q_proj")?, proj("k_proj")?, proj("v_proj")?])?,
            out: proj("out_proj")?,
            n_head: cfg.n_head,
            n_kv_head: cfg.n_head,
            head_dim: cfg.head_dim,
            rotary: Some(shared.0.clone()),
            masks: shared.1.clone(),
            window: None,
            softcap: None,
        },
        mlp: Mlp::Gelu {
            fc: Linear::load(w, &format!("{p}.mlp.fc_in"), ff, d, true)?,
            proj: Linear::load(w, &format!("{p}.mlp.fc_out"), d, ff, true)?,
            exact: false,
        },
    })
}

/// Loads a GPT-J model (Hugging Face's `GPTJForCausalLM` names).
pub(super) fn load(w: &Weights, cfg: &ModelConfig) -> Result<Model> {
    let d = cfg.d_model;
    let rotary = Rotary::new(
        cfg.rotary_dim,
        cfg.head_dim,
        true,
        (cfg.rope_theta, cfg.rope_scaling.as_ref()),
        cfg.max_positions,
        w.device,
    )?;
    let shared = (rotary, CausalMasks::default());
    let blocks = (0..cfg.n_layer)
        .map(|l| block(w, cfg, l, &shared))
        .collect::<Result<Vec<_>>>()?;
    Ok(Model {
        cfg: cfg.clone(),
        wte: w.get("transformer.wte.weight", &[cfg.vocab_size, d])?,
        wpe: None,
        blocks,
        ln_f: Norm::load_layer(w, "transformer.ln_f", d, cfg.norm_eps)?,
        lm_head: Linear::load(w, "lm_head", cfg.vocab_size, d, true)?,
        dtype: w.dtype,
        device: w.device.clone(),
    })
}
