//! The `loci` binary end to end: real processes, real files, JSON out.

use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn loci(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loci"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("loci runs")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "loci failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn tiny(name: &str) -> String {
    root()
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn smollm2() -> Option<String> {
    let out = Command::new("bash")
        .arg(root().join("scripts/fetch-model.sh"))
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "SKIPPED: SmolLM2 unavailable: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn predict_json_has_the_documented_shape() {
    let v = json(&loci(&[
        "predict",
        "--model",
        &tiny("tiny-gpt2"),
        "--prompt",
        "The Eiffel Tower is",
        "--top",
        "4",
        "--json",
    ]));
    assert_eq!(v["model"], "tiny-gpt2");
    assert_eq!(v["prompt"], "The Eiffel Tower is");
    let toks: Vec<&str> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(toks.concat(), "The Eiffel Tower is");
    let top = v["top"].as_array().unwrap();
    assert_eq!(top.len(), 4);
    let probs: Vec<f64> = top.iter().map(|t| t["prob"].as_f64().unwrap()).collect();
    assert!(probs.windows(2).all(|w| w[0] >= w[1]), "sorted: {probs:?}");
    assert!(probs.iter().all(|p| *p > 0.0 && *p < 1.0));
    assert!(top[0]["id"].as_u64().is_some() && top[0]["token"].as_str().is_some());
}

#[test]
fn smollm2_knows_where_the_eiffel_tower_is() {
    let Some(model) = smollm2() else { return };
    let v = json(&loci(&[
        "predict",
        "--model",
        &model,
        "--prompt",
        "The Eiffel Tower is located in the city of",
        "--top",
        "3",
        "--json",
    ]));
    assert_eq!(v["top"][0]["token"], " Paris");
    let p = v["top"][0]["prob"].as_f64().unwrap();
    assert!((p - 0.7015).abs() < 1e-3, "p(Paris) = {p}");

    let g = json(&loci(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "8",
        "--greedy",
        "--json",
    ]));
    assert!(
        g["text"]
            .as_str()
            .unwrap()
            .starts_with("The capital of France is Paris"),
        "{g}"
    );
    assert!(g["new_ids"].as_array().unwrap().len() <= 8);
}

#[test]
fn generation_is_deterministic_for_a_seed() {
    let run = |seed: &str| {
        json(&loci(&[
            "generate",
            "--model",
            &tiny("tiny-llama"),
            "--prompt",
            "Toko Yasuda plays",
            "--max-new-tokens",
            "12",
            "--top-k",
            "5",
            "--seed",
            seed,
            "--json",
        ]))
    };
    let a = run("1");
    assert_eq!(a, run("1"));
    assert_eq!(a["new_ids"].as_array().unwrap().len(), 12);
    let greedy = json(&loci(&[
        "generate",
        "--model",
        &tiny("tiny-llama"),
        "--prompt",
        "Toko Yasuda plays",
        "--max-new-tokens",
        "12",
        "--json",
    ]));
    assert_ne!(
        a["new_ids"], greedy["new_ids"],
        "top-k sampling should differ from greedy somewhere"
    );
}

#[test]
fn bench_forward_prints_json() {
    let v = json(&loci(&[
        "bench",
        "forward",
        "--model",
        &tiny("tiny-gptj"),
        "--tokens",
        "16",
        "--reps",
        "2",
        "--json",
    ]));
    assert_eq!(v["bench"], "forward");
    assert_eq!(v["tokens"], 16);
    assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_mib"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_input_exits_nonzero_with_a_message() {
    let out = loci(&["predict", "--model", "/no/such/model", "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/model"));
    let out = loci(&["predict", "--model", &tiny("tiny-gpt2"), "--prompt", ""]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
}
