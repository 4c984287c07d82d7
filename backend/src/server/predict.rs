//! `GET /api/models`, `POST /api/predict` and `POST /api/generate`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use loci_core::edit::Edit;
use loci_core::{Generation, GenerationStart, Prediction, Sampling};
use serde::Deserialize;

use super::batcher::{GenerateJob, ModelLane, PredictJob};
use super::jobs::*;
use super::{AppState, Schedule};

/// The served models: names, families, sizes, device and dtype, and their files for the tab.
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

/// The most likely next tokens after a prompt: in the quick lane, batched with other
/// visitors' predictions.
pub async fn predict(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    b: Result<Json<PredictBody>, JsonRejection>,
) -> Response {
    let b = match body(b) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if st.schedule == Schedule::OneLane {
        let work = Work::new(&v, Kind::Predict, 1.0);
        return job(st, work, move |st| {
            check_prompt(&b.prompt)?;
            let lm = view(st, &v, &b.model)?;
            Ok(lm.predict(&b.prompt, b.top.min(100))?)
        })
        .await;
    }
    respond(batched_prediction(st, v, b).await)
}

async fn batched_prediction(
    st: Arc<AppState>,
    v: Visitor,
    b: PredictBody,
) -> Result<Prediction, ApiError> {
    let (lane, ids, edits) = prepare(&st, &v, &b.model, &b.prompt).await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = PredictJob {
        prompt: b.prompt,
        ids,
        k: b.top.min(100),
        edits,
        reply: tx,
    };
    let _place = st.batchers.predict(&lane, &st.sched, &v.session, job)?;
    answer(&st, rx).await
}

/// What a quick-lane job needs before it is queued: the model's lane, the prompt's tokens and
/// the visitor's edits.
type Prepared = (Arc<ModelLane>, Vec<u32>, Vec<Arc<Edit>>);

/// A quick-lane job's [`Prepared`], its prompt checked (the model's lookup and the tokenizer
/// run on a blocking thread: the first request loads the model).
async fn prepare(
    st: &Arc<AppState>,
    v: &Visitor,
    name: &str,
    prompt: &str,
) -> Result<Prepared, ApiError> {
    check_prompt(prompt)?;
    let (v, name, prompt) = (v.clone(), name.to_string(), prompt.to_string());
    quick(st.clone(), move |st| {
        let m = model(st, &name)?;
        let ids = read(&m).lm.encode_prompt(&prompt)?;
        let edits = session_edits(st, &v, &name);
        Ok((st.batchers.lane(&name, m, &st.sched), ids, edits))
    })
    .await
}

/// The answer of a job whose batched pass failed before it could answer.
fn lost() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "internal error: the batched pass failed",
    )
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

/// A continuation of a prompt (greedy or top-k sampled): in the quick lane, decoded together
/// with other visitors' generations.
pub async fn generate(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    b: Result<Json<GenerateBody>, JsonRejection>,
) -> Response {
    let b = match body(b) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if st.schedule == Schedule::OneLane {
        let work = Work::new(&v, Kind::Generate, 1.0);
        return job(st, work, move |st| {
            check_prompt(&b.prompt)?;
            let sampling = b.sampling.unwrap_or(Sampling::Greedy);
            let lm = view(st, &v, &b.model)?;
            Ok(lm.generate(&b.prompt, b.max_new_tokens.min(200), sampling)?)
        })
        .await;
    }
    respond(batched_generation(st, v, b).await)
}

async fn batched_generation(
    st: Arc<AppState>,
    v: Visitor,
    b: GenerateBody,
) -> Result<Generation, ApiError> {
    let (lane, ids, edits) = prepare(&st, &v, &b.model, &b.prompt).await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = GenerateJob {
        start: GenerationStart {
            tag: (),
            prompt: b.prompt,
            ids,
            max_new: b.max_new_tokens.min(200),
            sampling: b.sampling.unwrap_or(Sampling::Greedy),
        },
        edits,
        reply: tx,
    };
    let _place = st.batchers.generate(&lane, &st.sched, &v.session, job)?;
    answer(&st, rx).await
}

/// A quick-lane job's answer, or a 504 when none came within the server's job limit.
async fn answer<T>(
    st: &AppState,
    rx: tokio::sync::oneshot::Receiver<Result<T, ApiError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(st.job_limit, rx).await {
        Ok(r) => r.unwrap_or_else(|_| Err(lost())),
        Err(_) => Err(ApiError::new(
            axum::http::StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no answer within the server's limit of {:.1} s",
                st.job_limit.as_secs_f64()
            ),
        )),
    }
}
