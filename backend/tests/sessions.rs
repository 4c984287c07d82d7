//! A public server: each visitor's edits are their own (their session's view of the shared
//! model), only the operator's token changes what everyone sees, sessions expire and say so,
//! a trace sees one model whatever others do meanwhile, and the page and API carry their
//! security policies, metrics and limits.

mod common;

use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "operator-token-0123456789";
const PROMPT: &str = "The Eiffel Tower is located in the city of";

/// A request by visitor `a`, optionally with the operator's token; status and JSON.
fn call(
    a: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<&[u8]>,
    token: Option<&str>,
) -> (u16, serde_json::Value, Vec<u8>) {
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let mut r = match body {
        Some(b) => a
            .run(
                req.header("content-type", "application/json")
                    .body(b.to_vec())
                    .unwrap(),
            )
            .unwrap(),
        None => a.run(req.body(()).unwrap()).unwrap(),
    };
    let status = r.status().as_u16();
    let bytes = r.body_mut().read_to_vec().unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json, bytes)
}

/// The five most likely next tokens after `PROMPT` as `a` sees the model: (id, prob).
fn top5(a: &ureq::Agent, base: &str) -> Vec<(u64, f64)> {
    let body = serde_json::json!({"model": "tiny-gpt2", "prompt": PROMPT, "top": 5});
    let (st, v, _) = call(
        a,
        "POST",
        &format!("{base}/api/predict"),
        Some(body.to_string().as_bytes()),
        None,
    );
    assert_eq!(st, 200, "{v}");
    v["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_u64().unwrap(), t["prob"].as_f64().unwrap()))
        .collect()
}

fn close(a: &[(u64, f64)], b: &[(u64, f64)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.0 == y.0 && (x.1 - y.1).abs() <= 1e-5 * (1.0 + y.1))
}

/// A causal trace by `a` (long enough to overlap other requests): its grids, and when each row
/// arrived; `started` is called at the first row.
fn trace(a: &ureq::Agent, base: &str, started: impl FnOnce()) -> (serde_json::Value, Vec<Instant>) {
    let body = r#"{"model":"tiny-gpt2","prompt":"The Eiffel Tower is located in the city of","subject":"Eiffel Tower","samples":64,"kinds":["hidden","mlp","attn"],"noise":{"type":"fixed","value":0.5}}"#;
    let r = a
        .post(&format!("{base}/api/trace"))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let mut started = Some(started);
    let mut arrivals = vec![];
    let events = read_events(r.into_body().into_reader(), |e, _| {
        if e == "row" {
            arrivals.push(Instant::now());
            if let Some(f) = started.take() {
                f();
            }
        }
        e == "result" || e == "error"
    });
    let (event, result) = events.last().unwrap().clone();
    assert_eq!(event, "result", "{result}");
    (result["scores"].clone(), arrivals)
}

#[test]
fn visitors_see_their_own_edits_and_only_the_operator_edits_for_everyone() {
    let (s, dir) = serve_editing_with("sessions", &["--admin-token", TOKEN, "--workers", "2"]);
    let base = &s.base;
    let (a, b) = (new_agent(), new_agent());
    let before = top5(&b, base);

    // Visitor A edits; the edit is A's alone.
    let edit = serde_json::json!({
        "model": "tiny-gpt2", "prompt": PROMPT, "subject": "Eiffel Tower", "target": "Rome",
        "layer": 2,
    });
    let (st, v, _) = call(
        &a,
        "POST",
        &format!("{base}/api/edit"),
        Some(edit.to_string().as_bytes()),
        None,
    );
    assert_eq!(st, 200, "{v}");
    let id = v["id"].as_u64().unwrap();
    let edited = top5(&a, base);
    assert!(!close(&edited, &before), "A's edit changed nothing");
    // At the same time, each sees their own model.
    let (seen_a, seen_b) = std::thread::scope(|sc| {
        let ta = sc.spawn(|| (0..6).map(|_| top5(&a, base)).collect::<Vec<_>>());
        let tb = sc.spawn(|| (0..6).map(|_| top5(&b, base)).collect::<Vec<_>>());
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert!(seen_a.iter().all(|p| p == &edited));
    assert!(seen_b.iter().all(|p| p == &before));
    // B neither lists nor undoes A's edit.
    let (st, list, _) = call(
        &b,
        "GET",
        &format!("{base}/api/edits?model=tiny-gpt2"),
        None,
        None,
    );
    assert_eq!((st, list), (200, serde_json::json!([])));
    let undo = br#"{"model":"tiny-gpt2"}"#;
    let (st, v, _) = call(&b, "POST", &format!("{base}/api/undo"), Some(undo), None);
    assert_eq!(st, 409, "{v}");
    // A wrong token is no token.
    let (st, _, _) = call(
        &b,
        "POST",
        &format!("{base}/api/undo"),
        Some(undo),
        Some("operator-token-wrong-guess"),
    );
    assert_eq!(st, 409);
    assert_eq!(top5(&a, base), edited);

    // A's session moves to a new visitor C as one file.
    let (st, _, session) = call(
        &a,
        "GET",
        &format!("{base}/api/session/export?model=tiny-gpt2"),
        None,
        None,
    );
    assert_eq!(st, 200);
    let c = new_agent();
    let (st, v, _) = call(
        &c,
        "POST",
        &format!("{base}/api/session/import?model=tiny-gpt2"),
        Some(&session),
        None,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(top5(&c, base), edited);
    let (st, v, _) = call(
        &c,
        "POST",
        &format!("{base}/api/session/import?model=tiny-gpt2"),
        Some(b"{}"),
        None,
    );
    assert_eq!(st, 400, "{v}");

    // The operator applies A's edit to the shared model: B, with no edits, now sees through the
    // weights what A saw through the view.
    let (st, _, file) = call(
        &a,
        "GET",
        &format!("{base}/api/edits/{id}/file?model=tiny-gpt2"),
        None,
        None,
    );
    assert_eq!(st, 200);
    let (st, v, _) = call(
        &b,
        "POST",
        &format!("{base}/api/edits/upload?model=tiny-gpt2"),
        Some(&file),
        Some(TOKEN),
    );
    assert_eq!(st, 200, "{v}");
    let shared = top5(&b, base);
    assert!(
        close(&shared, &edited),
        "view {edited:?} vs weights {shared:?}"
    );
    let (_, models, _) = call(&b, "GET", &format!("{base}/api/models"), None, None);
    assert_eq!(models[0]["edits"], 1, "{models}");

    // A trace running while the operator undoes sees one model from start to end.
    let d = new_agent();
    let (reference, _) = trace(&d, base, || {});
    let (tx, rx) = std::sync::mpsc::channel();
    let ((during, arrivals), (undone, undone_at)) = std::thread::scope(|sc| {
        let t = sc.spawn(|| trace(&d, base, move || tx.send(()).unwrap()));
        rx.recv_timeout(Duration::from_secs(60)).unwrap();
        let all = br#"{"model":"tiny-gpt2","all":true}"#;
        let undone = call(
            &b,
            "POST",
            &format!("{base}/api/undo"),
            Some(all),
            Some(TOKEN),
        );
        let undone_at = Instant::now();
        (t.join().unwrap(), (undone, undone_at))
    });
    assert_eq!(undone.0, 200, "{}", undone.1);
    assert!(
        arrivals.iter().any(|&t| t > undone_at),
        "the trace ended before the undo: nothing was tested"
    );
    assert_eq!(during, reference, "the trace saw the undo half-way");
    // The shared model is back, bit for bit.
    assert_eq!(top5(&b, base), before);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_expired_session_is_told_so_once() {
    let s = serve(&["--session-ttl", "1"]);
    let a = new_agent();
    top5(&a, &s.base);
    std::thread::sleep(Duration::from_millis(1600));
    // The model list reads no session: it answers (and starts a new one) without complaint.
    let b = new_agent();
    top5(&b, &s.base);
    std::thread::sleep(Duration::from_millis(1600));
    let (st, _, _) = call(&b, "GET", &format!("{}/api/models", s.base), None, None);
    assert_eq!(st, 200);
    let body = serde_json::json!({"model": "tiny-gpt2", "prompt": PROMPT});
    let (st, v, _) = call(
        &a,
        "POST",
        &format!("{}/api/predict", s.base),
        Some(body.to_string().as_bytes()),
        None,
    );
    assert_eq!(st, 410, "{v}");
    assert!(v["error"].as_str().unwrap().contains("expired"), "{v}");
    top5(&a, &s.base);
}

#[test]
fn pages_and_the_api_carry_their_policies_metrics_and_limits() {
    let s = serve(&[
        "--rate-limit",
        "1",
        "--rate-burst",
        "3",
        "--cors-origin",
        "https://lab.example",
    ]);
    let a = new_agent();
    let r = a.get(&format!("{}/", s.base)).call().unwrap();
    let csp = r
        .headers()
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self' 'wasm-unsafe-eval'"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let index = std::fs::read_to_string(root().join("dist/index.html")).unwrap_or_default();
    if index.contains("<script type=\"module\">") {
        assert!(
            csp.contains("'sha256-"),
            "the app's inline loader is allowed by its hash: {csp}"
        );
    }
    // CORS: the named origin may call the API, others get no grant.
    let preflight = |origin: &str| {
        a.run(
            ureq::http::Request::builder()
                .method("OPTIONS")
                .uri(format!("{}/api/predict", s.base))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .body(())
                .unwrap(),
        )
        .unwrap()
        .headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(
        preflight("https://lab.example").as_deref(),
        Some("https://lab.example")
    );
    assert_eq!(preflight("https://elsewhere.example"), None);
    // Health and metrics answer outside the rate limit.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            a.get(&format!("{}{path}", s.base))
                .call()
                .unwrap()
                .status()
                .as_u16(),
            200
        );
    }
    // One request a second with a burst of three: a quick run of ten is cut short with 429s.
    let statuses: Vec<u16> = (0..10)
        .map(|_| {
            a.get(&format!("{}/api/models", s.base))
                .call()
                .unwrap()
                .status()
                .as_u16()
        })
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    let (st, v, _) = call(&a, "GET", &format!("{}/api/models", s.base), None, None);
    assert_eq!(st, 429);
    assert!(
        v["error"].as_str().unwrap().contains("too many requests"),
        "{v}"
    );
    let r = a.get(&format!("{}/api/models", s.base)).call().unwrap();
    assert!(r.headers().contains_key("retry-after"));
    let mut r = a.get(&format!("{}/metrics", s.base)).call().unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    assert!(text.contains("loci_requests_total"), "{text}");
    assert!(text.contains("route=\"/api/models\""), "{text}");
    assert!(text.contains("loci_sessions_live"), "{text}");
    assert!(text.contains("loci_rejected_total"), "{text}");
    assert!(text.contains("loci_resident_memory_bytes"), "{text}");
}

#[test]
fn no_model_file_is_served_through_a_link_out_of_its_folder() {
    let dir = std::env::temp_dir().join(format!("loci-links-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = dir.join("models/linked");
    std::fs::create_dir_all(&model).unwrap();
    let fixture = root().join("tests/fixtures/tiny-gpt2");
    std::fs::write(dir.join("secret.safetensors"), b"not for visitors").unwrap();
    std::fs::copy(fixture.join("config.json"), model.join("config.json")).unwrap();
    // A link inside the folder is fine; one out of it is never listed nor served.
    std::fs::copy(fixture.join("tokenizer.json"), model.join("tok.json")).unwrap();
    std::os::unix::fs::symlink(model.join("tok.json"), model.join("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink(
        dir.join("secret.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();
    let s = serve_models(&dir.join("models"), &[], None);
    let a = new_agent();
    let (_, models, _) = call(&a, "GET", &format!("{}/api/models", s.base), None, None);
    let files: Vec<&str> = models[0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["config.json", "tokenizer.json"]);
    for (file, want) in [("tokenizer.json", 200), ("model.safetensors", 404)] {
        let url = format!("{}/api/models/linked/files/{file}", s.base);
        assert_eq!(
            a.get(&url).call().unwrap().status().as_u16(),
            want,
            "{file}"
        );
    }
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_job_past_the_servers_time_limit_is_stopped() {
    let s = serve(&["--job-seconds", "0.2"]);
    let a = new_agent();
    let started = Instant::now();
    // 48 tokens: seconds of work on this machine, far past the limit on any machine.
    let body = r#"{"model":"tiny-gpt2","prompt":"The Eiffel Tower, built by Gustave Eiffel's company for the World's Fair, is located in the city of","subject":"Eiffel Tower","samples":64,"kinds":["hidden","mlp","attn"],"noise":{"type":"fixed","value":0.5}}"#;
    let r = a
        .post(&format!("{}/api/trace", s.base))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let events = read_events(r.into_body().into_reader(), |e, _| {
        e == "result" || e == "error"
    });
    let (event, v) = events.last().unwrap();
    assert_eq!(event, "error", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("limit of 0.2 s"),
        "{v}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // The server goes on serving.
    top5(&a, &s.base);
}
