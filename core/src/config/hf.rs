//! Each family's `config.json`: the fields it names, its defaults, what it refuses.

use serde_json::Value;

use super::rope::{Rope, RopeKeys, LLAMA_ROPE};
use super::window::{gemma2_windows, sliding_of};
use super::{get_f64, get_usize, need, token_id, Family, ModelConfig, Quirks};
use crate::error::{LociError, Result};

impl ModelConfig {
    /// The GPT-2 or GPT-J (`model_type`) fields of a parsed `config.json`, not yet validated.
    pub(super) fn gpt_from_hf(v: &Value, model_type: &str) -> Result<Self> {
        let family = if model_type == "gpt2" {
            Family::Gpt2
        } else {
            Family::Gptj
        };
        let d_model = need(v, &["n_embd", "hidden_size"])?;
        let n_head = need(v, &["n_head", "num_attention_heads"])?;
        let act = v
            .get("activation_function")
            .and_then(Value::as_str)
            .unwrap_or("gelu_new");
        if act != "gelu_new" && act != "gelu_pytorch_tanh" {
            return Err(LociError::Unsupported(format!(
                "activation_function {act:?} (only gelu_new)"
            )));
        }
        Ok(ModelConfig {
            family,
            n_layer: need(v, &["n_layer", "num_hidden_layers"])?,
            d_model,
            n_head,
            n_kv_head: n_head,
            head_dim: d_model / n_head.max(1),
            d_ff: get_usize(v, &["n_inner"]).unwrap_or(4 * d_model),
            vocab_size: need(v, &["vocab_size"])?,
            max_positions: need(v, &["n_positions", "n_ctx"])?,
            norm_eps: get_f64(v, &["layer_norm_epsilon"]).unwrap_or(1e-5),
            rotary_dim: if family == Family::Gptj {
                get_usize(v, &["rotary_dim"]).unwrap_or(d_model / n_head.max(1))
            } else {
                0
            },
            rope_theta: 10000.0,
            tie_embeddings: family == Family::Gpt2,
            attn_bias: family == Family::Gpt2,
            bos_token_id: token_id(v, "bos_token_id"),
            eos_token_id: token_id(v, "eos_token_id"),
            rope_scaling: None,
            sliding_window: None,
            sliding_layers: vec![],
            quirks: Quirks {
                parallel_residual: family == Family::Gptj,
                ..Quirks::default()
            },
        })
    }

    /// The GPT-NeoX (`gpt_neox`, Pythia) fields of a parsed `config.json`, not yet validated.
    pub(super) fn neox_from_hf(v: &Value) -> Result<Self> {
        let d_model = need(v, &["hidden_size"])?;
        let n_head = need(v, &["num_attention_heads"])?;
        let head_dim = d_model / n_head.max(1);
        let gelu_exact = match v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu")
        {
            "gelu" => true,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => false,
            other => {
                return Err(LociError::Unsupported(format!(
                    "hidden_act {other:?} (GPT-NeoX: gelu, gelu_new, gelu_fast)"
                )))
            }
        };
        let max_positions = need(v, &["max_position_embeddings"])?;
        let keys = RopeKeys {
            theta: "rotary_emb_base",
            partial: Some("rotary_pct"),
        };
        let rope = Rope::of(v, keys, max_positions)?;
        let flag = |k: &str, default: bool| v.get(k).and_then(Value::as_bool).unwrap_or(default);
        Ok(ModelConfig {
            family: Family::Neox,
            n_layer: need(v, &["num_hidden_layers"])?,
            d_model,
            n_head,
            n_kv_head: n_head,
            head_dim,
            d_ff: need(v, &["intermediate_size"])?,
            vocab_size: need(v, &["vocab_size"])?,
            max_positions,
            norm_eps: get_f64(v, &["layer_norm_eps"]).unwrap_or(1e-5),
            // transformers' int(): the rotary part is truncated to whole dimensions.
            rotary_dim: (head_dim as f64 * rope.partial.unwrap_or(0.25)) as usize,
            rope_theta: rope.theta,
            tie_embeddings: flag("tie_word_embeddings", false),
            attn_bias: flag("attention_bias", true),
            bos_token_id: token_id(v, "bos_token_id"),
            eos_token_id: token_id(v, "eos_token_id"),
            rope_scaling: rope.scaling,
            sliding_window: None,
            sliding_layers: vec![],
            quirks: Quirks {
                parallel_residual: flag("use_parallel_residual", true),
                gelu_exact,
                ..Quirks::default()
            },
        })
    }

    /// The LLaMA-style (`llama`, `mistral`, `qwen2`, `phi3`) fields of a parsed `config.json`,
    /// not yet validated.
    pub(super) fn llama_from_hf(v: &Value, model_type: &str) -> Result<Self> {
        let d_model = need(v, &["hidden_size"])?;
        let n_head = need(v, &["num_attention_heads"])?;
        let n_layer = need(v, &["num_hidden_layers"])?;
        let max_positions = need(v, &["max_position_embeddings"])?;
        let phi3 = model_type == "phi3";
        let keys = if phi3 {
            RopeKeys {
                theta: "rope_theta",
                partial: Some("partial_rotary_factor"),
            }
        } else {
            LLAMA_ROPE
        };
        let rope = Rope::of(v, keys, max_positions)?;
        // transformers' Phi-3 reads every scaled rope type as LongRoPE, which Loci lacks.
        if let (true, Some(s)) = (phi3, &rope.scaling) {
            return Err(LociError::Unsupported(format!(
                "Phi-3 rope scaling {s:?} (transformers applies LongRoPE, not implemented)"
            )));
        }
        if let Some(act) = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .filter(|a| *a != "silu")
        {
            return Err(LociError::Unsupported(format!(
                "hidden_act {act:?} (only silu)"
            )));
        }
        let (sliding_window, sliding_layers) = sliding_of(v, model_type, n_layer)?;
        let head_dim = get_usize(v, &["head_dim"]).unwrap_or(d_model / n_head.max(1));
        let attention_bias = v.get("attention_bias").and_then(Value::as_bool) == Some(true);
        Ok(ModelConfig {
            family: if phi3 { Family::Phi3 } else { Family::Llama },
            n_layer,
            d_model,
            n_head,
            n_kv_head: get_usize(v, &["num_key_value_heads"]).unwrap_or(n_head),
            head_dim,
            d_ff: need(v, &["intermediate_size"])?,
            vocab_size: need(v, &["vocab_size"])?,
            max_positions,
            norm_eps: get_f64(v, &["rms_norm_eps"]).unwrap_or(1e-6),
            rotary_dim: (head_dim as f64 * rope.partial.unwrap_or(1.0)) as usize,
            rope_theta: rope.theta,
            tie_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            // Phi-3's fused projection has no bias whatever the config says.
            attn_bias: model_type == "qwen2" || (attention_bias && !phi3),
            bos_token_id: token_id(v, "bos_token_id"),
            eos_token_id: token_id(v, "eos_token_id"),
            rope_scaling: rope.scaling,
            sliding_window,
            sliding_layers,
            quirks: Quirks {
                attn_out_bias: model_type == "llama" && attention_bias,
                ..Quirks::default()
            },
        })
    }

    /// The Gemma and Gemma-2 fields of a parsed `config.json`, not yet validated: a LLaMA-style
    /// config (tied head, no biases) with Gemma's pieces in `quirks`.
    pub(super) fn gemma_from_hf(v: &Value, model_type: &str) -> Result<Self> {
        let two = model_type == "gemma2";
        let mut plain = v.clone();
        let act = ["hidden_activation", "hidden_act"]
            .iter()
            .find_map(|k| v.get(*k).and_then(Value::as_str))
            .unwrap_or("gelu_pytorch_tanh");
        // transformers reads Gemma's legacy "gelu" as the tanh approximation (Gemma-2's not).
        if !(matches!(act, "gelu_pytorch_tanh" | "gelu_new") || (act == "gelu" && !two)) {
            return Err(LociError::Unsupported(format!(
                "{model_type} activation {act:?} (gelu_pytorch_tanh)"
            )));
        }
        if v.get("use_bidirectional_attention")
            .and_then(Value::as_bool)
            == Some(true)
        {
            return Err(LociError::Unsupported(
                "use_bidirectional_attention (Loci's models are causal)".into(),
            ));
        }
        plain["hidden_act"] = "silu".into();
        // Gemma's heads are 256 wide unless the config says.
        if plain.get("head_dim").is_none_or(Value::is_null) {
            plain["head_dim"] = 256.into();
        }
        let mut cfg = Self::llama_from_hf(&plain, "llama")?;
        cfg.family = Family::Gemma;
        cfg.tie_embeddings = v
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        // A Gemma-2 default is dropped by an explicit null.
        let or_default = |k: &str, d: f64| match v.get(k) {
            None => Some(d),
            Some(x) => x.as_f64(),
        };
        cfg.quirks.glu_gelu = true;
        cfg.quirks.embed_scale = Some((cfg.d_model as f64).sqrt());
        if two {
            let scalar = get_f64(v, &["query_pre_attn_scalar"]).unwrap_or(256.0);
            cfg.quirks.query_pre_attn_scalar = Some(scalar);
            cfg.quirks.attn_softcap = or_default("attn_logit_softcapping", 50.0);
            cfg.quirks.final_softcap = or_default("final_logit_softcapping", 30.0);
            cfg.quirks.sandwich_norms = true;
            (cfg.sliding_window, cfg.sliding_layers) = gemma2_windows(v, cfg.n_layer)?;
        }
        Ok(cfg)
    }
}
