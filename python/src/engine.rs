//! `Engine`: one loaded model and the stack of edits applied to it, with the core's work on it
//! run with the GIL released. Each method returns the JSON the CLI prints for the same work.

use std::path::PathBuf;

use loci_backend::cli::{edit::default_edit_layers, embedded};
use loci_backend::workspace::{
    cached_embedding_std, collect_heard, default_corpus, stats_dir, trace_workers,
    with_hidden_bars, with_unedited, StatsSource,
};
use loci_core::edit::{
    AppliedEdit, Edit, EditMethod, EditReport, MemitReport, Preserved, Probes, RewriteRequest,
    TargetStr,
};
use loci_core::trace::{NoiseSpec, TraceHeader, TraceKind, TraceMethod, TraceObserver};
use loci_core::{DType, Device, LoadedModel, Sampling, TraceRequest};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use serde::Deserialize;

use crate::errors::{json, to_json, LociError, LociFileNotFoundError, OrPy};
use crate::heed::{as_heard, finish, hearing_steps, Heed};
use crate::settings::{hparams, Hparams};

/// Threads as the CLI runs its long commands: the work spread over one worker per core, each
/// matrix product on one thread (unless `RAYON_NUM_THREADS` says otherwise; set at import,
/// before any thread of ours exists); on a GPU build one worker, the device running the batches.
pub fn init_threads() {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _ = loci_backend::workspace::WORKERS.set(n);
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    loci_core::threads::set_workers(if cfg!(feature = "cuda") { 1 } else { n });
}

/// A loaded model and the edits applied to it, newest last, each with its number (Python's
/// `Edit` handle: numbers are never reused, so a handle cannot undo another edit).
#[pyclass(module = "loci._loci")]
pub struct Engine {
    lm: LoadedModel,
    stack: Vec<Applied>,
    next_id: u64,
}

/// An applied edit: its number, the edit, and what undoes it.
struct Applied {
    id: u64,
    edit: Edit,
    undo: AppliedEdit,
}

/// One fact to write, as Python gives it.
#[derive(Deserialize)]
struct Fact {
    prompt: String,
    subject: String,
    target: String,
    #[serde(default)]
    target_true: Option<String>,
}

/// Where key statistics come from: a folder (default: the model's cache), filled from a
/// corpus (default: the Wikipedia sample) with this many tokens when missing.
#[derive(Deserialize, Default)]
struct StatsFrom {
    dir: Option<PathBuf>,
    corpus: Option<PathBuf>,
    tokens: Option<u64>,
}

impl StatsFrom {
    fn source(self) -> StatsSource {
        StatsSource {
            dir: self.dir,
            corpus: self.corpus,
            stats_tokens: self.tokens.unwrap_or(100_000),
        }
    }
}

fn dtype(name: &str) -> PyResult<DType> {
    Ok(match name {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        _ => {
            return Err(LociError::new_err(format!(
                "dtype {name:?}: use f32, f16 or bf16"
            )))
        }
    })
}

fn device(name: &str) -> PyResult<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Device::new_cuda(0).or_py(),
        "cuda" => Err(LociError::new_err(
            "this build of loci has no CUDA: build it with `maturin build --features cuda`",
        )),
        _ => Err(LociError::new_err(format!(
            "device {name:?}: use cpu or cuda"
        ))),
    }
}

/// The trace's rows, heard one by one.
struct Rows {
    heed: std::rc::Rc<std::cell::RefCell<Heed>>,
    total: u64,
    done: u64,
}

impl TraceObserver for Rows {
    fn on_start(&mut self, header: &TraceHeader) {
        self.total = header.total_rows as u64;
    }
    fn on_row(&mut self, kind: TraceKind, token: usize, _: &[f32]) -> bool {
        self.done += 1;
        let what = format!("{} token {token}", kind.name());
        self.heed
            .borrow_mut()
            .step(self.done, self.total, &what, None)
    }
}

#[pymethods]
impl Engine {
    /// Loads a Hugging Face folder or a .gguf file.
    #[staticmethod]
    #[pyo3(signature = (path, device="cpu", dtype="f32"))]
    fn load(py: Python<'_>, path: PathBuf, device: &str, dtype: &str) -> PyResult<Engine> {
        let (dtype, device) = (self::dtype(dtype)?, self::device(device)?);
        if !path.exists() {
            return Err(LociFileNotFoundError::new_err(format!(
                "no model at {}",
                path.display()
            )));
        }
        let lm = py
            .detach(|| LoadedModel::load(&path, dtype, &device))
            .or_py()?;
        Ok(Engine {
            lm,
            stack: vec![],
            next_id: 1,
        })
    }

    /// The model's name, shape and origin (JSON).
    fn info(&self) -> PyResult<String> {
        let m = &self.lm.model;
        to_json(&serde_json::json!({
            "name": self.lm.name,
            "info": self.lm.info,
            "n_layer": m.n_layer(),
            "d_model": m.cfg.d_model,
            "d_ff": m.cfg.d_ff,
            "edits": self.stack.len(),
        }))
    }

    /// The `top` most likely next tokens (the CLI's `predict --json`).
    fn predict(&self, py: Python<'_>, prompt: &str, top: usize) -> PyResult<String> {
        let p = py.detach(|| self.lm.predict(prompt, top)).or_py()?;
        to_json(&p)
    }

    /// A continuation: greedy, or sampled among the `top_k` most likely (`generate --json`).
    #[pyo3(signature = (prompt, max_new_tokens, top_k=None, seed=0))]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &str,
        max_new_tokens: usize,
        top_k: Option<usize>,
        seed: u64,
    ) -> PyResult<String> {
        let sampling = match top_k {
            Some(k) => Sampling::TopK { k, seed },
            None => Sampling::Greedy,
        };
        let g = py
            .detach(|| self.lm.generate(prompt, max_new_tokens, sampling))
            .or_py()?;
        to_json(&g)
    }

    /// Token ids and their strings, as the model reads `text`.
    fn tokenize(&self, text: &str) -> PyResult<(Vec<u32>, Vec<String>)> {
        let ids = self.lm.tokenizer.encode(text).or_py()?;
        let strings = self.lm.tokenizer.token_strings(&ids).or_py()?;
        Ok((ids, strings))
    }

    /// The text of token ids (special tokens included).
    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        let vocab = self.lm.tokenizer.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(LociError::new_err(format!(
                "token id {bad} is outside the vocabulary ({vocab} tokens)"
            )));
        }
        self.lm.tokenizer.decode(&ids).or_py()
    }

    /// Causal tracing (or attribution patching) of one fact (`trace --json`).
    #[pyo3(signature = (prompt, subject, kinds, samples, window, noise, answer, full_answer, seed, method, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn trace(
        &self,
        py: Python<'_>,
        prompt: String,
        subject: String,
        kinds: Vec<String>,
        samples: usize,
        window: usize,
        noise: &str,
        answer: Option<String>,
        full_answer: bool,
        seed: u64,
        method: &str,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<String> {
        let kinds = kinds
            .iter()
            .map(|k| k.parse::<TraceKind>())
            .collect::<Result<Vec<_>, _>>()
            .or_py()?;
        let req = TraceRequest {
            prompt,
            subject,
            answer,
            kinds,
            samples,
            window,
            noise: noise.parse::<NoiseSpec>().or_py()?,
            seed,
            full_answer,
        };
        let method: TraceMethod = method.parse().or_py()?;
        let lm = &self.lm;
        py.detach(move || {
            let heed = Heed::new(progress);
            let out = (|| -> anyhow::Result<String> {
                let std = match req.noise {
                    NoiseSpec::Relative(_) => Some(cached_embedding_std(lm, None)?),
                    _ => None,
                };
                let mut rows = Rows {
                    heed: heed.clone(),
                    total: 0,
                    done: 0,
                };
                let workers = trace_workers(&lm.model.device);
                let r = lm.trace_by(method, &req, std, &mut rows, workers)?;
                Ok(serde_json::to_string(&r)?)
            })();
            finish(&heed, out)
        })
    }

    /// ROME's default layer and MEMIT's default layers: where statistics are needed.
    fn default_layers(&self) -> PyResult<Vec<usize>> {
        default_edit_layers(&self.lm).or_py()
    }

    /// Key statistics of `layers` from `corpus`, written to `out` (default: the model's cache,
    /// where edits look); layers already there are kept. Computed on the model as its files
    /// hold it, whatever edits are applied. Returns the folder.
    #[pyo3(signature = (layers, corpus=None, tokens=100_000, max_len=1024, out=None, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn stats(
        &self,
        py: Python<'_>,
        layers: Vec<usize>,
        corpus: Option<PathBuf>,
        tokens: u64,
        max_len: usize,
        out: Option<PathBuf>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<String> {
        let lm = &self.unedited().or_py()?;
        py.detach(move || {
            let heed = Heed::new(progress);
            let out = (|| -> anyhow::Result<String> {
                let corpus = match corpus {
                    Some(c) => c,
                    None => default_corpus()?,
                };
                let dir = stats_dir(lm, out.as_deref());
                let mut done = 0;
                with_hidden_bars(None, || {
                    collect_heard(lm, &layers, (&corpus, tokens, max_len), &dir, &mut |n| {
                        done += n;
                        heed.borrow_mut().step(done, tokens, "key statistics", None)
                    })
                })?;
                Ok(dir.display().to_string())
            })();
            finish(&heed, out)
        })
    }

    /// Edits `facts` (JSON list of {prompt, subject, target, target_true?}) by `method` and
    /// keeps the edit applied; returns its report (`edit --json`), its file's bytes and its
    /// number.
    #[pyo3(signature = (method, facts, layer, layers, settings, stats, probes, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn edit<'py>(
        &mut self,
        py: Python<'py>,
        method: &str,
        facts: &str,
        layer: Option<usize>,
        layers: Vec<usize>,
        settings: &str,
        stats: &str,
        probes: &str,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<(String, Bound<'py, PyBytes>, u64)> {
        let method: EditMethod = method.parse().or_py()?;
        let facts: Vec<Fact> = json(facts, "the facts")?;
        let settings = json(settings, "the settings")?;
        let source = json::<StatsFrom>(stats, "the statistics' source")?.source();
        let probes: Probes = json(probes, "the probes")?;
        let hp = hparams(&self.lm, method, layer, &layers, settings).or_py()?;
        let reqs = self.requests(method, facts)?;
        let unedited = self.unedited().or_py()?;
        let id = self.next_id;
        let Engine { lm, stack, .. } = self;
        let (report, file) = py.detach(|| {
            let heed = Heed::new(progress);
            let started = std::time::Instant::now();
            let out = hearing_steps(&heed, || {
                with_hidden_bars(Some(as_heard(&heed)), || {
                    with_unedited(Some(unedited), || {
                        edit_with(lm, stack, hp, reqs, &source, &probes)
                    })
                })
            });
            // Kept only whole: with its file and report made, and no Ctrl-C since the last
            // step; else undone.
            let out = out.and_then(|(edit, undo, report)| {
                let whole = (|| {
                    let file = edit.to_file(lm)?;
                    if heed.borrow_mut().interrupted() {
                        anyhow::bail!(loci_core::LociError::Cancelled);
                    }
                    Ok((report.json(started.elapsed().as_secs_f64())?, file))
                })();
                match whole {
                    Ok(kept) => {
                        stack.push(Applied { id, edit, undo });
                        Ok(kept)
                    }
                    Err(err) => {
                        lm.undo_edit(undo)?;
                        Err(err)
                    }
                }
            });
            finish(&heed, out)
        })?;
        self.next_id += 1;
        Ok((report, PyBytes::new(py, &file), id))
    }

    /// Undoes the newest edit (or edit number `id`, which must be the newest), bit for bit;
    /// `false` when there is none (or `id` is no longer applied).
    #[pyo3(signature = (id=None))]
    fn undo(&mut self, id: Option<u64>) -> PyResult<bool> {
        if self.stack.is_empty() {
            return Ok(false);
        }
        if let Some(id) = id {
            match self.position(id) {
                None => return Ok(false),
                Some(i) if i + 1 < self.stack.len() => {
                    return Err(LociError::new_err(format!(
                        "undo the {} later edits first",
                        self.stack.len() - 1 - i
                    )))
                }
                Some(_) => {}
            }
        }
        let newest = self.stack.last().expect("checked: not empty");
        self.lm.undo_edit(newest.undo.clone()).or_py()?;
        self.stack.pop();
        Ok(true)
    }

    /// Where edit number `id` is in the stack (0: the oldest), if it is applied.
    fn position(&self, id: u64) -> Option<usize> {
        self.stack.iter().position(|a| a.id == id)
    }

    /// How many edits are applied.
    fn edits(&self) -> usize {
        self.stack.len()
    }

    /// Applies a saved edit (`loci edit --save-edit`'s file, or `Edit.save`'s); returns what
    /// it holds (method, layers, requests, ‖ΔW‖ per layer) as JSON, and its number.
    fn apply_file(&mut self, data: &[u8]) -> PyResult<(String, u64)> {
        let (edit, undo) = self.lm.apply_file(data).or_py()?;
        let summary = serde_json::json!({
            "method": edit.method(),
            "layers": edit.layers(),
            "requests": edit.requests(),
            "delta_norms": edit.delta_norms(),
        });
        let id = self.next_id;
        self.next_id += 1;
        self.stack.push(Applied { id, edit, undo });
        Ok((to_json(&summary)?, id))
    }

    /// Layer `layer`'s MLP down-projection (the matrix ROME rewrites) as f32 bytes, with its
    /// shape `[d_model, d_ff]`.
    fn down_proj<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
    ) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
        let w = (|| -> anyhow::Result<(Vec<f32>, usize, usize)> {
            let w = &self.lm.model.down_proj(layer)?.weight;
            let (rows, cols) = w.dims2()?;
            let v = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok((v, rows, cols))
        })()
        .or_py()?;
        let bytes: Vec<u8> = w.0.iter().flat_map(|x| x.to_le_bytes()).collect();
        Ok((PyBytes::new(py, &bytes), w.1, w.2))
    }

    /// Runs a `loci eval …` or `loci study run …` command line on a copy of this model (with
    /// its edits); returns the JSON it prints. The model itself never changes.
    #[pyo3(signature = (argv, progress=None))]
    fn run_command(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Vec<String>> {
        let held = (
            self.lm.clone(),
            self.stack.iter().map(|a| a.edit.clone()).collect(),
        );
        let unedited = self.unedited().or_py()?;
        with_unedited(Some(unedited), || run_heard(py, Some(held), argv, progress))
    }
}

impl Engine {
    /// The model without its edits (a copy: weights are shared, the edited matrices swapped
    /// back), where key statistics are computed.
    fn unedited(&self) -> anyhow::Result<LoadedModel> {
        let mut lm = self.lm.clone();
        for a in self.stack.iter().rev() {
            lm.undo_edit(a.undo.clone())?;
        }
        Ok(lm)
    }

    /// The facts as complete requests (the true target read off the model where not given);
    /// several only for the MEMIT family.
    fn requests(&self, method: EditMethod, facts: Vec<Fact>) -> PyResult<Vec<RewriteRequest>> {
        let reqs = facts
            .into_iter()
            .map(|f| {
                let mut r = RewriteRequest::from_prompt(&f.prompt, &f.subject, &f.target)?;
                r.target_true = f.target_true.map(TargetStr::new);
                self.lm.complete_request(r)
            })
            .collect::<Result<Vec<_>, _>>()
            .or_py()?;
        if reqs.is_empty() {
            return Err(LociError::new_err("no fact to edit"));
        }
        if reqs.len() > 1 && !method.takes_many_facts() {
            return Err(LociError::new_err(format!(
                "{} edits one fact at a time ({} given); use memit, alphaedit or emmet to \
                 edit them together",
                method.label(),
                reqs.len()
            )));
        }
        Ok(reqs)
    }
}

/// `argv` run by the CLI's code on `held`, its optimisation steps heard.
fn run_heard(
    py: Python<'_>,
    held: Option<(LoadedModel, Vec<Edit>)>,
    argv: Vec<String>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Vec<String>> {
    py.detach(move || {
        let heed = Heed::new(progress);
        let out = hearing_steps(&heed, || {
            embedded::run_on(held, &argv, Some(as_heard(&heed)))
        });
        finish(&heed, out)
    })
}

/// A command line that needs no model (`study analyze`).
pub fn run_without_model(py: Python<'_>, argv: Vec<String>) -> PyResult<Vec<String>> {
    run_heard(py, None, argv, None)
}

/// An edit's report: one fact's (ROME, fine-tuning) or the MEMIT family's.
enum Report {
    One(Box<EditReport>),
    Many(MemitReport),
}

impl Report {
    /// The report as `loci edit --json` prints it, with the call's time.
    fn json(self, seconds: f64) -> serde_json::Result<String> {
        match self {
            Report::One(mut r) => {
                r.seconds = seconds;
                serde_json::to_string(&r)
            }
            Report::Many(mut r) => {
                r.seconds = seconds;
                serde_json::to_string(&r)
            }
        }
    }
}

/// The edit of `reqs` by `hp` on `lm` (statistics from `source`; AlphaEdit keeps the keys of
/// the `stack`'s edits), applied, and its report.
fn edit_with(
    lm: &mut LoadedModel,
    stack: &[Applied],
    hp: Hparams,
    mut reqs: Vec<RewriteRequest>,
    source: &StatsSource,
    probes: &Probes,
) -> anyhow::Result<(Edit, AppliedEdit, Report)> {
    Ok(match hp {
        Hparams::Rome(hp) => {
            let stats = source.ensure(lm, hp.layer)?;
            let (e, applied, r) = lm.rome_with_report(reqs.remove(0), &hp, Some(&stats), probes)?;
            (Edit::Rome(e), applied, Report::One(Box::new(r)))
        }
        Hparams::Ft(hp) => {
            let (e, applied, r) = lm.ft_with_report(reqs.remove(0), &hp, probes)?;
            (Edit::Ft(e), applied, Report::One(Box::new(r)))
        }
        Hparams::Grace(hp) => {
            let (e, applied, r) = lm.grace_with_report(reqs.remove(0), &hp, probes)?;
            (Edit::Grace(e), applied, Report::One(Box::new(r)))
        }
        Hparams::Memit(hp) => {
            let stats = source.ensure_layers(lm, &hp.layers)?;
            let earlier: Vec<Edit> = stack.iter().map(|a| a.edit.clone()).collect();
            let preserved = Preserved::of(&earlier);
            let (e, applied, r) =
                lm.memit_with_report(reqs, &hp, &stats, &preserved, probes, &mut |_| {})?;
            (Edit::Memit(e), applied, Report::Many(r))
        }
    })
}
