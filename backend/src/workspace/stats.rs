//! Key statistics as the CLI and the server get them: read from a folder (one safetensors file
//! per layer), collected from a text corpus when missing (with a progress bar), and kept in
//! memory in one cache while they fit a budget.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use loci_core::edit::{KeyStats, StatsAccumulator, TokenBudget};
use loci_core::LoadedModel;

use super::known::cache_dir;

/// The corpus a benchmark reads: `given`, which must be a file (checked before any model is
/// made), or the Wikipedia sample.
pub fn corpus_file(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(c) if c.is_file() => Ok(c.to_path_buf()),
        Some(c) => anyhow::bail!("no corpus file at {}", c.display()),
        None => default_corpus(),
    }
}

/// The Wikipedia sample next to the project, when no corpus is named.
pub fn default_corpus() -> Result<PathBuf> {
    let candidates = [
        std::env::var_os("LOCI_DATA")
            .map(|d| PathBuf::from(d).join("wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl")),
        Some(PathBuf::from(
            "../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl",
        )),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .context("no corpus given and no Wikipedia sample found; pass --corpus FILE (JSONL with a \"text\" field)")
}

/// Streams texts from JSONL (`text` field) or plain text (paragraphs).
pub fn corpus_texts(path: &Path) -> Result<impl Iterator<Item = Result<String>>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("opening corpus {}", path.display()))?;
    let jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    let lines = std::io::BufReader::new(file).lines();
    let mut para = String::new();
    let mut lines = lines.peekable();
    Ok(std::iter::from_fn(move || loop {
        match lines.next() {
            None if !para.is_empty() => return Some(Ok(std::mem::take(&mut para))),
            None => return None,
            Some(Err(e)) => return Some(Err(e.into())),
            Some(Ok(line)) if jsonl => {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = match serde_json::from_str(&line) {
                    Ok(v) => v,
                    Err(e) => return Some(Err(anyhow::anyhow!("bad JSONL line: {e}"))),
                };
                match v.get("text").and_then(|t| t.as_str()) {
                    Some(t) => return Some(Ok(t.to_string())),
                    None => {
                        return Some(Err(anyhow::anyhow!("a JSONL line has no \"text\" field")))
                    }
                }
            }
            Some(Ok(line)) => {
                if line.trim().is_empty() {
                    if !para.is_empty() {
                        return Some(Ok(std::mem::take(&mut para)));
                    }
                } else {
                    para.push_str(&line);
                    para.push('\n');
                }
            }
        }
    }))
}

/// Feeds corpus texts to `acc`, one per worker thread at a time, until it has seen exactly
/// `tokens` tokens (the text that crosses the mark is cut there), whatever the thread count (so
/// statistics do not depend on the machine that computed them). `progress` hears each pass's
/// tokens; `false` from it stops the feeding there.
pub fn feed(
    acc: &mut StatsAccumulator,
    lm: &LoadedModel,
    corpus: &Path,
    tokens: u64,
    mut progress: impl FnMut(usize) -> bool,
) -> Result<()> {
    let mut texts = corpus_texts(corpus)?;
    let mut budget = TokenBudget::new(tokens.saturating_sub(acc.tokens()));
    while !budget.spent() {
        let mut chunk = vec![];
        while chunk.len() < loci_core::threads::workers() && !budget.spent() {
            let Some(text) = texts.next() else { break };
            let text = text?;
            let cut = budget.take(acc.text_tokens(lm, &text)?);
            chunk.push((text, cut));
        }
        if chunk.is_empty() {
            break;
        }
        let cut: Vec<(&str, usize)> = chunk.iter().map(|(t, n)| (t.as_str(), *n)).collect();
        if !progress(acc.add_texts_cut(lm, &cut)?) {
            break;
        }
    }
    Ok(())
}

/// The statistics folder: `out`, or the model's cache folder.
pub fn stats_dir(lm: &LoadedModel, out: Option<&Path>) -> PathBuf {
    out.map(Path::to_path_buf)
        .unwrap_or_else(|| cache_dir(lm).join("stats"))
}

/// A layer's statistics file; those collected with the maps in bf16 (`--products bf16`: the
/// keys from bf16 products) are kept apart from f32's.
fn stats_file(dir: &Path, layer: usize) -> PathBuf {
    match loci_core::kernels::gemm::maps_precision() {
        loci_core::kernels::gemm::Precision::F32 => dir.join(format!("layer{layer}.safetensors")),
        loci_core::kernels::gemm::Precision::Bf16 => {
            dir.join(format!("layer{layer}.bf16-maps.safetensors"))
        }
    }
}

/// Collects statistics for `layers`, writing one file per layer; layers already there are kept.
pub fn collect(
    lm: &LoadedModel,
    layers: &[usize],
    corpus: &Path,
    tokens: u64,
    max_len: usize,
    dir: &Path,
) -> Result<()> {
    let pb = super::bar(
        tokens,
        "key statistics {bar:40} {pos}/{len} tokens ({per_sec}) [{elapsed_precise} < {eta}]",
    );
    let mut done = 0;
    collect_heard(lm, layers, (corpus, tokens, max_len), dir, &mut |n| {
        pb.inc(n);
        done += n;
        super::tell("key statistics", done, tokens)
    })?;
    pb.finish_and_clear();
    Ok(())
}

/// [`collect`], telling `heard` the tokens of each pass as they are taken in; `false` from it
/// stops the collection before any file is written.
pub fn collect_heard(
    lm: &LoadedModel,
    layers: &[usize],
    (corpus, tokens, max_len): (&Path, u64, usize),
    dir: &Path,
    heard: &mut dyn FnMut(u64) -> bool,
) -> Result<()> {
    let missing: Vec<usize> = layers
        .iter()
        .copied()
        .filter(|&l| !stats_file(dir, l).exists())
        .collect();
    if missing.is_empty() {
        eprintln!(
            "statistics for layers {layers:?} are already in {}",
            dir.display()
        );
        return Ok(());
    }
    if tokens == 0 {
        bail!("--tokens must be positive");
    }
    let mut acc = StatsAccumulator::new(lm, &missing, max_len)?;
    let mut going = true;
    feed(&mut acc, lm, corpus, tokens, |n| {
        going = going && heard(n as u64);
        going
    })?;
    if !going {
        bail!(loci_core::LociError::Cancelled);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for s in acc.finish(lm, &corpus.display().to_string())? {
        let f = stats_file(dir, s.provenance.layer);
        // Whole or not at all: a reader sharing the folder (another task of an array job) or
        // a rerun after a kill never sees half a file.
        super::write_atomic(&f, &s.to_bytes()?)?;
        eprintln!(
            "layer {}: {} tokens → {}",
            s.provenance.layer,
            s.provenance.tokens,
            f.display()
        );
    }
    Ok(())
}

thread_local! {
    static UNEDITED: std::cell::RefCell<Option<LoadedModel>> = const { std::cell::RefCell::new(None) };
}

/// Runs `work` with the key statistics it computes taken from `unedited`, the model before the
/// edits applied to the one it works on (`--apply-edit`, a Python model's edits): statistics
/// describe the model as its files hold it, and are cached under its fingerprint, so keys read
/// through an edited layer would poison later edits. The previous model is back afterwards.
pub fn with_unedited<T>(unedited: Option<LoadedModel>, work: impl FnOnce() -> T) -> T {
    struct Restore(Option<LoadedModel>);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNEDITED.with(|u| *u.borrow_mut() = self.0.take());
        }
    }
    let _before = Restore(UNEDITED.with(|u| u.replace(unedited)));
    work()
}

/// Keeps `unedited` as the model this thread's statistics are computed on, for the rest of a
/// command (`--apply-edit`: the edits applied at load).
pub fn keep_unedited(unedited: LoadedModel) {
    UNEDITED.with(|u| *u.borrow_mut() = Some(unedited));
}

/// The model statistics of `lm` are computed on: its unedited self when one was given.
pub fn statistics_model(lm: &LoadedModel) -> LoadedModel {
    UNEDITED
        .with(|u| u.borrow().clone())
        .filter(|u| u.info.fingerprint == lm.info.fingerprint)
        .unwrap_or_else(|| lm.clone())
}

/// Where an edit's key statistics come from: a folder, filled from a corpus when missing.
#[derive(clap::Args, Debug, Clone)]
pub struct StatsSource {
    /// Folder with key statistics (default: the model's cache; computed there when missing).
    #[arg(long = "stats")]
    pub dir: Option<PathBuf>,
    /// Corpus for statistics computed on the way.
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    #[arg(long, default_value_t = 100_000)]
    pub stats_tokens: u64,
}

impl StatsSource {
    /// The statistics of `layer`, computing and caching them first if needed.
    pub fn ensure(&self, lm: &LoadedModel, layer: usize) -> Result<KeyStats> {
        Ok(self.ensure_layers(lm, &[layer])?.remove(0))
    }

    /// The statistics of several layers; the missing ones are collected in one pass.
    pub fn ensure_layers(&self, lm: &LoadedModel, layers: &[usize]) -> Result<Vec<KeyStats>> {
        let dir = self.collect_missing(lm, layers)?;
        layers.iter().map(|&l| load_stats(lm, &dir, l)).collect()
    }

    /// Collects the statistics of the layers that have none yet, in one pass, without loading
    /// any; returns their folder.
    pub fn collect_missing(&self, lm: &LoadedModel, layers: &[usize]) -> Result<PathBuf> {
        let dir = stats_dir(lm, self.dir.as_deref());
        if layers.iter().any(|&l| !stats_file(&dir, l).exists()) {
            let corpus = match &self.corpus {
                Some(c) => c.clone(),
                None => default_corpus()?,
            };
            let lm = statistics_model(lm);
            collect(&lm, layers, &corpus, self.stats_tokens, 1024, &dir)?;
        }
        Ok(dir)
    }
}

pub fn load_stats(lm: &LoadedModel, dir: &Path, layer: usize) -> Result<KeyStats> {
    let f = stats_file(dir, layer);
    let bytes = std::fs::read(&f).with_context(|| format!("reading statistics {}", f.display()))?;
    let s = KeyStats::from_bytes(&bytes).with_context(|| format!("in {}", f.display()))?;
    s.check_fits(lm, layer)?;
    Ok(s)
}

/// Key statistics kept in memory after first use (with their Cholesky factors: later edits at
/// those layers neither read the files nor factor again), per model and layer: the one cache of
/// the CLI's study and the server. Missing ones come from the source, computed in one pass over
/// the corpus when their files are missing too.
pub struct StatsCache {
    /// Where statistics come from.
    pub source: StatsSource,
    kept: std::sync::Mutex<HashMap<StatsKey, KeyStats>>,
}

/// A model's name and fingerprint, and a layer.
type StatsKey = (String, String, usize);

/// Memory the kept statistics may take: two d_ff² f64 matrices per layer (sums and factor).
const BUDGET_BYTES: u64 = 4 << 30;

impl StatsCache {
    /// An empty cache over `source`.
    pub fn new(source: StatsSource) -> Self {
        Self {
            source,
            kept: Default::default(),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<StatsKey, KeyStats>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The statistics of `layers` of `lm` (kept per model name and fingerprint). The lock is
    /// not held while statistics are read or computed; when the new ones would exceed the
    /// memory budget, the kept ones are dropped first (the ones asked for stay in hand:
    /// statistics share their data between clones).
    pub fn get(&self, lm: &LoadedModel, layers: &[usize]) -> Result<Vec<KeyStats>> {
        let key = |l: usize| (lm.name.clone(), lm.info.fingerprint.clone(), l);
        let mut found: HashMap<usize, KeyStats> = HashMap::new();
        let mut missing = vec![];
        {
            let kept = self.kept();
            for &l in layers {
                match kept.get(&key(l)) {
                    Some(s) => {
                        found.insert(l, s.clone());
                    }
                    None => missing.push(l),
                }
            }
        }
        if !missing.is_empty() {
            let d_ff = lm.model.cfg.d_ff as u64;
            let max_kept = (BUDGET_BYTES / (16 * d_ff * d_ff)).max(5) as usize;
            {
                let mut kept = self.kept();
                if kept.len() + missing.len() > max_kept {
                    kept.clear();
                }
            }
            let loaded = self.source.ensure_layers(lm, &missing)?;
            let mut kept = self.kept();
            for (&l, s) in missing.iter().zip(loaded) {
                kept.insert(key(l), s.clone());
                found.insert(l, s);
            }
        }
        Ok(layers.iter().map(|l| found[l].clone()).collect())
    }
}
