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
        let heads: Vec<(&[u8], u64)> = safetensors
            .iter()
            .map(|s| (safetensors_head(s), s.len() as u64))
            .collect();
        let fingerprint = hf_fingerprint(config_json, &heads);
        let src = WeightSource::from_buffers(safetensors)?;
        let model = Model::from_source(&cfg, &src, dtype, device)?;
        let tok = Tokenizer::from_json(tokenizer_json, cfg.eos_token_id)?;
        Ok(Self::new(
            name.into(),
            "safetensors",
            model,
            tok,
            fingerprint,
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
        let head = &bytes[..bytes.len().min(GGUF_HEAD)];
        let fingerprint = gguf_fingerprint(head, bytes.len() as u64);
        Self::from_gguf_reader(name, &mut Cursor::new(bytes), dtype, device, fingerprint)
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

/// Bytes of a GGUF file's start that its fingerprint covers (metadata and tensor index).
const GGUF_HEAD: usize = 1 << 20;

/// The start of a safetensors file its fingerprint covers: the length word and the JSON header,
/// which names every tensor with its dtype, shape and offsets.
fn safetensors_head(bytes: &[u8]) -> &[u8] {
    let n = bytes
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    &bytes[..bytes.len().min(8 + n.min(1 << 27) as usize)]
}

/// A Hugging Face model's fingerprint: its config, and each weights file's header and length.
/// The same from files on disk and from bytes in a browser tab, so statistics made by one fit
/// the other; cheap (no weight is read) and different whenever the files differ in practice.
fn hf_fingerprint(config: &[u8], heads: &[(&[u8], u64)]) -> String {
    let mut h = Sha256::new();
    h.update(config);
    for (head, len) in heads {
        h.update(head);
        h.update(len.to_le_bytes());
    }
    short_hash(h)
}

/// A GGUF model's fingerprint: its first megabyte and its length (on disk or in memory alike).
fn gguf_fingerprint(head: &[u8], len: u64) -> String {
    let mut h = Sha256::new();
    h.update(head);
    h.update(len.to_le_bytes());
    short_hash(h)
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

    /// The next `n` bytes of `r` (fewer at the end of the file).
    fn read_next<R: std::io::Read>(r: &mut R, p: &Path, n: usize) -> Result<Vec<u8>> {
        use std::io::Read;
        let mut buf = vec![];
        r.by_ref()
            .take(n as u64)
            .read_to_end(&mut buf)
            .map_err(|e| LociError::io(p, e))?;
        Ok(buf)
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
                let len = file.metadata().map_err(|e| LociError::io(&g, e))?.len();
                let mut reader = std::io::BufReader::new(file);
                let head = read_next(&mut reader, &g, GGUF_HEAD)?;
                std::io::Seek::rewind(&mut reader).map_err(|e| LociError::io(&g, e))?;
                let fingerprint = gguf_fingerprint(&head, len);
                return Self::from_gguf_reader(&name, &mut reader, dtype, device, fingerprint);
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
            let mut heads = vec![];
            for f in &files {
                let mut file = std::fs::File::open(f).map_err(|e| LociError::io(f, e))?;
                let len = file.metadata().map_err(|e| LociError::io(f, e))?.len();
                let word = read_next(&mut file, f, 8)?;
                let n = word.get(..8).map_or(0, |b| {
                    u64::from_le_bytes(b.try_into().expect("8 bytes")).min(1 << 27)
                });
                let mut head = word;
                head.extend(read_next(&mut file, f, n as usize)?);
                heads.push((head, len));
            }
            let heads: Vec<(&[u8], u64)> = heads.iter().map(|(h, l)| (&h[..], *l)).collect();
            let fingerprint = hf_fingerprint(&config, &heads);
            let src = WeightSource::mmap(&files)?;
            let model = Model::from_source(&cfg, &src, dtype, device)?;
            let tok = Tokenizer::from_json(&read(&path.join("tokenizer.json"))?, cfg.eos_token_id)?;
            Ok(Self::new(name, "safetensors", model, tok, fingerprint))
        }

        /// Writes the model (as it is now, edits included) as a Hugging Face folder.
        pub fn save_hf_folder(&self, dir: &Path) -> Result<()> {
            // Refused before anything is written (a model carrying a GRACE codebook).
            let tensors = self.model.hf_tensors()?;
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
            candle_core::safetensors::save(&tensors, &p)
                .map_err(|e| LociError::model(format!("writing {}: {e}", p.display())))
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub use fs::{gguf_path, safetensors_files};
