//! JSON handlers. Every error is `{"error": "..."}` with a fitting status.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use loci_core::edit::{Edit, KeyMode, KeyStats, Probes, RewriteRequest};
use loci_core::eval::CounterFactCase;
use loci_core::study::{EditProblem, StudyMethod, StudyObserver};
use loci_core::trace::{TraceKind, TraceObserver, TraceRequest};
use loci_core::{LociError, Sampling};
use serde::{Deserialize, Serialize};

use super::models::{ModelState, ServedModel};
use super::AppState;

fn read(m: &ServedModel) -> std::sync::RwLockReadGuard<'_, ModelState> {
    // A panicked job never leaves a weight half-written (edits swap whole tensors).
    m.state.read().unwrap_or_else(|p| p.into_inner())
}

fn write(m: &ServedModel) -> std::sync::RwLockWriteGuard<'_, ModelState> {
    m.state.write().unwrap_or_else(|p| p.into_inner())
}

const MAX_PROMPT_CHARS: usize = 2000;

pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
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

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v)
        .map_err(|r| ApiError::new(r.status(), format!("bad request body: {}", r.body_text())))
}

fn check_prompt(p: &str) -> Result<(), ApiError> {
    if p.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("prompts are limited to {MAX_PROMPT_CHARS} characters"),
        ));
    }
    Ok(())
}

fn model(st: &AppState, name: &str) -> Result<Arc<ServedModel>, ApiError> {
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

fn busy() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server is busy (its job queue is full); try again shortly",
    )
}

/// Runs `f` on a blocking thread behind the queue; a panic becomes a 500, not a dead server.
async fn run_job<T, F>(st: Arc<AppState>, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
{
    let Ok(_queued) = st.admission.clone().try_acquire_owned() else {
        return Err(busy());
    };
    let Ok(_running) = st.running.clone().acquire_owned().await else {
        return Err(busy());
    };
    let st2 = st.clone();
    tokio::task::spawn_blocking(move || f(&st2))
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error: the job failed",
            ))
        })
}

/// A job whose answer is JSON.
async fn job<T, F>(st: Arc<AppState>, f: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
{
    match run_job(st, f).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A JSON job on a JSON request body (a bad body is answered before anything is queued).
async fn json_job<B, T, F>(st: Arc<AppState>, b: Result<Json<B>, JsonRejection>, f: F) -> Response
where
    B: Send + 'static,
    T: Serialize + Send + 'static,
    F: FnOnce(&AppState, B) -> Result<T, ApiError> + Send + 'static,
{
    match body(b) {
        Ok(b) => job(st, move |st| f(st, b)).await,
        Err(e) => e.into_response(),
    }
}

pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    Json(st.registry.listing()).into_response()
}

fn default_top() -> usize {
    10
}

#[derive(Deserialize)]
pub struct PredictBody {
    model: String,
    prompt: String,
    #[serde(default = "default_top")]
    top: usize,
}

pub async fn predict(
    State(st): State<Arc<AppState>>,
    b: Result<Json<PredictBody>, JsonRejection>,
) -> Response {
    json_job(st, b, move |st, b| {
        check_prompt(&b.prompt)?;
        let m = model(st, &b.model)?;
        let p = read(&m).lm.predict(&b.prompt, b.top.min(100))?;
        Ok(p)
    })
    .await
}

fn default_new_tokens() -> usize {
    30
}

#[derive(Deserialize)]
pub struct GenerateBody {
    model: String,
    prompt: String,
    #[serde(default = "default_new_tokens")]
    max_new_tokens: usize,
    #[serde(default)]
    sampling: Option<Sampling>,
}

pub async fn generate(
    State(st): State<Arc<AppState>>,
    b: Result<Json<GenerateBody>, JsonRejection>,
) -> Response {
    json_job(st, b, move |st, b| {
        check_prompt(&b.prompt)?;
        let sampling = b.sampling.unwrap_or(Sampling::Greedy);
        let m = model(st, &b.model)?;
        let lm = &read(&m).lm;
        Ok(lm.generate(&b.prompt, b.max_new_tokens.min(200), sampling)?)
    })
    .await
}

#[derive(Deserialize)]
pub struct TraceBody {
    model: String,
    #[serde(flatten)]
    request: TraceRequest,
}

#[derive(Deserialize)]
pub struct TraceQuery {
    /// The same JSON object as the POST body (browsers' EventSource can only GET).
    q: String,
}

pub async fn trace_get(
    State(st): State<Arc<AppState>>,
    query: axum::extract::Query<TraceQuery>,
) -> Response {
    match serde_json::from_str::<TraceBody>(&query.q) {
        Ok(b) => trace_stream(st, b).await,
        Err(e) => {
            ApiError::new(StatusCode::BAD_REQUEST, format!("bad request: {e}")).into_response()
        }
    }
}

/// Streams the trace: `start` (a TraceHeader: tokens, subject range, answer, high, low, …),
/// `row` {kind, token, scores} as rows finish, then `result` (the whole TraceResult) or
/// `error`. Closing the stream cancels the trace.
pub async fn trace(
    State(st): State<Arc<AppState>>,
    b: Result<Json<TraceBody>, JsonRejection>,
) -> Response {
    match body(b) {
        Ok(b) => trace_stream(st, b).await,
        Err(e) => e.into_response(),
    }
}

async fn trace_stream(st: Arc<AppState>, b: TraceBody) -> Response {
    if let Err(e) = check_prompt(&b.request.prompt) {
        return e.into_response();
    }
    // Refuse what is sure to fail before opening a stream.
    let r = &b.request;
    if r.subject.trim().is_empty() || !r.prompt.contains(r.subject.trim()) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the subject {:?} does not occur in the prompt", r.subject),
        )
        .into_response();
    }
    if r.samples == 0 || r.samples > 64 || r.window == 0 || r.kinds.is_empty() {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "samples must be 1..=64, window at least 1, and at least one kind",
        )
        .into_response();
    }
    if st.registry.names().iter().all(|n| n != &b.model) {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown model {:?}", b.model),
        )
        .into_response();
    }
    sse_job(st, move |st, tx| {
        let m = model(st, &b.model)?;
        let guard = read(&m);
        let lm = &guard.lm;
        let std = match b.request.noise {
            loci_core::trace::NoiseSpec::Relative(_) => {
                Some(crate::cli::trace::cached_embedding_std(lm, None)?)
            }
            _ => None,
        };
        let mut obs = SseObserver { tx: tx.clone() };
        Ok(lm.trace(&b.request, std, &mut obs, st.trace_workers)?)
    })
    .await
}

/// Sends `data` as the event `name`; `false` once the client has gone.
fn send_event<T: Serialize>(tx: &tokio::sync::mpsc::Sender<Event>, name: &str, data: &T) -> bool {
    match Event::default().event(name).json_data(data) {
        Ok(ev) => tx.blocking_send(ev).is_ok(),
        Err(_) => false,
    }
}

/// A streamed job: `f` runs behind the queue on a blocking thread and sends its progress events;
/// its value becomes the final `result` event, its error an `error` event. A client that closes
/// the stream makes the next send fail, which is how `f` learns to stop.
async fn sse_job<T, F>(st: Arc<AppState>, f: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(&AppState, &tokio::sync::mpsc::Sender<Event>) -> Result<T, ApiError> + Send + 'static,
{
    let Ok(queued) = st.admission.clone().try_acquire_owned() else {
        return busy().into_response();
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(256);
    tokio::spawn(async move {
        let _queued = queued;
        let Ok(_running) = st.running.clone().acquire_owned().await else {
            return;
        };
        let tx2 = tx.clone();
        let st2 = st.clone();
        let outcome = tokio::task::spawn_blocking(move || f(&st2, &tx2)).await;
        let event = match outcome {
            Ok(Ok(r)) => Event::default().event("result").json_data(&r),
            Ok(Err(e)) => Event::default()
                .event("error")
                .json_data(serde_json::json!({ "error": e.message })),
            Err(_) => Event::default()
                .event("error")
                .json_data(serde_json::json!({ "error": "internal error: the job failed" })),
        };
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

struct SseObserver {
    tx: tokio::sync::mpsc::Sender<Event>,
}

impl TraceObserver for SseObserver {
    fn on_start(&mut self, header: &loci_core::trace::TraceHeader) {
        send_event(&self.tx, "start", header);
    }
    fn on_row(&mut self, kind: TraceKind, token: usize, scores: &[f32]) -> bool {
        // A closed stream (the client left) cancels the trace.
        #[derive(Serialize)]
        struct Row<'a> {
            kind: TraceKind,
            token: usize,
            scores: &'a [f32],
        }
        // Serialised as f32, exactly as the final result's grid.
        send_event(
            &self.tx,
            "row",
            &Row {
                kind,
                token,
                scores,
            },
        )
    }
}

pub async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("../../../static/openapi.json"),
    )
        .into_response()
}

/// Edit files are small (two vectors per fact and layer); a GPT-J ROME edit is about 100 KB.
pub const MAX_EDIT_FILE: usize = 4 * 1024 * 1024;
const MAX_PROBES: usize = 20;
/// Facts one MEMIT request may write (each costs a v* optimisation).
const MAX_MEMIT_REQUESTS: usize = 16;

fn default_generate_tokens() -> usize {
    10
}

#[derive(Deserialize)]
pub struct EditBody {
    model: String,
    /// A CounterFact `requested_rewrite` object…
    #[serde(default)]
    request: Option<RewriteRequest>,
    /// …or a prompt holding the subject, the subject and the new target.
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    target: Option<String>,
    /// "rome" (default: one fact at `layer`), "memit" (all facts at once over `layers`) or "ft"
    /// (constrained fine-tuning of one fact at `layers`).
    #[serde(default)]
    method: Option<String>,
    /// MEMIT: more facts, written with the one above (if any).
    #[serde(default)]
    requests: Vec<RewriteRequest>,
    #[serde(default)]
    layer: Option<usize>,
    #[serde(default)]
    layers: Vec<usize>,
    /// "rrome" (default) or "original".
    #[serde(default)]
    key_mode: Option<String>,
    #[serde(default)]
    paraphrase: Vec<String>,
    #[serde(default)]
    neighborhood: Vec<String>,
    #[serde(default = "default_generate_tokens")]
    generate_tokens: usize,
}

#[derive(Serialize)]
struct EditResponse {
    id: u64,
    /// ROME's read-out…
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<loci_core::edit::EditReport>,
    /// …or MEMIT's, one per fact.
    #[serde(skip_serializing_if = "Option::is_none")]
    memit: Option<loci_core::edit::MemitReport>,
    edits: Vec<super::models::EditListing>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

/// Computes a ROME, MEMIT or fine-tuning edit, applies it on top of the model's other edits and
/// reports before/after.
pub async fn edit(
    State(st): State<Arc<AppState>>,
    b: Result<Json<EditBody>, JsonRejection>,
) -> Response {
    json_job(st, b, move |st, b| {
        let single = match (&b.request, &b.prompt, &b.subject, &b.target) {
            (Some(r), None, None, None) => Some(r.clone()),
            (None, Some(p), Some(s), Some(t)) => Some(RewriteRequest::from_prompt(p, s, t)?),
            (None, None, None, None) if !b.requests.is_empty() => None,
            _ => {
                return Err(bad(
                    "give either \"request\" (a requested_rewrite) or \"prompt\", \"subject\" and \"target\"",
                ))
            }
        };
        let method = b.method.as_deref().unwrap_or("rome");
        let reqs: Vec<RewriteRequest> = single.into_iter().chain(b.requests.clone()).collect();
        match method {
            "rome" if reqs.len() != 1 || !b.layers.is_empty() => {
                return Err(bad("ROME edits one fact at one \"layer\"; use \"method\": \"memit\" for \"requests\" and \"layers\""));
            }
            "ft" if reqs.len() != 1 || b.layer.is_some() => {
                return Err(bad("fine-tuning edits one fact at its \"layers\""));
            }
            "memit" if b.layer.is_some() => {
                return Err(bad("MEMIT edits its \"layers\", not one \"layer\""));
            }
            "memit" if reqs.len() > MAX_MEMIT_REQUESTS => {
                return Err(bad(format!(
                    "MEMIT writes at most {MAX_MEMIT_REQUESTS} facts at once"
                )));
            }
            "rome" | "ft" | "memit" => {}
            other => return Err(bad(format!("method {other:?}: use rome, memit or ft"))),
        }
        if b.paraphrase.len() + b.neighborhood.len() > MAX_PROBES {
            return Err(bad(format!("at most {MAX_PROBES} paraphrase and neighborhood prompts")));
        }
        for p in reqs.iter().map(|r| &r.prompt).chain(&b.paraphrase).chain(&b.neighborhood) {
            check_prompt(p)?;
        }
        let m = model(st, &b.model)?;
        let mut guard = write(&m);
        let state = &mut *guard;
        let probes = Probes {
            paraphrase: b.paraphrase.clone(),
            neighborhood: b.neighborhood.clone(),
            generate_tokens: b.generate_tokens.min(50),
        };
        if method == "ft" {
            let defaults = crate::cli::edit::FtArgs {
                norm_constraint: None,
                ft_objective: None,
            };
            let hp = crate::cli::edit::ft_hparams(&state.lm, &b.layers, &defaults)
                .map_err(|e| bad(format!("{e:#}")))?;
            let req = reqs.into_iter().next().expect("one request");
            let (e, applied, report) = state.lm.ft_with_report(req, &hp, &probes)?;
            let id = state.record(Edit::Ft(e), applied);
            return Ok(EditResponse {
                id,
                report: Some(report),
                memit: None,
                edits: state.listing(),
            });
        }
        if method == "memit" {
            let hp = crate::cli::edit::memit_hparams(&state.lm, &b.layers)
                .map_err(|e| bad(format!("{e:#}")))?;
            let stats = layers_stats(st, &b.model, &state.lm, &hp.layers)?;
            let (e, applied, report) =
                state
                    .lm
                    .memit_with_report(reqs, &hp, &stats, &probes, &mut |_| {})?;
            let id = state.record(Edit::Memit(e), applied);
            return Ok(EditResponse {
                id,
                report: None,
                memit: Some(report),
                edits: state.listing(),
            });
        }
        let mut hp = edit_hparams(&state.lm, b.layer)?;
        hp.key_mode = match b.key_mode.as_deref() {
            None | Some("rrome") => KeyMode::Rrome,
            Some("original") => KeyMode::Original,
            Some(other) => return Err(bad(format!("key_mode {other:?}: use rrome or original"))),
        };
        let stats = layers_stats(st, &b.model, &state.lm, &[hp.layer])?.remove(0);
        let req = reqs.into_iter().next().expect("one request");
        let (e, applied, report) = state.lm.rome_with_report(req, &hp, Some(&stats), &probes)?;
        let id = state.record(Edit::Rome(e), applied);
        Ok(EditResponse {
            id,
            report: Some(report),
            memit: None,
            edits: state.listing(),
        })
    })
    .await
}

/// The shipped hyper-parameters at `layer` (or the model's default layer), refused before any
/// statistics are computed when the layer does not exist.
fn edit_hparams(
    lm: &loci_core::LoadedModel,
    layer: Option<usize>,
) -> Result<loci_core::edit::RomeHparams, ApiError> {
    let hp = crate::cli::edit::hparams(lm, layer).map_err(|e| bad(format!("{e:#}")))?;
    if hp.layer >= lm.model.n_layer() {
        return Err(bad(format!(
            "layer {} out of range (the model has {} layers)",
            hp.layer,
            lm.model.n_layer()
        )));
    }
    Ok(hp)
}

/// Layers' key statistics, kept in memory after first use with their Cholesky factors: later
/// edits at those layers neither read the files nor factor again. Missing files are computed in
/// one pass over the corpus.
fn layers_stats(
    st: &AppState,
    name: &str,
    lm: &loci_core::LoadedModel,
    layers: &[usize],
) -> Result<Vec<KeyStats>, ApiError> {
    let cached = |l: usize| {
        st.stats_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(name.to_string(), l))
            .cloned()
    };
    let missing: Vec<usize> = layers
        .iter()
        .copied()
        .filter(|&l| cached(l).is_none())
        .collect();
    if !missing.is_empty() {
        for s in st.stats.ensure_layers(lm, &missing)? {
            st.stats_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((name.to_string(), s.provenance.layer), s);
        }
    }
    layers
        .iter()
        .map(|&l| cached(l).ok_or_else(|| bad(format!("no key statistics for layer {l}"))))
        .collect()
}

#[derive(Deserialize)]
pub struct ModelQuery {
    model: String,
}

type ModelQueryArg =
    Result<axum::extract::Query<ModelQuery>, axum::extract::rejection::QueryRejection>;

/// The model a `?model=NAME` query names.
fn model_query(q: ModelQueryArg) -> Result<String, ApiError> {
    q.map(|axum::extract::Query(q)| q.model)
        .map_err(|_| bad("add ?model=NAME"))
}

/// The edits applied to a model, oldest first.
pub async fn edits(State(st): State<Arc<AppState>>, q: ModelQueryArg) -> Response {
    let name = match model_query(q) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    job(st, move |st| {
        let m = model(st, &name)?;
        let list = read(&m).listing();
        Ok(list)
    })
    .await
}

#[derive(Deserialize)]
pub struct UndoBody {
    model: String,
    /// Must name the newest edit when given (edits are undone newest first).
    #[serde(default)]
    id: Option<u64>,
    /// Undo every edit: the model's original weights, bit for bit.
    #[serde(default)]
    all: bool,
}

pub async fn undo(
    State(st): State<Arc<AppState>>,
    b: Result<Json<UndoBody>, JsonRejection>,
) -> Response {
    json_job(st, b, move |st, b| {
        let m = model(st, &b.model)?;
        let mut state = write(&m);
        if state.edits.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "the model has no edits to undo",
            ));
        }
        if let Some(id) = b.id {
            let newest = state.edits.last().map(|e| e.id);
            if newest != Some(id) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "edit {id} is not the newest edit ({newest:?}); undo newer edits first"
                    ),
                ));
            }
        }
        let mut undone = vec![];
        while let Some(id) = state.pop()? {
            undone.push(id);
            if !b.all {
                break;
            }
        }
        Ok(serde_json::json!({ "undone": undone, "edits": state.listing() }))
    })
    .await
}

/// Downloads an applied edit as a small safetensors file (re-apply it with `--apply-edit` or
/// `/api/edits/upload`).
pub async fn edit_file(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<u64>,
    q: ModelQueryArg,
) -> Response {
    let name = match model_query(q) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let bytes = run_job(st, move |st| -> Result<Vec<u8>, ApiError> {
        let m = model(st, &name)?;
        let state = read(&m);
        let e = state
            .edits
            .iter()
            .find(|e| e.id == id)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no edit {id}")))?;
        Ok(e.edit.to_bytes()?)
    })
    .await;
    match bytes {
        Ok(b) => (
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    "application/octet-stream".to_string(),
                ),
                (
                    axum::http::header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"loci-edit-{id}.safetensors\""),
                ),
            ],
            b,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Applies an edit file (the raw bytes of a saved edit) on top of the model's edits.
pub async fn upload_edit(
    State(st): State<Arc<AppState>>,
    q: ModelQueryArg,
    bytes: axum::body::Bytes,
) -> Response {
    let name = match model_query(q) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    job(st, move |st| {
        let e = Edit::from_bytes(&bytes)?;
        let m = model(st, &name)?;
        let mut state = write(&m);
        let id = state.push(e)?;
        Ok(serde_json::json!({ "id": id, "edits": state.listing() }))
    })
    .await
}

#[derive(Deserialize)]
pub struct EvalBody {
    model: String,
    /// A CounterFact record (ROME's format).
    case: CounterFactCase,
    #[serde(default)]
    layer: Option<usize>,
    #[serde(default)]
    generation: bool,
}

/// Scores a CounterFact case before and after its ROME edit; the edit is undone afterwards.
pub async fn eval_case(
    State(st): State<Arc<AppState>>,
    b: Result<Json<EvalBody>, JsonRejection>,
) -> Response {
    json_job(st, b, move |st, b| {
        let c = &b.case;
        if c.paraphrase_prompts.len() + c.neighborhood_prompts.len() + c.generation_prompts.len()
            > 3 * MAX_PROBES
        {
            return Err(bad("the case has too many prompts"));
        }
        for p in std::iter::once(&c.requested_rewrite.prompt)
            .chain(&c.paraphrase_prompts)
            .chain(&c.neighborhood_prompts)
            .chain(&c.generation_prompts)
        {
            check_prompt(p)?;
        }
        let m = model(st, &b.model)?;
        let mut state = write(&m);
        let hp = edit_hparams(&state.lm, b.layer)?;
        let stats = layers_stats(st, &b.model, &state.lm, &[hp.layer])?.remove(0);
        Ok(state
            .lm
            .eval_case(c, &hp, Some(&stats), b.generation, None)?)
    })
    .await
}

/// A model's files for the browser's own engine, with byte ranges. Only files the registry
/// lists for that model are served; any other name is a 404.
pub async fn model_file(
    State(st): State<Arc<AppState>>,
    axum::extract::Path((name, file)): axum::extract::Path<(String, String)>,
    req: axum::extract::Request,
) -> Response {
    use tower::ServiceExt;
    let Some(path) = st.registry.file_path(&name, &file) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!("model {name:?} has no file {file:?}"),
        )
        .into_response();
    };
    match tower_http::services::ServeFile::new(path)
        .oneshot(req)
        .await
    {
        Ok(r) => r.into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Edits one study request may make (each a full edit, scored and undone).
const MAX_STUDY_EDITS: usize = 48;

fn default_study_methods() -> Vec<StudyMethod> {
    vec![StudyMethod::Rome]
}

fn default_study_problems() -> Vec<EditProblem> {
    vec![EditProblem::ErrorInjection]
}

fn default_study_samples() -> usize {
    10
}

#[derive(Deserialize)]
pub struct StudyBody {
    model: String,
    /// A CounterFact case: its rewrite (with `target_true`), first paraphrase and neighbour
    /// prompts are scored.
    case: CounterFactCase,
    #[serde(default = "default_study_methods")]
    methods: Vec<StudyMethod>,
    #[serde(default = "default_study_problems")]
    problems: Vec<EditProblem>,
    /// Central layers; default: every fourth, ROME's layer and the last.
    #[serde(default)]
    layers: Vec<usize>,
    #[serde(default = "default_study_samples")]
    samples: usize,
    /// Study the fact even if the model does not know it.
    #[serde(default)]
    all_cases: bool,
    /// Measure essence drift (5 generated texts, rescored after each edit).
    #[serde(default)]
    essence: bool,
}

#[derive(Serialize)]
struct StudyResult {
    case: loci_core::study::CaseLine,
    edits: Vec<loci_core::study::EditLine>,
    analysis: loci_core::study::StudyAnalysis,
}

struct SseStudy {
    tx: tokio::sync::mpsc::Sender<Event>,
}

impl StudyObserver for SseStudy {
    fn on_case(&mut self, case: &loci_core::study::CaseLine) {
        send_event(&self.tx, "case", case);
    }
    fn on_edit(&mut self, edit: &loci_core::study::EditLine) -> bool {
        send_event(&self.tx, "edit", edit)
    }
}

pub async fn study_get(
    State(st): State<Arc<AppState>>,
    query: axum::extract::Query<TraceQuery>,
) -> Response {
    match serde_json::from_str::<StudyBody>(&query.q) {
        Ok(b) => study_stream(st, b).await,
        Err(e) => bad(format!("bad request: {e}")).into_response(),
    }
}

/// Hase et al.'s layer sweep on one fact, streamed: `case` (the fact traced, or why it is left
/// out), an `edit` per scored edit, then `result` (the case, its edits and their analysis) or
/// `error`. Every edit is undone; closing the stream stops the sweep after the current edit.
pub async fn study(
    State(st): State<Arc<AppState>>,
    b: Result<Json<StudyBody>, JsonRejection>,
) -> Response {
    match body(b) {
        Ok(b) => study_stream(st, b).await,
        Err(e) => e.into_response(),
    }
}

async fn study_stream(st: Arc<AppState>, b: StudyBody) -> Response {
    let c = &b.case;
    let cells = b.methods.len() * b.problems.len() * b.layers.len().max(1);
    let refusal = if b.methods.is_empty() || b.problems.is_empty() {
        Some(bad("a study needs at least one method and one problem"))
    } else if cells > MAX_STUDY_EDITS {
        Some(bad(format!(
            "a study request makes at most {MAX_STUDY_EDITS} edits (methods × problems × layers)"
        )))
    } else if b.samples == 0 || b.samples > 64 {
        Some(bad("samples must be 1..=64"))
    } else if c.requested_rewrite.target_true.is_none() {
        Some(bad(
            "the case needs its true target (requested_rewrite.target_true)",
        ))
    } else if c.paraphrase_prompts.len() + c.neighborhood_prompts.len() > MAX_PROBES {
        Some(bad("the case has too many prompts"))
    } else if st.registry.names().iter().all(|n| n != &b.model) {
        Some(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown model {:?}", b.model),
        ))
    } else {
        std::iter::once(&c.requested_rewrite.prompt)
            .chain(&c.paraphrase_prompts)
            .chain(&c.neighborhood_prompts)
            .find_map(|p| check_prompt(p).err())
    };
    if let Some(e) = refusal {
        return e.into_response();
    }
    sse_job(st, move |st, tx| {
        let m = model(st, &b.model)?;
        // The sweep applies and undoes edits: no one else may see the model meanwhile.
        let mut state = write(&m);
        let defaults = crate::cli::edit::FtArgs {
            norm_constraint: None,
            ft_objective: None,
        };
        let mut cfg = crate::cli::study::study_config(
            &state.lm,
            b.methods.clone(),
            b.problems.clone(),
            &b.layers,
            loci_core::trace::NoiseSpec::Relative(3.0),
            &defaults,
        )
        .map_err(|e| bad(format!("{e:#}")))?;
        cfg.trace_samples = b.samples;
        cfg.correct_only = !b.all_cases;
        if b.all_cases {
            cfg.min_prob = 0.0;
        }
        cfg.essence = b.essence;
        if cfg.cells().len() > MAX_STUDY_EDITS {
            return Err(bad(format!(
                "a study request makes at most {MAX_STUDY_EDITS} edits; the default layers make {} here: name fewer \"layers\"",
                cfg.cells().len()
            )));
        }
        let mut obs = SseStudy { tx: tx.clone() };
        let result = state.lm.study_case(
            &b.case,
            &cfg,
            &mut |lm, layers| {
                layers_stats(st, &b.model, lm, layers).map_err(|e| LociError::input(e.message))
            },
            &mut obs,
        )?;
        let lines = [loci_core::study::StudyLine::Case(result.case.clone())]
            .into_iter()
            .chain(
                result
                    .edits
                    .iter()
                    .cloned()
                    .map(loci_core::study::StudyLine::Edit),
            )
            .collect::<Vec<_>>();
        Ok(StudyResult {
            analysis: loci_core::study::analyze(&lines),
            case: result.case,
            edits: result.edits,
        })
    })
    .await
}
