//! `POST /api/trace` (and its GET form for EventSource): a causal trace, streamed row by row.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use loci_core::trace::{TraceKind, TraceMethod, TraceObserver, TraceRequest};
use serde::{Deserialize, Serialize};

use super::jobs::*;
use super::AppState;

#[derive(Deserialize)]
pub struct TraceBody {
    model: String,
    /// `exact` (default) or `attribution` (attribution patching's estimate of every cell).
    #[serde(default)]
    method: TraceMethod,
    #[serde(flatten)]
    request: TraceRequest,
}

#[derive(Deserialize)]
pub struct TraceQuery {
    /// The same JSON object as the POST body (browsers' EventSource can only GET).
    pub(super) q: String,
}

/// The trace's GET form (the request JSON in `q`), for browsers' EventSource.
pub async fn trace_get(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    query: axum::extract::Query<TraceQuery>,
) -> Response {
    match serde_json::from_str::<TraceBody>(&query.q) {
        Ok(b) => trace_stream(st, v, b).await,
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
    Extension(v): Extension<Visitor>,
    b: Result<Json<TraceBody>, JsonRejection>,
) -> Response {
    match body(b) {
        Ok(b) => trace_stream(st, v, b).await,
        Err(e) => e.into_response(),
    }
}

async fn trace_stream(st: Arc<AppState>, v: Visitor, b: TraceBody) -> Response {
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
    if b.method == TraceMethod::Neurons && r.kinds != [TraceKind::Mlp] {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "knowledge neurons are MLP neurons: trace them with \"kinds\": [\"mlp\"]",
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
    let r = &b.request;
    let (tokens, m) = (units::tokens_of(&r.prompt), shape(&st, &b.model));
    let cost = match b.method {
        TraceMethod::Exact => units::trace(tokens, m, r.kinds.len(), r.samples),
        TraceMethod::Attribution => units::trace_attribution(tokens, m, r.samples),
        TraceMethod::Neurons => units::trace_neurons(tokens, m, r.samples),
    };
    let work = Work::new(&v, Kind::Trace, cost);
    sse_job(st, work, move |st, tx| {
        // The visitor's own view: one consistent model for the whole trace, whatever others
        // edit meanwhile.
        let lm = &view(st, &v, &b.model)?;
        let std = match b.request.noise {
            loci_core::trace::NoiseSpec::Relative(_) => {
                Some(crate::workspace::cached_embedding_std(lm, None)?)
            }
            _ => None,
        };
        let mut obs = SseObserver { tx: tx.clone() };
        Ok(lm.trace_by(b.method, &b.request, std, &mut obs, st.trace_workers)?)
    })
    .await
}

/// Streams a trace's header and rows as server-sent events; stops the trace once the client has
/// gone.
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
        !should_stop()
            && send_event(
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
