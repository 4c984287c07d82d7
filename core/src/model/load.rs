//! Building a `Model` from named tensors: Hugging Face safetensors (files, shards or bytes) or GGUF.

use std::collections::HashMap;
use std::io::{Read, Seek};

use candle_core::quantized::gguf_file;
use candle_core::safetensors::BufferedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::layers::{check_shape, Attention, CausalMasks, Linear, Mlp, Norm, Rotary};
use super::{Block, Model};
use crate::config::{Family, ModelConfig};
use crate::error::{LociError, Result};

/// Where weights come from; all lookups use Hugging Face tensor names.
pub enum WeightSource {
    /// One or more safetensors files (a sharded checkpoint is several).
    #[cfg(not(target_arch = "wasm32"))]
    Mmap(candle_core::safetensors::MmapedSafetensors),
    Buffers(Vec<BufferedSafetensors>),
    /// Already materialised tensors (GGUF, dequantised and renamed).
    Tensors(HashMap<String, Tensor>),
    /// Random weights made where they are used (for timing full-size models no one can
    /// download here): N(0, std²) matrices, unit norm scales, zero biases.
    Random {
        std: f64,
    },
}

impl WeightSource {
    /// Memory-maps safetensors files (one, or all shards of an index).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn mmap(paths: &[std::path::PathBuf]) -> Result<Self> {
        for p in paths {
            if !p.exists() {
                return Err(LociError::io(p, std::io::ErrorKind::NotFound.into()));
            }
        }
        // Safety: the files are opened read-only and the project never writes to them while mapped.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths) }
            .map_err(|e| LociError::model(format!("cannot read safetensors {paths:?}: {e}")))?;
        Ok(Self::Mmap(st))
    }

    /// Safetensors files already in memory (the browser has no file system).
    pub fn from_buffers(buffers: Vec<Vec<u8>>) -> Result<Self> {
        let shards = buffers
            .into_iter()
            .map(|b| {
                BufferedSafetensors::new(b)
                    .map_err(|e| LociError::model(format!("corrupt safetensors data: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::Buffers(shards))
    }

    /// Resolves `name`, also trying it without the `transformer.` prefix (the original GPT-2
    /// checkpoints store `h.0.attn...`).
    fn lookup(&self, name: &str) -> Result<Tensor> {
        let dev = Device::Cpu;
        let candidates = [Some(name), name.strip_prefix("transformer.")];
        for n in candidates.into_iter().flatten() {
            let found = match self {
                #[cfg(not(target_arch = "wasm32"))]
                WeightSource::Mmap(st) => st.get(n).ok().map(|_| st.load(n, &dev)),
                WeightSource::Buffers(shards) => shards
                    .iter()
                    .find(|s| s.get(n).is_ok())
                    .map(|s| s.load(n, &dev)),
                WeightSource::Tensors(m) => m.get(n).cloned().map(Ok),
                WeightSource::Random { .. } => None,
            };
            if let Some(t) = found {
                return t.map_err(|e| LociError::model(format!("tensor {n}: {e}")));
            }
        }
        Err(LociError::model(format!(
            "tensor {name} is missing from the weights"
        )))
    }

    pub fn contains(&self, name: &str) -> bool {
        matches!(self, WeightSource::Random { .. }) || self.lookup(name).is_ok()
    }

    /// Fetches `name`, checks its shape, converts it to `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if let WeightSource::Random { std } = self {
            // Made on the device directly: a 6B-parameter model never passes through the host.
            let t = if name.ends_with(".bias") || name.ends_with("_bias") {
                Tensor::zeros(shape, dtype, device)?
            } else if shape.len() == 1 {
                Tensor::ones(shape, dtype, device)?
            } else {
                Tensor::randn(0f32, *std as f32, shape, device)?.to_dtype(dtype)?
            };
            return Ok(t);
        }
        let t = self.lookup(name)?;
        check_shape(name, &t, shape)?;
        let t = t.to_dtype(dtype)?.to_device(device)?;
        Ok(t)
    }
}

struct Builder<'a> {
    src: &'a WeightSource,
    dtype: DType,
    device: &'a Device,
}

impl Builder<'_> {
    fn w(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.src.get(name, shape, self.dtype, self.device)
    }
    fn linear(&self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let b = if bias {
            Some(self.w(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(
            self.w(&format!("{prefix}.weight"), &[out, inp])?,
            b,
        ))
    }
    /// GPT-2's Conv1D stores `[in, out]`.
    fn conv1d(&self, prefix: &str, inp: usize, out: usize) -> Result<Linear> {
        let w = self
            .w(&format!("{prefix}.weight"), &[inp, out])?
            .t()?
            .contiguous()?;
        Ok(Linear::new(
            w,
            Some(self.w(&format!("{prefix}.bias"), &[out])?),
        ))
    }
    fn layer_norm(&self, prefix: &str, d: usize, eps: f64) -> Result<Norm> {
        Ok(Norm::Layer {
            w: self.w(&format!("{prefix}.weight"), &[d])?,
            b: self.w(&format!("{prefix}.bias"), &[d])?,
            eps: eps as f32,
        })
    }
    fn rms_norm(&self, prefix: &str, d: usize, eps: f64) -> Result<Norm> {
        Ok(Norm::Rms {
            w: self.w(&format!("{prefix}.weight"), &[d])?,
            eps: eps as f32,
        })
    }
}

fn cat_linears(parts: &[Linear]) -> Result<Linear> {
    let w = Tensor::cat(
        &parts.iter().map(|l| l.weight.clone()).collect::<Vec<_>>(),
        0,
    )?;
    let b = if parts.iter().all(|l| l.bias.is_some()) {
        Some(Tensor::cat(
            &parts
                .iter()
                .map(|l| l.bias.clone().unwrap())
                .collect::<Vec<_>>(),
            0,
        )?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

impl Model {
    /// Builds the model from Hugging Face-named tensors, checking every shape against `cfg`.
    pub fn from_source(
        cfg: &ModelConfig,
        src: &WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let b = Builder { src, dtype, device };
        let (d, ff, nh, nkv, hd) = (
            cfg.d_model,
            cfg.d_ff,
            cfg.n_head,
            cfg.n_kv_head,
            cfg.head_dim,
        );
        let eps = cfg.norm_eps;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        let (wte, wpe, ln_f, lm_head);
        let masks = CausalMasks::default();
        let rotary_of = |dim: usize, interleaved: bool| {
            Rotary::new(
                dim,
                hd,
                interleaved,
                cfg.rope_theta,
                cfg.max_positions,
                device,
            )
        };
        match cfg.family {
            Family::Gpt2 => {
                wte = b.w("transformer.wte.weight", &[cfg.vocab_size, d])?;
                wpe = Some(b.w("transformer.wpe.weight", &[cfg.max_positions, d])?);
                for l in 0..cfg.n_layer {
                    let p = format!("transformer.h.{l}");
                    blocks.push(Block {
                        ln1: b.layer_norm(&format!("{p}.ln_1"), d, eps)?,
                        ln2: Some(b.layer_norm(&format!("{p}.ln_2"), d, eps)?),
                        attn: Attention {
                            qkv: b.conv1d(&format!("{p}.attn.c_attn"), d, 3 * d)?,
                            out: b.conv1d(&format!("{p}.attn.c_proj"), d, d)?,
                            n_head: nh,
                            n_kv_head: nh,
                            head_dim: hd,
                            rotary: None,
                            masks: masks.clone(),
                        },
                        mlp: Mlp::Gelu {
                            fc: b.conv1d(&format!("{p}.mlp.c_fc"), d, ff)?,
                            proj: b.conv1d(&format!("{p}.mlp.c_proj"), ff, d)?,
                        },
                    });
                }
                ln_f = b.layer_norm("transformer.ln_f", d, eps)?;
                lm_head = Linear::new(wte.clone(), None);
            }
            Family::Gptj => {
                let rotary = rotary_of(cfg.rotary_dim, true)?;
                wte = b.w("transformer.wte.weight", &[cfg.vocab_size, d])?;
                wpe = None;
                for l in 0..cfg.n_layer {
                    let p = format!("transformer.h.{l}");
                    let proj = |n: &str| b.linear(&format!("{p}.attn.{n}"), d, d, false);
                    blocks.push(Block {
                        ln1: b.layer_norm(&format!("{p}.ln_1"), d, eps)?,
                        ln2: None,
                        attn: Attention {
                            qkv: cat_linears(&[proj("q_proj")?, proj("k_proj")?, proj("v_proj")?])?,
                            out: proj("out_proj")?,
                            n_head: nh,
                            n_kv_head: nh,
                            head_dim: hd,
                            rotary: Some(rotary.clone()),
                            masks: masks.clone(),
                        },
                        mlp: Mlp::Gelu {
                            fc: b.linear(&format!("{p}.mlp.fc_in"), ff, d, true)?,
                            proj: b.linear(&format!("{p}.mlp.fc_out"), d, ff, true)?,
                        },
                    });
                }
                ln_f = b.layer_norm("transformer.ln_f", d, eps)?;
                lm_head = b.linear("lm_head", cfg.vocab_size, d, true)?;
            }
            Family::Llama => {
                let rotary = rotary_of(hd, false)?;
                wte = b.w("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
                wpe = None;
                for l in 0..cfg.n_layer {
                    let p = format!("model.layers.{l}");
                    let ab = cfg.attn_bias;
                    let a = |n: &str, out: usize, inp: usize, bias: bool| {
                        b.linear(&format!("{p}.self_attn.{n}"), out, inp, bias)
                    };
                    let m = |n: &str, out: usize, inp: usize| {
                        b.linear(&format!("{p}.mlp.{n}"), out, inp, false)
                    };
                    blocks.push(Block {
                        ln1: b.rms_norm(&format!("{p}.input_layernorm"), d, eps)?,
                        ln2: Some(b.rms_norm(&format!("{p}.post_attention_layernorm"), d, eps)?),
                        attn: Attention {
                            qkv: cat_linears(&[
                                a("q_proj", nh * hd, d, ab)?,
                                a("k_proj", nkv * hd, d, ab)?,
                                a("v_proj", nkv * hd, d, ab)?,
                            ])?,
                            out: a("o_proj", d, nh * hd, false)?,
                            n_head: nh,
                            n_kv_head: nkv,
                            head_dim: hd,
                            rotary: Some(rotary.clone()),
                            masks: masks.clone(),
                        },
                        mlp: Mlp::SwiGlu {
                            gate_up: cat_linears(&[m("gate_proj", ff, d)?, m("up_proj", ff, d)?])?,
                            down: m("down_proj", d, ff)?,
                        },
                    });
                }
                ln_f = b.rms_norm("model.norm", d, eps)?;
                lm_head = if cfg.tie_embeddings && !src.contains("lm_head.weight") {
                    Linear::new(wte.clone(), None)
                } else {
                    b.linear("lm_head", cfg.vocab_size, d, false)?
                };
            }
        }
        Ok(Model {
            cfg: cfg.clone(),
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            dtype,
            device: device.clone(),
        })
    }
}

/// A parsed GGUF file: config, tensors under Hugging Face names, and its metadata (for the tokenizer).
pub struct GgufModel {
    pub cfg: ModelConfig,
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, gguf_file::Value>,
}

fn meta_u(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<usize> {
    let v = md
        .get(key)
        .ok_or_else(|| LociError::model(format!("GGUF metadata lacks {key}")))?;
    v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
        .map(|x| x as usize)
        .map_err(|e| LociError::model(format!("GGUF metadata {key}: {e}")))
}

fn meta_f(md: &HashMap<String, gguf_file::Value>, key: &str) -> Option<f64> {
    let v = md.get(key)?;
    v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
}

/// llama.cpp stores q/k rows permuted for its interleaved rotary; transformers' layout rotates halves.
fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?
        .contiguous()?)
}

impl GgufModel {
    /// Reads a LLaMA-architecture GGUF file, dequantising every tensor to f32.
    pub fn read<R: Read + Seek>(reader: &mut R) -> Result<Self> {
        let content = gguf_file::Content::read(reader)
            .map_err(|e| LociError::model(format!("not a readable GGUF file: {e}")))?;
        let md = &content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(LociError::Unsupported(format!(
                "GGUF architecture {arch:?} (supported: llama)"
            )));
        }
        let k = |s: &str| format!("llama.{s}");
        let d_model = meta_u(md, &k("embedding_length"))?;
        let n_head = meta_u(md, &k("attention.head_count"))?;
        let n_kv_head = meta_u(md, &k("attention.head_count_kv")).unwrap_or(n_head);
        let n_vocab = match md.get("tokenizer.ggml.tokens").map(|v| v.to_vec()) {
            Some(Ok(v)) => v.len(),
            _ => meta_u(md, &k("vocab_size"))?,
        };
        let tid = |key: &str| meta_u(md, key).ok().map(|x| x as u32);
        let cfg = ModelConfig {
            family: Family::Llama,
            n_layer: meta_u(md, &k("block_count"))?,
            d_model,
            n_head,
            n_kv_head,
            head_dim: meta_u(md, &k("attention.key_length")).unwrap_or(d_model / n_head.max(1)),
            d_ff: meta_u(md, &k("feed_forward_length"))?,
            vocab_size: n_vocab,
            max_positions: meta_u(md, &k("context_length"))?,
            norm_eps: meta_f(md, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            rotary_dim: 0,
            rope_theta: meta_f(md, &k("rope.freq_base")).unwrap_or(10000.0),
            tie_embeddings: !content.tensor_infos.contains_key("output.weight"),
            attn_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            bos_token_id: tid("tokenizer.ggml.bos_token_id"),
            eos_token_id: tid("tokenizer.ggml.eos_token_id"),
        }
        .with_full_rotary();
        cfg.validate()?;
        let mut tensors = HashMap::new();
        for name in content.tensor_infos.keys() {
            let Some(hf) = hf_name(name) else { continue };
            let q = content
                .tensor(reader, name, &Device::Cpu)
                .map_err(|e| LociError::model(format!("GGUF tensor {name}: {e}")))?;
            let mut t = q
                .dequantize(&Device::Cpu)
                .map_err(|e| LociError::model(format!("GGUF tensor {name}: {e}")))?;
            if name.ends_with("attn_q.weight") {
                t = unpermute_qk(&t, cfg.n_head)?;
            } else if name.ends_with("attn_k.weight") {
                t = unpermute_qk(&t, cfg.n_kv_head)?;
            }
            tensors.insert(hf, t);
        }
        Ok(Self {
            cfg,
            tensors,
            metadata: content.metadata,
        })
    }
}

fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}
