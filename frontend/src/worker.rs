//! A model worker: holds one model and runs jobs on it off the page's thread. Trace rows come one
//! per request so the page can spread them over several workers and cancel between rows.

use std::collections::HashMap;

use gloo_worker::{HandlerId, Worker, WorkerScope};
use loci_core::edit::{AppliedEdit, Edit};
use loci_core::trace::TracePlan;
use loci_core::{DType, Device, LoadedModel};

use crate::files::{bytes, now_ms};
use crate::protocol::{FileRef, FromWorker, ToWorker};

pub struct ModelWorker {
    model: Option<LoadedModel>,
    /// Spread of subject-token embeddings (relative trace noise), made at load.
    embedding_std: Option<f64>,
    plans: HashMap<u64, TracePlan>,
    /// Applied edits, newest last; each undo restores the weights it replaced.
    edits: Vec<AppliedEdit>,
}

pub enum Loaded {
    Done {
        id: HandlerId,
        result: Result<(LoadedModel, Option<f64>), String>,
        started: f64,
    },
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
        let mut shards = vec![];
        for f in files.iter().filter(|f| f.name.ends_with(".safetensors")) {
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

impl ModelWorker {
    fn run(&mut self, msg: ToWorker) -> Result<FromWorker, String> {
        let lm = self
            .model
            .as_ref()
            .ok_or_else(|| "no model is loaded in this worker".to_string());
        match msg {
            ToWorker::Load { .. } | ToWorker::TraceDrop { .. } => {
                unreachable!("handled in `received`")
            }
            ToWorker::Random { preset } => {
                let started = now_ms();
                self.model = None;
                self.plans.clear();
                self.edits.clear();
                let m = loci_core::presets::random_model(&preset, DType::F32, &Device::Cpu)
                    .map_err(|e| e.to_string())?;
                let info = m.info.clone();
                self.model = Some(m);
                self.embedding_std = None;
                Ok(FromWorker::Loaded {
                    info,
                    seconds: (now_ms() - started) / 1e3,
                })
            }
            ToWorker::Predict { prompt, top } => Ok(FromWorker::Prediction(
                lm?.predict(&prompt, top).map_err(|e| e.to_string())?,
            )),
            ToWorker::TracePlan { job, request } => {
                let plan = lm?
                    .trace_plan(&request, self.embedding_std)
                    .map_err(|e| e.to_string())?;
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
                let scores = lm?
                    .trace_row(plan, kind, token)
                    .map_err(|e| e.to_string())?;
                Ok(FromWorker::TraceRow {
                    job,
                    kind,
                    token,
                    scores,
                    seconds: (now_ms() - started) / 1e3,
                })
            }
            ToWorker::ApplyEdit { bytes } => {
                let e = Edit::from_bytes(&bytes).map_err(|e| e.to_string())?;
                let m = self
                    .model
                    .as_mut()
                    .ok_or("no model is loaded in this worker")?;
                let applied = m.apply(&e).map_err(|e| e.to_string())?;
                self.edits.push(applied);
                self.plans.clear();
                Ok(FromWorker::Edits {
                    count: self.edits.len(),
                })
            }
            ToWorker::UndoEdit { all } => {
                let m = self
                    .model
                    .as_mut()
                    .ok_or("no model is loaded in this worker")?;
                while let Some(a) = self.edits.pop() {
                    m.undo_edit(a).map_err(|e| e.to_string())?;
                    if !all {
                        break;
                    }
                }
                self.plans.clear();
                Ok(FromWorker::Edits {
                    count: self.edits.len(),
                })
            }
        }
    }
}

impl Worker for ModelWorker {
    type Message = Loaded;
    type Input = ToWorker;
    type Output = FromWorker;

    fn create(_scope: &WorkerScope<Self>) -> Self {
        Self {
            model: None,
            embedding_std: None,
            plans: HashMap::new(),
            edits: vec![],
        }
    }

    fn update(&mut self, scope: &WorkerScope<Self>, msg: Self::Message) {
        let Loaded::Done {
            id,
            result,
            started,
        } = msg;
        let out = match result {
            Ok((m, std)) => {
                let info = m.info.clone();
                self.model = Some(m);
                self.embedding_std = std;
                FromWorker::Loaded {
                    info,
                    seconds: (now_ms() - started) / 1e3,
                }
            }
            Err(message) => FromWorker::Error { message },
        };
        scope.respond(id, out);
    }

    fn received(&mut self, scope: &WorkerScope<Self>, msg: Self::Input, id: HandlerId) {
        if let ToWorker::Load {
            name,
            files,
            subjects_url,
        } = msg
        {
            // Free the old model before the new one's bytes arrive.
            self.model = None;
            self.plans.clear();
            self.edits.clear();
            let started = now_ms();
            scope.send_future(async move {
                Loaded::Done {
                    id,
                    result: load(name, files, subjects_url).await,
                    started,
                }
            });
            return;
        }
        if let ToWorker::TraceDrop { job } = msg {
            // Nothing to answer: the page has stopped listening to this trace.
            self.plans.remove(&job);
            return;
        }
        match self.run(msg) {
            Ok(out) => scope.respond(id, out),
            Err(message) => scope.respond(id, FromWorker::Error { message }),
        }
    }
}
