//! The in-tab engine: a pool of model workers, one model copy each. A trace's rows and the
//! statistics' texts are handed out a few at a time to whichever worker is free, so all cores
//! work without SharedArrayBuffer and a cancel takes effect at the next row. An edit is computed
//! by one worker, its steps streamed, and its file then applied by the others.
//!
//! A worker that stops (out of memory, or any uncaught error) is terminated and replaced: the
//! pool keeps what brings a fresh worker to the others' state (the model, its statistics, its
//! edits, in order) and replays it before the next job. Cancelling an edit terminates its worker
//! the same way, so the other copies never see the edit.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use futures_channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use futures_util::lock::Mutex;
use futures_util::StreamExt;
use loci_core::edit::{
    EditMethod, EditReport, KeyStats, MemitReport, Share, StatsProvenance, TokenBudget, ValueGrad,
};
use loci_core::trace::{TraceHeader, TraceKind, TraceMethod, TraceRequest, TraceResult};
use loci_core::{ModelInfo, Prediction};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{ErrorEvent, MessageEvent, Worker};

use crate::protocol::{decode, encode, Bytes, EditJob, FileRef, FromWorker, StudyJob, ToWorker};
use loci_core::study::StudyLine;

/// Texts per statistics message: a few seconds of a GPT-2 worker at most (the slice's texts are
/// ~450 tokens), so progress and cancel are prompt.
const STATS_TEXTS_PER_MESSAGE: usize = 1;

/// One worker: its messages wait until its code runs.
struct Slot {
    worker: Worker,
    ready: Rc<Cell<bool>>,
    waiting: Rc<RefCell<Vec<String>>>,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_error: Closure<dyn FnMut(ErrorEvent)>,
}

impl Slot {
    fn send(&self, msg: &ToWorker) {
        let text = encode(msg);
        if self.ready.get() {
            let _ = self.worker.post_message(&JsValue::from_str(&text));
        } else {
            self.waiting.borrow_mut().push(text);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.worker.terminate();
    }
}

/// What brings a new worker to the state of the others, in order.
#[derive(Default)]
struct Setup {
    load: Option<ToWorker>,
    /// The statistics files the workers hold, by layer (a newer one replaces its layer's).
    stats: Vec<(usize, Bytes)>,
    edits: Vec<Bytes>,
}

type Inbox = (usize, u64, FromWorker);

pub struct Pool {
    /// None: a stopped worker, replaced before the next job.
    slots: RefCell<Vec<Option<Slot>>>,
    /// Each slot's generation: messages of a terminated worker are dropped.
    generation: RefCell<Vec<u64>>,
    tx: UnboundedSender<Inbox>,
    inbox: Mutex<UnboundedReceiver<Inbox>>,
    next_job: Cell<u64>,
    setup: RefCell<Setup>,
    /// A worker's out-of-memory report, kept for the message when it stops.
    oom: RefCell<Vec<Option<(u64, u64)>>>,
    /// Whether the tab changed the copies' edits itself (so they no longer follow a server).
    own_edits: Cell<bool>,
}

/// An edit made in the tab: its file and read-out.
pub struct TabEdit {
    pub file: Vec<u8>,
    pub report: Option<EditReport>,
    pub memit: Option<MemitReport>,
}

/// What an edit job ended with.
pub enum EditOutcome {
    Done(Box<TabEdit>),
    /// Nothing was changed: these layers' key statistics are needed first.
    NeedsStats(Vec<usize>),
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

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

impl Pool {
    pub fn new(workers: usize) -> Rc<Self> {
        let (tx, rx) = unbounded();
        let n = workers.max(1);
        let pool = Rc::new(Self {
            slots: RefCell::new((0..n).map(|_| None).collect()),
            generation: RefCell::new(vec![0; n]),
            tx,
            inbox: Mutex::new(rx),
            next_job: Cell::new(1),
            setup: RefCell::new(Setup::default()),
            oom: RefCell::new(vec![None; n]),
            own_edits: Cell::new(false),
        });
        for i in 0..n {
            pool.spawn(i);
        }
        pool
    }

    /// Starts worker `i` (a new generation of it).
    fn spawn(&self, i: usize) {
        let gen = {
            let mut g = self.generation.borrow_mut();
            g[i] += 1;
            g[i]
        };
        let worker = Worker::new("./worker_loader.js").expect("the browser starts workers");
        let ready = Rc::new(Cell::new(false));
        let waiting: Rc<RefCell<Vec<String>>> = Rc::default();
        let tx = self.tx.clone();
        let (w, r, q) = (worker.clone(), ready.clone(), waiting.clone());
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |e: MessageEvent| {
            let text = e.data().as_string().unwrap_or_default();
            let msg =
                decode::<FromWorker>(&text).unwrap_or_else(|message| FromWorker::Error { message });
            if let FromWorker::Ready = msg {
                r.set(true);
                for t in q.borrow_mut().drain(..) {
                    let _ = w.post_message(&JsValue::from_str(&t));
                }
                return;
            }
            let _ = tx.unbounded_send((i, gen, msg));
        });
        let tx = self.tx.clone();
        let on_error = Closure::<dyn FnMut(ErrorEvent)>::new(move |e: ErrorEvent| {
            e.prevent_default();
            let message = e.message();
            let _ = tx.unbounded_send((i, gen, FromWorker::Crashed { message }));
        });
        worker.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        worker.set_onerror(Some(on_error.as_ref().unchecked_ref()));
        self.oom.borrow_mut()[i] = None;
        self.slots.borrow_mut()[i] = Some(Slot {
            worker,
            ready,
            waiting,
            _on_message: on_message,
            _on_error: on_error,
        });
    }

    /// Marks (or clears) that the tab edited, undid or uploaded edits of these copies itself.
    pub fn set_own_edits(&self, own: bool) {
        self.own_edits.set(own);
    }

    /// Whether the copies carry edits the tab made itself (see `set_own_edits`).
    pub fn own_edits(&self) -> bool {
        self.own_edits.get()
    }

    pub fn workers(&self) -> usize {
        self.slots.borrow().iter().filter(|s| s.is_some()).count()
    }

    fn alive(&self) -> Vec<usize> {
        let slots = self.slots.borrow();
        (0..slots.len()).filter(|&i| slots[i].is_some()).collect()
    }

    fn send(&self, i: usize, msg: &ToWorker) {
        if let Some(s) = &self.slots.borrow()[i] {
            s.send(msg);
        }
    }

    /// Stops worker `i` now (its job's work is lost; the others are untouched).
    fn stop(&self, i: usize) {
        self.slots.borrow_mut()[i] = None;
        self.generation.borrow_mut()[i] += 1;
    }

    /// The next message of a live worker. A worker that stopped is terminated and its message
    /// says why, naming the memory limit when that was it.
    async fn recv(&self) -> Result<(usize, FromWorker), String> {
        let mut inbox = self
            .inbox
            .try_lock()
            .ok_or_else(|| "the tab engine is busy with another job".to_string())?;
        loop {
            let (i, gen, msg) = inbox
                .next()
                .await
                .ok_or_else(|| "the model workers stopped".to_string())?;
            if self.generation.borrow()[i] != gen {
                continue; // a terminated worker's late message
            }
            match msg {
                FromWorker::OutOfMemory { bytes, heap } => {
                    self.oom.borrow_mut()[i] = Some((bytes, heap));
                }
                FromWorker::Crashed { message } => {
                    let why = match self.oom.borrow()[i] {
                        Some((bytes, heap)) => format!(
                            "worker {} ran out of memory: it asked for {} more with {} in use, and \
                             a tab's worker can use at most 4 GiB (WebAssembly's 32-bit memory) or \
                             what the browser allows. The pool replaces it; the other workers go on",
                            i + 1,
                            gib(bytes),
                            gib(heap)
                        ),
                        None => format!(
                            "worker {} stopped ({message}); the pool replaces it",
                            i + 1
                        ),
                    };
                    self.stop(i);
                    return Ok((i, FromWorker::Crashed { message: why }));
                }
                other => return Ok((i, other)),
            }
        }
    }

    /// Replaces stopped workers: each loads the model and takes the statistics and edits the
    /// others have, in order, before the job goes on.
    async fn ensure(&self) -> Result<(), String> {
        let dead: Vec<usize> = {
            let slots = self.slots.borrow();
            (0..slots.len()).filter(|&i| slots[i].is_none()).collect()
        };
        for i in dead {
            self.spawn(i);
            if let Err(e) = self.replay(i).await {
                // A half-set-up worker must not count as one of the copies.
                self.stop(i);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Brings the new worker `i` to the others' state: the model, statistics and edits.
    async fn replay(&self, i: usize) -> Result<(), String> {
        let mut msgs = vec![];
        {
            let setup = self.setup.borrow();
            msgs.extend(setup.load.clone());
            if !setup.stats.is_empty() {
                msgs.push(ToWorker::UseStats {
                    files: setup.stats.iter().map(|(_, b)| b.clone()).collect(),
                });
            }
            msgs.extend(
                setup
                    .edits
                    .iter()
                    .map(|b| ToWorker::ApplyEdit { bytes: b.clone() }),
            );
        }
        for m in msgs {
            self.send(i, &m);
            loop {
                match self.recv().await? {
                    (j, FromWorker::Error { message } | FromWorker::Crashed { message })
                        if j == i =>
                    {
                        return Err(format!("a replacement worker failed: {message}"));
                    }
                    (j, _) if j == i => break,
                    _ => {} // a cancelled job's late rows
                }
            }
        }
        Ok(())
    }

    /// Sends `msg` to every worker and waits for each one's answer (`pick` turns it into a value;
    /// other messages are a cancelled job's late rows). The first error wins, but only once
    /// every worker has answered, so no reply is left over for the next job.
    async fn ask<T>(
        &self,
        to: &[usize],
        msg: ToWorker,
        pick: impl Fn(FromWorker) -> Option<T>,
    ) -> Result<Vec<T>, String> {
        self.ask_each(to, vec![msg; to.len()], pick).await
    }

    /// Sends each worker of `to` its own message and waits for every answer `pick` takes: the
    /// values in `to`'s order, or the first error.
    async fn ask_each<T>(
        &self,
        to: &[usize],
        msgs: Vec<ToWorker>,
        pick: impl Fn(FromWorker) -> Option<T>,
    ) -> Result<Vec<T>, String> {
        // A worker stopped since `to` was taken (it crashed between two asks) would never
        // answer.
        if to.iter().any(|&i| self.slots.borrow()[i].is_none()) {
            return Err("a model worker stopped during the job: run it again".into());
        }
        for (&i, msg) in to.iter().zip(&msgs) {
            self.send(i, msg);
        }
        let mut values: Vec<Option<T>> = to.iter().map(|_| None).collect();
        let (mut failed, mut waiting) = (None, to.to_vec());
        while !waiting.is_empty() {
            let (i, m) = self.recv().await?;
            if !waiting.contains(&i) {
                continue;
            }
            let place = to.iter().position(|&j| j == i).expect("a worker asked");
            match m {
                FromWorker::Error { message } | FromWorker::Crashed { message } => {
                    failed.get_or_insert(message);
                }
                other => match pick(other) {
                    Some(v) => values[place] = Some(v),
                    None => continue,
                },
            }
            waiting.retain(|&j| j != i);
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(values.into_iter().flatten().collect()),
        }
    }

    async fn ask_all<T>(
        &self,
        msg: ToWorker,
        pick: impl Fn(FromWorker) -> Option<T>,
    ) -> Result<Vec<T>, String> {
        self.ensure().await?;
        self.ask(&self.alive(), msg, pick).await
    }

    /// Every worker's matrix-product FLOPs so far, summed, and the largest worker memory.
    pub async fn work(&self) -> Result<(u64, u64), String> {
        let work = |m| match m {
            FromWorker::Work { flops, heap_bytes } => Some((flops, heap_bytes)),
            _ => None,
        };
        let all = self.ask_all(ToWorker::Work, work).await?;
        let flops = all.iter().map(|w| w.0).sum();
        Ok((flops, all.iter().map(|w| w.1).max().unwrap_or(0)))
    }

    /// The best matrix-product speed of all workers at once (each on its own thread), summed:
    /// the tab's peak in GFLOP/s.
    pub async fn peak(&self) -> Result<f64, String> {
        let peak = |m| match m {
            FromWorker::Peak { gflops } => Some(gflops),
            _ => None,
        };
        Ok(self.ask_all(ToWorker::Peak, peak).await?.iter().sum())
    }

    async fn load_all(&self, msg: ToWorker) -> Result<ModelInfo, String> {
        *self.setup.borrow_mut() = Setup {
            load: Some(msg.clone()),
            ..Default::default()
        };
        let loaded = |m| match m {
            FromWorker::Loaded { info, .. } => Some(info),
            _ => None,
        };
        let mut out = self.ask_all(msg, loaded).await?;
        out.pop().ok_or_else(|| "no worker answered".into())
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
        self.ensure().await?;
        let w = *self.alive().first().ok_or("no model worker is running")?;
        let msg = ToWorker::Predict {
            prompt: prompt.to_string(),
            top,
        };
        let predicted = |m| match m {
            FromWorker::Prediction(p) => Some(p),
            _ => None,
        };
        let mut out = self.ask(&[w], msg, predicted).await?;
        out.pop().ok_or_else(|| "no worker answered".into())
    }

    /// A whole trace by attribution patching or knowledge neurons, on one worker.
    pub async fn trace_whole(
        &self,
        method: TraceMethod,
        request: &TraceRequest,
    ) -> Result<TraceResult, String> {
        self.ensure().await?;
        let w = *self.alive().first().ok_or("no model worker is running")?;
        let msg = ToWorker::TraceWhole {
            method,
            request: request.clone(),
        };
        let traced = |m| match m {
            FromWorker::Traced(r) => Some(*r),
            _ => None,
        };
        let mut out = self.ask(&[w], msg, traced).await?;
        out.pop().ok_or_else(|| "no worker answered".into())
    }

    /// Each of workers `to`'s digest of the weights edits change.
    async fn digests(&self, to: &[usize]) -> Result<Vec<String>, String> {
        let digest = |m| match m {
            FromWorker::Digest { digest } => Some(digest),
            _ => None,
        };
        self.ask(to, ToWorker::Digest, digest).await
    }

    /// A digest of the weights edits change, the same in every worker (else an error).
    pub async fn digest(&self) -> Result<String, String> {
        self.ensure().await?;
        let digests = self.digests(&self.alive()).await?;
        match &digests[..] {
            [first, rest @ ..] if rest.iter().all(|d| d == first) => Ok(first.clone()),
            _ => Err(format!("the workers' weights differ: {digests:?}")),
        }
    }

    async fn edits_reply(&self, to: &[usize], msg: ToWorker) -> Result<usize, String> {
        let count = |m| match m {
            FromWorker::Edits { count } => Some(count),
            _ => None,
        };
        let out = self.ask(to, msg, count).await?;
        Ok(out.first().copied().unwrap_or(0))
    }

    /// Applies an edit file in every worker; returns the number of edits applied. Any worker
    /// that fails is replaced, so all copies end equal.
    pub async fn apply_edit(&self, bytes: Vec<u8>) -> Result<usize, String> {
        self.ensure().await?;
        let to = self.alive();
        let bytes = Bytes(bytes);
        let msg = ToWorker::ApplyEdit {
            bytes: bytes.clone(),
        };
        match self.edits_reply(&to, msg).await {
            Ok(n) => {
                self.setup.borrow_mut().edits.push(bytes);
                Ok(n)
            }
            Err(e) => {
                // A bad file fails in every worker and changes none; anything else leaves
                // copies that differ, so all are rebuilt from the edits they share.
                self.rebuild_if_split(&to).await;
                Err(e)
            }
        }
    }

    /// After a failed edit: when the copies' weights differ, stop them all; the next job
    /// rebuilds them from the setup.
    async fn rebuild_if_split(&self, to: &[usize]) {
        let split = match self.digests(to).await {
            Ok(d) => d.windows(2).any(|w| w[0] != w[1]),
            Err(_) => false,
        };
        if split {
            for &i in to {
                self.stop(i);
            }
        }
    }

    pub async fn undo_edit(&self, all: bool) -> Result<usize, String> {
        self.ensure().await?;
        let to = self.alive();
        let result = self.edits_reply(&to, ToWorker::UndoEdit { all }).await;
        {
            let mut setup = self.setup.borrow_mut();
            if all {
                setup.edits.clear();
            } else {
                setup.edits.pop();
            }
        }
        if result.is_err() {
            // Some copies may not have undone: rebuild them all from the setup (the undo's
            // intended state).
            for &i in &to {
                self.stop(i);
            }
        }
        result
    }

    /// Edits now applied (the files, oldest first).
    pub fn edit_files(&self) -> Vec<Vec<u8>> {
        self.setup
            .borrow()
            .edits
            .iter()
            .map(|b| b.0.clone())
            .collect()
    }

    /// Gives every worker these statistics files (each checked against the model first);
    /// returns their provenance, in the files' order.
    pub async fn use_stats(&self, files: Vec<Vec<u8>>) -> Result<Vec<StatsProvenance>, String> {
        let given: Vec<StatsProvenance> = files
            .iter()
            .map(|f| KeyStats::from_bytes(f).map(|s| s.provenance))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let files: Vec<Bytes> = files.into_iter().map(Bytes).collect();
        let held = |m| matches!(m, FromWorker::StatsHeld { .. }).then_some(());
        self.ask_all(
            ToWorker::UseStats {
                files: files.clone(),
            },
            held,
        )
        .await?;
        let mut setup = self.setup.borrow_mut();
        for (p, f) in given.iter().zip(files) {
            setup.stats.retain(|(l, _)| *l != p.layer);
            setup.stats.push((p.layer, f));
        }
        Ok(given)
    }

    /// Collects key statistics of `layers` over `texts` (in order, exactly `goal` tokens: the
    /// text that crosses the mark is cut there), spread over the workers, and merges the
    /// workers' shares (`KeyStats::merge`): one per layer, in `layers`' order. `on_tokens`
    /// hears the tokens so far; false cancels.
    #[allow(clippy::too_many_arguments)]
    pub async fn collect_stats(
        &self,
        layers: &[usize],
        max_len: usize,
        texts: &[String],
        corpus: &str,
        goal: u64,
        mut on_tokens: impl FnMut(u64) -> bool,
    ) -> Result<Vec<KeyStats>, String> {
        self.ensure().await?;
        let to = self.alive();
        let begin = ToWorker::StatsBegin {
            layers: layers.to_vec(),
            max_len,
        };
        let begun = |m| matches!(m, FromWorker::StatsTokens { .. }).then_some(());
        self.ask(&to, begin, begun).await?;
        // One worker counts the texts' tokens; the plan cuts them to the budget.
        let count = ToWorker::StatsCount {
            texts: texts.to_vec(),
        };
        let counted = |m| match m {
            FromWorker::StatsCounts { tokens } => Some(tokens),
            _ => None,
        };
        let first = [*to.first().ok_or("no model worker is running")?];
        let counts = self.ask(&first, count, counted).await?.remove(0);
        let mut planned: Vec<(String, usize)> = texts
            .iter()
            .cloned()
            .zip(TokenBudget::new(goal).plan(&counts))
            .filter(|&(_, n)| n > 0)
            .collect();
        // The shortest texts go first, one per worker, so progress shows within a second; the
        // rest longest first, so the workers finish together. (The sum is the same set of
        // texts: only its rounding depends on the order.)
        planned.sort_by_key(|(_, n)| *n);
        let quick: Vec<(String, usize)> = planned.drain(..to.len().min(planned.len())).collect();
        planned.reverse();
        let planned: Vec<(String, usize)> = quick.into_iter().chain(planned).collect();
        let mut chunks: Vec<Vec<(String, usize)>> = planned
            .chunks(STATS_TEXTS_PER_MESSAGE)
            .map(<[(String, usize)]>::to_vec)
            .rev()
            .collect();
        let n = self.slots.borrow().len();
        let (mut seen, mut busy) = (vec![0u64; n], vec![false; n]);
        let give = |i: usize, chunks: &mut Vec<Vec<(String, usize)>>, busy: &mut Vec<bool>| {
            if let Some(c) = chunks.pop() {
                self.send(i, &ToWorker::StatsTexts { texts: c });
                busy[i] = true;
            }
        };
        for &i in &to {
            give(i, &mut chunks, &mut busy);
        }
        while busy.contains(&true) {
            let (i, m) = self.recv().await?;
            match m {
                FromWorker::StatsTokens { tokens } if busy[i] => {
                    busy[i] = false;
                    seen[i] = tokens;
                    let total: u64 = seen.iter().sum();
                    if !on_tokens(total) {
                        self.drain(&mut busy).await;
                        return Err("cancelled".into());
                    }
                    if total >= goal {
                        chunks.clear();
                    }
                    give(i, &mut chunks, &mut busy);
                }
                FromWorker::Error { message } | FromWorker::Crashed { message } if busy[i] => {
                    busy[i] = false;
                    self.drain(&mut busy).await;
                    return Err(message);
                }
                FromWorker::Crashed { message } => {
                    self.drain(&mut busy).await;
                    return Err(message);
                }
                _ => {} // late rows of a cancelled trace
            }
        }
        let finish = ToWorker::StatsFinish {
            corpus: corpus.to_string(),
        };
        let share = |m| match m {
            FromWorker::StatsParts { files } => Some(files),
            _ => None,
        };
        // A worker that got no text has an empty share.
        let shares: Vec<Vec<Bytes>> = self.ask(&to, finish, share).await?;
        (0..layers.len())
            .map(|l| {
                let parts = shares
                    .iter()
                    .filter(|w| !w.is_empty())
                    .map(|w| KeyStats::from_bytes(&w[l].0))
                    .collect::<Result<Vec<_>, _>>()?;
                KeyStats::merge(&parts)
            })
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())
    }

    /// Waits for the answers of the workers still `busy`, so none is left for the next job.
    async fn drain(&self, busy: &mut [bool]) {
        while busy.contains(&true) {
            match self.recv().await {
                Ok((
                    i,
                    FromWorker::StatsTokens { .. }
                    | FromWorker::Error { .. }
                    | FromWorker::Crashed { .. },
                )) => busy[i] = false,
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    /// Runs `msg` in one worker, handing its progress messages to `on_progress` (false cancels:
    /// that worker is stopped and replaced, the others never see its work); returns the
    /// worker's last answer.
    async fn run_one(
        &self,
        msg: ToWorker,
        mut on_progress: impl FnMut(FromWorker) -> bool,
    ) -> Result<(usize, FromWorker), String> {
        self.ensure().await?;
        let w = *self.alive().first().ok_or("no model worker is running")?;
        self.send(w, &msg);
        loop {
            let (i, m) = self.recv().await?;
            if i != w {
                continue; // late rows of a cancelled trace
            }
            if matches!(m, FromWorker::EditStep { .. } | FromWorker::StudyLine(_)) {
                if !on_progress(m) {
                    self.stop(w);
                    return Err("cancelled".into());
                }
                continue;
            }
            match m {
                FromWorker::Error { message } | FromWorker::Crashed { message } => {
                    return Err(message)
                }
                last @ (FromWorker::Edited { .. }
                | FromWorker::NeedsStats { .. }
                | FromWorker::StudyDone) => return Ok((w, last)),
                _ => {} // a cancelled trace's late rows
            }
        }
    }

    /// Computes an edit — ROME shared by every worker ([`Self::rome_shared`]), any other in one
    /// worker — with its steps to `on_step`, which returns false to cancel (a shared edit
    /// stops between two steps; a one-worker edit's worker is stopped and replaced; either way
    /// no copy has changed); then applies its file in every other worker.
    pub async fn edit(
        &self,
        job: EditJob,
        mut on_step: impl FnMut(&str, usize, usize, f32) -> bool,
    ) -> Result<EditOutcome, String> {
        self.ensure().await?;
        if job.method == EditMethod::Rome && self.alive().len() > 1 {
            return self.rome_shared(job, on_step).await;
        }
        let on_progress = |m: FromWorker| match m {
            FromWorker::EditStep {
                phase,
                step,
                steps,
                loss,
            } => on_step(&phase, step, steps, loss),
            _ => true,
        };
        let edited = match self.run_one(ToWorker::Edit(job), on_progress).await? {
            (_, FromWorker::NeedsStats { layers }) => return Ok(EditOutcome::NeedsStats(layers)),
            (
                editor,
                FromWorker::Edited {
                    file,
                    report,
                    memit,
                    ..
                },
            ) => (
                editor,
                TabEdit {
                    file: file.0,
                    report: report.map(|r| *r),
                    memit: memit.map(|m| *m),
                },
            ),
            (_, other) => return Err(format!("an unexpected answer to an edit: {other:?}")),
        };
        let (editor, edited) = edited;
        self.spread(editor, edited).await
    }

    /// A ROME edit whose v* every worker shares: each holds the same run and computes its share
    /// of the rows; each step the page hands every worker all the parts, then all the
    /// gradients, so all take the same step. The first worker finishes the edit and the others
    /// take its file. `on_step` returning false cancels between steps: nothing was applied, and
    /// the runs end with the workers' next job.
    async fn rome_shared(
        &self,
        job: EditJob,
        mut on_step: impl FnMut(&str, usize, usize, f32) -> bool,
    ) -> Result<EditOutcome, String> {
        let to = self.alive();
        let begin = (0..to.len())
            .map(|part| {
                let share = Share::part(part, to.len()).map_err(|e| e.to_string())?;
                let job = job.clone();
                Ok(ToWorker::RomeBegin { job, share })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let begun = |m| match m {
            FromWorker::ValueParts { parts } => Some(Ok(parts)),
            FromWorker::NeedsStats { layers } => Some(Err(layers)),
            _ => None,
        };
        let mut parts = vec![];
        for b in self.ask_each(&to, begin, begun).await? {
            match b {
                Ok(p) => parts.push(p),
                Err(layers) => return Ok(EditOutcome::NeedsStats(layers)),
            }
        }
        loop {
            let stepped = |m| match m {
                FromWorker::ValueGrad {
                    losses,
                    step,
                    steps,
                    grad,
                } => Some((losses, step, steps, Some(grad))),
                FromWorker::ValueDone {
                    losses,
                    step,
                    steps,
                } => Some((losses, step, steps, None)),
                _ => None,
            };
            let answers = self
                .ask(&to, ToWorker::ValueLosses { parts }, stepped)
                .await?;
            let (losses, step, steps, _) = &answers[0];
            let loss = loci_core::progress::step_loss(&losses.0);
            if !on_step("value", *step, *steps, loss) {
                return Err("cancelled".into());
            }
            let grads: Option<Vec<ValueGrad>> = answers.into_iter().map(|a| a.3).collect();
            let Some(grads) = grads else { break };
            let next = |m| match m {
                FromWorker::ValueParts { parts } => Some(parts),
                _ => None,
            };
            parts = self
                .ask(&to, ToWorker::ValueAdvance { grads }, next)
                .await?;
        }
        let finished = |m| match m {
            FromWorker::Edited {
                file,
                report,
                memit,
                ..
            } => Some(TabEdit {
                file: file.0,
                report: report.map(|r| *r),
                memit: memit.map(|m| *m),
            }),
            _ => None,
        };
        let edited = self.ask(&to[..1], ToWorker::RomeFinish, finished).await?;
        let edited = edited.into_iter().next().ok_or("no edit came back")?;
        self.spread(to[0], edited).await
    }

    /// Applies the edit `editor` made in every other worker and keeps it in the setup.
    async fn spread(&self, editor: usize, edited: TabEdit) -> Result<EditOutcome, String> {
        let others: Vec<usize> = self.alive().into_iter().filter(|&i| i != editor).collect();
        let bytes = Bytes(edited.file.clone());
        let applied = ToWorker::ApplyEdit {
            bytes: bytes.clone(),
        };
        let result = self.edits_reply(&others, applied).await;
        self.setup.borrow_mut().edits.push(bytes);
        if result.is_err() {
            // Copies that could not take it are rebuilt with it from the setup.
            self.rebuild_if_split(&others).await;
        }
        Ok(EditOutcome::Done(Box::new(edited)))
    }

    /// Runs a study in one worker, each line to `on_line` (false cancels); None when it is
    /// over, else the layers whose statistics it needs first.
    pub async fn study(
        &self,
        job: StudyJob,
        mut on_line: impl FnMut(StudyLine) -> bool,
    ) -> Result<Option<Vec<usize>>, String> {
        let on_progress = |m: FromWorker| match m {
            FromWorker::StudyLine(l) => on_line(l),
            _ => true,
        };
        match self
            .run_one(ToWorker::Study(Box::new(job)), on_progress)
            .await?
        {
            (_, FromWorker::StudyDone) => Ok(None),
            (_, FromWorker::NeedsStats { layers }) => Ok(Some(layers)),
            (_, other) => Err(format!("an unexpected answer to a study: {other:?}")),
        }
    }

    /// Runs a trace over the pool. `on_row` returning false cancels it. A worker that stops
    /// mid-trace loses only its row, which another worker runs.
    pub async fn trace(
        &self,
        request: &TraceRequest,
        mut on_header: impl FnMut(&TraceHeader),
        mut on_row: impl FnMut(TraceKind, usize, Vec<f32>) -> bool,
    ) -> Result<(), String> {
        self.ensure().await?;
        let job = self.next_job.get();
        self.next_job.set(job + 1);
        let to = self.alive();
        for &i in &to {
            self.send(
                i,
                &ToWorker::TracePlan {
                    job,
                    request: request.clone(),
                },
            );
        }
        let drop_all = || {
            for &i in &to {
                self.send(i, &ToWorker::TraceDrop { job });
            }
        };
        let mut queue: Vec<(TraceKind, usize)> = vec![];
        let mut running: Vec<Option<(TraceKind, usize)>> = vec![None; self.slots.borrow().len()];
        let (mut total, mut done) = (None::<usize>, 0usize);
        let give = |w: usize, queue: &mut Vec<(TraceKind, usize)>, running: &mut Vec<_>| {
            running[w] = queue.pop();
            if let Some((kind, token)) = running[w] {
                self.send(w, &ToWorker::TraceRow { job, kind, token });
            }
        };
        let mut planned = vec![];
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
                    planned.push(w);
                    give(w, &mut queue, &mut running);
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
                    give(w, &mut queue, &mut running);
                }
                FromWorker::Crashed { message } => {
                    // Its row goes back to the queue; an idle planned worker takes it.
                    if let Some(row) = running[w].take() {
                        queue.push(row);
                    }
                    planned.retain(|&p| p != w);
                    if self.alive().is_empty() {
                        return Err(message);
                    }
                    if let Some(&idle) = planned.iter().find(|&&p| running[p].is_none()) {
                        give(idle, &mut queue, &mut running);
                    }
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
