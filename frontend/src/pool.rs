//! The in-tab engine: a pool of model workers, one model copy each. Jobs go to the first
//! worker; a trace's rows are handed out one at a time to whichever worker is free, so all cores
//! work without SharedArrayBuffer and a cancel takes effect at the next row.

use std::cell::Cell;
use std::rc::Rc;

use futures_channel::mpsc::{unbounded, UnboundedReceiver};
use futures_util::lock::Mutex;
use futures_util::StreamExt;
use gloo_worker::{Spawnable, WorkerBridge};
use loci_core::trace::{TraceHeader, TraceKind, TraceRequest};
use loci_core::{ModelInfo, Prediction};

use crate::protocol::{FileRef, FromWorker, Json, ToWorker};
use crate::worker::ModelWorker;

pub struct Pool {
    bridges: Vec<WorkerBridge<ModelWorker>>,
    inbox: Mutex<UnboundedReceiver<(usize, FromWorker)>>,
    next_job: Cell<u64>,
}

/// Workers for a model of `model_bytes` (its f32 size): one per core, while the copies fit in
/// `budget_bytes`, and at most 8.
pub fn pool_size(cores: usize, model_bytes: u64, budget_bytes: u64) -> usize {
    let by_memory = (budget_bytes / model_bytes.max(1)) as usize;
    cores.min(by_memory).clamp(1, 8)
}

/// The machine's logical cores as the browser reports them.
pub fn cores() -> usize {
    web_sys::window()
        .map(|w| w.navigator().hardware_concurrency() as usize)
        .unwrap_or(1)
        .max(1)
}

impl Pool {
    pub fn new(workers: usize) -> Rc<Self> {
        let (tx, rx) = unbounded();
        let bridges = (0..workers.max(1))
            .map(|i| {
                let tx = tx.clone();
                ModelWorker::spawner()
                    .callback(move |out| {
                        let _ = tx.unbounded_send((i, out));
                    })
                    .encoding::<Json>()
                    .as_module(false)
                    .with_loader(true)
                    .spawn("./worker_loader.js")
            })
            .collect();
        Rc::new(Self {
            bridges,
            inbox: Mutex::new(rx),
            next_job: Cell::new(1),
        })
    }

    pub fn workers(&self) -> usize {
        self.bridges.len()
    }

    async fn recv(&self) -> Result<(usize, FromWorker), String> {
        let mut inbox = self
            .inbox
            .try_lock()
            .ok_or_else(|| "the tab engine is busy with another job".to_string())?;
        inbox
            .next()
            .await
            .ok_or_else(|| "the model workers stopped".to_string())
    }

    /// Sends `msg` to every worker and waits for each one's answer (`pick` turns it into a value;
    /// other messages are a cancelled job's late rows). The first error wins, but only once
    /// every worker has answered, so no reply is left over for the next job.
    async fn ask_all<T>(
        &self,
        msg: ToWorker,
        pick: impl Fn(FromWorker) -> Option<T>,
    ) -> Result<T, String> {
        for b in &self.bridges {
            b.send(msg.clone());
        }
        let (mut value, mut failed, mut replies) = (None, None, 0);
        while replies < self.bridges.len() {
            match self.recv().await?.1 {
                FromWorker::Error { message } => {
                    failed.get_or_insert(message);
                }
                other => match pick(other) {
                    Some(v) => value = Some(v),
                    None => continue,
                },
            }
            replies += 1;
        }
        match (failed, value) {
            (Some(e), _) => Err(e),
            (None, Some(v)) => Ok(v),
            (None, None) => Err("no worker answered".into()),
        }
    }

    async fn load_all(&self, msg: ToWorker) -> Result<ModelInfo, String> {
        self.ask_all(msg, |m| match m {
            FromWorker::Loaded { info, .. } => Some(info),
            _ => None,
        })
        .await
    }

    pub async fn load(
        &self,
        name: &str,
        files: Vec<FileRef>,
        subjects_url: &str,
    ) -> Result<ModelInfo, String> {
        self.load_all(ToWorker::Load {
            name: name.to_string(),
            files,
            subjects_url: subjects_url.to_string(),
        })
        .await
    }

    pub async fn load_random(&self, preset: &str) -> Result<ModelInfo, String> {
        self.load_all(ToWorker::Random {
            preset: preset.to_string(),
        })
        .await
    }

    pub async fn predict(&self, prompt: &str, top: usize) -> Result<Prediction, String> {
        self.bridges[0].send(ToWorker::Predict {
            prompt: prompt.to_string(),
            top,
        });
        loop {
            match self.recv().await?.1 {
                FromWorker::Prediction(p) => return Ok(p),
                FromWorker::Error { message } => return Err(message),
                _ => {} // late rows of a cancelled trace
            }
        }
    }

    /// Sends an edit or undo to every worker; returns the edits now applied.
    async fn edit_all(&self, msg: ToWorker) -> Result<usize, String> {
        self.ask_all(msg, |m| match m {
            FromWorker::Edits { count } => Some(count),
            _ => None,
        })
        .await
    }

    /// Applies an edit file in every worker; returns the number of edits applied.
    pub async fn apply_edit(&self, bytes: Vec<u8>) -> Result<usize, String> {
        self.edit_all(ToWorker::ApplyEdit { bytes }).await
    }

    pub async fn undo_edit(&self, all: bool) -> Result<usize, String> {
        self.edit_all(ToWorker::UndoEdit { all }).await
    }

    /// Runs a trace over the pool. `on_row` returning false cancels it.
    pub async fn trace(
        &self,
        request: &TraceRequest,
        mut on_header: impl FnMut(&TraceHeader),
        mut on_row: impl FnMut(TraceKind, usize, Vec<f32>) -> bool,
    ) -> Result<(), String> {
        let job = self.next_job.get();
        self.next_job.set(job + 1);
        for b in &self.bridges {
            b.send(ToWorker::TracePlan {
                job,
                request: request.clone(),
            });
        }
        let drop_all = || {
            for b in &self.bridges {
                b.send(ToWorker::TraceDrop { job });
            }
        };
        let mut queue: Vec<(TraceKind, usize)> = vec![];
        let (mut total, mut done) = (None::<usize>, 0usize);
        let give = |w: usize, queue: &mut Vec<(TraceKind, usize)>| {
            if let Some((kind, token)) = queue.pop() {
                self.bridges[w].send(ToWorker::TraceRow { job, kind, token });
            }
        };
        loop {
            let (w, msg) = self.recv().await?;
            match msg {
                FromWorker::TraceHeader { job: j, header } if j == job => {
                    if total.is_none() {
                        // Queue popped from the back. The last token's rows first: they are the
                        // cheapest (only the last position is recomputed), so cells show at
                        // once; then the earliest tokens, the longest rows, for a balanced end.
                        let last = header.tokens.len().saturating_sub(1);
                        let mut rows: Vec<(TraceKind, usize)> = (0..last)
                            .flat_map(|t| header.kinds.iter().map(move |&k| (k, t)))
                            .collect();
                        rows.reverse();
                        rows.extend(header.kinds.iter().map(|&k| (k, last)));
                        queue = rows;
                        total = Some(header.total_rows);
                        on_header(&header);
                    }
                    give(w, &mut queue);
                }
                FromWorker::TraceRow {
                    job: j,
                    kind,
                    token,
                    scores,
                    ..
                } if j == job => {
                    done += 1;
                    if !on_row(kind, token, scores) {
                        drop_all();
                        return Err("cancelled".into());
                    }
                    if Some(done) == total {
                        drop_all();
                        return Ok(());
                    }
                    give(w, &mut queue);
                }
                FromWorker::Error { message } => {
                    drop_all();
                    return Err(message);
                }
                _ => {} // a cancelled job's late rows
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pool_size;

    #[test]
    fn the_pool_fits_cores_and_memory() {
        assert_eq!(pool_size(8, 500_000_000, 2_500_000_000), 5);
        assert_eq!(pool_size(2, 500_000_000, 2_500_000_000), 2);
        // A model bigger than the budget still gets one worker; never more than 8.
        assert_eq!(pool_size(4, 9_000_000_000, 2_500_000_000), 1);
        assert_eq!(pool_size(64, 1_000, 2_500_000_000), 8);
    }
}
