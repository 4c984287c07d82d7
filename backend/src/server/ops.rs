//! What an operator of a public server needs around the API: Prometheus metrics, request logs
//! (with the session, never the prompt), health checks, the page's Content-Security-Policy, the
//! API's CORS policy and a per-client rate limit.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::AppState;

/// How the server faces the internet.
#[derive(clap::Args, Debug, Clone)]
pub struct Exposure {
    /// Requests per second one client (IP address) may make on average; 0: no limit.
    #[arg(long, default_value_t = 30)]
    pub rate_limit: u64,
    /// Requests one client may make at once above the average.
    #[arg(long, default_value_t = 120)]
    pub rate_burst: u32,
    /// Other origins whose pages may call the API (CORS); by default only the server's own.
    #[arg(long)]
    pub cors_origin: Vec<String>,
    /// Log each request's query string too (it may hold a prompt); by default only its path.
    #[arg(long)]
    pub log_queries: bool,
}

/// The process's metrics recorder and what renders it.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let seconds = [0.005, 0.02, 0.1, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0];
    Ok(PrometheusBuilder::new()
        .set_buckets(&seconds)?
        .install_recorder()?)
}

/// Structured logs on stderr (`RUST_LOG` filters; default `info`).
pub fn install_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `GET /metrics`: requests and latency per endpoint, the queue, rejections, sessions, memory.
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let admitted = match st.schedule {
        super::Schedule::OneLane => st.capacity.saturating_sub(st.admission.available_permits()),
        super::Schedule::Lanes => st.sched.heavy_jobs(),
    };
    metrics::gauge!("loci_jobs_admitted").set(admitted as f64);
    metrics::gauge!("loci_sessions_live").set(st.sessions.len() as f64);
    metrics::gauge!("loci_session_edit_bytes").set(st.sessions.bytes() as f64);
    if let Some(rss) = resident_bytes() {
        metrics::gauge!("loci_resident_memory_bytes").set(rss as f64);
    }
    match &st.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are off").into_response(),
    }
}

/// `GET /api/capacity`: how the server shares its machine, each kind's measured seconds per
/// unit of work, the heavy lane's expected wait now, and for each loaded model the requests per
/// second each kind of typical request can be served at (a 12-token prompt; a 30-token
/// generation; a trace of 3 kinds × 10 samples; a 20-step edit).
pub async fn capacity(State(st): State<Arc<AppState>>) -> Response {
    use super::sched::{units, Cost, Kind};
    let rates: serde_json::Map<String, serde_json::Value> = st
        .sched
        .rates()
        .into_iter()
        .map(|(k, r)| (k.to_string(), r.into()))
        .collect();
    let per_second =
        |kind: Kind, u: f64, lanes: usize| lanes as f64 / st.sched.seconds(Cost::new(kind, u));
    let models: Vec<serde_json::Value> = st
        .registry
        .loaded_shapes()
        .into_iter()
        .map(|(name, l)| {
            let quick = st.batchers.runners;
            let heavy = st.sched.heavy_slots;
            serde_json::json!({
                "name": name,
                "layers": l.layers,
                "d_model": l.d_model,
                "requests_per_second": {
                    "predict": per_second(Kind::Predict, units::predict(12, l), quick),
                    "generate": per_second(Kind::Generate, units::generate(12, 30, l), 1),
                    "trace": per_second(Kind::Trace, units::trace(12, l, 3, 10), heavy),
                    "edit": per_second(Kind::Edit, units::edit(12, l, 20, 1), heavy),
                },
            })
        })
        .collect();
    axum::Json(serde_json::json!({
        "schedule": format!("{:?}", st.schedule).to_lowercase(),
        "max_wait_seconds": st.sched.max_wait.as_secs_f64(),
        "heavy_slots": st.sched.heavy_slots,
        "prediction_runners": st.batchers.runners,
        "heavy_wait_seconds": st.sched.heavy_wait_now(),
        "heavy_waiting": st.sched.heavy_waiting(),
        "seconds_per_unit": rates,
        "models": models,
    }))
    .into_response()
}

/// The process's resident memory (Linux), in bytes.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// `GET /healthz`: the process answers.
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: ready for work (a heavy job would be admitted; with one lane, the queue has
/// room); 503 when not.
pub async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    let ready = match st.schedule {
        super::Schedule::OneLane => st.admission.available_permits() > 0,
        super::Schedule::Lanes => {
            st.sched.heavy_wait_now() <= st.sched.max_wait.as_secs_f64()
                && st.sched.heavy_waiting() < st.sched.max_waiting
        }
    };
    if ready {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response()
    }
}

/// Counts and times every request by its route, and logs it: method, route, status, time and
/// the session (its first 8 hex digits, enough to follow one visitor), never the body.
pub async fn observe(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let method = req.method().clone();
    let shown = if st.exposure.log_queries {
        req.uri().to_string()
    } else {
        req.uri().path().to_string()
    };
    let cookie = super::sessions::cookie_session(req.headers());
    let r = next.run(req).await;
    let session: String = cookie
        .or_else(|| super::sessions::cookie_session(r.headers()))
        .unwrap_or_default()
        .chars()
        .take(8)
        .collect();
    let status = r.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    let labels = [("route", route), ("status", status.to_string())];
    metrics::counter!("loci_requests_total", &labels).increment(1);
    metrics::histogram!("loci_request_seconds", "route" => labels[0].1.clone()).record(seconds);
    if status == 503 || status == 429 {
        metrics::counter!("loci_rejected_total", "status" => status.to_string()).increment(1);
    }
    tracing::info!(%method, path = %shown, status, ms = seconds * 1e3, session, "request");
    r
}

/// The page's Content-Security-Policy: scripts from the server only (plus the app's inline
/// loader, by its hash) and WebAssembly; styles may be inline (the app sets them); data from
/// the server and from https addresses (models and statistics a visitor names); no frames,
/// plugins or foreign form targets.
pub fn content_security_policy(dist: &std::path::Path) -> HeaderValue {
    let index = std::fs::read_to_string(dist.join("index.html")).unwrap_or_default();
    let hashes: String = inline_scripts(&index)
        .map(|s| {
            use base64::Engine;
            use sha2::Digest;
            let d = sha2::Sha256::digest(s.as_bytes());
            format!(
                " 'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(d)
            )
        })
        .collect();
    let policy = format!(
        "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'{hashes}; \
         style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; \
         connect-src 'self' https:; worker-src 'self'; object-src 'none'; base-uri 'self'; \
         frame-ancestors 'none'; form-action 'self'"
    );
    HeaderValue::from_str(&policy).expect("the policy is ASCII")
}

/// The bodies of the page's inline `<script>` elements, as the browser hashes them.
fn inline_scripts(html: &str) -> impl Iterator<Item = &str> {
    html.split("<script").skip(1).filter_map(|part| {
        let (attrs, rest) = part.split_once('>')?;
        if attrs.contains("src=") {
            return None;
        }
        rest.split_once("</script>").map(|(body, _)| body)
    })
}

/// The API's CORS policy: the server's own origin only, unless `--cors-origin` names others
/// (they may not send cookies, so they reach the shared model as a new visitor each time).
pub fn cors(origins: &[String]) -> anyhow::Result<CorsLayer> {
    let allowed = origins
        .iter()
        .map(|o| HeaderValue::from_str(o).map_err(|_| anyhow::anyhow!("bad origin {o:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(CorsLayer::new()
        .allow_origin(AllowOrigin::list(allowed))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn inline_scripts_are_found_and_external_ones_skipped() {
        let html = r#"<script type="module">a();</script><script src="/x.js"></script>
            <script>b</script>"#;
        let found: Vec<&str> = super::inline_scripts(html).collect();
        assert_eq!(found, ["a();", "b"]);
    }
}
