//! JSON handlers. Every error is `{"error": "..."}` with a fitting status.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use loci_core::trace::{TraceKind, TraceObserver, TraceRequest};
use loci_core::{LoadedModel, LociError, Sampling};
use serde::{Deserialize, Serialize};

use super::AppState;

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

fn model(st: &AppState, name: &str) -> Result<Arc<LoadedModel>, ApiError> {
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
async fn job<T, F>(st: Arc<AppState>, f: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
{
    let Ok(_queued) = st.admission.clone().try_acquire_owned() else {
        return busy().into_response();
    };
    let Ok(_running) = st.running.clone().acquire_owned().await else {
        return busy().into_response();
    };
    let st2 = st.clone();
    match tokio::task::spawn_blocking(move || f(&st2)).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error: the job failed",
        )
        .into_response(),
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
    let b = match body(b) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    job(st, move |st| {
        check_prompt(&b.prompt)?;
        Ok(model(st, &b.model)?.predict(&b.prompt, b.top.min(100))?)
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
    let b = match body(b) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    job(st, move |st| {
        check_prompt(&b.prompt)?;
        let sampling = b.sampling.unwrap_or(Sampling::Greedy);
        Ok(model(st, &b.model)?.generate(&b.prompt, b.max_new_tokens.min(200), sampling)?)
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
    let Ok(queued) = st.admission.clone().try_acquire_owned() else {
        return busy().into_response();
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(256);
    let st2 = st.clone();
    tokio::spawn(async move {
        let _queued = queued;
        let Ok(_running) = st2.running.clone().acquire_owned().await else {
            return;
        };
        let tx2 = tx.clone();
        let st3 = st2.clone();
        let outcome =
            tokio::task::spawn_blocking(move || -> Result<loci_core::TraceResult, ApiError> {
                let lm = model(&st3, &b.model)?;
                let std = match b.request.noise {
                    loci_core::trace::NoiseSpec::Relative(_) => {
                        Some(crate::cli::trace::cached_embedding_std(&lm, None)?)
                    }
                    _ => None,
                };
                let mut obs = SseObserver { tx: tx2 };
                Ok(lm.trace(&b.request, std, &mut obs, st3.trace_workers)?)
            })
            .await;
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
        if let Ok(ev) = Event::default().event("start").json_data(header) {
            let _ = self.tx.blocking_send(ev);
        }
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
        match Event::default().event("row").json_data(Row {
            kind,
            token,
            scores,
        }) {
            Ok(ev) => self.tx.blocking_send(ev).is_ok(),
            Err(_) => false,
        }
    }
}

pub async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("../../../static/openapi.json"),
    )
        .into_response()
}
