//! A model worker: holds one model copy and runs jobs on it off the page's thread. Every message
//! gets one answer (an edit's steps stream before it). Trace rows and statistics texts come a
//! few at a time, so the page spreads them over the pool and can stop between them.

use std::cell::RefCell;
use std::collections::HashMap;

use loci_core::edit::{
    AppliedEdit, Edit, EditMethod, EditReport, Floats, FtHparams, GraceHparams, KeyStats,
    MemitHparams, MemitReport, Preserved, Probes, RomeHparams, RomeRun, Share, StatsAccumulator,
    UpdateRule,
};
use loci_core::study::{StudyConfig, StudyLine, StudyObserver};
use loci_core::trace::{Quiet, TracePlan};
use loci_core::{DType, Device, LoadedModel};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{DedicatedWorkerGlobalScope, MessageEvent};

use crate::files::{bytes, now_ms};
use crate::protocol::{decode, encode, Bytes, EditJob, FileRef, FromWorker, StudyJob, ToWorker};

#[derive(Default)]
pub struct ModelWorker {
    model: Option<LoadedModel>,
    /// Spread of subject-token embeddings (relative trace noise), made at load.
    embedding_std: Option<f64>,
    plans: HashMap<u64, TracePlan>,
    /// Applied edits, newest last, with what undoes each (the weights it replaced); later
    /// AlphaEdit edits keep the keys the earlier ones record.
    edits: Vec<(Edit, AppliedEdit)>,
    /// Key statistics per layer, for ROME and MEMIT.
    stats: HashMap<usize, KeyStats>,
    /// Statistics being collected.
    collecting: Option<StatsAccumulator>,
    /// A ROME edit whose v* the workers share, and its probes, between the page's steps.
    rome_run: Option<(RomeRun, Probes)>,
}

thread_local! {
    static WORKER: RefCell<ModelWorker> = RefCell::new(ModelWorker::default());
}

fn scope() -> DedicatedWorkerGlobalScope {
    js_sys::global().unchecked_into()
}

/// Posts a message to the page (also in the middle of a job: an edit's steps).
pub fn post(msg: &FromWorker) {
    let _ = scope().post_message(&JsValue::from_str(&encode(msg)));
}

/// Starts taking the page's messages and tells the page so.
pub fn start() {
    let on_message = Closure::<dyn FnMut(MessageEvent)>::new(|e: MessageEvent| {
        let text = e.data().as_string().unwrap_or_default();
        match decode::<ToWorker>(&text) {
            Ok(msg) => received(msg),
            Err(message) => post(&FromWorker::Error { message }),
        }
    });
    scope().set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    on_message.forget();
    post(&FromWorker::Ready);
}

fn received(msg: ToWorker) {
    if let ToWorker::Load {
        name,
        files,
        subjects_url,
    } = msg
    {
        // Free the old model before the new one's bytes arrive.
        WORKER.with(|w| *w.borrow_mut() = ModelWorker::default());
        let started = now_ms();
        wasm_bindgen_futures::spawn_local(async move {
            let out = match load(name, files, subjects_url).await {
                Ok((m, std)) => {
                    let info = m.info.clone();
                    WORKER.with(|w| {
                        let mut w = w.borrow_mut();
                        w.model = Some(m);
                        w.embedding_std = std;
                    });
                    FromWorker::Loaded {
                        info,
                        seconds: (now_ms() - started) / 1e3,
                    }
                }
                Err(message) => FromWorker::Error { message },
            };
            post(&out);
        });
        return;
    }
    if let ToWorker::TraceDrop { job } = msg {
        // Nothing to answer: the page has stopped listening to this trace.
        WORKER.with(|w| w.borrow_mut().plans.remove(&job));
        return;
    }
    let out = WORKER.with(|w| w.borrow_mut().run(msg));
    post(&out.unwrap_or_else(|message| FromWorker::Error { message }));
}

async fn load(
    name: String,
    files: Vec<FileRef>,
    subjects_url: String,
) -> Result<(LoadedModel, Option<f64>), String> {
    let find = |n: &str| files.iter().find(|f| f.name == n);
    let lm = if let Some(g) = files.iter().find(|f| f.name.ends_with(".gguf")) {
        let b = bytes(&g.url).await?;
        LoadedModel::from_gguf_bytes(&name, &b, DType::F32, &Device::Cpu)
    } else {
        let (Some(cfg), Some(tok)) = (find("config.json"), find("tokenizer.json")) else {
            return Err("the model has no config.json and tokenizer.json".into());
        };
        let (cfg, tok) = (bytes(&cfg.url).await?, bytes(&tok.url).await?);
        // The shards the disk loader reads: model.safetensors alone when there is one, else
        // every shard in name order (so the fingerprint is the one `loci` computes).
        let single: Vec<&FileRef> = files
            .iter()
            .filter(|f| f.name == "model.safetensors")
            .collect();
        let mut names: Vec<&FileRef> = if single.is_empty() {
            files
                .iter()
                .filter(|f| f.name.ends_with(".safetensors"))
                .collect()
        } else {
            single
        };
        names.sort_by(|a, b| a.name.cmp(&b.name));
        let mut shards = vec![];
        for f in names {
            shards.push(bytes(&f.url).await?);
        }
        LoadedModel::from_hf_bytes(&name, &cfg, &tok, shards, DType::F32, &Device::Cpu)
    }
    .map_err(|e| e.to_string())?;
    // The relative noise needs the subjects' embedding spread; without them only fixed noise works.
    let std = match bytes(&subjects_url).await {
        Ok(b) => {
            let v: serde_json::Value = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
            let subjects: Vec<String> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r["subject"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            Some(loci_core::trace::embedding_std(&lm, &subjects).map_err(|e| e.to_string())?)
        }
        Err(_) => None,
    };
    Ok((lm, std))
}

fn text<E: ToString>(e: E) -> String {
    e.to_string()
}

impl ModelWorker {
    fn model(&self) -> Result<&LoadedModel, String> {
        self.model
            .as_ref()
            .ok_or_else(|| "no model is loaded in this worker".to_string())
    }

    fn run(&mut self, msg: ToWorker) -> Result<FromWorker, String> {
        let steps_the_run = matches!(
            msg,
            ToWorker::ValueLosses { .. } | ToWorker::ValueAdvance { .. } | ToWorker::RomeFinish
        );
        if !steps_the_run {
            // Another job (or a cancelled edit's next one): the shared run is over.
            self.rome_run = None;
        }
        match msg {
            ToWorker::Load { .. } | ToWorker::TraceDrop { .. } => {
                unreachable!("handled in `received`")
            }
            ToWorker::Random { preset } => {
                let started = now_ms();
                *self = ModelWorker::default();
                let m = loci_core::presets::random_model(&preset, DType::F32, &Device::Cpu)
                    .map_err(text)?;
                let info = m.info.clone();
                self.model = Some(m);
                Ok(FromWorker::Loaded {
                    info,
                    seconds: (now_ms() - started) / 1e3,
                })
            }
            ToWorker::Predict { prompt, top } => Ok(FromWorker::Prediction(
                self.model()?.predict(&prompt, top).map_err(text)?,
            )),
            ToWorker::TraceWhole { method, request } => Ok(FromWorker::Traced(Box::new(
                self.model()?
                    .trace_by(method, &request, self.embedding_std, &mut Quiet, 1)
                    .map_err(text)?,
            ))),
            ToWorker::TracePlan { job, request } => {
                let plan = (self.model()?)
                    .trace_plan(&request, self.embedding_std)
                    .map_err(text)?;
                let header = plan.header.clone();
                self.plans.insert(job, plan);
                Ok(FromWorker::TraceHeader { job, header })
            }
            ToWorker::TraceRow { job, kind, token } => {
                let started = now_ms();
                let plan = self
                    .plans
                    .get(&job)
                    .ok_or_else(|| format!("trace {job} was not planned in this worker"))?;
                let scores = self.model()?.trace_row(plan, kind, token).map_err(text)?;
                Ok(FromWorker::TraceRow {
                    job,
                    kind,
                    token,
                    scores,
                    seconds: (now_ms() - started) / 1e3,
                })
            }
            ToWorker::StatsBegin { layers, max_len } => {
                let acc = StatsAccumulator::new(self.model()?, &layers, max_len).map_err(text)?;
                self.collecting = Some(acc);
                Ok(FromWorker::StatsTokens { tokens: 0 })
            }
            ToWorker::StatsCount { texts } => {
                let lm = self.model.as_ref().ok_or("no model is loaded")?;
                let acc = self.collecting.as_ref().ok_or("no statistics are begun")?;
                let tokens = texts
                    .iter()
                    .map(|t| acc.text_tokens(lm, t))
                    .collect::<Result<_, _>>()
                    .map_err(text)?;
                Ok(FromWorker::StatsCounts { tokens })
            }
            ToWorker::StatsTexts { texts } => {
                let lm = self.model.as_ref().ok_or("no model is loaded")?;
                let acc = self.collecting.as_mut().ok_or("no statistics are begun")?;
                let cut: Vec<(&str, usize)> = texts.iter().map(|(t, n)| (t.as_str(), *n)).collect();
                acc.add_texts_cut(lm, &cut).map_err(text)?;
                Ok(FromWorker::StatsTokens {
                    tokens: acc.tokens(),
                })
            }
            ToWorker::StatsFinish { corpus } => {
                let acc = self.collecting.take().ok_or("no statistics are begun")?;
                if acc.tokens() == 0 {
                    // Fewer texts than workers: this one's share is empty.
                    return Ok(FromWorker::StatsParts { files: vec![] });
                }
                let stats = acc.finish(self.model()?, &corpus).map_err(text)?;
                let files = stats
                    .iter()
                    .map(|s| s.to_bytes().map(Bytes))
                    .collect::<Result<_, _>>()
                    .map_err(text)?;
                Ok(FromWorker::StatsParts { files })
            }
            ToWorker::UseStats { files } => self.use_stats(files),
            ToWorker::Edit(job) => self.edit(job),
            ToWorker::RomeBegin { job, share } => self.rome_begin(job, share),
            ToWorker::ValueLosses { parts } => {
                let (run, _) = self.rome_run.as_mut().ok_or(NO_RUN)?;
                let (step, steps) = run.value().progress();
                let losses = Floats(run.value().losses(&parts).map_err(text)?);
                let step = step + 1;
                if run.value().done() {
                    return Ok(FromWorker::ValueDone {
                        losses,
                        step,
                        steps,
                    });
                }
                let grad = run.value().backward().map_err(text)?;
                Ok(FromWorker::ValueGrad {
                    losses,
                    step,
                    steps,
                    grad,
                })
            }
            ToWorker::ValueAdvance { grads } => {
                let lm = self.model.as_ref().ok_or("no model is loaded")?;
                let (run, _) = self.rome_run.as_mut().ok_or(NO_RUN)?;
                run.value().advance(lm, &grads).map_err(text)?;
                let parts = run.value().forward(lm).map_err(text)?;
                Ok(FromWorker::ValueParts { parts })
            }
            ToWorker::RomeFinish => {
                let (run, probes) = self.rome_run.take().ok_or(NO_RUN)?;
                let lm = self.model.as_mut().ok_or("no model is loaded")?;
                let (e, applied, r) = lm.rome_run_with_report(run, &probes).map_err(text)?;
                self.record(Edit::Rome(e), applied, Some(Box::new(r)), None)
            }
            ToWorker::Study(job) => self.study(*job),
            ToWorker::ApplyEdit { bytes } => {
                let m = self.model.as_mut().ok_or("no model is loaded")?;
                let applied = m.apply_file(&bytes.0).map_err(text)?;
                self.edits.push(applied);
                self.plans.clear();
                Ok(FromWorker::Edits {
                    count: self.edits.len(),
                })
            }
            ToWorker::UndoEdit { all } => {
                let m = self.model.as_mut().ok_or("no model is loaded")?;
                while let Some((_, a)) = self.edits.pop() {
                    m.undo_edit(a).map_err(text)?;
                    if !all {
                        break;
                    }
                }
                self.plans.clear();
                Ok(FromWorker::Edits {
                    count: self.edits.len(),
                })
            }
            ToWorker::Digest => Ok(FromWorker::Digest {
                digest: weights_digest(self.model()?)?,
            }),
            ToWorker::Work => Ok(FromWorker::Work {
                flops: loci_core::flops::total(),
                heap_bytes: heap_bytes(),
            }),
            ToWorker::Peak => Ok(FromWorker::Peak {
                gflops: loci_core::kernels::product_gflops(&Device::Cpu, DType::F32, 1024, 1.0)
                    .map_err(text)?,
            }),
        }
    }

    /// Takes statistics files: all are read and checked before any replaces what is held.
    fn use_stats(&mut self, files: Vec<Bytes>) -> Result<FromWorker, String> {
        let lm = self.model()?;
        let mut read = vec![];
        for f in &files {
            let s = KeyStats::from_bytes(&f.0).map_err(text)?;
            s.check_fits(lm, s.provenance.layer).map_err(text)?;
            read.push(s);
        }
        for s in read {
            self.stats.insert(s.provenance.layer, s);
        }
        let mut held: Vec<_> = self.stats.values().map(|s| s.provenance.clone()).collect();
        held.sort_by_key(|p| p.layer);
        Ok(FromWorker::StatsHeld { held })
    }

    /// The statistics of `layers`, or the layers missing (the page offers to get them).
    fn stats_of(&self, layers: &[usize]) -> Result<Vec<KeyStats>, Vec<usize>> {
        let missing: Vec<usize> = layers
            .iter()
            .copied()
            .filter(|l| !self.stats.contains_key(l))
            .collect();
        if !missing.is_empty() {
            return Err(missing);
        }
        Ok(layers.iter().map(|l| self.stats[l].clone()).collect())
    }

    /// Computes the edit with its steps streamed to the page, applies it and reads the probes.
    fn edit(&mut self, job: EditJob) -> Result<FromWorker, String> {
        let lm = self.model()?;
        let cfg = &lm.model.cfg;
        let (reqs, probes) = (job.requests, job.probes);
        let (edit, applied, report, memit) = match job.method {
            EditMethod::Rome => {
                let hp = RomeHparams::defaults(cfg, job.layers.first().copied()).map_err(text)?;
                let stats = match self.stats_of(&[hp.layer]) {
                    Ok(mut s) => s.remove(0),
                    Err(layers) => return Ok(FromWorker::NeedsStats { layers }),
                };
                let req = one(reqs)?;
                let lm = self.model.as_mut().expect("checked above");
                let (e, applied, r) =
                    streamed(|| lm.rome_with_report(req, &hp, Some(&stats), &probes))?;
                (Edit::Rome(e), applied, Some(Box::new(r)), None)
            }
            m @ (EditMethod::Memit | EditMethod::Alphaedit | EditMethod::Emmet) => {
                let mut hp = MemitHparams::for_method(m, cfg, &job.layers).map_err(text)?;
                if let (Some(ns), UpdateRule::NullSpace { null_space, .. }) =
                    (job.null_space, &mut hp.update)
                {
                    *null_space = ns;
                }
                let stats = match self.stats_of(&hp.layers) {
                    Ok(s) => s,
                    Err(layers) => return Ok(FromWorker::NeedsStats { layers }),
                };
                let lm = self.model.as_mut().expect("checked above");
                // AlphaEdit keeps the keys of the edits this tab made or loaded before.
                let preserved = Preserved::of(self.edits.iter().map(|(e, _)| e));
                let (e, applied, r) = streamed(|| {
                    lm.memit_with_report(reqs, &hp, &stats, &preserved, &probes, &mut |_| {})
                })?;
                (Edit::Memit(e), applied, None, Some(Box::new(r)))
            }
            EditMethod::Ft => {
                let hp = FtHparams::defaults(cfg, &job.layers).map_err(text)?;
                let req = one(reqs)?;
                let lm = self.model.as_mut().expect("checked above");
                let (e, applied, r) = streamed(|| lm.ft_with_report(req, &hp, &probes))?;
                (Edit::Ft(e), applied, Some(Box::new(r)), None)
            }
            EditMethod::Grace => {
                let hp = GraceHparams::defaults(cfg, job.layers.first().copied()).map_err(text)?;
                let req = one(reqs)?;
                let lm = self.model.as_mut().expect("checked above");
                let (e, applied, r) = streamed(|| lm.grace_with_report(req, &hp, &probes))?;
                (Edit::Grace(e), applied, Some(Box::new(r)), None)
            }
        };
        self.record(edit, applied, report, memit)
    }

    /// Keeps an edit just applied, with its file for the page (undone if it cannot be written).
    fn record(
        &mut self,
        edit: Edit,
        applied: AppliedEdit,
        report: Option<Box<EditReport>>,
        memit: Option<Box<MemitReport>>,
    ) -> Result<FromWorker, String> {
        let file = match edit.to_file(self.model()?) {
            Ok(f) => f,
            Err(e) => {
                let m = self.model.as_mut().ok_or("no model is loaded")?;
                m.undo_edit(applied).map_err(text)?;
                return Err(e.to_string());
            }
        };
        self.edits.push((edit, applied));
        self.plans.clear();
        Ok(FromWorker::Edited {
            file: Bytes(file),
            report,
            memit,
            count: self.edits.len(),
        })
    }

    /// Begins a ROME edit shared with the other workers: up to v*, then its first forward
    /// pass.
    fn rome_begin(&mut self, job: EditJob, share: Share) -> Result<FromWorker, String> {
        let lm = self.model()?;
        let hp = RomeHparams::defaults(&lm.model.cfg, job.layers.first().copied()).map_err(text)?;
        let stats = match self.stats_of(&[hp.layer]) {
            Ok(mut s) => s.remove(0),
            Err(layers) => return Ok(FromWorker::NeedsStats { layers }),
        };
        let req = lm.complete_request(one(job.requests)?).map_err(text)?;
        let mut run = lm.rome_run(&req, &hp, Some(&stats), share).map_err(text)?;
        let parts = run.value().forward(lm).map_err(text)?;
        self.rome_run = Some((run, job.probes));
        Ok(FromWorker::ValueParts { parts })
    }

    /// Hase et al.'s study of one fact with the server's settings (noise 3σ of the subjects'
    /// embeddings, no essence drift); lines stream to the page; the model ends as it began.
    fn study(&mut self, job: StudyJob) -> Result<FromWorker, String> {
        let lm = self.model()?;
        let std = self
            .embedding_std
            .ok_or("the study's noise needs known_1000.json's subjects, which did not load")?;
        let mut cfg = StudyConfig::defaults(lm, job.methods, job.problems, &job.layers, 3.0 * std)
            .map_err(text)?;
        cfg.correct_only = !job.all_cases;
        if job.all_cases {
            cfg.min_prob = 0.0;
        }
        cfg.essence = false;
        if cfg.cells().len() > MAX_STUDY_EDITS {
            return Err(format!(
                "a study here makes at most {MAX_STUDY_EDITS} edits; these choices make {}: name fewer layers",
                cfg.cells().len()
            ));
        }
        let stats = match self.stats_of(&cfg.stats_layers(lm.model.n_layer())) {
            Ok(s) => s,
            Err(layers) => return Ok(FromWorker::NeedsStats { layers }),
        };
        let lm = self.model.as_mut().expect("checked above");
        let mut stats_for = |_: &LoadedModel, layers: &[usize]| {
            layers
                .iter()
                .map(|l| {
                    stats
                        .iter()
                        .find(|s| s.provenance.layer == *l)
                        .cloned()
                        .ok_or_else(|| {
                            loci_core::LociError::input(format!("no key statistics for layer {l}"))
                        })
                })
                .collect()
        };
        lm.study_case(&job.case, &cfg, &mut stats_for, &mut Posting)
            .map_err(text)?;
        self.plans.clear();
        Ok(FromWorker::StudyDone)
    }
}

/// Edits one study may make (each a full edit, scored and undone), as on the server.
const MAX_STUDY_EDITS: usize = 48;

/// The answer to a step of a shared edit that is not running (cancelled, or replaced by
/// another job).
const NO_RUN: &str = "no shared edit is running in this worker";

/// Posts each study line to the page as it comes.
struct Posting;

impl StudyObserver for Posting {
    fn on_case(&mut self, case: &loci_core::study::CaseLine) {
        post(&FromWorker::StudyLine(StudyLine::Case(case.clone())));
    }
    fn on_edit(&mut self, edit: &loci_core::study::EditLine) -> bool {
        post(&FromWorker::StudyLine(StudyLine::Edit(edit.clone())));
        true
    }
}

fn one(reqs: Vec<loci_core::RewriteRequest>) -> Result<loci_core::RewriteRequest, String> {
    match <[_; 1]>::try_from(reqs) {
        Ok([r]) => Ok(r),
        Err(v) => Err(format!("this method edits one fact, not {}", v.len())),
    }
}

/// Runs an edit with each optimisation step posted to the page as it ends.
fn streamed<T>(work: impl FnOnce() -> loci_core::Result<T>) -> Result<T, String> {
    let listener = |s: &loci_core::progress::Step| {
        post(&FromWorker::EditStep {
            phase: s.phase.to_string(),
            step: s.step,
            steps: s.steps,
            loss: s.loss,
        });
        // The page cancels by ending the worker, not through the listener.
        true
    };
    loci_core::progress::listen(listener, work).map_err(text)
}

/// The worker's WebAssembly memory in bytes (0 off the browser).
fn heap_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) as u64 * 65_536
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

/// FNV-1a over the bits of every layer's down-projection (weights, bias and GRACE codebook):
/// equal digests mean the layers an edit touches are equal bit for bit.
fn weights_digest(lm: &LoadedModel) -> Result<String, String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for l in 0..lm.model.n_layer() {
        let d = lm.model.down_proj(l).map_err(text)?;
        for x in d.codebook.as_ref().map(|c| c.bits()).unwrap_or_default() {
            for b in x.to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        for t in std::iter::once(&d.weight).chain(d.bias.as_ref()) {
            let v = t
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(text)?;
            for x in v {
                for b in x.to_bits().to_le_bytes() {
                    h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
                }
            }
        }
    }
    Ok(format!("{h:016x}"))
}
