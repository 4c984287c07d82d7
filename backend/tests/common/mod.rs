//! What the integration tests share: a real `loci serve` process on a loopback port, visitors
//! (HTTP agents with their own cookie jars) and server-sent events; and the command lines the
//! CLI tests repeat.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `loci edit --model MODEL` moving the Eiffel Tower to Rome with ROME at `layer`; the caller
/// adds the rest.
pub fn eiffel_edit(model: &str, layer: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_loci"));
    c.args(["edit", "--model", model])
        .args(["--prompt", "The Eiffel Tower is located in"])
        .args([
            "--subject",
            "Eiffel Tower",
            "--target",
            "Rome",
            "--layer",
            layer,
        ]);
    c
}

pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve(extra: &[&str]) -> Server {
    serve_logging(extra, None)
}

/// [`serve`] with the server's log (stderr) written to `log`.
pub fn serve_logging(extra: &[&str], log: Option<&std::path::Path>) -> Server {
    serve_models(&root().join("tests/fixtures"), extra, log)
}

/// A server of the models in `models`, its log (stderr) written to `log`.
pub fn serve_models(
    models: &std::path::Path,
    extra: &[&str],
    log: Option<&std::path::Path>,
) -> Server {
    let stderr = match log {
        Some(p) => Stdio::from(std::fs::File::create(p).unwrap()),
        None => Stdio::null(),
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args(["serve", "--addr", &format!("127.0.0.1:{port}"), "--models"])
        .arg(models)
        .args(extra)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while ureq::get(&format!("{base}/api/models")).call().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Server { child, base }
}

/// A server that can edit: key statistics from 2000 tokens of the Wikipedia sample, kept in a
/// fresh temporary folder (returned, for the test to remove).
pub fn serve_editing(name: &str) -> (Server, PathBuf) {
    serve_editing_with(name, &[])
}

/// [`serve_editing`] with more arguments.
pub fn serve_editing_with(name: &str, extra: &[&str]) -> (Server, PathBuf) {
    let dir = std::env::temp_dir().join(format!("loci-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let stats = dir.join("stats");
    let mut args = vec![
        "--corpus",
        corpus.to_str().unwrap(),
        "--stats",
        stats.to_str().unwrap(),
        "--stats-tokens",
        "2000",
    ];
    args.extend(extra);
    (serve(&args), dir)
}

/// A new visitor: an agent with its own cookie jar (its own server session).
pub fn new_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

thread_local! {
    /// Each test is one visitor (cookies ignore ports, so tests running side by side against
    /// their own servers must not share a jar).
    static VISITOR: ureq::Agent = new_agent();
}

pub fn agent() -> ureq::Agent {
    VISITOR.with(|a| a.clone())
}

pub fn post(base: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    post_as(&agent(), base, path, body)
}

/// [`post`] as visitor `a`.
pub fn post_as(a: &ureq::Agent, base: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut r = a
        .post(&format!("{base}{path}"))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let status = r.status().as_u16();
    let v = r.body_mut().read_json().unwrap_or(serde_json::Value::Null);
    (status, v)
}

/// Reads SSE events until `stop` says so; returns (event, data) pairs.
pub fn read_events(
    r: impl std::io::Read,
    mut stop: impl FnMut(&str, &serde_json::Value) -> bool,
) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    let mut event = String::new();
    for line in BufReader::new(r).lines() {
        let line = line.unwrap();
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            let v: serde_json::Value = serde_json::from_str(d).unwrap();
            let done = stop(&event, &v);
            out.push((event.clone(), v));
            if done {
                break;
            }
        }
    }
    out
}

pub fn get_json(base: &str, path: &str) -> (u16, serde_json::Value) {
    let mut r = agent().get(&format!("{base}{path}")).call().unwrap();
    let status = r.status().as_u16();
    (
        status,
        r.body_mut().read_json().unwrap_or(serde_json::Value::Null),
    )
}

pub fn top_prob(base: &str, prompt: &str) -> (u64, f64) {
    let (st, v) = post(
        base,
        "/api/predict",
        &serde_json::json!({"model": "tiny-gpt2", "prompt": prompt, "top": 1}).to_string(),
    );
    assert_eq!(st, 200, "{v}");
    (
        v["top"][0]["id"].as_u64().unwrap(),
        v["top"][0]["prob"].as_f64().unwrap(),
    )
}
