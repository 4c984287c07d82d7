//! Hostile request bodies for every endpoint that takes one: each valid body cut at every
//! length, with bytes flipped, and with each field swapped for values of the wrong type, out of
//! range or too large. The server answers every one with a status that says what was wrong
//! (never a 500), never panics (its log says so), and still serves afterwards. Uploaded edit
//! files and session files get the same.

mod common;

use std::time::Duration;

use common::*;

/// Every status a bad request may get: refused, not found, conflicting, gone, too large, too
/// many, busy or out of time — never an internal error.
const ACCEPTABLE: [u16; 11] = [200, 400, 404, 405, 409, 410, 413, 415, 422, 503, 504];

fn send(a: &ureq::Agent, base: &str, path: &str, ctype: &str, body: &[u8]) -> u16 {
    match a
        .post(&format!("{base}{path}"))
        .header("content-type", ctype)
        .send(body)
    {
        Ok(mut r) => {
            // SSE streams end with a result or an error event: read them to the end.
            let _ = r.body_mut().read_to_vec();
            r.status().as_u16()
        }
        Err(ureq::Error::Io(_)) => 413, // the server closed an oversize upload early
        Err(e) => panic!("{path}: {e}"),
    }
}

/// A seeded generator of mutation points.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

/// The body's mutations: every cut, `flips` random byte changes, and every field set to each
/// hostile value.
fn mutations(body: &serde_json::Value, flips: usize, seed: u64) -> Vec<Vec<u8>> {
    let text = serde_json::to_vec(body).unwrap();
    let mut out: Vec<Vec<u8>> = (0..text.len()).map(|n| text[..n].to_vec()).collect();
    let mut rng = Lcg(seed);
    for _ in 0..flips {
        let mut t = text.clone();
        let at = rng.below(t.len());
        t[at] = rng.below(256) as u8;
        out.push(t);
    }
    let hostile = [
        serde_json::json!(null),
        serde_json::json!(-1),
        serde_json::json!(1e300),
        serde_json::json!(18446744073709551615u64),
        serde_json::json!("x".repeat(70_000)),
        serde_json::from_str(&format!("{}1{}", "[".repeat(100), "]".repeat(100))).unwrap(),
        serde_json::json!({"a": {"b": {}}}),
        serde_json::json!(""),
        serde_json::json!("../../../../etc/passwd"),
        serde_json::json!(vec![1; 10_000]),
    ];
    if let Some(obj) = body.as_object() {
        for key in obj.keys() {
            for h in &hostile {
                let mut o = obj.clone();
                o.insert(key.clone(), h.clone());
                out.push(serde_json::to_vec(&o).unwrap());
            }
            let mut o = obj.clone();
            o.remove(key);
            out.push(serde_json::to_vec(&o).unwrap());
        }
    }
    out
}

#[test]
fn every_body_gets_a_fitting_answer_and_the_server_never_panics() {
    let log = std::env::temp_dir().join(format!("loci-hostile-api-{}.log", std::process::id()));
    let dir = std::env::temp_dir().join(format!("loci-hostile-api-{}", std::process::id()));
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let stats = dir.join("stats");
    let s = serve_logging(
        &[
            "--rate-limit",
            "0",
            "--corpus",
            corpus.to_str().unwrap(),
            "--stats",
            stats.to_str().unwrap(),
            "--stats-tokens",
            "2000",
            "--job-seconds",
            "20",
        ],
        Some(&log),
    );
    let a = new_agent();
    let prompt = "The Eiffel Tower is located in the city of";
    let case: serde_json::Value = {
        let path = root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json");
        let all: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        all[0].clone()
    };
    let bodies: Vec<(&str, serde_json::Value, usize)> = vec![
        (
            "/api/predict",
            serde_json::json!({"model": "tiny-gpt2", "prompt": prompt, "top": 5}),
            120,
        ),
        (
            "/api/generate",
            serde_json::json!({"model": "tiny-llama", "prompt": prompt, "max_new_tokens": 3,
                "sampling": {"mode": "top_k", "k": 5, "seed": 1}}),
            120,
        ),
        (
            "/api/trace",
            serde_json::json!({"model": "tiny-gpt2", "prompt": prompt, "subject": "Eiffel Tower",
                "samples": 2, "window": 2, "kinds": ["hidden"], "noise": {"type": "fixed", "value": 0.5}}),
            120,
        ),
        (
            "/api/edit",
            serde_json::json!({"model": "tiny-gpt2", "prompt": prompt, "subject": "Eiffel Tower",
                "target": "Rome", "layer": 1, "generate_tokens": 2}),
            40,
        ),
        (
            "/api/undo",
            serde_json::json!({"model": "tiny-gpt2", "all": true}),
            60,
        ),
        (
            "/api/eval",
            serde_json::json!({"model": "tiny-gpt2", "case": case, "layer": 1}),
            20,
        ),
    ];
    let mut counts = vec![];
    for (i, (path, body, flips)) in bodies.iter().enumerate() {
        let ms = mutations(body, *flips, i as u64 + 1);
        for m in &ms {
            let st = send(&a, &s.base, path, "application/json", m);
            assert!(
                ACCEPTABLE.contains(&st),
                "{path}: {st} for {}",
                String::from_utf8_lossy(&m[..m.len().min(300)])
            );
        }
        counts.push((path.to_string(), ms.len()));
    }
    // Binary uploads: an edit file and a session file, cut and flipped.
    let (st, v) = post(&s.base, "/api/edit", &bodies[3].1.to_string());
    assert_eq!(st, 200, "{v}");
    let mut r = a
        .get(&format!(
            "{}/api/edits/{}/file?model=tiny-gpt2",
            s.base, v["id"]
        ))
        .call()
        .unwrap();
    let file = r.body_mut().read_to_vec().unwrap();
    let mut r = a
        .get(&format!("{}/api/session/export?model=tiny-gpt2", s.base))
        .call()
        .unwrap();
    let session = r.body_mut().read_to_vec().unwrap();
    for (path, bytes) in [
        ("/api/edits/upload?model=tiny-gpt2", &file),
        ("/api/session/import?model=tiny-gpt2", &session),
    ] {
        let mut rng = Lcg(7);
        let mut ms: Vec<Vec<u8>> = (0..bytes.len())
            .step_by(bytes.len() / 300 + 1)
            .map(|n| bytes[..n].to_vec())
            .collect();
        for _ in 0..200 {
            let mut b = bytes.to_vec();
            let at = rng.below(b.len());
            b[at] ^= 1 << rng.below(8);
            ms.push(b);
        }
        for m in &ms {
            let st = send(&a, &s.base, path, "application/octet-stream", m);
            assert!(ACCEPTABLE.contains(&st), "{path}: {st}");
        }
        counts.push((path.to_string(), ms.len()));
    }
    // Query strings.
    for q in [
        "",
        "model=",
        "model=%00",
        "model=..%2F..%2Fetc",
        "model=tiny-gpt2&model=x",
        "q=%7B",
    ] {
        for path in [
            "/api/edits",
            "/api/trace",
            "/api/study",
            "/api/session/export",
        ] {
            let st = a
                .get(&format!("{}{path}?{q}", s.base))
                .call()
                .unwrap()
                .status()
                .as_u16();
            assert!(ACCEPTABLE.contains(&st), "{path}?{q}: {st}");
        }
    }
    // Still serving, and nothing panicked.
    std::thread::sleep(Duration::from_millis(200));
    let (st, _) = get_json(&s.base, "/api/models");
    assert_eq!(st, 200);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("panicked"), "the server panicked:\n{text}");
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    eprintln!("{total} hostile requests: {counts:?}");
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(log);
}
