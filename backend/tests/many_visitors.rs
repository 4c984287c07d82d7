//! Many visitors on one model: a burst of simultaneous predictions is answered in full (batched
//! across requests, identical ones sharing a row, each answer what the prompt gets alone), visitors with different edits
//! share passes and still see only their own, cheap requests never wait behind a heavy one,
//! the heavy lane refuses by expected wait (503 with `Retry-After`), a client that leaves while
//! waiting frees its place at once, and an overloaded server keeps answering its listing and
//! health checks.

mod common;

use std::time::{Duration, Instant};

use common::*;

const PROMPTS: [&str; 3] = [
    "The Eiffel Tower is located in the city of",
    "Michael Jordan plays",
    "Hi",
];

fn predict_body(model: &str, prompt: &str) -> String {
    serde_json::json!({ "model": model, "prompt": prompt, "top": 3 }).to_string()
}

fn probs(v: &serde_json::Value) -> Vec<f64> {
    v["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["prob"].as_f64().unwrap())
        .collect()
}

fn assert_same(a: &serde_json::Value, b: &serde_json::Value, what: &str) {
    let ids = |v: &serde_json::Value| {
        v["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(a), ids(b), "{what}");
    for (x, y) in probs(a).iter().zip(probs(b)) {
        assert!((x - y).abs() <= 1e-5, "{what}: {x} vs {y}");
    }
}

#[test]
fn a_burst_of_sixty_predictions_is_answered_in_full_each_as_alone() {
    let s = serve(&[]);
    let alone: Vec<serde_json::Value> = PROMPTS
        .iter()
        .map(|p| post(&s.base, "/api/predict", &predict_body("tiny-llama", p)).1)
        .collect();
    let answers: Vec<(usize, u16, serde_json::Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..60)
            .map(|i| {
                let base = s.base.clone();
                scope.spawn(move || {
                    let a = new_agent();
                    let body = predict_body("tiny-llama", PROMPTS[i % PROMPTS.len()]);
                    let (st, v) = post_as(&a, &base, "/api/predict", &body);
                    (i, st, v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, st, v) in answers {
        assert_eq!(st, 200, "request {i}: {v}");
        assert_same(&v, &alone[i % PROMPTS.len()], &format!("request {i}"));
    }
    // The burst shared passes: fewer batches than requests.
    let metrics = agent()
        .get(&format!("{}/metrics", s.base))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let batches = metric(&metrics, "loci_batch_size_count{kind=\"predict\"}");
    assert!(
        (1.0..60.0).contains(&batches),
        "{batches} batches\n{metrics}"
    );
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn visitors_with_different_edits_share_passes_and_see_only_their_own() {
    let (s, dir) = serve_editing("visitors");
    let prompt = PROMPTS[0];
    let model = "tiny-gpt2";
    let editor = new_agent();
    let (st, v) = post_as(
        &editor,
        &s.base,
        "/api/edit",
        &serde_json::json!({"model": model, "prompt": prompt, "subject": "Eiffel Tower",
            "target": "Rome", "layer": 2, "generate_tokens": 0})
        .to_string(),
    );
    assert_eq!(st, 200, "{v}");
    let plain = new_agent();
    let alone_edited = post_as(
        &editor,
        &s.base,
        "/api/predict",
        &predict_body(model, prompt),
    )
    .1;
    let alone_plain = post_as(
        &plain,
        &s.base,
        "/api/predict",
        &predict_body(model, prompt),
    )
    .1;
    assert!(
        (probs(&alone_edited)[0] - probs(&alone_plain)[0]).abs() > 1e-4,
        "the edit changed nothing"
    );
    // Both visitors at once, many times over: each gets their own view's answer.
    std::thread::scope(|scope| {
        for round in 0..10 {
            for (who, want) in [(&editor, &alone_edited), (&plain, &alone_plain)] {
                let base = s.base.clone();
                scope.spawn(move || {
                    let (st, v) = post_as(who, &base, "/api/predict", &predict_body(model, prompt));
                    assert_eq!(st, 200, "{v}");
                    assert_same(&v, want, &format!("round {round}"));
                });
            }
        }
    });
    // Generations too, decoded together: the same text as one at a time.
    let gen = |a: &ureq::Agent| {
        let body = serde_json::json!({"model": model, "prompt": prompt, "max_new_tokens": 8});
        post_as(a, &s.base, "/api/generate", &body.to_string())
    };
    let (want_edited, want_plain) = (gen(&editor).1, gen(&plain).1);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            for (who, want) in [(&editor, &want_edited), (&plain, &want_plain)] {
                scope.spawn(move || {
                    let (st, v) = gen(who);
                    assert_eq!(st, 200, "{v}");
                    assert_eq!(v["text"], want["text"]);
                });
            }
        }
    });
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts a long trace of SmolLM2 (the heavy lane's job for a while); its event reader.
fn long_trace(base: &str, a: &ureq::Agent) -> (u16, Box<dyn std::io::Read + Send>) {
    let body = r#"{"model":"SmolLM2-135M-Instruct.Q4_1","prompt":"The Eiffel Tower is located in the city of","subject":"Eiffel Tower","noise":{"type":"fixed","value":0.1}}"#;
    let r = a
        .post(&format!("{base}/api/trace"))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let status = r.status().as_u16();
    (status, Box::new(r.into_body().into_reader()))
}

fn smollm2() -> Option<String> {
    let out = std::process::Command::new("bash")
        .arg(root().join("scripts/fetch-model.sh"))
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("SKIPPED: SmolLM2 unavailable");
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn heavy_work_never_holds_up_cheap_requests_and_a_leaver_frees_its_place() {
    let Some(gguf) = smollm2() else { return };
    let s = serve(&["--models", &gguf, "--workers", "1"]);
    let (st, mut running) = long_trace(&s.base, &new_agent());
    assert_eq!(st, 200);
    read_events(&mut running, |e, _| e == "row");
    // A second trace waits for the slot; its client leaves while it waits.
    let waiter = std::thread::spawn({
        let base = s.base.clone();
        move || {
            let (st, reader) = long_trace(&base, &new_agent());
            assert_eq!(st, 200);
            std::thread::sleep(Duration::from_millis(500));
            drop(reader);
        }
    });
    let waiting = |s: &Server| get_json(&s.base, "/api/capacity").1["heavy_waiting"].as_u64();
    let start = Instant::now();
    while waiting(&s) != Some(1) {
        assert!(start.elapsed() < Duration::from_secs(10), "nothing waited");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Cheap requests answer at once meanwhile: predictions, the listing, health checks.
    for prompt in PROMPTS {
        let t = Instant::now();
        let (st, v) = post(&s.base, "/api/predict", &predict_body("tiny-gpt2", prompt));
        assert_eq!(st, 200, "{v}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    for path in ["/api/models", "/healthz", "/readyz", "/api/capacity"] {
        let t = Instant::now();
        let r = agent().get(&format!("{}{path}", s.base)).call().unwrap();
        // Readiness may say busy (a heavy job would wait too long): said at once all the same.
        let ok: &[u16] = if path == "/readyz" {
            &[200, 503]
        } else {
            &[200]
        };
        assert!(ok.contains(&r.status().as_u16()), "{path}: {}", r.status());
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{path}: {:?}",
            t.elapsed()
        );
    }
    waiter.join().unwrap();
    let start = Instant::now();
    while waiting(&s) != Some(0) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the leaver kept its place"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The capacity is said: requests per second for each kind.
    let (_, cap) = get_json(&s.base, "/api/capacity");
    let smol = cap["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "SmolLM2-135M-Instruct.Q4_1")
        .unwrap();
    for kind in ["predict", "generate", "trace", "edit"] {
        let rps = smol["requests_per_second"][kind].as_f64().unwrap();
        assert!(rps > 0.0 && rps.is_finite(), "{kind}: {rps}");
    }
}

#[test]
fn a_wait_beyond_the_bound_is_refused_with_its_estimate() {
    let Some(gguf) = smollm2() else { return };
    let s = serve(&["--models", &gguf, "--workers", "1", "--max-wait", "1"]);
    let (st, mut running) = long_trace(&s.base, &new_agent());
    assert_eq!(st, 200);
    read_events(&mut running, |e, _| e == "row");
    // The running trace is estimated at far more than a second: another must not wait for it.
    let r = agent()
        .post(&format!("{}/api/trace", s.base))
        .header("content-type", "application/json")
        .send(r#"{"model":"tiny-gpt2","prompt":"The Eiffel Tower is in","subject":"Eiffel Tower"}"#)
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 1, "come back in {retry} s");
    // A prediction's wait is short: admitted.
    let (st, v) = post(&s.base, "/api/predict", &predict_body("tiny-gpt2", "Hi"));
    assert_eq!(st, 200, "{v}");
}
