//! Building a `Model` from named tensors: Hugging Face safetensors (files, shards or bytes) or
//! GGUF.

use std::collections::HashMap;
use std::io::{Read, Seek};

use candle_core::quantized::gguf_file;
use candle_core::safetensors::BufferedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::layers::check_shape;
use crate::config::{Family, ModelConfig, Quirks, RopeScaling};
use crate::error::{candle_message, LociError, Result};

/// Where weights come from; all lookups use Hugging Face tensor names.
pub enum WeightSource {
    /// One or more safetensors files (a sharded checkpoint is several).
    #[cfg(not(target_arch = "wasm32"))]
    Mmap(candle_core::safetensors::MmapedSafetensors),
    /// Safetensors files already in memory, one per shard.
    Buffers(Vec<BufferedSafetensors>),
    /// Already materialised tensors (GGUF, dequantised and renamed).
    Tensors(HashMap<String, Tensor>),
    /// Random weights made where they are used (for timing full-size models no one can
    /// download here): N(0, std²) matrices, unit norm scales, zero biases.
    Random {
        /// Standard deviation of the random matrices.
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

    /// Whether tensor `name` (or its name without `transformer.`) is there; random weights
    /// have every name.
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

/// Named weights, fetched in the model's dtype onto its device: what every piece's `load` takes.
pub struct Weights<'a> {
    pub(crate) src: &'a WeightSource,
    pub(crate) dtype: DType,
    pub(crate) device: &'a Device,
}

impl Weights<'_> {
    /// The tensor `name`, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.src.get(name, shape, self.dtype, self.device)
    }

    /// Whether the weights hold `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.src.contains(name)
    }
}

/// A parsed GGUF file: config, tensors under Hugging Face names, and its metadata (for the
/// tokenizer).
pub struct GgufModel {
    /// The architecture, from the file's metadata.
    pub cfg: ModelConfig,
    /// The model's tensors, dequantised to f32 on the CPU, under Hugging Face names.
    pub tensors: HashMap<String, Tensor>,
    /// The file's metadata, where the tokenizer is read from.
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
        .map_err(|e| LociError::model(format!("GGUF metadata {key}: {}", candle_message(&e))))
}

fn meta_f(md: &HashMap<String, gguf_file::Value>, key: &str) -> Option<f64> {
    let v = md.get(key)?;
    v.to_f32().map(f64::from).or_else(|_| v.to_f64()).ok()
}

/// llama.cpp stores q/k rows permuted for its interleaved rotary; transformers' layout rotates
/// halves.
fn unpermute_qk(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_head;
    Ok(w.reshape((n_head, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?
        .contiguous()?)
}

/// The architecture a LLaMA-architecture GGUF file's metadata describes, validated; read
/// before any tensor is.
pub fn gguf_config(content: &gguf_file::Content) -> Result<ModelConfig> {
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
    // As llama.cpp reads it: linear unless a type says otherwise, the factor from
    // `rope.scaling.factor` (or the older `rope.scale_linear`), 0 and 1 meaning none.
    let factor = meta_f(md, &k("rope.scaling.factor"))
        .or_else(|| meta_f(md, &k("rope.scale_linear")))
        .filter(|f| *f != 0.0 && *f != 1.0);
    let kind = md
        .get(&k("rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .map_or("linear", |t| t.as_str());
    let scaling = match (kind, factor) {
        ("none", _) | (_, None) => None,
        ("linear", Some(factor)) => Some(RopeScaling::Linear { factor }),
        (t, Some(_)) => {
            return Err(LociError::Unsupported(format!("GGUF rope scaling {t:?}")));
        }
    };
    // Llama 3.1's scaled frequencies come as a tensor of per-pair factors.
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(LociError::Unsupported(
            "GGUF rotary frequency factors (rope_freqs, Llama 3.1's scaling): load the \
             Hugging Face folder instead"
                .into(),
        ));
    }
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
        rope_scaling: scaling,
        sliding_window: None,
        sliding_layers: vec![],
        quirks: Quirks::default(),
    }
    .with_full_rotary();
    cfg.validate()?;
    Ok(cfg)
}

/// A GGUF file's architecture and each tensor's stored type and bytes (`("Q4K", 1234)`), from
/// its header alone.
#[cfg(not(target_arch = "wasm32"))]
pub fn gguf_header(path: &std::path::Path) -> Result<(ModelConfig, Vec<(String, u64)>)> {
    let mut f = std::fs::File::open(path).map_err(|e| LociError::io(path, e))?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| {
        LociError::model(format!("not a readable GGUF file: {}", candle_message(&e)))
    })?;
    let types = content
        .tensor_infos
        .values()
        .map(|t| {
            let blocks = t.shape.elem_count() / t.ggml_dtype.block_size();
            let bytes = (blocks * t.ggml_dtype.type_size()) as u64;
            (format!("{:?}", t.ggml_dtype), bytes)
        })
        .collect();
    Ok((gguf_config(&content)?, types))
}

impl GgufModel {
    /// Reads a LLaMA-architecture GGUF file, dequantising every tensor to f32.
    pub fn read<R: Read + Seek>(reader: &mut R) -> Result<Self> {
        let content = gguf_file::Content::read(reader).map_err(|e| {
            LociError::model(format!("not a readable GGUF file: {}", candle_message(&e)))
        })?;
        let cfg = gguf_config(&content)?;
        let file_size = reader
            .seek(std::io::SeekFrom::End(0))
            .map_err(|e| LociError::model(format!("GGUF file: {e}")))?;
        check_tensor_infos(&content, file_size)?;
        let mut tensors = HashMap::new();
        for name in content.tensor_infos.keys() {
            let Some(hf) = hf_name(name) else { continue };
            let q = content.tensor(reader, name, &Device::Cpu).map_err(|e| {
                LociError::model(format!("GGUF tensor {name}: {}", candle_message(&e)))
            })?;
            let mut t = q.dequantize(&Device::Cpu).map_err(|e| {
                LociError::model(format!("GGUF tensor {name}: {}", candle_message(&e)))
            })?;
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

/// Refuses tensor infos whose shapes overflow or whose data lies outside the file, before a
/// tensor is read: dequantising a tensor allocates what its shape claims, so a claim the file
/// cannot back would allocate without bound (or overflow the element count).
fn check_tensor_infos(content: &gguf_file::Content, file_size: u64) -> Result<()> {
    for (name, t) in &content.tensor_infos {
        let bad = |why: String| LociError::model(format!("GGUF tensor {name}: {why}"));
        let elems = t
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| bad(format!("its shape {:?} overflows", t.shape.dims())))?;
        let block = t.ggml_dtype.block_size();
        if !elems.is_multiple_of(block) {
            return Err(bad(format!(
                "{elems} elements are not a whole number of blocks of {block}"
            )));
        }
        let bytes = (elems / block)
            .checked_mul(t.ggml_dtype.type_size())
            .ok_or_else(|| bad("its size overflows".into()))?;
        let end = content
            .tensor_data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(bytes as u64));
        if end.is_none_or(|e| e > file_size) {
            return Err(bad(format!(
                "its {bytes} bytes at offset {} lie outside the file of {file_size} bytes",
                t.offset
            )));
        }
    }
    Ok(())
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
