//! LLaMA and the families that share its layout (SmolLM2, Llama 3, Mistral, Qwen2): rotary
//! embeddings on halves (scaled for long contexts where the config says), RMSNorm,
//! grouped-query attention (optional q/k/v biases, an optional sliding window), a SwiGLU MLP,
//! and a head tied to the embeddings where the config says so.

use super::layers::{Attention, CausalMasks, Linear, Mlp, Norm, Rotary};
use super::load::Weights;
use super::{Block, Model};
use crate::config::ModelConfig;
use crate::error::Result;

/// Block `l`'s weights under `model.layers.{l}`.
fn block(
    w: &Weights,
    cfg: &ModelConfig,
    l: usize,
    shared: &(Rotary, CausalMasks),
) -> Result<Block> {
    let (d, ff, eps) = (cfg.d_model, cfg.d_ff, cfg.norm_eps);
    let (nh, nkv, hd) = (cfg.n_head, cfg.n_kv_head, cfg.head_dim);
    let p = format!("model.layers.{l}");
    let a = |n: &str, out: usize, inp: usize, bias: bool| {
        Linear::load(w, &format!("{p}.self_attn.{n}"), out, inp, bias)
    };
    let m =
        |n: &str, out: usize, inp: usize| Linear::load(w, &format!("{p}.mlp.{n}"), out, inp, false);
    let ab = cfg.attn_bias;
    Ok(Block {
        ln1: Norm::load_rms(w, &format!("{p}.input_layernorm"), d, eps)?,
        ln2: Some(Norm::load_rms(
            w,
            &format!("{p}.post_attention_layernorm"),
            d,
            eps,
        )?),
        parallel: false,
        attn: Attention {
            qkv: Linear::cat(&[
                a("q_proj", nh * hd, d, ab)?,
                a("k_proj", nkv * hd, d, ab)?,
                a("v_proj", nkv * hd, d, ab)?,
            ])?,
            out: a("o_proj", d, nh * hd, cfg.attn_out_bias)?,
            n_head: nh,
            n_kv_head: nkv,
            head_dim: hd,
            rotary: Some(shared.0.clone()),
            masks: shared.1.clone(),
            window: cfg.window_of(l),
        },
        mlp: Mlp::SwiGlu {
            gate_up: Linear::cat(&[m("gate_proj", ff, d)?, m("up_proj", ff, d)?])?,
            down: m("down_proj", d, ff)?,
        },
    })
}

/// Loads a LLaMA-style model (Hugging Face's `LlamaForCausalLM` names).
pub(super) fn load(w: &Weights, cfg: &ModelConfig) -> Result<Model> {
    let d = cfg.d_model;
    let hd = cfg.head_dim;
    let rope = (cfg.rope_theta, cfg.rope_scaling.as_ref());
    let rotary = Rotary::new(cfg.rotary_dim, hd, false, rope, cfg.max_positions, w.device)?;
    let shared = (rotary, CausalMasks::default());
    let wte = w.get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
    let blocks = (0..cfg.n_layer)
        .map(|l| block(w, cfg, l, &shared))
        .collect::<Result<Vec<_>>>()?;
    let lm_head = if cfg.tie_embeddings && !w.contains("lm_head.weight") {
        Linear::new(wte.clone(), None)
    } else {
        Linear::load(w, "lm_head", cfg.vocab_size, d, false)?
    };
    Ok(Model {
        cfg: cfg.clone(),
        wte,
        wpe: None,
        blocks,
        ln_f: Norm::load_rms(w, "model.norm", d, cfg.norm_eps)?,
        lm_head,
        dtype: w.dtype,
        device: w.device.clone(),
    })
}
