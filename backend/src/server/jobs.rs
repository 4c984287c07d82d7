//! The plumbing every endpoint shares: errors as `{"error": "..."}` with a fitting status, JSON
//! bodies, the bounded job queue (admission, running permits, blocking threads, panics as 500s)
//! and server-sent event streams.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use loci_core::LociError;
use serde::Serialize;

use super::models::{ModelState, ServedModel};
use super::AppState;

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

/// An error as the client sees it: a status and `{"error": message}`.
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
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

/// The 503 of a full queue.
pub(super) fn busy() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server is busy (its job queue is full); try again shortly",
    )
}

/// Runs `f` on a blocking thread behind the queue; a panic becomes a 500, not a dead server.
pub(super) async fn run_job<T, F>(st: Arc<AppState>, f: F) -> Result<T, ApiError>
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
pub(super) async fn job<T, F>(st: Arc<AppState>, f: F) -> Response
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
pub(super) async fn json_job<B, T, F>(
    st: Arc<AppState>,
    b: Result<Json<B>, JsonRejection>,
    f: F,
) -> Response
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
pub(super) async fn sse_job<T, F>(st: Arc<AppState>, f: F) -> Response
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

/// A 400 with this message.
pub(super) fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}
