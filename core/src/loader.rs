//! Opening a model: a Hugging Face folder or a GGUF file, from disk or from bytes.

use std::io::Cursor;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Family, ModelConfig};
use crate::error::{LociError, Result};
use crate::model::load::{GgufModel, WeightSource};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// A model ready to run: weights, tokenizer and where they came from.
#[derive(Clone)]
pub struct LoadedModel {
    /// Display name: the name given, or the file/folder stem when loaded from disk.
    pub name: String,
    /// The transformer with its weights (edits are applied here, in place).
    pub model: Model,
    /// The tokenizer that came with the weights.
    pub tokenizer: Tokenizer,
    /// Summary of the model's shape and origin, for display and cache keys.
    pub info: ModelInfo,
}

/// A serializable summary of a loaded model: architecture, size, format and where it runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    /// The model's display name (copied from [`LoadedModel::name`]).
    pub name: String,
    /// Architecture family (GPT-2, GPT-J, LLaMA-style).
    pub family: Family,
    /// Where the weights came from: `"safetensors"`, `"gguf"` or `"random"`.
    pub format: String,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Width of the MLP's hidden layer.
    pub d_ff: usize,
    /// Parameter count estimated from the config (blocks, embeddings, learned positions).
    pub n_params: usize,
    /// Context length in tokens: the longest prompt the model accepts.
    pub max_positions: usize,
    /// The weights' dtype in lower case, as candle's `Debug` names it (`"f32"`, `"bf16"`, ...).
    pub dtype: String,
    /// `"cpu"` or `"cuda"`.
    pub device: String,
    /// Short content hash of the configuration and source files: ties caches to the model.
    pub fingerprint: String,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    fn new(
        name: String,
        format: &str,
        model: Model,
        tokenizer: Tokenizer,
        fingerprint: String,
    ) -> Self {
        let cfg = &model.cfg;
        let info = ModelInfo {
            name: name.clone(),
            family: cfg.family,
            format: format.into(),
            n_layer: cfg.n_layer,
            d_model: cfg.d_model,
            d_ff: cfg.d_ff,
            n_params: cfg.n_params(),
            max_positions: cfg.max_positions,
            dtype: format!("{:?}", model.dtype).to_lowercase(),
            device: if model.device.is_cpu() {
                "cpu".into()
            } else {
                "cuda".into()
            },
            fingerprint,
        };
        Self {
            name,
            model,
            tokenizer,
            info,
        }
    }

    /// Tokenizes a prompt and checks it can be run: not empty, within the context.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        if prompt.trim().is_empty() {
            return Err(LociError::input("the prompt is empty"));
        }
        let ids = self.tokenizer.encode(prompt)?;
        if ids.is_empty() {
            return Err(LociError::input("the prompt tokenizes to nothing"));
        }
        let max = self.model.cfg.max_positions;
        if ids.len() > max {
            return Err(LociError::input(format!(
                "the prompt has {} tokens, more than the model's context of {max}",
                ids.len()
            )));
        }
        Ok(ids)
    }

    /// Builds from Hugging Face files held in memory.
    pub fn from_hf_bytes(
        name: &str,
        config_json: &[u8],
        tokenizer_json: &[u8],
        safetensors: Vec<Vec<u8>>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let cfg = ModelConfig::from_hf_json(&String::from_utf8_lossy(config_json))?;
        let mut h = Sha256::new();
        h.update(config_json);
        for s in &safetensors {
            // The header names every tensor with its offsets; hashing it and the length is cheap
            // and changes whenever the weights file does in practice.
            h.update(&s[..s.len().min(1 << 16)]);
            h.update(s.len().to_le_bytes());
        }
        let src = WeightSource::from_buffers(safetensors)?;
        let model = Model::from_source(&cfg, &src, dtype, device)?;
        let tok = Tokenizer::from_json(tokenizer_json, cfg.eos_token_id)?;
        Ok(Self::new(
            name.into(),
            "safetensors",
            model,
            tok,
            short_hash(h),
        ))
    }

    /// A model of the given shape with random weights (N(0, 0.02²)), made on `device`: for
    /// benchmarks of full-size models whose weights are not at hand.
    pub fn random(
        name: &str,
        cfg: &ModelConfig,
        tokenizer_json: &[u8],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let model = Model::from_source(cfg, &WeightSource::Random { std: 0.02 }, dtype, device)?;
        let tok = Tokenizer::from_json(tokenizer_json, cfg.eos_token_id)?;
        if tok.vocab_size() > cfg.vocab_size {
            return Err(LociError::model(format!(
                "the tokenizer has {} tokens, the model only {}",
                tok.vocab_size(),
                cfg.vocab_size
            )));
        }
        Ok(Self::new(
            name.into(),
            "random",
            model,
            tok,
            format!("random-{name}"),
        ))
    }

    /// Builds from a GGUF file held in memory.
    pub fn from_gguf_bytes(
        name: &str,
        bytes: &[u8],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut h = Sha256::new();
        h.update(&bytes[..bytes.len().min(1 << 20)]);
        h.update(bytes.len().to_le_bytes());
        Self::from_gguf_reader(name, &mut Cursor::new(bytes), dtype, device, short_hash(h))
    }

    fn from_gguf_reader<R: std::io::Read + std::io::Seek>(
        name: &str,
        reader: &mut R,
        dtype: DType,
        device: &Device,
        fingerprint: String,
    ) -> Result<Self> {
        let g = GgufModel::read(reader)?;
        let tok = Tokenizer::from_gguf(&g.metadata)?;
        let model = Model::from_source(&g.cfg, &WeightSource::Tensors(g.tensors), dtype, device)?;
        Ok(Self::new(name.into(), "gguf", model, tok, fingerprint))
    }
}

fn short_hash(h: Sha256) -> String {
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(not(target_arch = "wasm32"))]
mod fs {
    use std::path::{Path, PathBuf};

    use super::*;

    fn read(p: &Path) -> Result<Vec<u8>> {
        std::fs::read(p).map_err(|e| LociError::io(p, e))
    }

    /// The `.gguf` file a path names: the file itself, or the only one in a folder without config.
    pub fn gguf_path(path: &Path) -> Option<PathBuf> {
        if path.is_file() {
            return path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
                .then(|| path.to_path_buf());
        }
        if path.join("config.json").exists() {
            return None;
        }
        let mut found = std::fs::read_dir(path)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"));
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }

    /// The safetensors files of a Hugging Face folder: one file, or every shard of the index.
    pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Ok(vec![single]);
        }
        let index = dir.join("model.safetensors.index.json");
        if !index.exists() {
            return Err(LociError::model(format!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            )));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&read(&index)?).map_err(|source| LociError::Json {
                what: index.display().to_string(),
                source,
            })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LociError::model("safetensors index has no weight_map"))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        files
            .into_iter()
            .map(|f| {
                // Shard names come from a file; refuse any that would leave the folder.
                if f.contains('/') || f.contains('\\') || f.contains("..") {
                    return Err(LociError::model(format!(
                        "bad shard name {f:?} in the index"
                    )));
                }
                Ok(dir.join(f))
            })
            .collect()
    }

    impl LoadedModel {
        /// Opens a Hugging Face folder (`config.json`, safetensors, `tokenizer.json`) or a `.gguf`.
        pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
            if !path.exists() {
                return Err(LociError::io(path, std::io::ErrorKind::NotFound.into()));
            }
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            if let Some(g) = gguf_path(path) {
                let file = std::fs::File::open(&g).map_err(|e| LociError::io(&g, e))?;
                let meta = file.metadata().map_err(|e| LociError::io(&g, e))?;
                let mut h = Sha256::new();
                h.update(g.file_name().unwrap_or_default().as_encoded_bytes());
                h.update(meta.len().to_le_bytes());
                let mut reader = std::io::BufReader::new(file);
                return Self::from_gguf_reader(&name, &mut reader, dtype, device, short_hash(h));
            }
            if !path.is_dir() {
                return Err(LociError::input(format!(
                    "{} is neither a model folder nor a .gguf file",
                    path.display()
                )));
            }
            let config = read(&path.join("config.json"))?;
            let cfg = ModelConfig::from_hf_json(&String::from_utf8_lossy(&config))?;
            let files = safetensors_files(path)?;
            let mut h = Sha256::new();
            h.update(&config);
            for f in &files {
                let len = std::fs::metadata(f).map_err(|e| LociError::io(f, e))?.len();
                h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
                h.update(len.to_le_bytes());
            }
            let src = WeightSource::mmap(&files)?;
            let model = Model::from_source(&cfg, &src, dtype, device)?;
            let tok = Tokenizer::from_json(&read(&path.join("tokenizer.json"))?, cfg.eos_token_id)?;
            Ok(Self::new(name, "safetensors", model, tok, short_hash(h)))
        }

        /// Writes the model (as it is now, edits included) as a Hugging Face folder.
        pub fn save_hf_folder(&self, dir: &Path) -> Result<()> {
            std::fs::create_dir_all(dir).map_err(|e| LociError::io(dir, e))?;
            let write = |name: &str, text: String| {
                let p = dir.join(name);
                std::fs::write(&p, text).map_err(|e| LociError::io(&p, e))
            };
            let mut config = self.model.hf_config();
            config["loci_source"] = serde_json::json!(self.info.fingerprint);
            write(
                "config.json",
                serde_json::to_string_pretty(&config).expect("JSON value"),
            )?;
            write("tokenizer.json", self.tokenizer.to_json()?)?;
            let p = dir.join("model.safetensors");
            candle_core::safetensors::save(&self.model.hf_tensors()?, &p)
                .map_err(|e| LociError::model(format!("writing {}: {e}", p.display())))
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub use fs::{gguf_path, safetensors_files};
