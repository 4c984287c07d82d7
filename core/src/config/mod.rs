//! Architecture hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata: the
//! shapes and pieces here, each family's parser in `hf.rs`, rotary scaling in `rope.rs`, sliding
//! windows in `window.rs`.

mod hf;
mod rope;
mod window;

pub use rope::RopeScaling;

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
    /// GPT-NeoX (Pythia): partial rotary on halves, fused head-interleaved q/k/v, LayerNorms with
    /// biases, exact GELU, and (usually) attention and MLP in parallel off two norms.
    Neox,
    /// Phi-3: LLaMA's layout with q/k/v and gate/up each stored as one matrix, and partial
    /// rotary where the config says.
    Phi3,
    /// Gemma and Gemma-2: LLaMA's layout with `(1 + w)` RMSNorms, GeGLU, embeddings scaled by
    /// √d_model; Gemma-2 adds norms on the attention's and MLP's outputs, soft-capped scores
    /// and logits, its own score scale and a sliding window on alternate layers.
    Gemma,
}

impl Family {
    /// The family's lowercase name (`gpt2`, `gptj`, `llama`).
    pub fn name(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Gptj => "gptj",
            Family::Llama => "llama",
            Family::Neox => "neox",
            Family::Phi3 => "phi3",
            Family::Gemma => "gemma",
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
    /// How the rotary frequencies are rescaled for a longer context than trained on; `None`:
    /// as trained.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Sliding-window attention: a query sees only the last `w` positions, itself included.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Which layers attend through the window (empty: all of them, as Mistral's).
    #[serde(default)]
    pub sliding_layers: Vec<bool>,
    /// The smaller ways a family's pieces differ, all off by default.
    #[serde(default)]
    pub quirks: Quirks,
}

/// The smaller ways families differ from the plain pieces of their layout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Quirks {
    /// Attention and MLP both read the block's input and add to the residual together (GPT-J;
    /// GPT-NeoX's `use_parallel_residual`, each through its own norm).
    pub parallel_residual: bool,
    /// The MLP's GELU is the exact (erf) one rather than the tanh approximation.
    pub gelu_exact: bool,
    /// A bias on the attention's output projection too (LLaMA's `attention_bias`; Qwen2 biases
    /// q/k/v only).
    pub attn_out_bias: bool,
    /// The gated MLP's gate goes through GELU (tanh), not SiLU: GeGLU (Gemma).
    pub glu_gelu: bool,
    /// Token embeddings scaled by this as they enter the residual stream (Gemma: √d_model).
    pub embed_scale: Option<f64>,
    /// Attention scores scaled by this to the −½ rather than by 1/√head_dim (Gemma-2's
    /// `query_pre_attn_scalar`).
    pub query_pre_attn_scalar: Option<f64>,
    /// Attention scores soft-capped, `c·tanh(s/c)`, before the mask (Gemma-2).
    pub attn_softcap: Option<f64>,
    /// Logits soft-capped the same way (Gemma-2).
    pub final_softcap: Option<f64>,
    /// Norms on the attention's and the MLP's outputs too, before each joins the residual
    /// (Gemma-2's "sandwich").
    pub sandwich_norms: bool,
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
    /// Whether layer `l` attends through a sliding window, and how wide.
    pub fn window_of(&self, l: usize) -> Option<usize> {
        let on = self.sliding_layers.is_empty() || self.sliding_layers.get(l) == Some(&true);
        self.sliding_window.filter(|_| on)
    }

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
            "gpt_neox" => Self::neox_from_hf(&v)?,
            "phi3" => Self::llama_from_hf(&v, model_type)?,
            "gemma" | "gemma2" => Self::gemma_from_hf(&v, model_type)?,
            other => {
                return Err(LociError::Unsupported(format!(
                    "model_type {other:?} (supported: gpt2, gptj, llama, mistral, qwen2, phi3, \
                     gemma, gemma2, gpt_neox)"
                )))
            }
        };
        cfg.validate()?;
        Ok(cfg)
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
        let free_heads = matches!(self.family, Family::Llama | Family::Phi3 | Family::Gemma);
        if !free_heads && self.head_dim * self.n_head != self.d_model {
            return bad(format!(
                "d_model {} is not divisible by {} heads",
                self.d_model, self.n_head
            ));
        }
        if self.sliding_window == Some(0) {
            return bad("a sliding window of 0 positions".into());
        }
        let factor = match &self.rope_scaling {
            Some(RopeScaling::Linear { factor })
            | Some(RopeScaling::Dynamic { factor })
            | Some(RopeScaling::Llama3 { factor, .. })
            | Some(RopeScaling::Yarn { factor, .. }) => *factor,
            None => 1.0,
        };
        if !(factor.is_finite() && factor > 0.0) {
            return bad(format!("rope scaling factor {factor} is not positive"));
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
                Family::Llama | Family::Phi3 | Family::Gemma => 3 * d * self.d_ff,
                Family::Gpt2 | Family::Gptj | Family::Neox => 2 * d * self.d_ff,
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

    const LLAMA: &str = r#""hidden_size":64,"num_attention_heads":4,"num_hidden_layers":3,"intermediate_size":128,"vocab_size":100,"max_position_embeddings":64"#;

    fn llama(model_type: &str, extra: &str) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(&format!(
            r#"{{"model_type":"{model_type}",{LLAMA}{extra}}}"#
        ))
    }

    #[test]
    fn rope_types_are_read_in_both_layouts_and_unknown_ones_refused_by_name() {
        // transformers 4's rope_scaling beside rope_theta, and 5's rope_parameters.
        let v4 = llama(
            "llama",
            r#","rope_theta":5e5,"rope_scaling":{"type":"linear","factor":2.0}"#,
        )
        .unwrap();
        let v5 = llama(
            "llama",
            r#","rope_parameters":{"rope_type":"linear","factor":2.0,"rope_theta":5e5}"#,
        )
        .unwrap();
        assert_eq!(v4, v5);
        assert_eq!(v4.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(v4.rope_theta, 5e5);
        let dynamic = llama(
            "llama",
            r#","rope_scaling":{"rope_type":"dynamic","factor":2.0}"#,
        );
        assert_eq!(
            dynamic.unwrap().rope_scaling,
            Some(RopeScaling::Dynamic { factor: 2.0 })
        );
        // LLaMA-style models turn whole heads whatever the config says, as transformers does.
        let partial = llama("llama", r#","partial_rotary_factor":0.5"#).unwrap();
        assert_eq!(partial.rotary_dim, partial.head_dim);
        for (extra, named) in [
            (
                r#","rope_scaling":{"rope_type":"longrope","factor":2.0}"#,
                "longrope",
            ),
            (
                r#","rope_scaling":{"rope_type":"llama3","factor":8.0}"#,
                "low_freq_factor",
            ),
            (
                r#","rope_parameters":{"full_attention":{"rope_type":"default"}}"#,
                "per layer",
            ),
            (
                r#","rope_scaling":{"rope_type":"linear","factor":-1.0}"#,
                "not positive",
            ),
            (r#","sliding_window":0"#, "sliding window"),
        ] {
            let e = llama("mistral", extra).unwrap_err().to_string();
            assert!(e.contains(named), "{extra}: {e}");
        }
        let e = ModelConfig::from_hf_json(r#"{"model_type":"gpt_neox","hidden_size":64,"num_attention_heads":4,"num_hidden_layers":2,"intermediate_size":128,"vocab_size":100,"max_position_embeddings":64,"hidden_act":"relu"}"#).unwrap_err();
        assert!(e.to_string().contains("relu"), "{e}");
    }

    #[test]
    fn sliding_windows_cover_the_layers_each_family_says() {
        let windows = |c: &ModelConfig| (0..3).map(|l| c.window_of(l)).collect::<Vec<_>>();
        assert_eq!(
            windows(&llama("llama", r#","sliding_window":8"#).unwrap()),
            [None; 3]
        );
        assert_eq!(windows(&llama("mistral", "").unwrap()), [Some(4096); 3]);
        assert_eq!(
            windows(&llama("mistral", r#","sliding_window":null"#).unwrap()),
            [None; 3]
        );
        let mistral = llama("mistral", r#","sliding_window":8"#).unwrap();
        assert_eq!(
            (0..3).map(|l| mistral.window_of(l)).collect::<Vec<_>>(),
            [Some(8); 3]
        );
        // Qwen2 windows only with use_sliding_window, from max_window_layers on.
        let off = llama("qwen2", r#","sliding_window":8"#).unwrap();
        assert_eq!(off.sliding_window, None);
        assert!(off.attn_bias && !off.quirks.attn_out_bias);
        let qwen = llama(
            "qwen2",
            r#","sliding_window":8,"use_sliding_window":true,"max_window_layers":2"#,
        )
        .unwrap();
        assert_eq!(
            (0..3).map(|l| qwen.window_of(l)).collect::<Vec<_>>(),
            [None, None, Some(8)]
        );
        let listed = llama("qwen2", r#","sliding_window":8,"use_sliding_window":true,"layer_types":["full_attention","sliding_attention","full_attention"]"#).unwrap();
        assert_eq!(
            (0..3).map(|l| listed.window_of(l)).collect::<Vec<_>>(),
            [None, Some(8), None]
        );
        // Phi-3 windows every layer when its config names a window.
        assert_eq!(
            windows(&llama("phi3", r#","sliding_window":8"#).unwrap()),
            [Some(8); 3]
        );
        assert_eq!(windows(&llama("phi3", "").unwrap()), [None; 3]);
        // Gemma-2: every other layer from the first by default, its defaults dropped by null.
        let gemma2 = llama("gemma2", r#","head_dim":16"#).unwrap();
        assert_eq!(windows(&gemma2), [Some(4096), None, Some(4096)]);
        let q = &gemma2.quirks;
        assert_eq!((q.attn_softcap, q.final_softcap), (Some(50.0), Some(30.0)));
        assert_eq!(q.query_pre_attn_scalar, Some(256.0));
        assert_eq!(q.embed_scale, Some(8.0));
        let uncapped = llama("gemma2", r#","final_logit_softcapping":null"#).unwrap();
        assert_eq!(uncapped.quirks.final_softcap, None);
        let gemma = llama("gemma", "").unwrap();
        assert_eq!(gemma.head_dim, 256, "Gemma's default head width");
        assert!(gemma.tie_embeddings && gemma.quirks.glu_gelu && !gemma.quirks.sandwich_norms);
        assert_eq!(windows(&gemma), [None; 3]);
        let short = llama(
            "qwen2",
            r#","sliding_window":8,"use_sliding_window":true,"layer_types":["full_attention"]"#,
        );
        assert!(short.unwrap_err().to_string().contains("1 layers"));
    }
}
