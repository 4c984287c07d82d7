//! The quick lane: every visitor's predictions and generations of a model gathered into batched
//! passes.
//!
//! - **Predictions** wait a few milliseconds (`--batch-window-ms`) for company, then a runner
//!   takes its share of the queue (runners: one per core) and computes them in one right-padded
//!   pass (`LoadedModel::next_probs_rows`).
//! - **Generations** are decoded together by one thread per model (continuous batching,
//!   `loci_core::DecodeBatch`): newcomers join between decode steps; a generation leaves the
//!   moment it ends, or its client goes.
//!
//! Each row carries its visitor's edits, added by a per-row hook (`edit::RowEdits`), so visitors
//! with different edits share a pass; predictions asking the same (the same tokens under the
//! same edits) share a row. Rows are taken round-robin across sessions: one visitor's
//! flood does not fill every batch. A request whose client leaves gives up its place at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use loci_core::edit::{Edit, RowEdits};
use loci_core::{DecodeBatch, Generation, GenerationStart, LoadedModel, NoHook, Prediction};

use super::jobs::{read, ApiError};
use super::models::ServedModel;
use super::sched::{units, Cost, Kind, Scheduler};

/// Rows in one pass at most.
const MAX_ROWS: usize = 64;
/// Tokens in one prediction pass at most (rows × the longest row).
const MAX_TOKENS: usize = 4096;

/// A prediction waiting for its pass.
pub struct PredictJob {
    pub prompt: String,
    pub ids: Vec<u32>,
    pub k: usize,
    pub edits: Vec<Arc<Edit>>,
    pub reply: tokio::sync::oneshot::Sender<Result<Prediction, ApiError>>,
}

/// A generation waiting to join the decode batch.
pub struct GenerateJob {
    pub start: GenerationStart<()>,
    pub edits: Vec<Arc<Edit>>,
    pub reply: tokio::sync::oneshot::Sender<Result<Generation, ApiError>>,
}

/// A queued job and what the queue knows of it.
struct Queued<J> {
    id: u64,
    session: String,
    cost: Cost,
    arrived: Instant,
    job: J,
}

/// A model's waiting jobs of one kind.
struct Queue<J> {
    items: Mutex<VecDeque<Queued<J>>>,
    ready: Condvar,
}

impl<J> Default for Queue<J> {
    fn default() -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
        }
    }
}

impl<J> Queue<J> {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued<J>>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The units waiting.
    fn units(&self) -> f64 {
        self.lock().iter().map(|q| q.cost.units).sum()
    }

    /// Waits for a job, lets company gather for `window` after the oldest arrived, and takes up
    /// to `share` of the waiting jobs (at most `most`), round-robin across sessions.
    fn take(
        &self,
        window: Duration,
        share: impl Fn(usize) -> usize,
        block: bool,
    ) -> Vec<Queued<J>> {
        let mut q = self.lock();
        if !block && q.is_empty() {
            return vec![];
        }
        while q.is_empty() {
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        loop {
            let since = q.front().map_or(window, |f| f.arrived.elapsed());
            if since >= window || q.len() >= MAX_ROWS {
                break;
            }
            q = self
                .ready
                .wait_timeout(q, window - since)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if q.is_empty() {
                return vec![];
            }
        }
        let n = share(q.len()).clamp(1, q.len());
        let taken = round_robin(&mut q, n);
        if !q.is_empty() {
            // Others may take what is left at once.
            self.ready.notify_one();
        }
        taken
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|q| q.id != id);
    }
}

/// Takes `n` jobs from `q`, one per session in turn (each session's in its order).
fn round_robin<J>(q: &mut VecDeque<Queued<J>>, n: usize) -> Vec<Queued<J>> {
    let mut sessions: Vec<String> = vec![];
    for item in q.iter() {
        if !sessions.contains(&item.session) {
            sessions.push(item.session.clone());
        }
    }
    let mut taken = vec![];
    while taken.len() < n && !q.is_empty() {
        for s in &sessions {
            if taken.len() == n {
                break;
            }
            if let Some(i) = q.iter().position(|item| &item.session == s) {
                taken.extend(q.remove(i));
            }
        }
    }
    taken
}

/// One model's quick lane.
pub struct ModelLane {
    model: Arc<ServedModel>,
    predictions: Queue<PredictJob>,
    generations: Queue<GenerateJob>,
}

/// The quick lanes of every model, started on first use.
pub struct Batchers {
    lanes: Mutex<HashMap<String, Arc<ModelLane>>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Prediction runners per model.
    pub runners: usize,
    /// How long a prediction waits for company.
    pub window: Duration,
}

/// A model's queue of one kind (picked from its lane) and how many threads serve it.
type QueueAt<J> = (fn(&ModelLane) -> &Queue<J>, usize);

/// A job's place in a queue: dropping it (the client left) takes the job out.
pub struct Place<J> {
    lane: Arc<ModelLane>,
    id: u64,
    pick: fn(&ModelLane) -> &Queue<J>,
}

impl<J> Drop for Place<J> {
    fn drop(&mut self) {
        (self.pick)(&self.lane).remove(self.id);
    }
}

impl Batchers {
    pub fn new(runners: usize, window: Duration) -> Self {
        Self {
            lanes: Mutex::default(),
            next_id: Default::default(),
            runners: runners.max(1),
            window,
        }
    }

    /// The quick lane of model `name` (`model` loaded), its threads started on first use.
    pub fn lane(
        &self,
        name: &str,
        model: Arc<ServedModel>,
        sched: &Arc<Scheduler>,
    ) -> Arc<ModelLane> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = lanes.get(name) {
            return l.clone();
        }
        let lane = Arc::new(ModelLane {
            model,
            predictions: Queue::default(),
            generations: Queue::default(),
        });
        // A panic in a pass fails the jobs it held (their answers are dropped: a 500) and the
        // thread goes on with the next.
        for i in 0..self.runners {
            let (lane, sched, window, runners) =
                (lane.clone(), sched.clone(), self.window, self.runners);
            let _ = std::thread::Builder::new()
                .name(format!("loci-predict-{i}"))
                .spawn(move || loop {
                    surviving("a prediction pass", || {
                        predict_batch(&lane, &sched, window, runners)
                    })
                });
        }
        let (l2, sched) = (lane.clone(), sched.clone());
        let _ = std::thread::Builder::new()
            .name("loci-generate".into())
            .spawn(move || loop {
                surviving("the decode loop", || decode_loop(&l2, &sched))
            });
        lanes.insert(name.to_string(), lane.clone());
        lane
    }

    /// Queues a prediction, or refuses it when its expected wait passes the bound.
    pub fn predict(
        &self,
        lane: &Arc<ModelLane>,
        sched: &Scheduler,
        session: &str,
        job: PredictJob,
    ) -> Result<Place<PredictJob>, ApiError> {
        let cost = Cost::new(Kind::Predict, units::predict(job.ids.len(), shape(lane)));
        // The runners share the waiting predictions.
        let at: QueueAt<_> = (|l| &l.predictions, self.runners);
        self.queue(lane, at, sched, session, cost, job)
    }

    /// Queues a generation, or refuses it when its expected wait passes the bound.
    pub fn generate(
        &self,
        lane: &Arc<ModelLane>,
        sched: &Scheduler,
        session: &str,
        job: GenerateJob,
    ) -> Result<Place<GenerateJob>, ApiError> {
        let (tokens, new) = (job.start.ids.len(), job.start.max_new);
        let cost = Cost::new(Kind::Generate, units::generate(tokens, new, shape(lane)));
        // One decode loop takes them all.
        let at: QueueAt<_> = (|l| &l.generations, 1);
        self.queue(lane, at, sched, session, cost, job)
    }

    /// Queues `job` in the queue `pick` names, served by `servers` threads at once, unless its
    /// expected wait (the work queued there ahead of it) passes the bound.
    fn queue<J>(
        &self,
        lane: &Arc<ModelLane>,
        (pick, servers): QueueAt<J>,
        sched: &Scheduler,
        session: &str,
        cost: Cost,
        job: J,
    ) -> Result<Place<J>, ApiError> {
        let queue = pick(lane);
        let wait = queue.units() * sched.rate(cost.kind) / servers as f64;
        if wait > sched.max_wait.as_secs_f64() {
            return Err(sched.refuse(wait, "quick"));
        }
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        queue.lock().push_back(Queued {
            id,
            session: session.to_string(),
            cost,
            arrived: Instant::now(),
            job,
        });
        queue.ready.notify_one();
        Ok(Place {
            lane: lane.clone(),
            id,
            pick,
        })
    }
}

/// Runs `f`, logging a panic instead of ending the thread.
fn surviving(what: &str, f: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        tracing::error!("{what} panicked; its jobs failed, and the lane goes on");
    }
}

fn shape(lane: &ModelLane) -> units::Shape {
    super::models::shape_of(&read(&lane.model).lm)
}

/// The hook giving each row its own edits (`None` when no row has any).
fn row_hook(lm: &LoadedModel, rows: &[&[Arc<Edit>]]) -> loci_core::Result<Option<RowEdits>> {
    let mut distinct: Vec<&Arc<Edit>> = vec![];
    let per_row: Vec<Vec<usize>> = rows
        .iter()
        .map(|edits| {
            edits
                .iter()
                .map(|e| match distinct.iter().position(|d| Arc::ptr_eq(d, e)) {
                    Some(i) => i,
                    None => {
                        distinct.push(e);
                        distinct.len() - 1
                    }
                })
                .collect()
        })
        .collect();
    if distinct.is_empty() {
        return Ok(None);
    }
    let refs: Vec<&Edit> = distinct.iter().map(|e| e.as_ref()).collect();
    Ok(Some(RowEdits::per_row(
        &refs,
        &per_row,
        lm.model.width_on_device(),
    )?))
}

/// Whether every edit can ride as a per-row hook on `lm` (else the row runs alone on its
/// view).
fn hookable(lm: &LoadedModel, edits: &[Arc<Edit>]) -> bool {
    edits.iter().all(|e| RowEdits::can_hook_on(lm, e))
}

fn failed(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// One prediction runner's turn: a share of the waiting predictions in one pass.
fn predict_batch(lane: &ModelLane, sched: &Scheduler, window: Duration, runners: usize) {
    let share = |waiting: usize| waiting.div_ceil(runners).min(MAX_ROWS);
    let mut batch = lane.predictions.take(window, share, true);
    // Bound the padded pass: the longest rows wait for the next turn.
    while batch.len() > 1
        && batch.len() * batch.iter().map(|q| q.job.ids.len()).max().unwrap_or(0) > MAX_TOKENS
    {
        let back = batch.pop().expect("non-empty");
        lane.predictions.lock().push_front(back);
        lane.predictions.ready.notify_one();
    }
    if batch.is_empty() {
        return;
    }
    let started = Instant::now();
    let units: f64 = batch.iter().map(|q| q.cost.units).sum();
    let lm = read(&lane.model).lm.clone();
    let (together, alone): (Vec<_>, Vec<_>) =
        batch.into_iter().partition(|q| hookable(&lm, &q.job.edits));
    predict_together(&lm, together);
    for q in alone {
        let j = q.job;
        let refs: Vec<&Edit> = j.edits.iter().map(|e| e.as_ref()).collect();
        let r = lm
            .with_edits(&refs)
            .and_then(|v| Ok((v.next_probs(&j.ids)?, v)))
            .and_then(|(p, v)| v.prediction(&j.prompt, &j.ids, &p, j.k));
        let _ = j.reply.send(r.map_err(ApiError::from));
    }
    sched.took(Cost::new(Kind::Predict, units), started.elapsed());
}

/// Predictions in one pass, each row with its visitor's edits. Requests that ask the same (the
/// same tokens under the same edits: a demo's example prompt) share a row.
fn predict_together(lm: &LoadedModel, jobs: Vec<Queued<PredictJob>>) {
    if jobs.is_empty() {
        return;
    }
    let mut firsts: Vec<usize> = vec![];
    let row_of: Vec<usize> = (0..jobs.len())
        .map(|i| {
            let same = firsts
                .iter()
                .position(|&f| same_question(&jobs[f].job, &jobs[i].job));
            same.unwrap_or_else(|| {
                firsts.push(i);
                firsts.len() - 1
            })
        })
        .collect();
    metrics::histogram!("loci_batch_size", "kind" => "predict").record(jobs.len() as f64);
    metrics::histogram!("loci_batch_rows", "kind" => "predict").record(firsts.len() as f64);
    let rows: Vec<Vec<u32>> = firsts.iter().map(|&f| jobs[f].job.ids.clone()).collect();
    let edits: Vec<&[Arc<Edit>]> = firsts
        .iter()
        .map(|&f| jobs[f].job.edits.as_slice())
        .collect();
    let probs = rows_by_length(lm, &rows, &edits);
    match probs {
        Ok(probs) => {
            for (q, r) in jobs.into_iter().zip(row_of) {
                let j = q.job;
                let answer = lm.prediction(&j.prompt, &j.ids, &probs[r], j.k);
                let _ = j.reply.send(answer.map_err(ApiError::from));
            }
        }
        Err(e) => {
            for q in jobs {
                let _ = q.job.reply.send(Err(failed(&e)));
            }
        }
    }
}

/// Next-token probabilities of `rows` (row `i` with `edits[i]`), in passes of rows of similar
/// lengths (`LoadedModel::next_probs_by_length`), each pass with its rows' edits as hooks.
fn rows_by_length(
    lm: &LoadedModel,
    rows: &[Vec<u32>],
    edits: &[&[Arc<Edit>]],
) -> loci_core::Result<Vec<Vec<f32>>> {
    lm.next_probs_by_length(rows, &mut |pass| {
        let e: Vec<&[Arc<Edit>]> = pass.iter().map(|&i| edits[i]).collect();
        Ok(match row_hook(lm, &e)? {
            Some(h) => Box::new(h),
            None => Box::new(NoHook),
        })
    })
}

/// Whether two predictions ask the same: the same tokens under the same edits.
fn same_question(a: &PredictJob, b: &PredictJob) -> bool {
    a.ids == b.ids
        && a.edits.len() == b.edits.len()
        && a.edits.iter().zip(&b.edits).all(|(x, y)| Arc::ptr_eq(x, y))
}

/// A generation under way: its edits and whom to answer.
struct Decoding {
    edits: Vec<Arc<Edit>>,
    reply: tokio::sync::oneshot::Sender<Result<Generation, ApiError>>,
}

/// The model's decode loop: admits newcomers between steps, steps every generation under way,
/// answers those that end. Generations that cannot ride together (edits that are not hooks)
/// run alone on their views.
fn decode_loop(lane: &ModelLane, sched: &Scheduler) {
    let mut batch: DecodeBatch<Decoding> = DecodeBatch::default();
    let mut current: Option<(LoadedModel, u64)> = None;
    loop {
        let idle = batch.is_empty();
        let version = read(&lane.model).version;
        // The batch keeps the weights it started with; newcomers wait for a changed model.
        let room = MAX_ROWS.saturating_sub(batch.len());
        if room > 0 && (idle || current.as_ref().is_some_and(|c| c.1 == version)) {
            let newcomers = lane.generations.take(Duration::ZERO, |n| n.min(room), idle);
            if idle {
                // The model as it is now that work has come (the wait may have been long).
                let s = read(&lane.model);
                current = Some((s.lm.clone(), s.version));
            }
            let lm = &current.as_ref().expect("set").0;
            admit(lm, &mut batch, newcomers, sched);
        }
        let Some((lm, _)) = current.as_ref() else {
            continue;
        };
        if let Err(e) = batch.retain(|d| !d.reply.is_closed()) {
            for d in batch.clear() {
                let _ = d.reply.send(Err(failed(&e)));
            }
        }
        if batch.is_empty() {
            continue;
        }
        let started = Instant::now();
        let rows = batch.len();
        let edits: Vec<&[Arc<Edit>]> = batch.tags().map(|d| d.edits.as_slice()).collect();
        let stepped = row_hook(lm, &edits).and_then(|h| match h {
            Some(mut h) => batch.step(lm, &mut h),
            None => batch.step(lm, &mut NoHook),
        });
        if let Err(e) = stepped {
            // A failed step fails every generation under way, and the batch starts afresh.
            for d in batch.clear() {
                let _ = d.reply.send(Err(failed(&e)));
            }
        }
        answer(&mut batch);
        let units = (rows * lm.model.n_layer()) as f64;
        sched.took(Cost::new(Kind::Generate, units), started.elapsed());
    }
}

/// Prefills `newcomers` and adds them to `batch` (those whose edits are not hooks run alone).
fn admit(
    lm: &LoadedModel,
    batch: &mut DecodeBatch<Decoding>,
    newcomers: Vec<Queued<GenerateJob>>,
    sched: &Scheduler,
) {
    if newcomers.is_empty() {
        return;
    }
    let started = Instant::now();
    let units: f64 = newcomers
        .iter()
        .map(|q| (q.job.start.ids.len() * lm.model.n_layer()) as f64)
        .sum();
    let (together, alone): (Vec<_>, Vec<_>) = newcomers
        .into_iter()
        .partition(|q| hookable(lm, &q.job.edits));
    for q in alone {
        let j = q.job;
        let refs: Vec<&Edit> = j.edits.iter().map(|e| e.as_ref()).collect();
        let r = lm
            .with_edits(&refs)
            .and_then(|v| v.generate(&j.start.prompt, j.start.max_new, j.start.sampling));
        let _ = j.reply.send(r.map_err(ApiError::from));
    }
    let edits: Vec<&[Arc<Edit>]> = together.iter().map(|q| q.job.edits.as_slice()).collect();
    let hook = row_hook(lm, &edits);
    let starts: Vec<GenerationStart<Decoding>> = together
        .into_iter()
        .map(|q| {
            let j = q.job;
            GenerationStart {
                tag: Decoding {
                    edits: j.edits,
                    reply: j.reply,
                },
                prompt: j.start.prompt,
                ids: j.start.ids,
                max_new: j.start.max_new,
                sampling: j.start.sampling,
            }
        })
        .collect();
    // A failed prefill drops the newcomers' answers: their requests end as failed jobs.
    let admitted = hook.and_then(|h| match h {
        Some(mut h) => batch.admit(lm, starts, &mut h),
        None => batch.admit(lm, starts, &mut NoHook),
    });
    if let Err(e) = admitted {
        tracing::warn!("a decode batch's newcomers failed: {e}");
    }
    answer(batch);
    sched.took(Cost::new(Kind::Generate, units), started.elapsed());
}

/// Sends every finished generation its answer.
fn answer(batch: &mut DecodeBatch<Decoding>) {
    for (d, r) in batch.take_finished() {
        let _ = d.reply.send(r.map_err(ApiError::from));
    }
}
