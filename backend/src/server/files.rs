//! `GET /api/openapi.json` and `GET /api/models/{name}/files/{file}`: the API description and
//! a model's files for the web app's workers (only the files the server names).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::jobs::*;
use super::AppState;

/// The API's OpenAPI 3 description.
pub async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("../../../static/openapi.json"),
    )
        .into_response()
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
