//! The bundled known facts (ROME's known_1000.json), the per-model cache folder, and the
//! subject-embedding std that relative tracing noise is measured in, cached there.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use loci_core::trace::embedding_std;
use loci_core::LoadedModel;
use serde::{Deserialize, Serialize};

/// One of ROME's known facts.
#[derive(Deserialize)]
pub struct KnownFact {
    /// The subject, as it appears in the prompt.
    pub subject: String,
    /// The prompt, ending before the answer.
    pub prompt: String,
    /// The answer.
    pub attribute: String,
}

/// ROME's known_1000.json (MIT), bundled so the default noise needs no data folder.
const KNOWN_1000: &str = include_str!("../../../static/data/known_1000.json");

/// The subjects of a known_1000-style file (default: the bundled copy), and the file's name.
pub fn known_subjects(known: Option<&Path>) -> Result<(String, Vec<String>)> {
    let facts: Vec<KnownFact> = match known {
        Some(p) => read_facts(p)?,
        None => bundled_facts(),
    };
    let name = known.map_or_else(
        || "bundled known_1000.json".to_string(),
        |p| p.display().to_string(),
    );
    Ok((name, facts.into_iter().map(|f| f.subject).collect()))
}

/// The bundled known facts.
pub fn bundled_facts() -> Vec<KnownFact> {
    serde_json::from_str(KNOWN_1000).expect("bundled known_1000.json parses")
}

/// The bundled facts as sentences ("prompt attribute"): a corpus that needs no data folder.
pub fn bundled_fact_texts() -> Vec<String> {
    bundled_facts()
        .into_iter()
        .map(|f| format!("{}{}.", f.prompt, f.attribute))
        .collect()
}

/// The bundled facts' prompts ("Vinson Massif is located in the continent of"): requests that
/// differ, as strangers' would.
pub fn bundled_fact_prompts() -> Vec<String> {
    bundled_facts().into_iter().map(|f| f.prompt).collect()
}

/// The facts of a known_1000-style JSON file.
pub fn read_facts(path: &Path) -> Result<Vec<KnownFact>> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a known_1000-style JSON list", path.display()))
}

/// Per-model cache folder (`$LOCI_CACHE` or `~/.cache/loci`), keyed by the model's fingerprint.
pub fn cache_dir(lm: &LoadedModel) -> PathBuf {
    let base = std::env::var_os("LOCI_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/loci")))
        .unwrap_or_else(|| PathBuf::from(".loci-cache"));
    base.join(format!("{}-{}", lm.name, lm.info.fingerprint))
}

#[derive(Serialize, Deserialize)]
struct NoiseCache {
    subjects_file: String,
    embedding_std: f64,
}

/// The subject-embedding std of this model, computed once and cached per model.
pub fn cached_embedding_std(lm: &LoadedModel, known: Option<&Path>) -> Result<f64> {
    let (name, subjects) = known_subjects(known)?;
    let file = cache_dir(lm).join("embedding_std.json");
    let cached = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice::<NoiseCache>(&b).ok());
    if let Some(c) = cached.filter(|c| c.subjects_file == name) {
        return Ok(c.embedding_std);
    }
    let std = embedding_std(lm, &subjects)?;
    // The cache only saves time: failing to write it is not an error.
    if std::fs::create_dir_all(file.parent().expect("cache file has a folder")).is_ok() {
        let cache = NoiseCache {
            subjects_file: name,
            embedding_std: std,
        };
        let _ = super::write_atomic(&file, serde_json::to_string(&cache)?.as_bytes());
    }
    Ok(std)
}
