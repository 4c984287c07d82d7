//! Scheduling by cost. Every job's work is estimated before it is admitted (tokens × layers ×
//! passes, per kind), and turned into seconds by a running mean of what that kind has cost per
//! unit on this machine. Two lanes:
//!
//! - the **quick lane**: predictions and generations, gathered across requests into batched
//!   passes (see `batcher`) on threads of normal priority;
//! - the **heavy lane**: traces, edits, evaluations, studies — at most `--workers` at once, each
//!   on its own threads at a lower CPU priority (nice 10), so a prediction never waits for a
//!   core behind a minute-long trace, while an idle machine gives the trace every core. When a
//!   slot frees, the next job is the oldest of a session with the fewest jobs running (a fair
//!   share per visitor).
//!
//! A request is refused (503, `Retry-After` of the estimate) only when its expected wait passes
//! `--max-wait`, not by a count.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::jobs::ApiError;

/// What a job does, for its estimate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Predict,
    Generate,
    Trace,
    Edit,
    Eval,
    Study,
    /// Key statistics, uploads and imports: work the estimate treats as one unit.
    Other,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Predict,
        Kind::Generate,
        Kind::Trace,
        Kind::Edit,
        Kind::Eval,
        Kind::Study,
        Kind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Predict => "predict",
            Kind::Generate => "generate",
            Kind::Trace => "trace",
            Kind::Edit => "edit",
            Kind::Eval => "eval",
            Kind::Study => "study",
            Kind::Other => "other",
        }
    }

    /// Seconds per unit before anything was measured: SmolLM2-135M on one core of a 2-core
    /// Xeon (a prediction's token·layer ≈ 0.2 ms; a trace's cells share their passes).
    fn prior(self) -> f64 {
        match self {
            Kind::Predict | Kind::Generate => 2e-4,
            Kind::Trace => 2.5e-5,
            Kind::Edit | Kind::Eval | Kind::Study => 2e-4,
            Kind::Other => 1.0,
        }
    }
}

/// A job's estimated work, in token·layer passes.
#[derive(Clone, Copy, Debug)]
pub struct Cost {
    pub kind: Kind,
    pub units: f64,
}

impl Cost {
    pub fn new(kind: Kind, units: f64) -> Self {
        Self {
            kind,
            units: units.max(1.0),
        }
    }
}

/// Each kind's work in token·layer passes of a 576-wide model (a layer's matrix work grows with
/// the square of its width), from what a request asks (tokens estimated from characters where
/// the prompt is not yet tokenized: about four to a token).
pub mod units {
    /// A model's shape, as far as estimates go.
    #[derive(Clone, Copy, Debug)]
    pub struct Shape {
        pub layers: usize,
        pub d_model: usize,
    }

    impl Shape {
        /// The guess for a model not loaded yet.
        pub const GUESS: Shape = Shape {
            layers: 24,
            d_model: 1024,
        };

        /// One token through every layer, in token·layers of a 576-wide model.
        fn pass(self) -> f64 {
            self.layers as f64 * (self.d_model as f64 / 576.0).powi(2)
        }
    }

    /// Tokens in a text, roughly, before it is tokenized.
    pub fn tokens_of(text: &str) -> usize {
        text.len() / 4 + 1
    }

    /// One pass over the prompt.
    pub fn predict(tokens: usize, m: Shape) -> f64 {
        tokens as f64 * m.pass()
    }

    /// The prompt's pass and one step per new token.
    pub fn generate(tokens: usize, new: usize, m: Shape) -> f64 {
        (tokens + new) as f64 * m.pass()
    }

    /// A trace: each of `kinds × tokens × layers` cells restores one state in `samples` noisy
    /// passes over (on average) half the layers.
    pub fn trace(tokens: usize, m: Shape, kinds: usize, samples: usize) -> f64 {
        (kinds * tokens * m.layers * samples * tokens) as f64 * m.pass() / 2.0
    }

    /// Attribution patching: the clean run, then one corrupted pass and its backward pass
    /// (about three passes of the samples' rows in all).
    pub fn trace_attribution(tokens: usize, m: Shape, samples: usize) -> f64 {
        (3 * samples * tokens) as f64 * m.pass()
    }

    /// Knowledge neurons: at two tokens, one pass per layer of `samples` rows over at most the
    /// prompt's tokens and (on average) half the layers, with its backward (three passes' work).
    pub fn trace_neurons(tokens: usize, m: Shape, samples: usize) -> f64 {
        (2 * 3 * m.layers * samples * tokens) as f64 * m.pass() / 2.0
    }

    /// An edit of `facts` facts: `steps` forward and backward passes (three passes' work) over
    /// each prompt and its ten context prefixes.
    pub fn edit(tokens: usize, m: Shape, steps: usize, facts: usize) -> f64 {
        (3 * steps * 11 * tokens * facts.max(1)) as f64 * m.pass()
    }

    /// A study: one edit per layer swept, and a trace.
    pub fn study(tokens: usize, m: Shape, swept: usize, steps: usize) -> f64 {
        swept as f64 * edit(tokens, m, steps, 1) + trace(tokens, m, 1, 10)
    }
}

/// One heavy job, waiting or running.
struct Entry {
    id: u64,
    session: String,
    seconds: f64,
    since: Instant,
    wake: Option<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Default)]
struct Heavy {
    running: Vec<Entry>,
    waiting: VecDeque<Entry>,
    next_id: u64,
    /// The sessions of the last jobs started, newest last (for fair shares).
    recent: VecDeque<String>,
}

impl Heavy {
    /// How many of the last jobs started are remembered.
    const RECENT: usize = 16;

    fn started(&mut self, session: &str) {
        if self.recent.len() == Self::RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(session.to_string());
    }
}

/// The estimates and the heavy lane.
pub struct Scheduler {
    /// Seconds per unit by kind (running means).
    rates: Mutex<[f64; 7]>,
    heavy: Mutex<Heavy>,
    /// Heavy jobs at once.
    pub heavy_slots: usize,
    /// The longest expected wait a request is admitted with.
    pub max_wait: Duration,
    /// Heavy jobs that may wait, whatever their estimates (a bound on memory).
    pub max_waiting: usize,
}

impl Scheduler {
    pub fn new(heavy_slots: usize, max_wait: Duration, max_waiting: usize) -> Self {
        Self {
            rates: Mutex::new(Kind::ALL.map(Kind::prior)),
            heavy: Mutex::default(),
            heavy_slots: heavy_slots.max(1),
            max_wait,
            max_waiting,
        }
    }

    /// The expected seconds of a job of this cost (running alone).
    pub fn seconds(&self, c: Cost) -> f64 {
        c.units * self.rate(c.kind)
    }

    /// Kind `k`'s expected seconds per unit.
    pub fn rate(&self, k: Kind) -> f64 {
        self.rates.lock().unwrap_or_else(|p| p.into_inner())[k as usize]
    }

    /// Notes that work of cost `c` took `took`: the kind's rate moves an eighth of the way.
    pub fn took(&self, c: Cost, took: Duration) {
        let per_unit = took.as_secs_f64() / c.units;
        let mut r = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        let k = c.kind as usize;
        r[k] = (r[k] * 7.0 + per_unit) / 8.0;
        metrics::gauge!("loci_seconds_per_unit", "kind" => c.kind.name()).set(r[k]);
    }

    /// Each kind's expected seconds per unit now.
    pub fn rates(&self) -> Vec<(&'static str, f64)> {
        let r = self.rates.lock().unwrap_or_else(|p| p.into_inner());
        Kind::ALL
            .iter()
            .map(|k| (k.name(), r[*k as usize]))
            .collect()
    }

    /// A 503 for an expected wait of `wait` seconds.
    pub fn refuse(&self, wait: f64, lane: &str) -> ApiError {
        metrics::counter!("loci_rejected_total", "status" => "503", "lane" => lane.to_string())
            .increment(1);
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the server is busy: this job would wait about {wait:.0} s for the {lane} lane \
                 (the bound is {} s); try again shortly",
                self.max_wait.as_secs_f64()
            ),
        );
        e.retry_after = Some(wait.ceil().max(1.0) as u64);
        e
    }

    /// A place in the heavy lane for a job of `session` of cost `c` (or the 503 of a wait
    /// longer than the bound), and the turn to await when it must wait (`None`: it may start at
    /// once). The ticket holds the place until dropped; dropping it while waiting gives the
    /// place up. When a slot frees, the next job is the oldest of a session with the fewest jobs
    /// running and, among those, the fewest started lately.
    pub fn enqueue(
        self: &Arc<Self>,
        session: &str,
        c: Cost,
    ) -> Result<(HeavyTicket, Option<tokio::sync::oneshot::Receiver<()>>), ApiError> {
        let seconds = self.seconds(c);
        let mut h = self.lock();
        h.next_id += 1;
        let id = h.next_id;
        let entry = |wake| Entry {
            id,
            session: session.to_string(),
            seconds,
            since: Instant::now(),
            wake,
        };
        let ticket = || HeavyTicket {
            sched: self.clone(),
            id,
        };
        if h.running.len() < self.heavy_slots && h.waiting.is_empty() {
            h.running.push(entry(None));
            h.started(session);
            return Ok((ticket(), None));
        }
        let wait = self.heavy_wait(&h);
        if wait > self.max_wait.as_secs_f64() || h.waiting.len() >= self.max_waiting {
            return Err(self.refuse(wait, "heavy"));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        h.waiting.push_back(entry(Some(tx)));
        metrics::gauge!("loci_waiting", "lane" => "heavy").set(h.waiting.len() as f64);
        Ok((ticket(), Some(rx)))
    }

    /// Expected seconds until a newly queued heavy job starts.
    fn heavy_wait(&self, h: &Heavy) -> f64 {
        let left: f64 = h
            .running
            .iter()
            .map(|e| (e.seconds - e.since.elapsed().as_secs_f64()).max(0.0))
            .chain(h.waiting.iter().map(|e| e.seconds))
            .sum();
        left / self.heavy_slots as f64
    }

    /// Heavy jobs running and waiting now.
    pub fn heavy_jobs(&self) -> usize {
        let h = self.lock();
        h.running.len() + h.waiting.len()
    }

    /// Heavy jobs waiting now.
    pub fn heavy_waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Expected wait of the heavy lane now, in seconds.
    pub fn heavy_wait_now(&self) -> f64 {
        self.heavy_wait(&self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Heavy> {
        self.heavy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees job `id`'s place (waiting or running) and starts the next jobs that fit.
    fn release(&self, id: u64) {
        let mut h = self.lock();
        h.waiting.retain(|e| e.id != id);
        h.running.retain(|e| e.id != id);
        while h.running.len() < self.heavy_slots {
            let Some(i) = next_fair(&h) else { break };
            let Some(mut e) = h.waiting.remove(i) else {
                break;
            };
            e.since = Instant::now();
            let woke = e.wake.take().is_some_and(|w| w.send(()).is_ok());
            if woke {
                h.started(&e.session);
                h.running.push(e);
            }
        }
        metrics::gauge!("loci_waiting", "lane" => "heavy").set(h.waiting.len() as f64);
    }
}

/// The waiting job to start next: the oldest of a session with the fewest jobs running, and
/// among those, the fewest started lately.
fn next_fair(h: &Heavy) -> Option<usize> {
    let running = |s: &str| h.running.iter().filter(|e| e.session == s).count();
    let lately = |s: &str| h.recent.iter().filter(|r| *r == s).count();
    h.waiting
        .iter()
        .enumerate()
        .min_by_key(|(i, e)| (running(&e.session), lately(&e.session), *i))
        .map(|(i, _)| i)
}

/// A job's place in the heavy lane (see [`Scheduler::heavy`]).
pub struct HeavyTicket {
    sched: Arc<Scheduler>,
    id: u64,
}

impl Drop for HeavyTicket {
    fn drop(&mut self) {
        self.sched.release(self.id);
    }
}

/// Runs `f` on a new thread at a lower CPU priority (nice 10 on Linux; threads it starts
/// inherit it), so that the quick lane's threads go first on a busy machine.
pub async fn low_priority<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("loci-heavy".into())
        .spawn(move || {
            lower_priority();
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(out);
        });
    let failed = || {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error: the job failed",
        )
    };
    if spawned.is_err() {
        return Err(failed());
    }
    match rx.await {
        Ok(Ok(r)) => r,
        _ => Err(failed()),
    }
}

/// Lowers this thread's CPU priority (Linux: `setpriority` on the calling thread).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority reads no memory of ours; `who = 0` is the calling thread on Linux.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(slots: usize, wait_s: u64) -> Arc<Scheduler> {
        Arc::new(Scheduler::new(slots, Duration::from_secs(wait_s), 100))
    }

    impl Scheduler {
        /// A place, awaited.
        async fn heavy(self: &Arc<Self>, session: &str, c: Cost) -> Result<HeavyTicket, ApiError> {
            let (ticket, turn) = self.enqueue(session, c)?;
            if let Some(turn) = turn {
                let _ = turn.await;
            }
            Ok(ticket)
        }
    }

    #[tokio::test]
    async fn a_free_slot_starts_at_once_and_a_long_wait_is_refused() {
        let s = sched(1, 10);
        let first = s.heavy("a", Cost::new(Kind::Other, 30.0)).await.unwrap();
        // 30 s ahead (Other costs one second per unit) is beyond the 10 s bound.
        let Err(refused) = s.heavy("b", Cost::new(Kind::Other, 1.0)).await else {
            panic!("admitted")
        };
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(refused.retry_after.unwrap() >= 29);
        drop(first);
        let _next = s.heavy("b", Cost::new(Kind::Other, 1.0)).await.unwrap();
    }

    #[tokio::test]
    async fn the_session_served_least_lately_goes_first_and_a_leaver_frees_its_place() {
        let s = sched(1, 1000);
        let running = s.heavy("a", Cost::new(Kind::Other, 1.0)).await.unwrap();
        let order = Arc::new(Mutex::new(vec![]));
        let mut tasks = vec![];
        for (who, delay) in [("a", 0), ("a", 5), ("b", 10)] {
            let (s, order) = (s.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let t = s.heavy(who, Cost::new(Kind::Other, 1.0)).await.unwrap();
                order.lock().unwrap().push(who);
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(t);
            }));
        }
        // One that gives up while waiting must not hold a place.
        let leaver = {
            let s = s.clone();
            tokio::spawn(async move { s.heavy("c", Cost::new(Kind::Other, 1.0)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        leaver.abort();
        assert!(leaver.await.is_err_and(|e| e.is_cancelled()));
        assert_eq!(s.lock().waiting.len(), 3);
        drop(running);
        for t in tasks {
            t.await.unwrap();
        }
        // "a" had the last turn, so "b" goes first though it came last; then "a"'s in order.
        assert_eq!(*order.lock().unwrap(), vec!["b", "a", "a"]);
    }
}
