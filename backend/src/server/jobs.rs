//! The plumbing every endpoint shares: errors as `{"error": "..."}` with a fitting status, JSON
//! bodies, the bounded job queue (admission, running permits, blocking threads, panics as 500s)
//! and server-sent event streams.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use loci_core::edit::{Edit, KeyStats};
use loci_core::{LoadedModel, LociError};
use serde::Serialize;

use super::models::{ModelState, ServedModel};
use super::sched::{low_priority, Cost, HeavyTicket};
pub(super) use super::sched::{units, Kind};
pub(super) use super::sessions::Visitor;
use super::{AppState, Schedule};

/// The model for reading (a poisoned lock is still the model: a panic never half-changes it).
pub(super) fn read(m: &ServedModel) -> std::sync::RwLockReadGuard<'_, ModelState> {
    // A panicked job never leaves a weight half-written (edits swap whole tensors).
    m.state.read().unwrap_or_else(|p| p.into_inner())
}

/// The model for changing (edits, undo, the study).
pub(super) fn write(m: &ServedModel) -> std::sync::RwLockWriteGuard<'_, ModelState> {
    m.state.write().unwrap_or_else(|p| p.into_inner())
}

pub(super) const MAX_PROMPT_CHARS: usize = 2000;

/// An error as the client sees it: a status and `{"error": message}` (and for a busy server,
/// when to come back).
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
    pub(super) retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

impl From<LociError> for ApiError {
    fn from(e: LociError) -> Self {
        let status = match e {
            LociError::Input(_) | LociError::Tokenizer(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<LociError>() {
            Ok(l) => l.into(),
            Err(e) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        }
    }
}

/// A JSON body, or a 400 that says what is wrong with it.
pub(super) fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v)
        .map_err(|r| ApiError::new(r.status(), format!("bad request body: {}", r.body_text())))
}

/// Refuses an empty prompt or one over the server's length bound.
pub(super) fn check_prompt(p: &str) -> Result<(), ApiError> {
    if p.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("prompts are limited to {MAX_PROMPT_CHARS} characters"),
        ));
    }
    Ok(())
}

/// The served model of this name (loaded on first use), or a 404.
pub(super) fn model(st: &AppState, name: &str) -> Result<Arc<ServedModel>, ApiError> {
    st.registry.get(name)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "unknown model {name:?}; available: {}",
                st.registry.names().join(", ")
            ),
        )
    })
}

/// The model as `v` sees it: the shared model with the visitor's own edits added as a view (the
/// weights are shared, not copied). An operator's requests see the shared model.
pub(super) fn view(st: &AppState, v: &Visitor, name: &str) -> Result<LoadedModel, ApiError> {
    let m = model(st, name)?;
    let edits = session_edits(st, v, name);
    let refs: Vec<&Edit> = edits.iter().map(|e| e.as_ref()).collect();
    let view = read(&m).lm.with_edits(&refs)?;
    Ok(view)
}

/// A private copy of the model as `v` sees it, the visitor's edits applied to its own copies of
/// the layers they touch: for work that changes weights (an edit computed on top of earlier
/// ones, the study's edits and undos) while everyone else goes on reading the shared model. With
/// it, the shared model's version (see [`ModelState::version`]).
pub(super) fn private_copy(
    st: &AppState,
    v: &Visitor,
    name: &str,
) -> Result<(LoadedModel, u64), ApiError> {
    let m = model(st, name)?;
    let edits = session_edits(st, v, name);
    let refs: Vec<&Edit> = edits.iter().map(|e| e.as_ref()).collect();
    let state = read(&m);
    Ok((state.lm.with_edits_applied(&refs)?, state.version))
}

/// The visitor's own edits of `name` (none for the operator, who sees the shared model).
pub(super) fn session_edits(st: &AppState, v: &Visitor, name: &str) -> Vec<Arc<Edit>> {
    if v.admin {
        vec![]
    } else {
        st.sessions.edits(&v.session, name)
    }
}

/// Key statistics of `layers`, computed (when missing) on the shared model, never on a
/// visitor's edited copy.
pub(super) fn shared_stats(
    st: &AppState,
    name: &str,
    layers: &[usize],
) -> Result<Vec<KeyStats>, ApiError> {
    let m = model(st, name)?;
    // A clone (its tensors shared): computing missing statistics holds no lock.
    let lm = read(&m).lm.clone();
    Ok(st.stats.get(&lm, layers)?)
}

/// The 503 of a full queue, with a `Retry-After` of the queue's expected wait.
pub(super) fn busy(st: &AppState) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server is busy (its job queue is full); try again shortly",
    );
    e.retry_after = Some(st.expected_wait_seconds());
    e
}

/// What stops a job before its end: its client leaving, or its time running out.
#[derive(Clone)]
pub(super) struct Stop {
    deadline: Instant,
    /// How long the job may run.
    limit: Duration,
    left: Arc<AtomicBool>,
}

thread_local! {
    /// The stop of the job running on this thread.
    static STOP: RefCell<Option<Stop>> = const { RefCell::new(None) };
}

impl Stop {
    /// A job's stop: the server's limit, and with scheduling by cost, its step bound — eight
    /// times its estimate, at least two minutes — so a job whose estimate was wrong does not
    /// hold its lane for long.
    fn new(st: &AppState, work: &Work) -> Self {
        let limit = match st.schedule {
            Schedule::OneLane => st.job_limit,
            Schedule::Lanes => st.job_limit.min(Duration::from_secs_f64(
                (8.0 * st.sched.seconds(work.cost)).max(120.0),
            )),
        };
        Self {
            deadline: Instant::now() + limit,
            limit,
            left: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs the job `f` on this thread under this stop: optimisation steps, trace rows and
    /// study edits ask [`should_stop`] and end early when it says so.
    fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        STOP.with(|s| *s.borrow_mut() = Some(self.clone()));
        let out = loci_core::progress::listen(|_| !should_stop(), f);
        STOP.with(|s| *s.borrow_mut() = None);
        out
    }

    /// The job's result, a stop for lack of time said as such.
    fn outcome<T>(&self, r: Result<T, ApiError>) -> Result<T, ApiError> {
        match r {
            Err(_) if Instant::now() >= self.deadline => Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the job ran past its limit of {:.1} s and was stopped",
                    self.limit.as_secs_f64()
                ),
            )),
            r => r,
        }
    }
}

/// Whether the job on this thread should stop now: its client left or its time is up.
pub(super) fn should_stop() -> bool {
    STOP.with(|s| {
        s.borrow()
            .as_ref()
            .is_some_and(|s| s.left.load(Ordering::Relaxed) || Instant::now() >= s.deadline)
    })
}

/// Marks the job's client as gone when dropped: axum drops a handler's future when its client
/// disconnects, and with it this guard.
struct LeftOnDrop(Arc<AtomicBool>);

impl Drop for LeftOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Model `name`'s shape for estimates (a guess until it is loaded).
pub(super) fn shape(st: &AppState, name: &str) -> units::Shape {
    st.registry
        .shape_if_loaded(name)
        .unwrap_or(units::Shape::GUESS)
}

/// A heavy job's owner and estimated cost: its place and share in the heavy lane.
pub(super) struct Work {
    pub session: String,
    pub cost: Cost,
}

impl Work {
    pub fn new(v: &Visitor, kind: Kind, units: f64) -> Self {
        Self {
            session: v.session.clone(),
            cost: Cost::new(kind, units),
        }
    }

    /// Work no session asked for (served files computed on the way).
    pub fn unowned(kind: Kind, units: f64) -> Self {
        Self {
            session: String::new(),
            cost: Cost::new(kind, units),
        }
    }
}

/// A job's place: the one lane's two permits, or a ticket of the heavy lane.
enum Place {
    OneLane {
        _queued: tokio::sync::OwnedSemaphorePermit,
        running: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    Heavy {
        _ticket: HeavyTicket,
    },
}

/// A place in line for `work`, or the 503 of a server too busy for it; with the turn to await
/// before it may run.
fn enqueue(st: &Arc<AppState>, work: &Work) -> Result<(Place, Option<Turn>), ApiError> {
    match st.schedule {
        Schedule::OneLane => {
            let queued = st
                .admission
                .clone()
                .try_acquire_owned()
                .map_err(|_| busy(st))?;
            let place = Place::OneLane {
                _queued: queued,
                running: None,
            };
            Ok((place, Some(Turn::Permit(st.running.clone()))))
        }
        Schedule::Lanes => {
            let (ticket, turn) = st.sched.enqueue(&work.session, work.cost)?;
            Ok((Place::Heavy { _ticket: ticket }, turn.map(Turn::Slot)))
        }
    }
}

/// What a queued job awaits before it runs.
enum Turn {
    Permit(Arc<tokio::sync::Semaphore>),
    Slot(tokio::sync::oneshot::Receiver<()>),
}

impl Place {
    /// Waits for `turn`; the place then holds the job's running slot.
    async fn wait(&mut self, turn: Option<Turn>) -> Result<(), ApiError> {
        match turn {
            None => Ok(()),
            Some(Turn::Slot(rx)) => rx.await.map_err(|_| {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the job lost its place")
            }),
            Some(Turn::Permit(sem)) => {
                let permit = sem.acquire_owned().await.map_err(|_| {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping")
                })?;
                if let Place::OneLane { running, .. } = self {
                    *running = Some(permit);
                }
                Ok(())
            }
        }
    }
}

/// Runs `f` behind the queue (a heavy job; its place by its cost); a panic becomes a 500, not
/// a dead server. The job stops at its next step when the client disconnects or its time runs
/// out.
pub(super) async fn run_job<T, F>(st: Arc<AppState>, work: Work, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
{
    let (mut place, turn) = enqueue(&st, &work)?;
    place.wait(turn).await?;
    let stop = Stop::new(&st, &work);
    let _left = LeftOnDrop(stop.left.clone());
    let out = stoppable(st, stop, work.cost, f).await;
    drop(place);
    out
}

/// Runs `f` under `stop` (on a low-priority thread when scheduling by cost), noting its time
/// for the estimates and `Retry-After`.
async fn stoppable<T, F>(st: Arc<AppState>, stop: Stop, cost: Cost, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
{
    let started = Instant::now();
    let st2 = st.clone();
    let job = move || {
        let r = stop.run(|| f(&st2));
        stop.outcome(r)
    };
    let out = match st.schedule {
        Schedule::OneLane => blocking(job).await,
        Schedule::Lanes => low_priority(job).await,
    };
    st.job_took(started.elapsed());
    // A job stopped for time took at least this long: a lower bound that corrects a low
    // estimate (else every later job of its kind would be stopped too).
    let timed_out = matches!(&out, Err(e) if e.status == StatusCode::GATEWAY_TIMEOUT);
    if (out.is_ok() || timed_out) && st.schedule == Schedule::Lanes {
        st.sched.took(cost, started.elapsed());
    }
    out
}

/// Runs `f` on a blocking thread; a panic becomes a 500, not a dead server.
async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|_| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error: the job failed",
        ))
    })
}

/// A cheap job that computes nothing with a model (a session's listing, an undo, a download):
/// it runs at once on a blocking thread, never waits in the queue nor is refused as busy, so a
/// visitor can always see and undo their edits.
pub(super) async fn quick<T, F>(st: Arc<AppState>, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
{
    blocking(move || f(&st)).await
}

/// A result as the client sees it: the value as JSON, or the error.
pub(super) fn respond<T: Serialize>(r: Result<T, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A job whose answer is JSON.
pub(super) async fn job<T, F>(st: Arc<AppState>, work: Work, f: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
{
    respond(run_job(st, work, f).await)
}

/// A JSON job on a JSON request body (a bad body is answered before anything is queued); `work`
/// says what the body costs.
pub(super) async fn json_job<B, T, F>(
    st: Arc<AppState>,
    b: Result<Json<B>, JsonRejection>,
    work: impl FnOnce(&AppState, &B) -> Work,
    f: F,
) -> Response
where
    B: Send + 'static,
    T: Serialize + Send + 'static,
    F: FnOnce(&AppState, B) -> Result<T, ApiError> + Send + 'static,
{
    match body(b) {
        Ok(b) => {
            let w = work(&st, &b);
            job(st, w, move |st| f(st, b)).await
        }
        Err(e) => e.into_response(),
    }
}

/// Sends `data` as the event `name`; `false` once the client has gone.
pub(super) fn send_event<T: Serialize>(
    tx: &tokio::sync::mpsc::Sender<Event>,
    name: &str,
    data: &T,
) -> bool {
    match Event::default().event(name).json_data(data) {
        Ok(ev) => tx.blocking_send(ev).is_ok(),
        Err(_) => false,
    }
}

/// A streamed job: `f` runs behind the queue on a blocking thread and sends its progress events;
/// its value becomes the final `result` event, its error an `error` event. A client that closes
/// the stream makes the next send fail, which is how `f` learns to stop.
pub(super) async fn sse_job<T, F>(st: Arc<AppState>, work: Work, f: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(&AppState, &tokio::sync::mpsc::Sender<Event>) -> Result<T, ApiError> + Send + 'static,
{
    let (mut place, turn) = match enqueue(&st, &work) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(256);
    tokio::spawn(async move {
        // A client that leaves while the job waits gives its place up at once.
        tokio::select! {
            r = place.wait(turn) => if r.is_err() { return },
            _ = tx.closed() => return,
        }
        let tx2 = tx.clone();
        let stop = Stop::new(&st, &work);
        let event = match stoppable(st, stop, work.cost, move |st| f(st, &tx2)).await {
            Ok(r) => Event::default().event("result").json_data(&r),
            Err(e) => Event::default()
                .event("error")
                .json_data(serde_json::json!({ "error": e.message })),
        };
        drop(place);
        if let Ok(ev) = event {
            let _ = tx.send(ev).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|ev| (Ok::<_, std::convert::Infallible>(ev), rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// A 400 with this message.
pub(super) fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}
