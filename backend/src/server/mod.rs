//! `loci serve`: the web app and a JSON API over the same core functions the CLI uses.
//!
//! Models are named by the server (never by paths from requests), loaded lazily and shared; each
//! visitor's edits apply to their own requests only (see `sessions`); work is scheduled by its
//! estimated cost: predictions and generations batched across requests in a quick lane
//! (`batcher`), heavy jobs at a lower CPU priority in theirs (`sched`); a panic in one request
//! becomes a 500.

mod batcher;
mod edit;
mod files;
mod jobs;
mod models;
mod ops;
mod predict;
mod sched;
mod sessions;
mod study;
mod trace;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue};
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

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
    /// Heavy jobs (traces, edits, evaluations, studies) computed at once; a trace spreads over
    /// the cores divided by this. Predictions and generations have their own lane.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Heavy jobs that may wait whatever their estimates (a bound on memory); with
    /// `--schedule one-lane`, every job that may wait.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// How jobs share the machine: `lanes` (by cost: predictions and generations batched across
    /// requests in a quick lane, heavy jobs at a lower CPU priority in theirs, admission by
    /// expected wait) or `one-lane` (every job in one first-come queue of `--workers` slots and
    /// `--queue` waiting: the earlier server, kept to measure against).
    #[arg(long, value_enum, default_value_t = Schedule::Lanes)]
    pub schedule: Schedule,
    /// The longest expected wait a request is admitted with, in seconds; beyond it, 503 with a
    /// `Retry-After` of the estimate.
    #[arg(long, default_value_t = 120.0)]
    pub max_wait: f64,
    /// Milliseconds a prediction waits for others to share its pass.
    #[arg(long, default_value_t = 3)]
    pub batch_window_ms: u64,
    /// Seconds one job may run; a longer one stops at its next step (504).
    #[arg(long, default_value_t = 600.0)]
    pub job_seconds: f64,
    /// Weights and activations dtype of the served models.
    #[arg(long, value_enum, default_value_t = crate::workspace::Precision::F32)]
    pub dtype: crate::workspace::Precision,
    /// Key statistics for edits: folder, corpus and token count when computed on the way.
    #[command(flatten)]
    pub stats: crate::workspace::StatsSource,
    /// The operator's token: requests with `Authorization: Bearer TOKEN` edit the shared model
    /// that every visitor sees. Without one, no request changes the shared model.
    #[arg(long, env = "LOCI_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// A file holding the operator's token.
    #[arg(long, conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub sessions: sessions::SessionLimits,
    #[command(flatten)]
    pub exposure: ops::Exposure,
}

/// How jobs share the machine (see `--schedule`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Lanes,
    OneLane,
}

/// What every request shares: the models, the lanes and queues, the threads a trace may use
/// and the key statistics.
pub struct AppState {
    /// How jobs share the machine.
    pub schedule: Schedule,
    /// The estimates and the heavy lane.
    pub sched: Arc<sched::Scheduler>,
    /// The quick lanes (batched predictions and generations) of each model.
    pub batchers: batcher::Batchers,
    pub registry: Registry,
    /// With `--schedule one-lane`: permits for running and waiting jobs together.
    pub admission: Arc<tokio::sync::Semaphore>,
    /// Permits for running jobs.
    pub running: Arc<tokio::sync::Semaphore>,
    /// Threads one trace may use.
    pub trace_workers: usize,
    /// Key statistics, kept in memory after first use.
    pub stats: crate::workspace::StatsCache,
    /// Running and waiting jobs the queue admits.
    pub capacity: usize,
    /// Jobs run at once.
    pub workers: usize,
    /// How long one job may run.
    pub job_limit: std::time::Duration,
    /// A running mean of recent jobs' durations, in milliseconds (for `Retry-After`).
    pub job_ms: std::sync::atomic::AtomicU64,
    /// The visitors' sessions and their edits.
    pub sessions: sessions::Sessions,
    /// The operator's token, if there is one.
    pub admin: sessions::AdminToken,
    /// How the server faces the internet.
    pub exposure: ops::Exposure,
    /// What `/metrics` renders (`None` when the process has no recorder of ours).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl AppState {
    /// Notes a job's duration in the running mean.
    pub fn job_took(&self, d: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let ms = d.as_millis().min(u64::MAX as u128) as u64;
        let _ = self
            .job_ms
            .fetch_update(Relaxed, Relaxed, |m| Some((m * 7 + ms) / 8));
    }

    /// Seconds until a full queue has room again, by the recent jobs' mean duration.
    pub fn expected_wait_seconds(&self) -> u64 {
        let mean = self.job_ms.load(std::sync::atomic::Ordering::Relaxed);
        (mean * self.capacity as u64 / self.workers as u64)
            .div_ceil(1000)
            .max(1)
    }
}

/// The API's routes (each visitor's session, rate limits, CORS, metrics and logs around them),
/// health checks and metrics, the shared assets under `/static` and the built app everywhere
/// else, every response with the page's security headers.
pub fn router(state: Arc<AppState>, dist: PathBuf, static_dir: PathBuf) -> Result<Router> {
    let api = Router::new()
        .route("/api/models", get(predict::models))
        .route("/api/capacity", get(ops::capacity))
        .route("/api/predict", post(predict::predict))
        .route("/api/generate", post(predict::generate))
        .route("/api/trace", post(trace::trace).get(trace::trace_get))
        .route("/api/edit", post(edit::edit))
        .route("/api/edits", get(edit::edits))
        .route("/api/undo", post(edit::undo))
        .route("/api/edits/{id}/file", get(edit::edit_file))
        .route("/api/session/export", get(edit::export_session))
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
        .route(
            "/api/session/import",
            post(edit::import_session).layer(DefaultBodyLimit::max(8 * edit::MAX_EDIT_FILE)),
        )
        .layer(middleware::from_fn_with_state(
            state.clone(),
            sessions::middleware,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), ops::observe))
        .layer(ops::cors(&state.exposure.cors_origin)?);
    let api = with_rate_limit(api, &state.exposure);
    let csp = ops::content_security_policy(&dist);
    Ok(api
        .route("/metrics", get(ops::metrics))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .with_state(state)
        .nest_service("/static", ServeDir::new(static_dir))
        .fallback_service(ServeDir::new(dist))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            csp,
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        )))
}

/// The routes behind a per-client (peer IP address) limit of `rate_limit` requests a second on
/// average and `rate_burst` at once (429 with `Retry-After` beyond); none when `rate_limit` is 0.
fn with_rate_limit(api: Router<Arc<AppState>>, e: &ops::Exposure) -> Router<Arc<AppState>> {
    if e.rate_limit == 0 {
        return api;
    }
    let Some(conf) = tower_governor::governor::GovernorConfigBuilder::default()
        .per_nanosecond((1_000_000_000 / e.rate_limit).max(1))
        .burst_size(e.rate_burst.max(1))
        .finish()
    else {
        return api;
    };
    let limiter = conf.limiter().clone();
    // Forget clients that have gone quiet, so the table does not grow without bound.
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
        limiter.retain_recent();
    });
    api.layer(tower_governor::GovernorLayer::new(conf).error_handler(too_many))
}

/// A rate-limited request's 429: the limiter's `Retry-After`, and the API's JSON error.
fn too_many(e: tower_governor::GovernorError) -> axum::response::Response {
    metrics::counter!("loci_rejected_total", "status" => "429").increment(1);
    let (mut parts, text) = e.into_response().into_parts();
    let body =
        serde_json::json!({ "error": format!("too many requests from your address: {text}") });
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    axum::response::Response::from_parts(parts, axum::body::Body::from(body.to_string()))
}

/// `loci serve`: discovers the models, binds the address and serves until Ctrl-C.
pub fn serve(a: ServeArgs) -> Result<()> {
    let paths = if a.models.is_empty() {
        vec![crate::workspace::default_model()?]
    } else {
        a.models.clone()
    };
    // candle's norms and softmaxes run on rayon's global pool, whose threads would take the CPU
    // priority of whichever thread first used it: start it here, at normal priority, before a
    // low-priority heavy job can.
    rayon::current_num_threads();
    let device = crate::workspace::device()?;
    let trace_workers = (crate::workspace::trace_workers(&device) / a.workers.max(1)).max(1);
    let registry = Registry::discover(&paths, a.dtype.dtype(), device)?;
    let capacity = a.workers.max(1) + a.queue;
    ops::install_logs();
    let max_wait = std::time::Duration::from_secs_f64(a.max_wait.clamp(0.0, 1e7));
    let state = Arc::new(AppState {
        schedule: a.schedule,
        sched: Arc::new(sched::Scheduler::new(a.workers, max_wait, a.queue)),
        batchers: batcher::Batchers::new(
            crate::workspace::workers(),
            std::time::Duration::from_millis(a.batch_window_ms.min(1000)),
        ),
        registry,
        admission: Arc::new(tokio::sync::Semaphore::new(capacity)),
        running: Arc::new(tokio::sync::Semaphore::new(a.workers.max(1))),
        trace_workers,
        stats: crate::workspace::StatsCache::new(a.stats),
        capacity,
        workers: a.workers.max(1),
        job_limit: std::time::Duration::from_secs_f64(a.job_seconds.clamp(0.01, 1e7)),
        job_ms: std::sync::atomic::AtomicU64::new(1000),
        sessions: sessions::Sessions::new(a.sessions.clone()),
        admin: sessions::AdminToken::new(a.admin_token.clone(), a.admin_token_file.as_deref())?,
        exposure: a.exposure.clone(),
        metrics: ops::install_metrics().ok(),
    });
    let app = router(state.clone(), a.dist, a.static_dir)?;
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
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok(())
    })
}
