//! LLaMA and the families that share its layout and names (SmolLM2, Llama 3, Mistral, Qwen2,
//! Phi-3, Gemma, Gemma-2): rotary embeddings on halves (scaled for long contexts where the
//! config says), RMSNorm, grouped-query attention (optional q/k/v biases, an optional sliding
//! window), a gated MLP, and a head tied to the embeddings where the config says so. Phi-3
//! stores q/k/v and gate/up fused; Gemma's norms scale by `1 + w`, its MLP gates with GELU, and
//! Gemma-2 adds norms on the attention's and MLP's outputs and soft-caps scores.

use super::layers::{Attention, CausalMasks, Linear, Mlp, Norm, Rotary};
use super::load::Weights;
use super::{Block, Model};
use crate::config::{Family, ModelConfig};
use crate::error::Result;

/// Block `l`'s weights under `model.layers.{l}`.
fn block(
    w: &Weights,
    cfg: &ModelConfig,
    l: usize,
    shared: &(Rotary, CausalMasks),
) -> Result<Block> {
    let (d, ff) = (cfg.d_model, cfg.d_ff);
    let (nh, nkv, hd) = (cfg.n_head, cfg.n_kv_head, cfg.head_dim);
    let p = format!("model.layers.{l}");
    let a = |n: &str, out: usize, inp: usize, bias: bool| {
        Linear::load(w, &format!("{p}.self_attn.{n}"), out, inp, bias)
    };
    let m =
        |n: &str, out: usize, inp: usize| Linear::load(w, &format!("{p}.mlp.{n}"), out, inp, false);
    let norm = |n: &str| rms(w, cfg, &format!("{p}.{n}"));
    let ab = cfg.attn_bias;
    // Phi-3 stores q/k/v and gate/up each as one matrix, in the skeleton's own order.
    let phi3 = cfg.family == Family::Phi3;
    let qkv = if phi3 {
        a("qkv_proj", (nh + 2 * nkv) * hd, d, false)?
    } else {
        Linear::cat(&[
            a("q_proj", nh * hd, d, ab)?,
            a("k_proj", nkv * hd, d, ab)?,
            a("v_proj", nkv * hd, d, ab)?,
        ])?
    };
    let gate_up = if phi3 {
        m("gate_up_proj", 2 * ff, d)?
    } else {
        Linear::cat(&[m("gate_proj", ff, d)?, m("up_proj", ff, d)?])?
    };
    // Gemma-2's sandwich: its post-attention norm is on the attention's output, and the MLP
    // reads a pre-feed-forward norm.
    let sandwich = cfg.quirks.sandwich_norms;
    let (ln2, post_attn, post_mlp) = if sandwich {
        (
            norm("pre_feedforward_layernorm")?,
            Some(norm("post_attention_layernorm")?),
            Some(norm("post_feedforward_layernorm")?),
        )
    } else {
        (norm("post_attention_layernorm")?, None, None)
    };
    Ok(Block {
        ln1: norm("input_layernorm")?,
        ln2: Some(ln2),
        parallel: false,
        post_attn,
        post_mlp,
        attn: Attention {
            qkv,
            out: a("o_proj", d, nh * hd, cfg.quirks.attn_out_bias)?,
            n_head: nh,
            n_kv_head: nkv,
            head_dim: hd,
            rotary: Some(shared.0.clone()),
            masks: shared.1.clone(),
            window: cfg.window_of(l),
            softcap: cfg.quirks.attn_softcap,
        },
        mlp: Mlp::SwiGlu {
            gate_up,
            down: m("down_proj", d, ff)?,
            gelu: cfg.quirks.glu_gelu,
        },
    })
}

/// An RMSNorm; Gemma's scale by `1 + w` (its weights are stored less one).
fn rms(w: &Weights, cfg: &ModelConfig, prefix: &str) -> Result<Norm> {
    let (d, eps) = (cfg.d_model, cfg.norm_eps);
    if cfg.family == Family::Gemma {
        Norm::load_rms_plus_one(w, prefix, d, eps)
    } else {
        Norm::load_rms(w, prefix, d, eps)
    }
}

/// Loads a LLaMA-style model (Hugging Face's `LlamaForCausalLM` names).
pub(super) fn load(w: &Weights, cfg: &ModelConfig) -> Result<Model> {
    let d = cfg.d_model;
    let hd = cfg.head_dim;
    let rope = (cfg.rope_theta, cfg.rope_scaling.as_ref());
    let mut rotary = Rotary::new(cfg.rotary_dim, hd, false, rope, cfg.max_positions, w.device)?;
    if let Some(s) = cfg.quirks.query_pre_attn_scalar {
        rotary = rotary.with_query_scale(s.powf(-0.5))?;
    }
    let shared = (rotary, CausalMasks::default());
    let wte = w.get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
    let blocks = (0..cfg.n_layer)
        .map(|l| block(w, cfg, l, &shared))
        .collect::<Result<Vec<_>>>()?;
    let lm_head = super::load_head(w, cfg, &wte, "lm_head")?;
    Ok(Model {
        cfg: cfg.clone(),
        wte,
        wpe: None,
        blocks,
        ln_f: rms(w, cfg, "model.norm")?,
        lm_head,
        dtype: w.dtype,
        device: w.device.clone(),
    })
}
