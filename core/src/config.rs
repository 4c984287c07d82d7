//! Architecture hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{LociError, Result};

/// The architecture family: how the weights are named and the blocks built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// GPT-2: learned positions, pre-LN, sequential attention then MLP, GELU (tanh).
    Gpt2,
    /// GPT-J: partial interleaved rotary, attention and MLP in parallel off one LayerNorm.
    Gptj,
    /// LLaMA-style: RMSNorm, SwiGLU, rotary (rotate-half), grouped-query attention.
    Llama,
}

impl Family {
    /// The family's lowercase name (`gpt2`, `gptj`, `llama`).
    pub fn name(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Gptj => "gptj",
            Family::Llama => "llama",
        }
    }
}

/// The matrix weights of one block, by part: one token through the block costs 2 FLOPs each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockWeights {
    /// The query projection.
    pub q: usize,
    /// Key and value projections together.
    pub kv: usize,
    /// The attention's output projection.
    pub out: usize,
    /// The MLP's matrices (two; three with SwiGLU).
    pub mlp: usize,
}

impl BlockWeights {
    /// Every matrix weight of the block: a token through it costs twice this in FLOPs.
    pub fn total(&self) -> usize {
        self.q + self.kv + self.out + self.mlp
    }
}

/// A model's architecture: everything the skeleton needs to lay out and check its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Which family's layout the weights follow.
    pub family: Family,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention (query) heads.
    pub n_head: usize,
    /// Key/value heads (fewer than `n_head` with grouped-query attention).
    pub n_kv_head: usize,
    /// Width of each attention head.
    pub head_dim: usize,
    /// Width of the MLP hidden layer: the dimension of ROME's keys.
    pub d_ff: usize,
    /// Tokens in the vocabulary: rows of the embedding and the head.
    pub vocab_size: usize,
    /// The context length: the most positions one sequence may have.
    pub max_positions: usize,
    /// The norms' epsilon.
    pub norm_eps: f64,
    /// Rotary dimensions per head (0: learned absolute positions).
    pub rotary_dim: usize,
    /// Base of the rotary frequencies.
    pub rope_theta: f64,
    /// Whether the head reuses the token embeddings.
    pub tie_embeddings: bool,
    /// Biases on the q/k/v projections (GPT-2 always; some LLaMA-style models).
    pub attn_bias: bool,
    /// The beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// The end-of-sequence token, if any (the first when several are listed).
    pub eos_token_id: Option<u32>,
}

fn get_usize(v: &Value, keys: &[&str]) -> Option<usize> {
    keys.iter()
        .find_map(|k| v.get(*k).and_then(Value::as_u64))
        .map(|x| x as usize)
}

fn get_f64(v: &Value, keys: &[&str]) -> Option<f64> {
    keys.iter().find_map(|k| v.get(*k).and_then(Value::as_f64))
}

fn token_id(v: &Value, key: &str) -> Option<u32> {
    match v.get(key)? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        // Some configs list several end tokens; the first is the canonical one.
        Value::Array(a) => a.first()?.as_u64().map(|x| x as u32),
        _ => None,
    }
}

/// The first of `keys` that `config.json` holds as an integer, or an error naming them all.
fn need(v: &Value, keys: &[&str]) -> Result<usize> {
    get_usize(v, keys)
        .ok_or_else(|| LociError::model(format!("config.json lacks \"{}\"", keys.join("\" or \""))))
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|source| LociError::Json {
            what: "config.json".into(),
            source,
        })?;
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| LociError::model("config.json has no \"model_type\""))?;
        let cfg = match model_type {
            "gpt2" | "gptj" => Self::gpt_from_hf(&v, model_type)?,
            "llama" | "mistral" | "qwen2" => Self::llama_from_hf(&v, model_type)?,
            other => {
                return Err(LociError::Unsupported(format!(
                    "model_type {other:?} (supported: gpt2, gptj, llama)"
                )))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The GPT-2 or GPT-J (`model_type`) fields of a parsed `config.json`, not yet validated.
    fn gpt_from_hf(v: &Value, model_type: &str) -> Result<Self> {
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
        })
    }

    /// The LLaMA-style (`llama`, `mistral`, `qwen2`) fields of a parsed `config.json`, not yet
    /// validated.
    fn llama_from_hf(v: &Value, model_type: &str) -> Result<Self> {
        let d_model = need(v, &["hidden_size"])?;
        let n_head = need(v, &["num_attention_heads"])?;
        if v.get("rope_scaling").is_some_and(|r| !r.is_null()) {
            return Err(LociError::Unsupported("rope_scaling".into()));
        }
        Ok(ModelConfig {
            family: Family::Llama,
            n_layer: need(v, &["num_hidden_layers"])?,
            d_model,
            n_head,
            n_kv_head: get_usize(v, &["num_key_value_heads"]).unwrap_or(n_head),
            head_dim: get_usize(v, &["head_dim"]).unwrap_or(d_model / n_head.max(1)),
            d_ff: need(v, &["intermediate_size"])?,
            vocab_size: need(v, &["vocab_size"])?,
            max_positions: need(v, &["max_position_embeddings"])?,
            norm_eps: get_f64(v, &["rms_norm_eps"]).unwrap_or(1e-6),
            rotary_dim: 0,
            rope_theta: get_f64(v, &["rope_theta"]).unwrap_or(10000.0),
            tie_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attn_bias: model_type == "qwen2"
                || v.get("attention_bias").and_then(Value::as_bool) == Some(true),
            bos_token_id: token_id(v, "bos_token_id"),
            eos_token_id: token_id(v, "eos_token_id"),
        }
        .with_full_rotary())
    }

    pub(crate) fn with_full_rotary(mut self) -> Self {
        self.rotary_dim = self.head_dim;
        self
    }

    /// Rejects shapes the skeleton cannot run, before any tensor is touched.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LociError::model(m));
        if self.n_layer == 0 || self.d_model == 0 || self.n_head == 0 || self.vocab_size == 0 {
            return bad(format!("degenerate config: {self:?}"));
        }
        if self.n_kv_head == 0 || !self.n_head.is_multiple_of(self.n_kv_head) {
            return bad(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.n_head, self.n_kv_head
            ));
        }
        if self.family != Family::Llama && self.head_dim * self.n_head != self.d_model {
            return bad(format!(
                "d_model {} is not divisible by {} heads",
                self.d_model, self.n_head
            ));
        }
        if self.rotary_dim > self.head_dim || !self.rotary_dim.is_multiple_of(2) {
            return bad(format!(
                "rotary_dim {} does not fit head_dim {}",
                self.rotary_dim, self.head_dim
            ));
        }
        Ok(())
    }

    /// Weights in one block's matrices (biases and norms aside).
    pub fn block_weights(&self) -> BlockWeights {
        let (d, q, kv) = (
            self.d_model,
            self.n_head * self.head_dim,
            self.n_kv_head * self.head_dim,
        );
        BlockWeights {
            q: d * q,
            kv: 2 * d * kv,
            out: q * d,
            mlp: match self.family {
                Family::Llama => 3 * d * self.d_ff,
                _ => 2 * d * self.d_ff,
            },
        }
    }

    /// Number of parameters implied by the shapes (embeddings counted once when tied).
    pub fn n_params(&self) -> usize {
        let d = self.d_model;
        let emb = self.vocab_size * d * if self.tie_embeddings { 1 } else { 2 };
        let pos = if self.family == Family::Gpt2 {
            self.max_positions * d
        } else {
            0
        };
        self.n_layer * self.block_weights().total() + emb + pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gpt2_small_config() {
        let c = ModelConfig::from_hf_json(
            r#"{"model_type":"gpt2","n_embd":768,"n_layer":12,"n_head":12,"n_positions":1024,"vocab_size":50257,"n_inner":null}"#,
        )
        .unwrap();
        assert_eq!(c.family, Family::Gpt2);
        assert_eq!(c.d_ff, 3072);
        assert_eq!(c.head_dim, 64);
        assert!(c.tie_embeddings);
        // GPT-2 small has 124,439,808 parameters; 121,344 of them are biases and norm gains.
        assert_eq!(c.n_params(), 124_318_464);
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_heads() {
        let e = ModelConfig::from_hf_json(r#"{"model_type":"bert"}"#).unwrap_err();
        assert!(e.to_string().contains("bert"), "{e}");
        let e = ModelConfig::from_hf_json(
            r#"{"model_type":"llama","hidden_size":64,"num_attention_heads":4,"num_key_value_heads":3,"num_hidden_layers":2,"intermediate_size":128,"vocab_size":100,"max_position_embeddings":64}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("key/value heads"), "{e}");
    }
}
