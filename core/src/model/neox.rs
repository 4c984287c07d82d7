//! GPT-NeoX (Pythia): rotary embeddings on halves of the first `rotary_dim` dimensions of each
//! head, one fused q/k/v projection stored head by head, LayerNorms with biases, an exact-GELU
//! MLP, attention and MLP in parallel off two norms (`use_parallel_residual`), and an untied
//! head (`embed_out`).

use candle_core::Tensor;

use super::layers::{Attention, CausalMasks, Linear, Mlp, Norm, Rotary};
use super::load::Weights;
use super::{Block, Model};
use crate::config::ModelConfig;
use crate::error::Result;

/// NeoX stores its fused projection's rows head by head, `[n_head, 3 (q, k, v), head_dim]`;
/// the skeleton wants `[3, n_head, head_dim]` (all queries, then keys, then values).
pub(super) fn qkv_from_heads(t: &Tensor, n_head: usize) -> Result<Tensor> {
    regroup(t, [n_head, 3])
}

/// The inverse of [`qkv_from_heads`], for writing NeoX's layout back.
pub(super) fn qkv_to_heads(t: &Tensor, n_head: usize) -> Result<Tensor> {
    regroup(t, [3, n_head])
}

/// Rows `[a·b·h, …]` viewed as `[a, b, h, …]`, with `a` and `b` swapped.
fn regroup(t: &Tensor, [a, b]: [usize; 2]) -> Result<Tensor> {
    let rows = t.dim(0)?;
    let rest: Vec<usize> = t.dims()[1..].to_vec();
    let mut shape = vec![a, b, rows / (a * b)];
    shape.extend(&rest);
    let swapped = t.reshape(shape)?.transpose(0, 1)?.contiguous()?;
    Ok(swapped.reshape(t.dims())?)
}

/// Block `l`'s weights under `gpt_neox.layers.{l}`.
fn block(
    w: &Weights,
    cfg: &ModelConfig,
    l: usize,
    shared: &(Rotary, CausalMasks),
) -> Result<Block> {
    let (d, ff, eps, nh) = (cfg.d_model, cfg.d_ff, cfg.norm_eps, cfg.n_head);
    let p = format!("gpt_neox.layers.{l}");
    let fused = Linear::load(
        w,
        &format!("{p}.attention.query_key_value"),
        3 * d,
        d,
        cfg.attn_bias,
    )?;
    let qkv = Linear::new(
        qkv_from_heads(&fused.weight, nh)?,
        fused.bias.map(|b| qkv_from_heads(&b, nh)).transpose()?,
    );
    let lin = |n: &str, out: usize, inp: usize, bias: bool| {
        Linear::load(w, &format!("{p}.{n}"), out, inp, bias)
    };
    Ok(Block {
        ln1: Norm::load_layer(w, &format!("{p}.input_layernorm"), d, eps)?,
        ln2: Some(Norm::load_layer(
            w,
            &format!("{p}.post_attention_layernorm"),
            d,
            eps,
        )?),
        parallel: cfg.quirks.parallel_residual,
        post_attn: None,
        post_mlp: None,
        attn: Attention {
            qkv,
            out: lin("attention.dense", d, d, cfg.attn_bias)?,
            n_head: nh,
            n_kv_head: nh,
            head_dim: cfg.head_dim,
            rotary: Some(shared.0.clone()),
            masks: shared.1.clone(),
            window: None,
            softcap: None,
        },
        mlp: Mlp::Gelu {
            fc: lin("mlp.dense_h_to_4h", ff, d, true)?,
            proj: lin("mlp.dense_4h_to_h", d, ff, true)?,
            exact: cfg.quirks.gelu_exact,
        },
    })
}

/// Loads a GPT-NeoX model (Hugging Face's `GPTNeoXForCausalLM` names).
pub(super) fn load(w: &Weights, cfg: &ModelConfig) -> Result<Model> {
    let d = cfg.d_model;
    let rope = (cfg.rope_theta, cfg.rope_scaling.as_ref());
    let rotary = Rotary::new(
        cfg.rotary_dim,
        cfg.head_dim,
        false,
        rope,
        cfg.max_positions,
        w.device,
    )?;
    let shared = (rotary, CausalMasks::default());
    let wte = w.get("gpt_neox.embed_in.weight", &[cfg.vocab_size, d])?;
    let blocks = (0..cfg.n_layer)
        .map(|l| block(w, cfg, l, &shared))
        .collect::<Result<Vec<_>>>()?;
    let lm_head = super::load_head(w, cfg, &wte, "embed_out")?;
    Ok(Model {
        cfg: cfg.clone(),
        wte,
        wpe: None,
        blocks,
        ln_f: Norm::load_layer(w, "gpt_neox.final_layer_norm", d, cfg.norm_eps)?,
        lm_head,
        dtype: w.dtype,
        device: w.device.clone(),
    })
}
