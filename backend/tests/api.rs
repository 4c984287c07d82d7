//! The HTTP API end to end: a real `loci serve` process on a loopback port.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The `key` string of every object in the JSON array `list`.
fn strings<'a>(list: &'a serde_json::Value, key: &str) -> Vec<&'a str> {
    let items = list.as_array().expect("a JSON array");
    items.iter().map(|x| x[key].as_str().unwrap()).collect()
}

#[test]
fn endpoints_answer_and_refuse_bad_requests() {
    let s = serve(&[]);
    let (status, models) = get_json(&s.base, "/api/models");
    assert_eq!(status, 200);
    let names = strings(&models, "name");
    assert_eq!(names, ["tiny-gpt2", "tiny-gptj", "tiny-llama"]);
    assert_eq!(
        (models[0]["device"].as_str(), models[0]["dtype"].as_str()),
        (Some("cpu"), Some("f32"))
    );

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
    let (status, models) = get_json(&s.base, "/api/models");
    assert_eq!(status, 200);
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

    let (status, spec) = get_json(&s.base, "/api/openapi.json");
    assert_eq!(status, 200);
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

#[test]
fn traces_stream_rows_then_the_same_result_as_the_core() {
    let s = serve(&[]);
    // A trace posted: its status, and its events up to the result (or error).
    let post_trace = |body: &str| {
        let r = agent()
            .post(&format!("{}/api/trace", s.base))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        let status = r.status().as_u16();
        let events = read_events(r.into_body().into_reader(), |e, _| {
            e == "result" || e == "error"
        });
        (status, events)
    };
    let body = r#"{"model":"tiny-gptj","prompt":"The Eiffel Tower is located in","subject":"Eiffel Tower","samples":3,"kinds":["hidden","attn"],"noise":{"type":"fixed","value":0.5}}"#;
    let (status, events) = post_trace(body);
    assert_eq!(status, 200);
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
    // With the server's thread count (one per core), which decides how rows are batched.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let want = lm
        .trace(&req, None, &mut loci_core::trace::Quiet, threads)
        .unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(&want.scores).unwrap()).unwrap();
    assert_eq!(
        want, result["scores"],
        "the server's grid is the core's, number for number"
    );

    // Attribution patching: the same stream (header, rows, result), the core's estimate.
    let atp_body = body.replace("{\"model\"", "{\"method\":\"attribution\",\"model\"");
    let (_, events) = post_trace(&atp_body);
    let (last, result) = events.last().unwrap();
    assert_eq!(
        (events[0].0.as_str(), last.as_str()),
        ("start", "result"),
        "{result}"
    );
    assert_eq!(events.iter().filter(|e| e.0 == "row").count(), 2 * n_tok);
    assert_eq!(result["method"], "attribution");
    let want = lm
        .trace_attribution(&req, None, &mut loci_core::trace::Quiet)
        .unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(&want.scores).unwrap()).unwrap();
    assert_eq!(want, result["scores"]);

    // Knowledge neurons: refused before the stream with other kinds; then a row per token,
    // the core's attributions and its neurons.
    let all_kinds = body.replace("{\"model\"", "{\"method\":\"neurons\",\"model\"");
    assert_eq!(post_trace(&all_kinds).0, 400);
    let kn_body = body
        .replace("{\"model\"", "{\"method\":\"neurons\",\"model\"")
        .replace(r#"["hidden","attn"]"#, r#"["mlp"]"#);
    let (_, events) = post_trace(&kn_body);
    let (last, result) = events.last().unwrap();
    assert_eq!(last, "result", "{result}");
    assert_eq!(events.iter().filter(|e| e.0 == "row").count(), n_tok);
    let req: loci_core::TraceRequest = serde_json::from_str(&kn_body).unwrap();
    let want = lm
        .trace_neurons(&req, &mut loci_core::trace::Quiet)
        .unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(&want.neurons).unwrap()).unwrap();
    assert_eq!(want, result["neurons"]);
}

#[test]
fn a_full_heavy_lane_answers_503_predictions_still_answer_and_a_dropped_stream_cancels_its_trace() {
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
    let trace = || {
        agent()
            .post(&format!("{}/api/trace", s.base))
            .header("content-type", "application/json")
            .send(body)
            .unwrap()
    };
    let mut reader = trace().into_body().into_reader();
    let first = read_events(&mut reader, |e, _| e == "row");
    assert_eq!(first.last().unwrap().0, "row");
    // The heavy lane's one slot is taken and nothing may wait: another trace is refused at
    // once, and says when to come back.
    let r = trace();
    assert_eq!(r.status().as_u16(), 503);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "come back in {retry} s");
    let v: serde_json::Value = r.into_body().read_json().unwrap();
    assert!(v["error"].as_str().unwrap().contains("busy"), "{v}");
    // A prediction has its own lane: answered while the trace runs.
    let t = Instant::now();
    let (st, v) = post(
        &s.base,
        "/api/predict",
        r#"{"model":"tiny-gpt2","prompt":"Hi"}"#,
    );
    assert_eq!(st, 200, "{v}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Leaving cancels the trace (long before its ~40 s), and the slot frees.
    drop(reader);
    let start = Instant::now();
    while trace().status().as_u16() != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the trace was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn edits_apply_list_download_undo_and_reapply() {
    let (s, dir) = serve_editing("edit");
    let prompt = "The Eiffel Tower is located in the city of";
    let before = top_prob(&s.base, prompt);
    let edit = serde_json::json!({
        "model": "tiny-gpt2", "prompt": prompt, "subject": "Eiffel Tower", "target": "Rome",
        "layer": 2, "paraphrase": ["Where is the Eiffel Tower? In"],
        "neighborhood": ["The Louvre is located in the city of"], "generate_tokens": 5,
    });
    let (st, v) = post(&s.base, "/api/edit", &edit.to_string());
    assert_eq!(st, 200, "{v}");
    let id = v["id"].as_u64().unwrap();
    let r = &v["report"];
    assert_eq!(r["layer"], 2);
    assert!(
        r["after"]["rewrite"]["target_new"].as_f64().unwrap()
            > r["before"]["rewrite"]["target_new"].as_f64().unwrap()
    );
    assert_eq!(r["after"]["paraphrase"].as_array().unwrap().len(), 1);
    assert_eq!(r["generations"]["after"].as_array().unwrap().len(), 2);
    assert!(
        dir.join("stats/layer2.safetensors").exists(),
        "statistics computed and cached"
    );
    // The served model is edited: predict sees it, and the listing shows it.
    let edited = top_prob(&s.base, prompt);
    assert_ne!(edited, before);
    let (st, list) = get_json(&s.base, "/api/edits?model=tiny-gpt2");
    assert_eq!(st, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"].as_u64(), Some(id));
    assert_eq!(list[0]["method"], "rome");
    assert_eq!(list[0]["layers"], serde_json::json!([2]));
    assert_eq!(list[0]["requests"][0]["target_new"]["str"], "Rome");

    // Download the edit, undo it (the original numbers, exactly), upload it (the edited numbers).
    let mut r = agent()
        .get(&format!("{}/api/edits/{id}/file?model=tiny-gpt2", s.base))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let file = r.body_mut().read_to_vec().unwrap();
    assert!(loci_core::edit::RomeEdit::from_bytes(&file).is_ok());
    let (st, v) = post(&s.base, "/api/undo", r#"{"model":"tiny-gpt2","id":999}"#);
    assert_eq!(st, 409, "only the newest edit can be undone: {v}");
    let (st, v) = post(&s.base, "/api/undo", r#"{"model":"tiny-gpt2"}"#);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["undone"][0].as_u64(), Some(id));
    assert_eq!(top_prob(&s.base, prompt), before);
    let (st, v) = post(&s.base, "/api/undo", r#"{"model":"tiny-gpt2"}"#);
    assert_eq!(st, 409, "nothing left to undo: {v}");
    let upload = |bytes: &[u8]| {
        let mut r = agent()
            .post(&format!("{}/api/edits/upload?model=tiny-gpt2", s.base))
            .header("content-type", "application/octet-stream")
            .send(bytes)
            .unwrap();
        let st = r.status().as_u16();
        (
            st,
            r.body_mut()
                .read_json::<serde_json::Value>()
                .unwrap_or_default(),
        )
    };
    let (st, v) = upload(&file);
    assert_eq!(st, 200, "{v}");
    assert_eq!(top_prob(&s.base, prompt), edited);
    // Twice applied, then both undone at once.
    assert_eq!(upload(&file).0, 200);
    assert_ne!(top_prob(&s.base, prompt), edited);
    let (st, v) = post(&s.base, "/api/undo", r#"{"model":"tiny-gpt2","all":true}"#);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["undone"].as_array().unwrap().len(), 2);
    assert_eq!(top_prob(&s.base, prompt), before);

    // Bad edits change nothing.
    let (st, v) = upload(b"not an edit");
    assert_eq!(st, 400, "{v}");
    // Edit files are limited to 4 MiB. The server answers 413 as soon as it has read past the
    // limit and closes the connection: a client still sending sees either the 413 or, when the
    // rest of its body no longer fits the socket buffers, a broken connection. Nothing applies.
    match agent()
        .post(&format!("{}/api/edits/upload?model=tiny-gpt2", s.base))
        .send(&vec![0u8; 5 << 20][..])
    {
        Ok(r) => assert_eq!(r.status().as_u16(), 413),
        Err(e) => assert!(matches!(e, ureq::Error::Io(_)), "{e}"),
    }
    let (_, list) = get_json(&s.base, "/api/edits?model=tiny-gpt2");
    assert_eq!(
        list.as_array().unwrap().len(),
        0,
        "the oversize upload changed nothing"
    );
    let (st, _) = post(&s.base, "/api/edit", "{not json");
    assert_eq!(st, 400);
    let (st, _) = agent()
        .post(&format!("{}/api/edits/upload?model=tiny-llama", s.base))
        .send(&file[..])
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(st, 400, "an edit for another model's shape is refused");
    for (body, want) in [
        (
            serde_json::json!({"model": "tiny-gpt2", "prompt": prompt, "subject": "Colosseum", "target": "Rome", "layer": 1}),
            400,
        ),
        (
            serde_json::json!({"model": "tiny-gpt2", "prompt": prompt, "subject": "Eiffel Tower", "target": "Rome", "layer": 99}),
            400,
        ),
        (
            serde_json::json!({"model": "tiny-gpt2", "prompt": prompt, "subject": "Eiffel Tower", "target": "  ", "layer": 1}),
            400,
        ),
        (
            serde_json::json!({"model": "tiny-gpt2", "prompt": prompt, "layer": 1}),
            400,
        ),
        (
            serde_json::json!({"model": "nope", "prompt": prompt, "subject": "Eiffel Tower", "target": "Rome", "layer": 1}),
            404,
        ),
    ] {
        let (st, v) = post(&s.base, "/api/edit", &body.to_string());
        assert_eq!(st, want, "{body}: {v}");
        assert!(v["error"].is_string());
    }
    assert_eq!(top_prob(&s.base, prompt), before);
    let (st, list) = get_json(&s.base, "/api/edits?model=tiny-gpt2");
    assert_eq!((st, list.as_array().unwrap().len()), (200, 0));
    let (st, _) = get_json(&s.base, "/api/edits/1/file?model=tiny-gpt2");
    assert_eq!(st, 404);

    // A CounterFact case is evaluated and undone.
    let case = serde_json::json!({"model": "tiny-gpt2", "layer": 2, "case": {
        "case_id": 0,
        "requested_rewrite": {"prompt": "The {} is located in the city of", "subject": "Eiffel Tower",
            "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
        "paraphrase_prompts": ["Where is the Eiffel Tower? In"],
        "neighborhood_prompts": ["The Louvre is located in the city of"]}});
    let (st, v) = post(&s.base, "/api/eval", &case.to_string());
    assert_eq!(st, 200, "{v}");
    assert!(v["metrics"]["efficacy_score"].is_number());
    assert_eq!(top_prob(&s.base, prompt), before);

    // MEMIT: two facts at once over two layers; listed, downloadable, undone exactly.
    let memit = serde_json::json!({
        "model": "tiny-gpt2", "method": "memit", "layers": [1, 2],
        "prompt": prompt, "subject": "Eiffel Tower", "target": "Rome",
        "requests": [{"prompt": "{} plays the sport of", "subject": "Michael Jordan",
                      "target_new": {"str": "soccer"}}],
        "neighborhood": ["The Louvre is located in the city of"], "generate_tokens": 3,
    });
    let (st, v) = post(&s.base, "/api/edit", &memit.to_string());
    assert_eq!(st, 200, "{v}");
    let r = &v["memit"];
    assert!(v["report"].is_null());
    assert_eq!(r["layers"], serde_json::json!([1, 2]));
    assert_eq!(r["requests"].as_array().unwrap().len(), 2);
    // (How far the facts move is the core tests' business: this tiny model has no tuned λ.)
    for q in r["requests"].as_array().unwrap() {
        let p = |side: &str| q[side]["rewrite"]["target_new"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&p("after")) && p("after") != p("before"),
            "{q}"
        );
        assert_eq!(q["after"]["neighborhood"].as_array().unwrap().len(), 1);
    }
    assert!(dir.join("stats/layer1.safetensors").exists());
    assert_ne!(top_prob(&s.base, prompt), before);
    let (_, list) = get_json(&s.base, "/api/edits?model=tiny-gpt2");
    assert_eq!(list[0]["method"], "memit");
    assert_eq!(list[0]["requests"].as_array().unwrap().len(), 2);
    assert_eq!(list[0]["delta_norms"].as_array().unwrap().len(), 2);
    let id = list[0]["id"].as_u64().unwrap();
    let file = agent()
        .get(&format!("{}/api/edits/{id}/file?model=tiny-gpt2", s.base))
        .call()
        .unwrap()
        .body_mut()
        .read_to_vec()
        .unwrap();
    assert!(loci_core::edit::MemitEdit::from_bytes(&file).is_ok());
    let edited = top_prob(&s.base, prompt);
    let (st, _) = post(&s.base, "/api/undo", r#"{"model":"tiny-gpt2"}"#);
    assert_eq!(st, 200);
    assert_eq!(top_prob(&s.base, prompt), before);
    let st = agent()
        .post(&format!("{}/api/edits/upload?model=tiny-gpt2", s.base))
        .send(&file[..])
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(st, 200);
    assert_eq!(top_prob(&s.base, prompt), edited);
    let (st, _) = post(&s.base, "/api/undo", r#"{"model":"tiny-gpt2","all":true}"#);
    assert_eq!(st, 200);
    // Constrained fine-tuning: one fact at its layers, listed as "ft", undone exactly.
    let ft = serde_json::json!({
        "model": "tiny-gpt2", "method": "ft", "layers": [1],
        "prompt": prompt, "subject": "Eiffel Tower", "target": "Rome",
    });
    let (st, v) = post(&s.base, "/api/edit", &ft.to_string());
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["report"]["layer"], 1);
    assert_eq!(v["edits"][0]["method"], "ft");
    let (st, _) = post(&s.base, "/api/undo", r#"{"model":"tiny-gpt2"}"#);
    assert_eq!(st, 200);
    assert_eq!(top_prob(&s.base, prompt), before);
    // GRACE: a codebook entry at one layer, listed as "grace", undone exactly.
    let grace = serde_json::json!({
        "model": "tiny-gpt2", "method": "grace", "layer": 2,
        "prompt": prompt, "subject": "Eiffel Tower", "target": "Rome",
    });
    let (st, v) = post(&s.base, "/api/edit", &grace.to_string());
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (&v["report"]["layer"], &v["edits"][0]["method"]),
        (&2.into(), &"grace".into())
    );
    let (st, _) = post(&s.base, "/api/undo", r#"{"model":"tiny-gpt2"}"#);
    assert_eq!(st, 200);
    assert_eq!(top_prob(&s.base, prompt), before);
    let fact = serde_json::json!({"prompt": "{} is in", "subject": "Rome", "target_new": {"str": "Paris"}});
    for (patch, want) in [
        (serde_json::json!({"layers": [1, 99]}), "out of range"),
        (serde_json::json!({"layers": [2, 1]}), "ascending"),
        (serde_json::json!({"layer": 1}), "not one \"layer\""),
        (
            serde_json::json!({"requests": vec![fact; 16]}),
            "at most 16",
        ),
        (
            serde_json::json!({"method": "kn"}),
            "use one of rome, memit, alphaedit, emmet, ft",
        ),
        (serde_json::json!({"method": "rome"}), "one fact"),
        (serde_json::json!({"method": "ft"}), "one fact"),
        (serde_json::json!({"method": "grace"}), "one fact"),
        (serde_json::json!({"emmet_lambda": 0.5}), "EMMET's setting"),
        (serde_json::json!({"l2": 3.0}), "AlphaEdit's settings"),
        (
            serde_json::json!({"method": "alphaedit", "null_threshold": 1e-12}),
            "leaves no null space",
        ),
        (
            serde_json::json!({"method": "alphaedit", "null_threshold": 0.1, "null_energy": 0.1}),
            "not both",
        ),
        (
            serde_json::json!({"method": "ft", "l2": 3.0}),
            "settings of the MEMIT family",
        ),
    ] {
        let mut body = memit.clone();
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (st, v) = post(&s.base, "/api/edit", &body.to_string());
        assert_eq!(st, 400, "{patch}: {v}");
        assert!(v["error"].as_str().unwrap().contains(want), "{patch}: {v}");
    }
    assert_eq!(top_prob(&s.base, prompt), before);

    // AlphaEdit twice on the visitor's stack (the second computed with the first's keys kept;
    // what that preserves is core/tests/memit_family.rs's business), then EMMET; each listed by
    // its method, all undone exactly.
    let one = |method: &str, subject: &str, fact_prompt: &str, target: &str| {
        let mut b = serde_json::json!({
            "model": "tiny-gpt2", "method": method, "layers": [1, 2],
            "prompt": fact_prompt, "subject": subject, "target": target, "generate_tokens": 1,
        });
        if method == "alphaedit" {
            b["null_energy"] = 0.3.into();
            b["l2"] = 1.0.into();
        } else {
            b["layers"] = serde_json::json!([2]);
        }
        let (st, v) = post(&s.base, "/api/edit", &b.to_string());
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["memit"]["method"], method, "{v}");
    };
    one("alphaedit", "Eiffel Tower", prompt, "Rome");
    one(
        "alphaedit",
        "Michael Jordan",
        "Michael Jordan plays the sport of",
        "soccer",
    );
    one(
        "emmet",
        "Louvre",
        "The Louvre is located in the city of",
        "Berlin",
    );
    let (_, list) = get_json(&s.base, "/api/edits?model=tiny-gpt2");
    let methods = strings(&list, "method");
    assert_eq!(methods, ["alphaedit", "alphaedit", "emmet"]);
    let (st, _) = post(&s.base, "/api/undo", r#"{"model":"tiny-gpt2","all":true}"#);
    assert_eq!(st, 200);
    assert_eq!(top_prob(&s.base, prompt), before);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn model_files_are_served_with_ranges_and_nothing_else() {
    let s = serve(&[]);
    let (_, models) = get_json(&s.base, "/api/models");
    let files = strings(&models[0]["files"], "name");
    assert_eq!(
        files,
        ["config.json", "model.safetensors", "tokenizer.json"]
    );
    let path = root().join("tests/fixtures/tiny-gpt2/model.safetensors");
    let want = std::fs::read(&path).unwrap();
    let mut r = agent()
        .get(&format!(
            "{}/api/models/tiny-gpt2/files/model.safetensors",
            s.base
        ))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.body_mut().read_to_vec().unwrap(), want);
    let mut r = agent()
        .get(&format!(
            "{}/api/models/tiny-gpt2/files/model.safetensors",
            s.base
        ))
        .header("range", "bytes=8-15")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.body_mut().read_to_vec().unwrap(), want[8..16]);
    for bad in [
        "/api/models/tiny-gpt2/files/generation_config.json",
        "/api/models/tiny-gpt2/files/..%2F..%2FCargo.toml",
        "/api/models/tiny-gpt2/files/%2Fetc%2Fpasswd",
        "/api/models/..%2Ftiny-gpt2/files/config.json",
        "/api/models/nope/files/config.json",
    ] {
        let r = agent().get(&format!("{}{bad}", s.base)).call().unwrap();
        assert_eq!(r.status().as_u16(), 404, "{bad}");
    }
}

#[test]
fn a_study_streams_its_case_and_edits_and_leaves_the_model_as_it_was() {
    let (s, dir) = serve_editing("study");
    let prompt = "The Eiffel Tower is located in the city of";
    let before = top_prob(&s.base, prompt);
    let case = serde_json::json!({
        "case_id": 0,
        "requested_rewrite": {
            "prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
            "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"},
        },
        "paraphrase_prompts": ["Where is the Eiffel Tower? It is in"],
        "neighborhood_prompts": ["The Louvre is located in the city of"],
    });
    let body = serde_json::json!({
        "model": "tiny-gpt2", "case": case, "methods": ["rome", "ft-5"],
        "problems": ["error_injection", "fact_forcing"], "layers": [1, 3], "samples": 3,
        "all_cases": true,
    });
    let r = agent()
        .post(&format!("{}/api/study", s.base))
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let events = read_events(r.into_body().into_reader(), |e, _| {
        e == "result" || e == "error"
    });
    let (last, result) = events.last().unwrap();
    assert_eq!(last, "result", "{result}");
    assert_eq!(events[0].0, "case");
    let trace = &events[0].1["trace"];
    assert_eq!(trace["max_fraction_restored"].as_array().unwrap().len(), 4);
    let edits: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e.0 == "edit")
        .map(|e| &e.1)
        .collect();
    assert_eq!(edits.len(), 8);
    assert_eq!(result["edits"].as_array().unwrap().len(), 8);
    for e in &edits {
        assert!(e["error"].is_null(), "{e}");
        let layer = e["layer"].as_u64().unwrap() as usize;
        assert_eq!(e["tracing_effect"], trace["max_fraction_restored"][layer]);
    }
    // Fact forcing cannot corrupt a paraphrase that spells the subject differently ("the
    // Eiffel Tower"): it leaves it unscored rather than scoring it clean.
    for e in &edits {
        let forcing = e["problem"] == "fact_forcing";
        assert_eq!(e["scores"]["paraphrase"].is_null(), forcing, "{e}");
    }
    assert_eq!(result["analysis"]["edits"], 8);
    assert!(!result["analysis"]["layers"].as_array().unwrap().is_empty());
    // Every edit was undone: the model answers exactly as before, and holds no edit.
    assert_eq!(top_prob(&s.base, prompt), before);
    let (_, listed) = get_json(&s.base, "/api/edits?model=tiny-gpt2");
    assert_eq!(listed.as_array().unwrap().len(), 0);

    // Refused before any work.
    for (body, status, msg) in [
        (
            serde_json::json!({"model": "tiny-gpt2", "case": case, "methods": ["knn"]}),
            422,
            "",
        ),
        (
            serde_json::json!({"model": "tiny-gpt2", "case": case, "methods": ["rome", "memit", "ft-1", "ft-5"],
                "problems": ["error_injection", "fact_erasure", "fact_forcing"], "layers": [0, 1, 2, 3, 0]}),
            400,
            "at most 48 edits",
        ),
        (
            serde_json::json!({"model": "nope", "case": case}),
            404,
            "unknown model",
        ),
        (
            serde_json::json!({"model": "tiny-gpt2", "case": case, "samples": 0}),
            400,
            "samples",
        ),
    ] {
        let (st, v) = post(&s.base, "/api/study", &body.to_string());
        assert_eq!(st, status, "{v}");
        assert!(v["error"].as_str().unwrap().contains(msg), "{v}");
    }
    // A layer the model lacks fails inside the stream, with a message.
    let body =
        serde_json::json!({"model": "tiny-gpt2", "case": case, "layers": [9], "all_cases": true});
    let r = agent()
        .post(&format!("{}/api/study", s.base))
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap();
    let events = read_events(r.into_body().into_reader(), |e, _| {
        e == "result" || e == "error"
    });
    let (last, v) = events.last().unwrap();
    assert_eq!(last, "error");
    assert!(v["error"].as_str().unwrap().contains("out of range"), "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tab that edits itself downloads a layer's key statistics: the file `loci stats` writes,
/// fitting the model as the tab loads it (from bytes); bad layers and models are refused.
#[test]
fn a_tab_downloads_a_layers_key_statistics_from_the_server() {
    let (s, dir) = serve_editing("stats-file");
    let mut r = agent()
        .get(&format!("{}/api/models/tiny-gpt2/stats/2", s.base))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let bytes = r.body_mut().read_to_vec().unwrap();
    let stats = loci_core::edit::KeyStats::from_bytes(&bytes).unwrap();
    let src = root().join("tests/fixtures/tiny-gpt2");
    let read = |f: &str| std::fs::read(src.join(f)).unwrap();
    let in_tab = loci_core::LoadedModel::from_hf_bytes(
        "tiny-gpt2",
        &read("config.json"),
        &read("tokenizer.json"),
        vec![read("model.safetensors")],
        loci_core::DType::F32,
        &loci_core::Device::Cpu,
    )
    .unwrap();
    stats.check_fits(&in_tab, 2).unwrap();
    assert!(stats.provenance.tokens >= 2000, "{:?}", stats.provenance);
    let (st, v) = get_json(&s.base, "/api/models/tiny-gpt2/stats/99");
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("out of range"), "{v}");
    let (st, _) = get_json(&s.base, "/api/models/no-such-model/stats/2");
    assert_eq!(st, 404);
    let (_, spec) = get_json(&s.base, "/api/openapi.json");
    assert!(spec["paths"]["/api/models/{name}/stats/{layer}"].is_object());
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_other_families_are_served_like_the_first() {
    let s = serve_models(&root().join("tests/fixtures/families"), &[], None);
    let (_, models) = get_json(&s.base, "/api/models");
    let names = strings(&models, "name");
    assert_eq!(names.len(), 8, "{names:?}");
    for name in &names {
        let body = format!(r#"{{"model":"{name}","prompt":"The Eiffel Tower is","top":3}}"#);
        let (st, v) = post(&s.base, "/api/predict", &body);
        assert_eq!(st, 200, "{name}: {v}");
        // The same answer as the core gives.
        let lm = loci_core::LoadedModel::load(
            &root().join("tests/fixtures/families").join(name),
            loci_core::DType::F32,
            &loci_core::Device::Cpu,
        )
        .unwrap();
        let core = lm.predict("The Eiffel Tower is", 3).unwrap();
        assert_eq!(v["top"][0]["id"], core.top[0].id, "{name}");
    }
    let (st, v) = post(
        &s.base,
        "/api/trace",
        r#"{"model":"tiny-gemma2","prompt":"The Eiffel Tower is located in","subject":"Eiffel Tower","samples":2}"#,
    );
    assert_eq!(st, 200, "{v}");
}
