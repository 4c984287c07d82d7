//! `loci serve`: the web app and a JSON API over the same core functions the CLI uses.
//!
//! Models are named by the server (never by paths from requests), loaded lazily and shared; work
//! runs on blocking threads behind a bounded queue; a panic in one request becomes a 500.

mod edit;
mod files;
mod jobs;
mod models;
mod predict;
mod study;
mod trace;

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
    #[arg(long, value_enum, default_value_t = crate::workspace::Precision::F32)]
    pub dtype: crate::workspace::Precision,
    /// Key statistics for edits: folder, corpus and token count when computed on the way.
    #[command(flatten)]
    pub stats: crate::workspace::StatsSource,
}

/// What every request shares: the models, the job queue's permits, the threads a trace may use
/// and the key statistics.
pub struct AppState {
    pub registry: Registry,
    /// Permits for running and waiting jobs together.
    pub admission: Arc<tokio::sync::Semaphore>,
    /// Permits for running jobs.
    pub running: Arc<tokio::sync::Semaphore>,
    /// Threads one trace may use.
    pub trace_workers: usize,
    /// Key statistics, kept in memory after first use.
    pub stats: crate::workspace::StatsCache,
}

/// The API's routes, the shared assets under `/static` and the built app everywhere else.
pub fn router(state: Arc<AppState>, dist: PathBuf, static_dir: PathBuf) -> Router {
    Router::new()
        .route("/api/models", get(predict::models))
        .route("/api/predict", post(predict::predict))
        .route("/api/generate", post(predict::generate))
        .route("/api/trace", post(trace::trace).get(trace::trace_get))
        .route("/api/edit", post(edit::edit))
        .route("/api/edits", get(edit::edits))
        .route("/api/undo", post(edit::undo))
        .route("/api/edits/{id}/file", get(edit::edit_file))
        .route("/api/eval", post(study::eval_case))
        .route("/api/study", post(study::study).get(study::study_get))
        .route("/api/models/{name}/files/{file}", get(files::model_file))
        .route("/api/models/{name}/stats/{layer}", get(edit::stats_file))
        .route("/api/openapi.json", get(files::openapi))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .route(
            "/api/edits/upload",
            post(edit::upload_edit).layer(DefaultBodyLimit::max(edit::MAX_EDIT_FILE)),
        )
        .with_state(state)
        .nest_service("/static", ServeDir::new(static_dir))
        .fallback_service(ServeDir::new(dist))
}

/// `loci serve`: discovers the models, binds the address and serves until Ctrl-C.
pub fn serve(a: ServeArgs) -> Result<()> {
    let paths = if a.models.is_empty() {
        vec![crate::workspace::default_model()?]
    } else {
        a.models.clone()
    };
    let device = crate::workspace::device()?;
    let trace_workers = (crate::workspace::trace_workers(&device) / a.workers.max(1)).max(1);
    let registry = Registry::discover(&paths, a.dtype.dtype(), device)?;
    let state = Arc::new(AppState {
        registry,
        admission: Arc::new(tokio::sync::Semaphore::new(a.workers.max(1) + a.queue)),
        running: Arc::new(tokio::sync::Semaphore::new(a.workers.max(1))),
        trace_workers,
        stats: crate::workspace::StatsCache::new(a.stats),
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
