//! The HTTP API end to end: a real `loci serve` process on a loopback port.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args(["serve", "--addr", &format!("127.0.0.1:{port}"), "--models"])
        .arg(root().join("tests/fixtures"))
        .args(extra)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn post(base: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut r = agent()
        .post(&format!("{base}{path}"))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let status = r.status().as_u16();
    let v = r.body_mut().read_json().unwrap_or(serde_json::Value::Null);
    (status, v)
}

#[test]
fn endpoints_answer_and_refuse_bad_requests() {
    let s = serve(&[]);
    let models: serde_json::Value = agent()
        .get(&format!("{}/api/models", s.base))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let names: Vec<&str> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tiny-gpt2", "tiny-gptj", "tiny-llama"]);

    let (st, v) = post(
        &s.base,
        "/api/predict",
        r#"{"model":"tiny-gpt2","prompt":"The Eiffel Tower is","top":3}"#,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["top"].as_array().unwrap().len(), 3);
    // The same numbers as the CLI (and the core) give.
    let lm = loci_core::LoadedModel::load(
        &root().join("tests/fixtures/tiny-gpt2"),
        loci_core::DType::F32,
        &loci_core::Device::Cpu,
    )
    .unwrap();
    let want = lm.predict("The Eiffel Tower is", 3).unwrap();
    assert_eq!(v["top"][0]["id"], want.top[0].id);
    assert!((v["top"][0]["prob"].as_f64().unwrap() - want.top[0].prob as f64).abs() < 1e-6);
    // Loaded models report their details.
    let models: serde_json::Value = agent()
        .get(&format!("{}/api/models", s.base))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert_eq!(models[0]["info"]["n_layer"], 4);

    let (st, v) = post(
        &s.base,
        "/api/generate",
        r#"{"model":"tiny-llama","prompt":"Toko Yasuda plays","max_new_tokens":5}"#,
    );
    assert_eq!(st, 200, "{v}");
    assert!(v["new_ids"].as_array().unwrap().len() <= 5);

    for (body, status, needle) in [
        (r#"{"model":"nope","prompt":"x"}"#, 404, "unknown model"),
        (
            r#"{"model":"../../etc/passwd","prompt":"x"}"#,
            404,
            "unknown model",
        ),
        (
            r#"{"model":"tiny-gpt2/../tiny-gpt2","prompt":"x"}"#,
            404,
            "unknown model",
        ),
        (
            r#"{"model": "tiny-gpt2", "prompt": "#,
            400,
            "bad request body",
        ),
        (r#"{"model":"tiny-gpt2","prompt":""}"#, 400, "empty"),
        (r#"{"prompt":"x"}"#, 422, "bad request body"),
    ] {
        let (st, v) = post(&s.base, "/api/predict", body);
        assert_eq!(st, status, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{body}: {v}");
    }
    let big = format!(
        r#"{{"model":"tiny-gpt2","prompt":"{}"}}"#,
        "a".repeat(100_000)
    );
    let (st, _) = post(&s.base, "/api/predict", &big);
    assert_eq!(st, 413);
    let long = format!(
        r#"{{"model":"tiny-gpt2","prompt":"{}"}}"#,
        "Paris is nice. ".repeat(200)
    );
    let (st, v) = post(&s.base, "/api/predict", &long);
    assert_eq!(st, 413, "{v}");
    let (st, v) = post(
        &s.base,
        "/api/predict",
        &format!(
            r#"{{"model":"tiny-gpt2","prompt":"{}"}}"#,
            "Paris is nice. ".repeat(20)
        ),
    );
    assert_eq!(st, 400, "over the tiny model's 64-token context: {v}");
    assert!(v["error"].as_str().unwrap().contains("context"));

    let (st, v) = post(
        &s.base,
        "/api/trace",
        r#"{"model":"tiny-gpt2","prompt":"The Eiffel Tower is in","subject":"Louvre"}"#,
    );
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("does not occur"));
    let (st, _) = post(
        &s.base,
        "/api/trace",
        r#"{"model":"tiny-gpt2","prompt":"The Eiffel Tower is in","subject":"Eiffel","samples":0}"#,
    );
    assert_eq!(st, 400);

    let spec: serde_json::Value = agent()
        .get(&format!("{}/api/openapi.json", s.base))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert!(spec["paths"]["/api/trace"].is_object());
    assert_eq!(
        agent()
            .get(&format!("{}/static/data/known_1000.json", s.base))
            .call()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    for path in [
        "/static/../Cargo.toml",
        "/static/%2e%2e/Cargo.toml",
        "/%2e%2e/Cargo.toml",
    ] {
        let st = agent()
            .get(&format!("{}{path}", s.base))
            .call()
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(st, 404, "{path}");
    }
}

/// Reads SSE events until `stop` says so; returns (event, data) pairs.
fn read_events(
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

#[test]
fn traces_stream_rows_then_the_same_result_as_the_core() {
    let s = serve(&[]);
    let body = r#"{"model":"tiny-gptj","prompt":"The Eiffel Tower is located in","subject":"Eiffel Tower","samples":3,"kinds":["hidden","attn"],"noise":{"type":"fixed","value":0.5}}"#;
    let r = agent()
        .post(&format!("{}/api/trace", s.base))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let events = read_events(r.into_body().into_reader(), |e, _| {
        e == "result" || e == "error"
    });
    assert_eq!(events[0].0, "start");
    let result = &events.last().unwrap().1;
    assert_eq!(events.last().unwrap().0, "result", "{result}");
    let rows: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.0 == "row")
        .map(|e| &e.1)
        .collect();
    let n_tok = result["tokens"].as_array().unwrap().len();
    assert_eq!(rows.len(), 2 * n_tok);
    for row in &rows {
        let kind = row["kind"].as_str().unwrap();
        let t = row["token"].as_u64().unwrap() as usize;
        assert_eq!(row["scores"], result["scores"][kind][t]);
    }
    let lm = loci_core::LoadedModel::load(
        &root().join("tests/fixtures/tiny-gptj"),
        loci_core::DType::F32,
        &loci_core::Device::Cpu,
    )
    .unwrap();
    let req: loci_core::TraceRequest = serde_json::from_str(body).unwrap();
    let want = lm
        .trace(&req, None, &mut loci_core::trace::Quiet, 1)
        .unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(&want.scores).unwrap()).unwrap();
    assert_eq!(
        want, result["scores"],
        "the server's grid is the core's, number for number"
    );
}

#[test]
fn a_full_queue_answers_503_and_a_dropped_stream_cancels_its_trace() {
    let Ok(out) = Command::new("bash")
        .arg(root().join("scripts/fetch-model.sh"))
        .output()
    else {
        return;
    };
    if !out.status.success() {
        eprintln!("SKIPPED: SmolLM2 unavailable");
        return;
    }
    let gguf = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let s = serve(&["--models", &gguf, "--workers", "1", "--queue", "0"]);
    let body = r#"{"model":"SmolLM2-135M-Instruct.Q4_1","prompt":"The Eiffel Tower is located in the city of","subject":"Eiffel Tower","noise":{"type":"fixed","value":0.1}}"#;
    let r = agent()
        .post(&format!("{}/api/trace", s.base))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let mut reader = r.into_body().into_reader();
    let first = read_events(&mut reader, |e, _| e == "row");
    assert_eq!(first.last().unwrap().0, "row");
    // The one slot is taken by the trace: anything else is refused at once.
    let (st, v) = post(
        &s.base,
        "/api/predict",
        r#"{"model":"tiny-gpt2","prompt":"Hi"}"#,
    );
    assert_eq!(st, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("busy"));
    // Leaving cancels the trace (long before its ~40 s), and the slot frees.
    drop(reader);
    let start = Instant::now();
    loop {
        let (st, _) = post(
            &s.base,
            "/api/predict",
            r#"{"model":"tiny-gpt2","prompt":"Hi"}"#,
        );
        if st == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the trace was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
