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

/// A rotary scaling for contexts longer than the model was trained on, as transformers' `rope_type`s
/// define it; the frequencies themselves are computed beside the rotary tables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (positions interpolated).
    Linear {
        /// The context's stretch.
        factor: f64,
    },
    /// Dynamic NTK scaling: a larger base once a sequence passes `max_position_embeddings`,
    /// which is the longest Loci runs, so the frequencies stay as trained (kept to be saved).
    Dynamic {
        /// The context's stretch past the trained length.
        factor: f64,
    },
    /// Llama 3's: wavelengths longer than `original / low_freq_factor` divided by `factor`, shorter
    /// than `original / high_freq_factor` kept, and a smooth blend between.
    Llama3 {
        /// The stretch of the low frequencies.
        factor: f64,
        /// Bounds the low-frequency band.
        low_freq_factor: f64,
        /// Bounds the high-frequency band.
        high_freq_factor: f64,
        /// The context the model was pre-trained on.
        original_max_positions: usize,
    },
    /// YaRN: frequencies ramp from extrapolated (fast) to interpolated (slow) between the
    /// dimensions that turn `beta_fast` and `beta_slow` times over the original context; cos and
    /// sin scaled by `attention_factor`.
    Yarn {
        /// The context's stretch.
        factor: f64,
        /// The context the model was pre-trained on.
        original_max_positions: usize,
        /// Rotations that mark the extrapolated end of the ramp.
        beta_fast: f64,
        /// Rotations that mark the interpolated end of the ramp.
        beta_slow: f64,
        /// Scales cos and sin (so attention scores by its square).
        attention_factor: f64,
        /// Whether the ramp's ends are rounded to whole dimensions.
        truncate: bool,
    },
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

/// A config's rotary parameters: transformers 5 writes them in `rope_parameters`, 4 in
/// `rope_scaling` beside a top-level base (which wins, as in transformers, when both are there).
struct Rope {
    theta: f64,
    /// The share of each head that turns, where the family reads one.
    partial: Option<f64>,
    scaling: Option<RopeScaling>,
}

/// Where a family keeps its rotary base and turning share outside `rope_parameters`: LLaMA,
/// Mistral and Qwen2 turn whole heads whatever a config says.
struct RopeKeys {
    theta: &'static str,
    partial: Option<&'static str>,
}

const LLAMA_ROPE: RopeKeys = RopeKeys {
    theta: "rope_theta",
    partial: None,
};

impl Rope {
    fn of(v: &Value, keys: RopeKeys, max_positions: usize) -> Result<Self> {
        let object = |k: &str| v.get(k).filter(|p| p.is_object());
        let params = object("rope_scaling").or_else(|| object("rope_parameters"));
        let get = |k: &str| params.and_then(|p| p.get(k));
        if params.is_some_and(|p| p.as_object().unwrap().values().any(Value::is_object)) {
            return Err(LociError::Unsupported(
                "rotary parameters per layer type".into(),
            ));
        }
        let f = |k: &str| get(k).and_then(Value::as_f64);
        let kind = get("rope_type")
            .or_else(|| get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let need_f = |k: &str| {
            f(k).ok_or_else(|| LociError::model(format!("rope type {kind:?} needs {k:?}")))
        };
        let original = get_usize(v, &["original_max_position_embeddings"])
            .or_else(|| {
                get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                    .map(|x| x as usize)
            })
            .unwrap_or(max_positions);
        let scaling = match kind {
            "default" => None,
            "dynamic" => Some(RopeScaling::Dynamic {
                factor: need_f("factor")?,
            }),
            "linear" => Some(RopeScaling::Linear {
                factor: need_f("factor")?,
            }),
            "llama3" => Some(RopeScaling::Llama3 {
                factor: need_f("factor")?,
                low_freq_factor: need_f("low_freq_factor")?,
                high_freq_factor: need_f("high_freq_factor")?,
                original_max_positions: original,
            }),
            "yarn" => {
                let factor = f("factor").unwrap_or(max_positions as f64 / original as f64);
                let mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention_factor =
                    match (f("attention_factor"), f("mscale"), f("mscale_all_dim")) {
                        (Some(a), _, _) => a,
                        (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                            mscale(factor, m) / mscale(factor, all)
                        }
                        _ => mscale(factor, 1.0),
                    };
                let nonzero = |k: &str, d: f64| f(k).filter(|x| *x != 0.0).unwrap_or(d);
                Some(RopeScaling::Yarn {
                    factor,
                    original_max_positions: original,
                    beta_fast: nonzero("beta_fast", 32.0),
                    beta_slow: nonzero("beta_slow", 1.0),
                    attention_factor,
                    truncate: get("truncate").and_then(Value::as_bool).unwrap_or(true),
                })
            }
            other => {
                return Err(LociError::Unsupported(format!(
                    "rope type {other:?} (supported: default, linear, dynamic, llama3, yarn)"
                )))
            }
        };
        let in_parameters = |k: &str| {
            object("rope_parameters")
                .and_then(|p| p.get(k))
                .and_then(Value::as_f64)
        };
        Ok(Rope {
            theta: get_f64(v, &[keys.theta])
                .or_else(|| in_parameters("rope_theta"))
                .unwrap_or(10000.0),
            partial: keys
                .partial
                .and_then(|k| get_f64(v, &[k]).or_else(|| in_parameters("partial_rotary_factor"))),
            scaling,
        })
    }
}

/// Sliding-window attention as transformers applies it: the window and which layers use it
/// (empty: all). Mistral windows every layer (4096 positions when the config names none, none
/// when it says `null`), Phi-3 every layer when it names one; Qwen2 only with `use_sliding_window`, in the layers `layer_types` lists
/// or else from `max_window_layers` (28) on; LLaMA never.
fn sliding_of(v: &Value, model_type: &str, n_layer: usize) -> Result<(Option<usize>, Vec<bool>)> {
    let window = |default: Option<usize>| match v.get("sliding_window") {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(w) => w
            .as_u64()
            .map(|w| Some(w as usize))
            .ok_or_else(|| LociError::model(format!("sliding_window {w} is not a count"))),
    };
    match model_type {
        "mistral" => Ok((window(Some(4096))?, vec![])),
        "phi3" => Ok((window(None)?, vec![])),
        "qwen2" if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) => {
            let Some(w) = window(Some(4096))? else {
                return Ok((None, vec![]));
            };
            let layers = match v.get("layer_types").and_then(Value::as_array) {
                Some(types) => types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        other => Err(LociError::Unsupported(format!("layer type {other:?}"))),
                    })
                    .collect::<Result<Vec<_>>>()?,
                None => {
                    let from = get_usize(v, &["max_window_layers"]).unwrap_or(28);
                    (0..n_layer).map(|l| l >= from).collect()
                }
            };
            if layers.len() != n_layer {
                return Err(LociError::model(format!(
                    "layer_types lists {} layers, the model has {n_layer}",
                    layers.len()
                )));
            }
            Ok(match layers.iter().filter(|&&s| s).count() {
                0 => (None, vec![]),
                // Every layer windowed is written as no list, however the config said it.
                n if n == n_layer => (Some(w), vec![]),
                _ => (Some(w), layers),
            })
        }
        _ => Ok((None, vec![])),
    }
}

/// Gemma-2's windows: 4096 positions (or its `sliding_window`) in the layers `layer_types`
/// names, else in every other layer from the first.
fn gemma2_windows(v: &Value, n_layer: usize) -> Result<(Option<usize>, Vec<bool>)> {
    let window = match v.get("sliding_window") {
        None => Some(4096),
        Some(w) => w.as_u64().map(|w| w as usize),
    };
    let layers: Vec<bool> = match v.get("layer_types").and_then(Value::as_array) {
        Some(types) => types
            .iter()
            .map(|t| t.as_str() == Some("sliding_attention"))
            .collect(),
        None => (0..n_layer).map(|l| l % 2 == 0).collect(),
    };
    if layers.len() != n_layer {
        return Err(LociError::model(format!(
            "layer_types lists {} layers, the model has {n_layer}",
            layers.len()
        )));
    }
    Ok(match window {
        Some(w) if layers.contains(&true) => (Some(w), layers),
        _ => (None, vec![]),
    })
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
    fn neox_from_hf(v: &Value) -> Result<Self> {
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
    fn llama_from_hf(v: &Value, model_type: &str) -> Result<Self> {
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
    fn gemma_from_hf(v: &Value, model_type: &str) -> Result<Self> {
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
