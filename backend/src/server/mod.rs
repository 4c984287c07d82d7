//! `loci serve`: the web app and a JSON API over the same core functions the CLI uses.
//!
//! Models are named by the server (never by paths from requests), loaded lazily and shared; work
//! runs on blocking threads behind a bounded queue; a panic in one request becomes a 500.

mod api;
mod models;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tower_http::services::ServeDir;

pub use models::Registry;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Models (HF folders or .gguf files) or folders of them. Default: the fetched SmolLM2.
    #[arg(long)]
    pub models: Vec<PathBuf>,
    /// The built web app (trunk's output).
    #[arg(long, default_value = "dist")]
    pub dist: PathBuf,
    /// Shared assets.
    #[arg(long, default_value = "static")]
    pub static_dir: PathBuf,
    /// Jobs computed at once; more wait in the queue.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Jobs that may wait; beyond that requests get 503.
    #[arg(long, default_value_t = 8)]
    pub queue: usize,
    /// Weights and activations dtype of the served models.
    #[arg(long, value_enum, default_value_t = super::cli::Precision::F32)]
    pub dtype: super::cli::Precision,
    /// Key statistics for edits: folder, corpus and token count when computed on the way.
    #[command(flatten)]
    pub stats: super::cli::edit::StatsSource,
}

pub struct AppState {
    pub registry: Registry,
    /// Permits for running and waiting jobs together.
    pub admission: Arc<tokio::sync::Semaphore>,
    /// Permits for running jobs.
    pub running: Arc<tokio::sync::Semaphore>,
    /// Threads one trace may use.
    pub trace_workers: usize,
    pub stats: super::cli::edit::StatsSource,
    /// Key statistics in use, per (model, layer).
    pub stats_cache:
        std::sync::Mutex<std::collections::HashMap<(String, usize), loci_core::edit::KeyStats>>,
}

pub fn router(state: Arc<AppState>, dist: PathBuf, static_dir: PathBuf) -> Router {
    Router::new()
        .route("/api/models", get(api::models))
        .route("/api/predict", post(api::predict))
        .route("/api/generate", post(api::generate))
        .route("/api/trace", post(api::trace).get(api::trace_get))
        .route("/api/edit", post(api::edit))
        .route("/api/edits", get(api::edits))
        .route("/api/undo", post(api::undo))
        .route("/api/edits/{id}/file", get(api::edit_file))
        .route("/api/eval", post(api::eval_case))
        .route("/api/study", post(api::study).get(api::study_get))
        .route("/api/models/{name}/files/{file}", get(api::model_file))
        .route("/api/openapi.json", get(api::openapi))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .route(
            "/api/edits/upload",
            post(api::upload_edit).layer(DefaultBodyLimit::max(api::MAX_EDIT_FILE)),
        )
        .with_state(state)
        .nest_service("/static", ServeDir::new(static_dir))
        .fallback_service(ServeDir::new(dist))
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let paths = if a.models.is_empty() {
        vec![super::cli::default_model()?]
    } else {
        a.models.clone()
    };
    let device = super::cli::device()?;
    let trace_workers = (super::cli::trace_workers(&device) / a.workers.max(1)).max(1);
    let registry = Registry::discover(&paths, a.dtype.dtype(), device)?;
    let state = Arc::new(AppState {
        registry,
        admission: Arc::new(tokio::sync::Semaphore::new(a.workers.max(1) + a.queue)),
        running: Arc::new(tokio::sync::Semaphore::new(a.workers.max(1))),
        trace_workers,
        stats: a.stats,
        stats_cache: Default::default(),
    });
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.addr)
            .await
            .with_context(|| format!("binding {}", a.addr))?;
        let addr = listener.local_addr()?;
        println!(
            "Loci is serving on http://{addr}/ ({} models: {})",
            state.registry.len(),
            state.registry.names().join(", ")
        );
        axum::serve(listener, router(state, a.dist, a.static_dir))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}
