//! The models a server offers: found once at start, loaded on first use, shared after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use loci_core::{DType, Device, LoadedModel, ModelInfo};
use serde::Serialize;

struct Entry {
    path: PathBuf,
    size_bytes: u64,
    loaded: Mutex<Option<Arc<LoadedModel>>>,
}

pub struct Registry {
    models: BTreeMap<String, Entry>,
}

#[derive(Serialize)]
pub struct ModelListing {
    pub name: String,
    pub format: &'static str,
    pub size_bytes: u64,
    pub loaded: bool,
    pub info: Option<ModelInfo>,
}

fn is_model(p: &Path) -> bool {
    p.join("config.json").exists() || loci_core::loader::gguf_path(p).is_some()
}

fn size_of(p: &Path) -> u64 {
    if p.is_file() {
        return p.metadata().map_or(0, |m| m.len());
    }
    std::fs::read_dir(p)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

impl Registry {
    /// Each path is a model, or a folder whose entries are models.
    pub fn discover(paths: &[PathBuf]) -> Result<Self> {
        let mut models = BTreeMap::new();
        for p in paths {
            if !p.exists() {
                bail!("{} does not exist", p.display());
            }
            let found: Vec<PathBuf> = if is_model(p) {
                vec![p.clone()]
            } else {
                let mut v: Vec<PathBuf> = std::fs::read_dir(p)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|q| is_model(q))
                    .collect();
                v.sort();
                v
            };
            for m in found {
                let name = m
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                models.insert(
                    name,
                    Entry {
                        size_bytes: size_of(&m),
                        path: m,
                        loaded: Mutex::new(None),
                    },
                );
            }
        }
        if models.is_empty() {
            bail!("no models found in {paths:?}");
        }
        Ok(Self { models })
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn names(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    pub fn listing(&self) -> Vec<ModelListing> {
        self.models
            .iter()
            .map(|(name, e)| {
                let loaded = e.loaded.lock().expect("registry lock").clone();
                ModelListing {
                    name: name.clone(),
                    format: if e.path.is_file() {
                        "gguf"
                    } else {
                        "safetensors"
                    },
                    size_bytes: e.size_bytes,
                    loaded: loaded.is_some(),
                    info: loaded.map(|m| m.info.clone()),
                }
            })
            .collect()
    }

    /// The model called `name`, loading it on first use (blocking: call from a worker thread).
    pub fn get(&self, name: &str) -> Result<Option<Arc<LoadedModel>>> {
        let Some(e) = self.models.get(name) else {
            return Ok(None);
        };
        let mut slot = e.loaded.lock().expect("registry lock");
        if let Some(m) = slot.as_ref() {
            return Ok(Some(m.clone()));
        }
        let m = Arc::new(LoadedModel::load(&e.path, DType::F32, &Device::Cpu)?);
        *slot = Some(m.clone());
        Ok(Some(m))
    }
}
