//! `GET /api/models`, `POST /api/predict` and `POST /api/generate`.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use loci_core::Sampling;
use serde::Deserialize;

use super::jobs::*;
use super::AppState;

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

/// The most likely next tokens after a prompt.
pub async fn predict(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    b: Result<Json<PredictBody>, JsonRejection>,
) -> Response {
    json_job(st, b, move |st, b| {
        check_prompt(&b.prompt)?;
        let lm = view(st, &v, &b.model)?;
        Ok(lm.predict(&b.prompt, b.top.min(100))?)
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

/// A continuation of a prompt (greedy or top-k sampled).
pub async fn generate(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    b: Result<Json<GenerateBody>, JsonRejection>,
) -> Response {
    json_job(st, b, move |st, b| {
        check_prompt(&b.prompt)?;
        let sampling = b.sampling.unwrap_or(Sampling::Greedy);
        let lm = view(st, &v, &b.model)?;
        Ok(lm.generate(&b.prompt, b.max_new_tokens.min(200), sampling)?)
    })
    .await
}
