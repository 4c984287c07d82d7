//! The models a server offers: found once at start, loaded on first use, shared after.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::sched::units::Shape;
use anyhow::{bail, Result};
use loci_core::edit::{AppliedEdit, Edit};
use loci_core::{DType, Device, LoadedModel, ModelInfo};
use serde::Serialize;

struct Entry {
    path: PathBuf,
    size_bytes: u64,
    loaded: Mutex<Option<Arc<ServedModel>>>,
}

/// A loaded model and the edits applied to it, in order. Reads (predict, trace) share the lock;
/// an edit or undo holds it alone.
pub struct ServedModel {
    pub state: RwLock<ModelState>,
}

/// A served model with its applied edits, newest last.
pub struct ModelState {
    pub lm: LoadedModel,
    pub edits: Vec<ServedEdit>,
    next_id: u64,
    /// Counts the changes of the weights: an edit computed on a copy is applied only if no
    /// other change came first.
    pub version: u64,
}

/// An applied edit: its id, the edit (for its file and listing) and what undoes it.
pub struct ServedEdit {
    pub id: u64,
    pub edit: Edit,
    pub applied: AppliedEdit,
}

/// What a client sees of an applied edit.
#[derive(Serialize)]
pub struct EditListing {
    pub id: u64,
    /// The method that made the edit (`rome`, `memit`, `alphaedit`, `emmet` or `ft` in JSON).
    pub method: loci_core::edit::EditMethod,
    pub layers: Vec<usize>,
    pub requests: Vec<loci_core::edit::RewriteRequest>,
    /// ‖ΔW‖ per layer.
    pub delta_norms: Vec<f32>,
}

impl ModelState {
    /// Records an edit already applied to the weights.
    pub fn record(&mut self, edit: Edit, applied: AppliedEdit) -> u64 {
        self.next_id += 1;
        self.version += 1;
        self.edits.push(ServedEdit {
            id: self.next_id,
            edit,
            applied,
        });
        self.next_id
    }

    /// Undoes the newest edit (edits stack: each one's undo restores the weights it replaced).
    pub fn pop(&mut self) -> loci_core::Result<Option<u64>> {
        let Some(e) = self.edits.pop() else {
            return Ok(None);
        };
        self.version += 1;
        self.lm.undo_edit(e.applied)?;
        Ok(Some(e.id))
    }

    pub fn listing(&self) -> Vec<EditListing> {
        listing(self.edits.iter().map(|e| (e.id, &e.edit)))
    }
}

/// What a client sees of edits `(id, edit)`.
pub fn listing<'a>(edits: impl Iterator<Item = (u64, &'a Edit)>) -> Vec<EditListing> {
    edits
        .map(|(id, e)| EditListing {
            id,
            method: e.method(),
            layers: e.layers(),
            requests: e.requests().into_iter().cloned().collect(),
            delta_norms: e.delta_norms(),
        })
        .collect()
}

/// The models the server names, each loaded on first use; requests name models, never paths.
pub struct Registry {
    models: BTreeMap<String, Entry>,
    dtype: DType,
    device: Device,
}

#[derive(Serialize)]
pub struct ModelListing {
    pub name: String,
    pub format: &'static str,
    pub size_bytes: u64,
    /// Where and in what precision the server runs it ("cpu"/"cuda", "f32"/"f16"/"bf16").
    pub device: String,
    pub dtype: String,
    pub loaded: bool,
    pub info: Option<ModelInfo>,
    /// Edits applied to the shared model, which every visitor sees (0 when not loaded).
    pub edits: usize,
    /// The files a browser downloads to run the model itself, from `/api/models/{name}/files/`.
    pub files: Vec<ModelFile>,
}

#[derive(Serialize)]
pub struct ModelFile {
    pub name: String,
    pub size_bytes: u64,
}

/// Where a model folder's files may really lie: the folder itself, and for a folder of a Hugging
/// Face cache (`…/snapshots/REV/`), its repository's `blobs/`, where the cache's links point.
fn allowed_roots(dir: &Path) -> Vec<PathBuf> {
    let Ok(dir) = dir.canonicalize() else {
        return vec![];
    };
    let mut roots = vec![dir.clone()];
    if let Some(repo) = dir
        .parent()
        .filter(|s| s.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(Path::parent)
    {
        roots.extend(repo.join("blobs").canonicalize());
    }
    roots
}

/// The files of a model a client may fetch: the .gguf itself, or a folder's config, tokenizer,
/// safetensors and shard index. Nothing else is ever served, and no link out of the folder.
fn model_files(p: &Path) -> Vec<(String, PathBuf, u64)> {
    let entry = |q: PathBuf| {
        let name = q.file_name()?.to_str()?.to_string();
        let size = q.metadata().ok()?.len();
        Some((name, q, size))
    };
    if p.is_file() {
        return entry(p.to_path_buf()).into_iter().collect();
    }
    let roots = allowed_roots(p);
    let inside = |q: &PathBuf| {
        q.canonicalize()
            .is_ok_and(|c| roots.iter().any(|r| c.starts_with(r)))
    };
    let mut v: Vec<_> = std::fs::read_dir(p)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|q| q.is_file())
                .filter(|q| {
                    let n = q.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    n == "config.json"
                        || n == "tokenizer.json"
                        || n == "model.safetensors.index.json"
                        || n.ends_with(".safetensors")
                })
                .filter(inside)
                .filter_map(entry)
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
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

/// A loaded model's shape, for estimates.
pub fn shape_of(lm: &LoadedModel) -> Shape {
    Shape {
        layers: lm.model.n_layer(),
        d_model: lm.model.cfg.d_model,
    }
}

impl Registry {
    /// Each path is a model, or a folder whose entries are models.
    pub fn discover(paths: &[PathBuf], dtype: DType, device: Device) -> Result<Self> {
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
        Ok(Self {
            models,
            dtype,
            device,
        })
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    pub fn names(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    pub fn listing(&self) -> Vec<ModelListing> {
        self.models
            .iter()
            .map(|(name, e)| {
                let loaded = e.loaded.lock().expect("registry lock").clone();
                let (info, edits) = match &loaded {
                    Some(m) => {
                        let st = m.state.read().unwrap_or_else(|p| p.into_inner());
                        (Some(st.lm.info.clone()), st.edits.len())
                    }
                    None => (None, 0),
                };
                ModelListing {
                    name: name.clone(),
                    format: if e.path.is_file() {
                        "gguf"
                    } else {
                        "safetensors"
                    },
                    size_bytes: e.size_bytes,
                    device: if self.device.is_cpu() { "cpu" } else { "cuda" }.to_string(),
                    dtype: format!("{:?}", self.dtype).to_lowercase(),
                    loaded: loaded.is_some(),
                    info,
                    edits,
                    files: model_files(&e.path)
                        .into_iter()
                        .map(|(name, _, size_bytes)| ModelFile { name, size_bytes })
                        .collect(),
                }
            })
            .collect()
    }

    /// The loaded models' names and shapes (without waiting for one being loaded).
    pub fn loaded_shapes(&self) -> Vec<(String, Shape)> {
        self.models
            .keys()
            .filter_map(|name| Some((name.clone(), self.shape_if_loaded(name)?)))
            .collect()
    }

    /// The shape of model `name` if it is loaded (without waiting for one being loaded).
    pub fn shape_if_loaded(&self, name: &str) -> Option<Shape> {
        let m = self.models.get(name)?.loaded.try_lock().ok()?.clone()?;
        let state = m.state.read().ok()?;
        Some(shape_of(&state.lm))
    }

    /// The path of a model's downloadable file, if `file` is one of them.
    pub fn file_path(&self, name: &str, file: &str) -> Option<PathBuf> {
        let e = self.models.get(name)?;
        model_files(&e.path)
            .into_iter()
            .find(|(n, _, _)| n == file)
            .map(|(_, p, _)| p)
    }

    /// The model called `name`, loading it on first use (blocking: call from a worker thread).
    pub fn get(&self, name: &str) -> Result<Option<Arc<ServedModel>>> {
        let Some(e) = self.models.get(name) else {
            return Ok(None);
        };
        let mut slot = e.loaded.lock().expect("registry lock");
        if let Some(m) = slot.as_ref() {
            return Ok(Some(m.clone()));
        }
        let lm = LoadedModel::load(&e.path, self.dtype, &self.device)?;
        let m = Arc::new(ServedModel {
            state: RwLock::new(ModelState {
                lm,
                edits: vec![],
                next_id: 0,
                version: 0,
            }),
        });
        *slot = Some(m.clone());
        Ok(Some(m))
    }
}
