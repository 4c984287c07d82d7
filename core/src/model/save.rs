//! The inverse of loading: a model's tensors under Hugging Face names and its `config.json`,
//! so an edited model can be written out as a folder that transformers (and Loci) load.

use std::collections::HashMap;

use candle_core::Tensor;
use serde_json::json;

use super::layers::{Linear, Mlp, Norm};
use super::Model;
use crate::config::{Family, RopeScaling};
use crate::error::Result;

fn split_rows(l: &Linear, sizes: &[usize]) -> Result<Vec<Linear>> {
    let mut out = Vec::new();
    let mut start = 0;
    for &n in sizes {
        out.push(Linear::new(
            l.weight.narrow(0, start, n)?.contiguous()?,
            l.bias.as_ref().map(|b| b.narrow(0, start, n)).transpose()?,
        ));
        start += n;
    }
    Ok(out)
}

struct Out(HashMap<String, Tensor>);

impl Out {
    fn put(&mut self, name: String, t: &Tensor) -> Result<()> {
        self.0.insert(name, t.contiguous()?);
        Ok(())
    }
    fn linear(&mut self, prefix: &str, l: &Linear) -> Result<()> {
        self.put(format!("{prefix}.weight"), &l.weight)?;
        if let Some(b) = &l.bias {
            self.put(format!("{prefix}.bias"), b)?;
        }
        Ok(())
    }
    fn conv1d(&mut self, prefix: &str, l: &Linear) -> Result<()> {
        self.put(format!("{prefix}.weight"), &l.weight.t()?)?;
        if let Some(b) = &l.bias {
            self.put(format!("{prefix}.bias"), b)?;
        }
        Ok(())
    }
    fn norm(&mut self, prefix: &str, n: &Norm) -> Result<()> {
        match n {
            Norm::Layer { w, b, .. } => {
                self.put(format!("{prefix}.weight"), w)?;
                self.put(format!("{prefix}.bias"), b)?;
            }
            Norm::Rms { w, .. } => self.put(format!("{prefix}.weight"), w)?,
        }
        Ok(())
    }
}

impl Model {
    /// Every weight under its Hugging Face name and layout. A GRACE codebook is not weights:
    /// a model that carries one is refused (save the edit's file instead).
    pub fn hf_tensors(&self) -> Result<HashMap<String, Tensor>> {
        if let Some(l) = (0..self.n_layer()).find(|&l| self.blocks[l].mlp.down().codebook.is_some())
        {
            return Err(crate::error::LociError::input(format!(
                "layer {l} carries a GRACE codebook, which is not in the weights: save the edit \
                 file (--save-edit) and apply it to the model instead"
            )));
        }
        let c = &self.cfg;
        let (q, kv) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let mut o = Out(HashMap::new());
        match c.family {
            Family::Gpt2 => {
                o.put("transformer.wte.weight".into(), &self.wte)?;
                if let Some(wpe) = &self.wpe {
                    o.put("transformer.wpe.weight".into(), wpe)?;
                }
                for (l, b) in self.blocks.iter().enumerate() {
                    let p = format!("transformer.h.{l}");
                    o.norm(&format!("{p}.ln_1"), &b.ln1)?;
                    if let Some(ln2) = &b.ln2 {
                        o.norm(&format!("{p}.ln_2"), ln2)?;
                    }
                    o.conv1d(&format!("{p}.attn.c_attn"), &b.attn.qkv)?;
                    o.conv1d(&format!("{p}.attn.c_proj"), &b.attn.out)?;
                    if let Mlp::Gelu { fc, proj, .. } = &b.mlp {
                        o.conv1d(&format!("{p}.mlp.c_fc"), fc)?;
                        o.conv1d(&format!("{p}.mlp.c_proj"), proj)?;
                    }
                }
                o.norm("transformer.ln_f", &self.ln_f)?;
            }
            Family::Gptj => {
                o.put("transformer.wte.weight".into(), &self.wte)?;
                for (l, b) in self.blocks.iter().enumerate() {
                    let p = format!("transformer.h.{l}");
                    o.norm(&format!("{p}.ln_1"), &b.ln1)?;
                    let parts = split_rows(&b.attn.qkv, &[q, kv, kv])?;
                    for (n, part) in ["q_proj", "k_proj", "v_proj"].iter().zip(&parts) {
                        o.linear(&format!("{p}.attn.{n}"), part)?;
                    }
                    o.linear(&format!("{p}.attn.out_proj"), &b.attn.out)?;
                    if let Mlp::Gelu { fc, proj, .. } = &b.mlp {
                        o.linear(&format!("{p}.mlp.fc_in"), fc)?;
                        o.linear(&format!("{p}.mlp.fc_out"), proj)?;
                    }
                }
                o.norm("transformer.ln_f", &self.ln_f)?;
                o.linear("lm_head", &self.lm_head)?;
            }
            Family::Llama | Family::Phi3 | Family::Gemma => self.llama_layout(&mut o)?,
            Family::Neox => {
                o.put("gpt_neox.embed_in.weight".into(), &self.wte)?;
                for (l, b) in self.blocks.iter().enumerate() {
                    let p = format!("gpt_neox.layers.{l}");
                    o.norm(&format!("{p}.input_layernorm"), &b.ln1)?;
                    if let Some(ln2) = &b.ln2 {
                        o.norm(&format!("{p}.post_attention_layernorm"), ln2)?;
                    }
                    let heads = |t: &Tensor| super::neox::qkv_to_heads(t, c.n_head);
                    let qkv = Linear::new(
                        heads(&b.attn.qkv.weight)?,
                        b.attn.qkv.bias.as_ref().map(heads).transpose()?,
                    );
                    o.linear(&format!("{p}.attention.query_key_value"), &qkv)?;
                    o.linear(&format!("{p}.attention.dense"), &b.attn.out)?;
                    if let Mlp::Gelu { fc, proj, .. } = &b.mlp {
                        o.linear(&format!("{p}.mlp.dense_h_to_4h"), fc)?;
                        o.linear(&format!("{p}.mlp.dense_4h_to_h"), proj)?;
                    }
                }
                o.norm("gpt_neox.final_layer_norm", &self.ln_f)?;
                if !c.tie_embeddings {
                    o.linear("embed_out", &self.lm_head)?;
                }
            }
        }
        Ok(o.0)
    }

    /// The LLaMA layout's tensors (LLaMA, Mistral, Qwen2; Phi-3 fused; Gemma's norms less one).
    fn llama_layout(&self, o: &mut Out) -> Result<()> {
        let c = &self.cfg;
        let (q, kv) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let (phi3, gemma) = (c.family == Family::Phi3, c.family == Family::Gemma);
        let norm = |o: &mut Out, name: String, n: &Norm| match (gemma, n) {
            (true, Norm::Rms { w, .. }) => {
                let less_one = (w.to_dtype(candle_core::DType::F32)? - 1.0)?;
                o.put(name + ".weight", &less_one.to_dtype(self.dtype)?)
            }
            _ => o.norm(&name, n),
        };
        o.put("model.embed_tokens.weight".into(), &self.wte)?;
        for (l, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{l}");
            norm(o, format!("{p}.input_layernorm"), &b.ln1)?;
            let before_mlp = match &b.post_attn {
                Some(n) => {
                    norm(o, format!("{p}.post_attention_layernorm"), n)?;
                    "pre_feedforward_layernorm"
                }
                None => "post_attention_layernorm",
            };
            if let Some(ln2) = &b.ln2 {
                norm(o, format!("{p}.{before_mlp}"), ln2)?;
            }
            if let Some(n) = &b.post_mlp {
                norm(o, format!("{p}.post_feedforward_layernorm"), n)?;
            }
            if phi3 {
                o.linear(&format!("{p}.self_attn.qkv_proj"), &b.attn.qkv)?;
            } else {
                let parts = split_rows(&b.attn.qkv, &[q, kv, kv])?;
                for (n, part) in ["q_proj", "k_proj", "v_proj"].iter().zip(&parts) {
                    o.linear(&format!("{p}.self_attn.{n}"), part)?;
                }
            }
            o.linear(&format!("{p}.self_attn.o_proj"), &b.attn.out)?;
            if let Mlp::SwiGlu { gate_up, down, .. } = &b.mlp {
                if phi3 {
                    o.linear(&format!("{p}.mlp.gate_up_proj"), gate_up)?;
                } else {
                    let gu = split_rows(gate_up, &[c.d_ff, c.d_ff])?;
                    o.linear(&format!("{p}.mlp.gate_proj"), &gu[0])?;
                    o.linear(&format!("{p}.mlp.up_proj"), &gu[1])?;
                }
                o.linear(&format!("{p}.mlp.down_proj"), down)?;
            }
        }
        norm(o, "model.norm".into(), &self.ln_f)?;
        if !c.tie_embeddings {
            o.linear("lm_head", &self.lm_head)?;
        }
        Ok(())
    }

    /// A `config.json` that transformers and Loci both read back to this architecture.
    pub fn hf_config(&self) -> serde_json::Value {
        let c = &self.cfg;
        let dtype = match self.dtype {
            candle_core::DType::F16 => "float16",
            candle_core::DType::BF16 => "bfloat16",
            _ => "float32",
        };
        match c.family {
            Family::Gpt2 => json!({
                "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "n_embd": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": c.d_ff,
                "n_positions": c.max_positions, "n_ctx": c.max_positions, "vocab_size": c.vocab_size,
                "layer_norm_epsilon": c.norm_eps, "activation_function": "gelu_new",
                "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": dtype,
            }),
            Family::Gptj => json!({
                "model_type": "gptj", "architectures": ["GPTJForCausalLM"],
                "n_embd": c.d_model, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": c.d_ff,
                "rotary_dim": c.rotary_dim, "n_positions": c.max_positions, "vocab_size": c.vocab_size,
                "layer_norm_epsilon": c.norm_eps, "activation_function": "gelu_new",
                "tie_word_embeddings": false,
                "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": dtype,
            }),
            Family::Llama => {
                // LLaMA's attention biases include the output's and it has no sliding window;
                // Qwen2 biases q/k/v only; Mistral has no biases and a window.
                let (model_type, arch) = if c.quirks.attn_out_bias {
                    ("llama", "LlamaForCausalLM")
                } else if c.attn_bias {
                    ("qwen2", "Qwen2ForCausalLM")
                } else if c.sliding_window.is_some() {
                    ("mistral", "MistralForCausalLM")
                } else {
                    ("llama", "LlamaForCausalLM")
                };
                let mut v = json!({
                    "model_type": model_type, "architectures": [arch],
                    "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layer,
                    "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
                    "max_position_embeddings": c.max_positions, "vocab_size": c.vocab_size,
                    "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "hidden_act": "silu",
                    "tie_word_embeddings": c.tie_embeddings, "attention_bias": c.quirks.attn_out_bias,
                    "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": dtype,
                    "rope_scaling": rope_scaling_json(c.rope_scaling.as_ref()),
                });
                if let Some(w) = c.sliding_window {
                    v["sliding_window"] = json!(w);
                    v["use_sliding_window"] = json!(true);
                    // Qwen2 reads its windowed layers from the list; Mistral windows them all.
                    if model_type == "qwen2" || !c.sliding_layers.is_empty() {
                        v["layer_types"] = json!(layer_types(c));
                    }
                }
                v
            }
            Family::Phi3 => {
                let original = match &c.rope_scaling {
                    Some(RopeScaling::Llama3 {
                        original_max_positions,
                        ..
                    })
                    | Some(RopeScaling::Yarn {
                        original_max_positions,
                        ..
                    }) => *original_max_positions,
                    _ => c.max_positions,
                };
                json!({
                    "model_type": "phi3", "architectures": ["Phi3ForCausalLM"],
                    "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layer,
                    "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
                    "head_dim": c.head_dim, "max_position_embeddings": c.max_positions,
                    "vocab_size": c.vocab_size, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
                    "hidden_act": "silu",
                    // Phi-3's default padding id (32000) lies outside smaller vocabularies.
                    "pad_token_id": c.eos_token_id,
                    // Read back as int(head_dim · factor): half a dimension over keeps it exact.
                    "partial_rotary_factor": (c.rotary_dim as f64 + 0.5) / c.head_dim as f64,
                    // Phi-3's top-level value overrides the one in rope_scaling.
                    "original_max_position_embeddings": original,
                    "sliding_window": c.sliding_window, "tie_word_embeddings": c.tie_embeddings,
                    "rope_scaling": rope_scaling_json(c.rope_scaling.as_ref()),
                    "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": dtype,
                })
            }
            Family::Gemma => {
                let q = &c.quirks;
                let two = q.sandwich_norms;
                let mut v = json!({
                    "model_type": if two { "gemma2" } else { "gemma" },
                    "architectures": [if two { "Gemma2ForCausalLM" } else { "GemmaForCausalLM" }],
                    "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layer,
                    "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
                    "max_position_embeddings": c.max_positions, "vocab_size": c.vocab_size,
                    "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
                    "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": c.tie_embeddings,
                    "attention_bias": c.attn_bias,
                    "rope_scaling": rope_scaling_json(c.rope_scaling.as_ref()),
                    "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": dtype,
                });
                if two {
                    // transformers wants an integer where the scalar is whole (it always is).
                    v["query_pre_attn_scalar"] = match q.query_pre_attn_scalar {
                        Some(s) if s.fract() == 0.0 => json!(s as i64),
                        s => json!(s),
                    };
                    v["attn_logit_softcapping"] = json!(q.attn_softcap);
                    v["final_logit_softcapping"] = json!(q.final_softcap);
                    v["sliding_window"] = json!(c.sliding_window);
                    v["layer_types"] = json!(layer_types(c));
                }
                v
            }
            Family::Neox => json!({
                "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"],
                "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layer,
                "num_attention_heads": c.n_head, "max_position_embeddings": c.max_positions,
                "vocab_size": c.vocab_size, "layer_norm_eps": c.norm_eps,
                // Read back as int(head_dim · pct): half a dimension over keeps it exact.
                "rotary_pct": (c.rotary_dim as f64 + 0.5) / c.head_dim as f64,
                "rotary_emb_base": c.rope_theta,
                "hidden_act": if c.quirks.gelu_exact { "gelu" } else { "gelu_new" },
                "use_parallel_residual": c.quirks.parallel_residual, "attention_bias": c.attn_bias,
                "tie_word_embeddings": c.tie_embeddings,
                "rope_scaling": rope_scaling_json(c.rope_scaling.as_ref()),
                "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": dtype,
            }),
        }
    }
}

/// Each layer's attention as transformers' `layer_types` names it.
fn layer_types(c: &crate::config::ModelConfig) -> Vec<&'static str> {
    (0..c.n_layer)
        .map(|l| match c.window_of(l) {
            Some(_) => "sliding_attention",
            None => "full_attention",
        })
        .collect()
}

/// A rotary scaling as transformers' `rope_scaling` names it (`null` for none).
fn rope_scaling_json(s: Option<&RopeScaling>) -> serde_json::Value {
    match s {
        None => serde_json::Value::Null,
        Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Dynamic { factor }) => json!({"rope_type": "dynamic", "factor": factor}),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_positions,
        }) => json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_positions,
        }),
        Some(RopeScaling::Yarn {
            factor,
            original_max_positions,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        }) => json!({
            "rope_type": "yarn", "factor": factor,
            "original_max_position_embeddings": original_max_positions,
            "beta_fast": beta_fast, "beta_slow": beta_slow,
            "attention_factor": attention_factor, "truncate": truncate,
        }),
    }
}
