//! The `loci` binary end to end: real processes, real files, JSON out.

mod common;

use std::process::{Command, Output};

use common::root;

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

/// The JSON lines of a file (results, study runs).
fn jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
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

    // The linear maps in bf16: the same answer within the stated tolerance, or a clear refusal
    // where the processor has no bf16 dot products.
    let prompt = "The Eiffel Tower is located in the city of";
    let args = [
        "--products",
        "bf16",
        "predict",
        "--model",
        &model,
        "--prompt",
        prompt,
        "--json",
    ];
    if loci_core::kernels::gemm::bf16_detected() {
        let v = json(&loci(&args));
        assert_eq!(v["top"][0]["token"], " Paris");
        let q = v["top"][0]["prob"].as_f64().unwrap();
        assert!((q - p).abs() < 0.02, "p(Paris) in bf16 = {q}, in f32 {p}");
    } else {
        refused(&loci(&args), "bf16 dot products");
    }

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
fn info_describes_a_model_from_its_headers() {
    let v = json(&loci(&["info", &tiny("families/tiny-gemma2"), "--json"]));
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["config"]["family"], "gemma");
    assert_eq!(
        v["config"]["sliding_layers"],
        serde_json::json!([true, false, true])
    );
    assert_eq!(v["config"]["quirks"]["attn_softcap"], 5.0);
    assert_eq!(v["edit_site"]["matrix"], "model.layers.{l}.mlp.down_proj");
    assert_eq!(v["stored"]["F32"]["tensors"], 35);
    let params = v["params"].as_u64().unwrap();
    assert_eq!(v["memory"]["cpu_f32"].as_u64().unwrap(), 4 * params);
    assert_eq!(v["memory"]["fits_tab"], true);
    let lines = String::from_utf8(loci(&["info", &tiny("families/tiny-neox")]).stdout).unwrap();
    assert!(lines.contains("family neox"), "{lines}");
    assert!(lines.contains("attention and MLP in parallel"), "{lines}");
    assert!(
        lines.contains("gpt_neox.layers.{l}.mlp.dense_4h_to_h, with its bias"),
        "{lines}"
    );
    if let Some(gguf) = smollm2() {
        let v = json(&loci(&["info", &gguf, "--json"]));
        assert_eq!(v["format"], "gguf");
        assert!(
            v["stored"]["Q4_1"]["tensors"].as_u64().unwrap() > 200,
            "{v}"
        );
        assert!(v["on_load"]
            .as_str()
            .unwrap()
            .contains("dequantised to f32"));
    }
    let out = loci(&["info", "no/such/model"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
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

#[test]
fn trace_writes_json_and_plots() {
    let dir = std::env::temp_dir().join(format!("loci-trace-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("t.json");
    let svg = dir.join("t.svg");
    let png = dir.join("t.png");
    let cache = dir.join("cache");
    let run = |plot: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_loci"))
            .args([
                "trace",
                "--model",
                &tiny("tiny-gptj"),
                "--prompt",
                "The Eiffel Tower is located in the city of",
                "--subject",
                "Eiffel Tower",
                "--samples",
                "3",
                "--kind",
                "hidden,mlp",
            ])
            .arg("--json")
            .arg(&json_path)
            .arg("--plot")
            .arg(plot)
            .env("LOCI_CACHE", &cache)
            .output()
            .unwrap()
    };
    let out = run(&svg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    let n_tok = v["tokens"].as_array().unwrap().len();
    let range: Vec<usize> = v["subject_range"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let subject: String = v["tokens"].as_array().unwrap()[range[0]..range[1]]
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(subject, " Eiffel Tower");
    for kind in ["hidden", "mlp"] {
        let grid = v["scores"][kind].as_array().unwrap();
        assert_eq!(grid.len(), n_tok);
        assert!(grid.iter().all(|row| row.as_array().unwrap().len() == 4));
        assert_eq!(v["tracing_effect"][kind].as_array().unwrap().len(), 4);
    }
    assert!(
        v["scores"].get("attn").is_none(),
        "only the kinds asked for"
    );
    assert!(
        v["noise"].as_f64().unwrap() > 0.0,
        "3x noise from the bundled subjects"
    );
    assert!(
        cache.read_dir().unwrap().next().is_some(),
        "the embedding std is cached"
    );
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg") && svg_text.matches("<rect x=").count() >= 2 * n_tok * 4);
    let out = run(&png);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn trace_over_facts_reports_average_curves() {
    let facts = root()
        .join("static/data/known_1000.json")
        .display()
        .to_string();
    let v = json(&loci(&[
        "trace",
        "--model",
        &tiny("tiny-llama"),
        "--facts",
        &facts,
        "--n",
        "2",
        "--samples",
        "2",
        "--kind",
        "hidden",
        "--noise",
        "0.5",
        "--json",
    ]));
    // The random tiny model gets one fact of the file right by chance ("… native speaker of"
    // → " French"): it scans the whole file for a second one and reports what it found.
    let traced = v["n_traced"].as_u64().unwrap();
    assert_eq!(traced, 1);
    assert_eq!(traced + v["n_skipped_wrong"].as_u64().unwrap(), 1209);
    assert_eq!(v["aggregate"]["n_facts"], 1);
    assert_eq!(
        v["aggregate"]["last_token"]["hidden"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(v["traces"][0]["answer"]["token"], " French");
}

#[test]
fn trace_rejects_bad_requests() {
    let m = tiny("tiny-gpt2");
    let out = loci(&[
        "trace",
        "--model",
        &m,
        "--prompt",
        "The Eiffel Tower is in",
        "--subject",
        "Louvre",
        "--noise",
        "0.1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not occur"));
    let out = loci(&[
        "trace",
        "--model",
        &m,
        "--prompt",
        "The Eiffel Tower is in",
        "--subject",
        "Eiffel",
        "--samples",
        "0",
        "--noise",
        "0.1",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("samples"));
    let out = loci(&[
        "trace",
        "--model",
        &m,
        "--prompt",
        "The Eiffel Tower is in",
        "--subject",
        "Eiffel",
        "--noise",
        "loud",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("noise"));
    let out = loci(&[
        "trace",
        "--model",
        &m,
        "--prompt",
        "The Eiffel Tower is in",
        "--subject",
        "Eiffel",
        "--plot",
        "/tmp/x.gif",
        "--noise",
        "0.1",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(".svg or .png"));
}

#[test]
fn stats_then_edit_reports_before_and_after() {
    let dir = std::env::temp_dir().join(format!("loci-edit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let stats = dir.join("stats");
    let model = tiny("tiny-gpt2");
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args([
            "stats", "--model", &model, "--layers", "1,2", "--tokens", "2000",
        ])
        .arg("--corpus")
        .arg(&corpus)
        .arg("--out")
        .arg(&stats)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stats.join("layer1.safetensors").exists() && stats.join("layer2.safetensors").exists());
    // Exactly the budget: the text that crosses it is cut there.
    let layer1 = std::fs::read(stats.join("layer1.safetensors")).unwrap();
    let held = loci_core::edit::KeyStats::from_bytes(&layer1).unwrap();
    assert_eq!(held.provenance.tokens, 2000);
    let edit_file = dir.join("edit.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args([
            "edit",
            "--model",
            &model,
            "--prompt",
            "The Eiffel Tower is located in the city of",
            "--subject",
            "Eiffel Tower",
            "--target",
            "Rome",
            "--layer",
            "2",
            "--v-steps",
            "4",
            "--json",
        ])
        .args([
            "--paraphrase",
            "Where is the Eiffel Tower? In",
            "--neighborhood",
            "The Louvre is located in the city of",
        ])
        .arg("--stats")
        .arg(&stats)
        .arg("--save-edit")
        .arg(&edit_file)
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["layer"], 2);
    assert_eq!(v["request"]["prompt"], "The {} is located in the city of");
    assert!(
        v["request"]["target_true"]["str"].is_string(),
        "defaults to the current top-1"
    );
    for side in ["before", "after"] {
        let p = v[side]["rewrite"]["target_new"].as_f64().unwrap();
        assert!(p > 0.0 && p <= 1.0);
        assert_eq!(v[side]["paraphrase"].as_array().unwrap().len(), 1);
        assert_eq!(v[side]["neighborhood"].as_array().unwrap().len(), 1);
    }
    assert!(
        v["after"]["rewrite"]["target_new"].as_f64().unwrap()
            > v["before"]["rewrite"]["target_new"].as_f64().unwrap()
    );
    assert_eq!(v["generations"]["before"].as_array().unwrap().len(), 2);
    assert!(std::fs::metadata(&edit_file).unwrap().len() > 0);
    // The saved edit re-applies: the model then gives the edited probability.
    let prompt = "The Eiffel Tower is located in the city of";
    let with = json(
        &Command::new(env!("CARGO_BIN_EXE_loci"))
            .args([
                "predict", "--model", &model, "--prompt", prompt, "--top", "50", "--json",
            ])
            .arg("--apply-edit")
            .arg(&edit_file)
            .output()
            .unwrap(),
    );
    let without = json(&loci(&[
        "predict", "--model", &model, "--prompt", prompt, "--top", "50", "--json",
    ]));
    assert_ne!(with["top"], without["top"]);
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args([
            "predict",
            "--model",
            &tiny("tiny-llama"),
            "--prompt",
            prompt,
        ])
        .arg("--apply-edit")
        .arg(&edit_file)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an edit for another model is refused"
    );

    // Stats made for another layer are refused.
    let out = common::eiffel_edit(&tiny("tiny-llama"), "2")
        .arg("--stats")
        .arg(&stats)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("made for"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `predict --top 50`'s list with the saved `edits` applied.
/// Asserts a command failed, saying `want` on stderr.
fn refused(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(want),
        "want {want:?}: {err}"
    );
}

/// `loci edit --method METHOD` of the Eiffel Tower to Rome on `model` at `prompt`, with `extra`.
fn method_edit(model: &str, method: &str, prompt: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loci"))
        .args(["edit", "--model", model, "--method", method])
        .args([
            "--prompt",
            prompt,
            "--subject",
            "Eiffel Tower",
            "--target",
            "Rome",
        ])
        .args(extra)
        .output()
        .unwrap()
}

/// `loci eval` of two CounterFact cases by the method `how` names: asserts both are scored.
fn eval_two_cases(model: &str, how: &[&str]) {
    let data = root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args(["eval", "--model", model])
        .args(how)
        .args(["--n", "2", "--no-generation", "--summary", "--dataset"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(json(&out)["cases"], 2);
}

fn top50(model: &str, prompt: &str, edits: &[&std::path::Path]) -> serde_json::Value {
    let mut c = Command::new(env!("CARGO_BIN_EXE_loci"));
    c.args([
        "predict", "--model", model, "--prompt", prompt, "--top", "50", "--json",
    ]);
    for f in edits {
        c.arg("--apply-edit").arg(f);
    }
    json(&c.output().unwrap())["top"].clone()
}

#[test]
fn attribution_patching_traces_from_the_command_line() {
    let model = tiny("tiny-gpt2");
    let run = |method: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_loci"))
            .args(["trace", "--model", &model, "--method", method, "--json"])
            .args(["--prompt", "The Eiffel Tower is located in the city of"])
            .args([
                "--subject",
                "Eiffel Tower",
                "--noise",
                "0.1",
                "--samples",
                "2",
            ])
            .output()
            .unwrap();
        json(&out)
    };
    let (exact, atp) = (run("exact"), run("attribution"));
    assert_eq!(atp["method"], "attribution");
    assert!(
        exact.get("method").is_none(),
        "exact traces keep their format"
    );
    assert_eq!(atp["high"], exact["high"]);
    // `low` from attribution's own corrupted pass: the exact run's, within rounding.
    let low = |t: &serde_json::Value| t["low"].as_f64().unwrap();
    assert!(
        (low(&atp) - low(&exact)).abs() < 1e-6,
        "{} vs {}",
        low(&atp),
        low(&exact)
    );
    for kind in ["hidden", "mlp", "attn"] {
        assert_eq!(
            atp["scores"][kind].as_array().unwrap().len(),
            exact["scores"][kind].as_array().unwrap().len()
        );
    }
}

#[test]
fn knowledge_neurons_localise_from_the_command_line_and_in_the_study() {
    let model = tiny("tiny-gpt2");
    let trace = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_loci"))
            .args(["trace", "--model", &model, "--method", "neurons"])
            .args(["--prompt", "The Eiffel Tower is located in the city of"])
            .args(["--subject", "Eiffel Tower"])
            .args(extra)
            .output()
            .unwrap()
    };
    let kn = json(&trace(&["--json"]));
    assert_eq!(kn["method"], "neurons");
    assert_eq!(kn["samples"], 20, "Dai et al.'s 20 points by default");
    let kinds: Vec<&String> = kn["scores"].as_object().unwrap().keys().collect();
    assert_eq!(kinds, ["mlp"], "MLP neurons only by default");
    let neurons = kn["neurons"].as_array().unwrap();
    assert!(!neurons.is_empty() && neurons[0]["attribution"].as_f64().unwrap() > 0.0);
    refused(&trace(&["--kind", "hidden"]), "MLP neurons");

    let dir = std::env::temp_dir().join(format!("loci-study-kn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json");
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let study_with = |windows: &str, how: &[&str], out: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_loci"))
            .args([
                "study",
                "run",
                "--model",
                &model,
                "--n",
                "1",
                "--methods",
                "rome",
            ])
            .args(["--layers", "2", "--all-cases", "--min-prob", "0"])
            .args(["--v-steps", "2", "--no-essence", "--trace-windows", windows])
            .args(how)
            .args(["--stats-tokens", "2000", "--json", "--dataset"])
            .arg(&data)
            .arg("--corpus")
            .arg(&corpus)
            .arg("--stats")
            .arg(dir.join("stats"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let neurons = ["--localization", "neurons", "--samples", "4"];
    let study = |windows: &str| study_with(windows, &neurons, &dir.join("study.jsonl"));
    refused(&study("5,10"), "no window");
    json(&study("5"));
    let lines = jsonl(&dir.join("study.jsonl"));
    let case = lines.iter().find(|l| l["record"] == "case").unwrap();
    let trace = &case["trace"];
    assert_eq!(trace["low"], 0.0, "knowledge neurons' baseline: {case}");
    let effect = trace["max_fraction_restored"].as_array().unwrap();
    assert!(effect.iter().any(|e| e.as_f64().unwrap() > 0.0), "{case}");
    let edit = lines.iter().find(|l| l["record"] == "edit").unwrap();
    assert_eq!(
        edit["tracing_effect"], effect[2],
        "joined at the edited layer"
    );

    // The same edits, localised again by attribution patching: only the traces change, and
    // the new file is that run's (resuming it with the new localization studies nothing).
    let moved = dir.join("atp.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args([
            "study",
            "relocalize",
            "--model",
            &model,
            "--localization",
            "attribution",
        ])
        .arg(dir.join("study.jsonl"))
        .arg("--out")
        .arg(&moved)
        .arg("--json")
        .output()
        .unwrap();
    json(&out);
    let again = jsonl(&moved);
    assert_eq!(again.len(), lines.len());
    let case = again.iter().find(|l| l["record"] == "case").unwrap();
    assert_eq!(case["run"]["config"]["localization"], "attribution");
    assert_ne!(case["trace"]["low"], 0.0, "a corrupted run's p: {case}");
    let effect = case["trace"]["max_fraction_restored"].as_array().unwrap();
    let moved_edit = again.iter().find(|l| l["record"] == "edit").unwrap();
    assert_eq!(moved_edit["tracing_effect"], effect[2]);
    for key in ["scores", "post", "pre", "layer", "target"] {
        assert_eq!(moved_edit[key], edit[key], "{key}: the edit itself is kept");
    }
    let resumed = study_with("5", &["--localization", "attribution"], &moved);
    json(&resumed);
    assert_eq!(
        jsonl(&moved).len(),
        lines.len(),
        "every case is already done"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn alphaedit_and_emmet_edit_in_sequence_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("loci-alpha-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let model = tiny("tiny-gpt2");
    let first = dir.join("first.safetensors");
    let run = |fact: [&str; 3], extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_loci"))
            .args(["edit", "--model", &model, "--v-steps", "4", "--json"])
            .args([
                "--prompt",
                fact[0],
                "--subject",
                fact[1],
                "--target",
                fact[2],
            ])
            .args(extra)
            .arg("--stats")
            .arg(dir.join("stats"))
            .arg("--corpus")
            .arg(&corpus)
            .args(["--stats-tokens", "2000"])
            .output()
            .unwrap()
    };
    let eiffel = [
        "The Eiffel Tower is located in the city of",
        "Eiffel Tower",
        "Rome",
    ];
    let jordan = [
        "Michael Jordan plays the sport of",
        "Michael Jordan",
        "soccer",
    ];
    let alpha = [
        "--method",
        "alphaedit",
        "--layers",
        "1,2",
        "--null-energy",
        "0.3",
    ];
    let v = json(&run(
        eiffel,
        &[&alpha[..], &["--save-edit", first.to_str().unwrap()]].concat(),
    ));
    assert_eq!(v["method"], "alphaedit");
    // The second edit is computed with the first's keys kept (read from the file it applies).
    let v = json(&run(
        jordan,
        &[&alpha[..], &["--apply-edit", first.to_str().unwrap()]].concat(),
    ));
    assert_eq!(v["method"], "alphaedit");
    let p = |side: &str| {
        v["requests"][0][side]["rewrite"]["target_new"]
            .as_f64()
            .unwrap()
    };
    assert!(p("after") > p("before"), "{v}");
    let v = json(&run(jordan, &["--method", "emmet", "--layers", "2"]));
    assert_eq!(
        (v["method"].as_str(), v["layers"].clone()),
        (Some("emmet"), serde_json::json!([2]))
    );

    // Settings of another method, and a null space that is empty, are refused.
    let err = |extra: &[&str]| String::from_utf8_lossy(&run(jordan, extra).stderr).to_string();
    assert!(err(&["--method", "memit", "--layers", "2", "--l2", "3"]).contains("AlphaEdit's"));
    assert!(err(&[
        "--method",
        "alphaedit",
        "--layers",
        "2",
        "--emmet-lambda",
        "1"
    ])
    .contains("EMMET's"));
    assert!(err(&[
        "--method",
        "alphaedit",
        "--layers",
        "2",
        "--null-threshold",
        "1e-12"
    ])
    .contains("leaves no null space"));

    // A sequence of AlphaEdit edits in the evaluation.
    let data = root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args([
            "eval",
            "--model",
            &model,
            "--method",
            "alphaedit",
            "--layers",
            "1,2",
        ])
        .args(["--null-energy", "0.3", "--n", "2", "--v-steps", "2"])
        .args(["--sequential", "--no-generation", "--summary", "--dataset"])
        .arg(&data)
        .arg("--stats")
        .arg(dir.join("stats"))
        .output()
        .unwrap();
    let s = json(&out);
    assert_eq!(s["after_all_edits"]["cases"], 2, "{s}");

    // `bench edit` alone times one ROME edit; with `--methods all` every method makes its
    // sequence too, each timed and measured.
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args([
            "bench",
            "edit",
            "--model",
            &model,
            "--layer",
            "2",
            "--stats-tokens",
            "2000",
        ])
        .arg("--json")
        .arg("--corpus")
        .arg(&corpus)
        .output()
        .unwrap();
    let b = json(&out);
    assert!(
        b["p_new_after"].is_number() && b.get("methods").is_none(),
        "{b}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args([
            "bench",
            "edit",
            "--model",
            &model,
            "--layer",
            "2",
            "--stats-tokens",
            "2000",
        ])
        .args([
            "--methods",
            "all",
            "--edits",
            "2",
            "--null-energy",
            "0.3",
            "--json",
        ])
        .arg("--corpus")
        .arg(&corpus)
        .output()
        .unwrap();
    let b = json(&out);
    let methods = b["methods"].as_array().unwrap();
    let names: Vec<&str> = methods
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["rome", "memit", "alphaedit", "emmet", "ft", "grace"]
    );
    for m in methods {
        assert_eq!(m["edits"], 2, "{m}");
        assert!(
            m["error"].is_null() && m["edits_per_second"].as_f64().unwrap() > 0.0,
            "{m}"
        );
        assert!(m["peak_rss_mib"].as_f64().unwrap() > 0.0, "{m}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn memit_edits_several_facts_at_once_and_its_file_reapplies() {
    let dir = std::env::temp_dir().join(format!("loci-memit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let model = tiny("tiny-gpt2");
    let requests = dir.join("requests.json");
    std::fs::write(
        &requests,
        r#"[{"prompt": "{} is located in the city of", "subject": "Eiffel Tower",
             "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
            {"prompt": "{} plays the sport of", "subject": "Michael Jordan",
             "target_new": {"str": "soccer"}}]"#,
    )
    .unwrap();
    let edit_file = dir.join("memit.safetensors");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_loci"))
            .args(["edit", "--model", &model, "--v-steps", "4"])
            .args(extra)
            .arg("--request")
            .arg(&requests)
            .arg("--stats")
            .arg(dir.join("stats"))
            .arg("--corpus")
            .arg(&corpus)
            .args(["--stats-tokens", "2000"])
            .output()
            .unwrap()
    };
    let v = json(&run(&[
        "--method",
        "memit",
        "--layers",
        "1,2",
        "--json",
        "--save-edit",
        edit_file.to_str().unwrap(),
        "--neighborhood",
        "The Louvre is located in the city of",
    ]));
    assert_eq!(v["layers"], serde_json::json!([1, 2]));
    let reqs = v["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 2);
    assert!(
        reqs[1]["request"]["target_true"]["str"].is_string(),
        "defaults to the current top-1"
    );
    for r in reqs {
        let p = |side: &str| r[side]["rewrite"]["target_new"].as_f64().unwrap();
        assert!(p("after") > p("before"), "{r}");
        assert_eq!(r["after"]["neighborhood"].as_array().unwrap().len(), 1);
        assert_eq!(r["generations"]["after"].as_array().unwrap().len(), 1);
    }
    assert_eq!(v["delta_norms"].as_array().unwrap().len(), 2);
    assert!(dir.join("stats/layer1.safetensors").exists());

    // The saved edit re-applies (both facts move); MEMIT and ROME edits stack.
    let prompt = "Michael Jordan plays the sport of";
    let top = |edits: &[&std::path::Path]| top50(&model, prompt, edits);
    assert_ne!(top(&[&edit_file]), top(&[]));
    assert_ne!(top(&[&edit_file, &edit_file]), top(&[&edit_file]));

    // ROME takes one fact; the layer options belong to their methods.
    let out = run(&["--layer", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("one fact at a time"));
    let out = run(&["--method", "memit", "--layer", "2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--layers"));
    let out = run(&["--method", "memit", "--layers", "1,9"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of range"));
    let out = run(&["--method", "memit", "--layers", "2,1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ascending"));

    // CounterFact cases, several per MEMIT edit.
    let data = root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args([
            "eval", "--model", &model, "--method", "memit", "--layers", "1,2",
        ])
        .args([
            "--n",
            "3",
            "--batch",
            "2",
            "--v-steps",
            "2",
            "--no-generation",
        ])
        .args(["--summary", "--out"])
        .arg(dir.join("memit.jsonl"))
        .arg("--dataset")
        .arg(&data)
        .arg("--stats")
        .arg(dir.join("stats"))
        .output()
        .unwrap();
    let s = json(&out);
    // The third case does not fit the tiny model's context: reported, and skipped.
    assert!(String::from_utf8_lossy(&out.stderr).contains("case 819: the prompt has"));
    assert_eq!(s["cases"], 2);
    let v = s["efficacy_score"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&v));
    let lines = std::fs::read_to_string(dir.join("memit.jsonl")).unwrap();
    let secs: Vec<f64> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["edit_seconds"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(secs.len(), 2);
    assert_eq!(secs[0], secs[1], "the two cases share one edit");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fine_tuning_edits_one_fact_and_its_file_reapplies() {
    let dir = std::env::temp_dir().join(format!("loci-ft-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny("tiny-gpt2");
    let prompt = "The Eiffel Tower is located in the city of";
    let edit_file = dir.join("ft.safetensors");
    let edit = |extra: &[&str]| method_edit(&model, "ft", prompt, extra);
    let v = json(&edit(&[
        "--layers",
        "1,2",
        "--norm-constraint",
        "0.01",
        "--ft-objective",
        "sequence",
        "--json",
        "--save-edit",
        edit_file.to_str().unwrap(),
    ]));
    assert_eq!(v["layer"], 1);
    let p = |side: &str| v[side]["rewrite"]["target_new"].as_f64().unwrap();
    assert!(p("after") > p("before"), "{v}");
    let losses = v["v_losses"].as_array().unwrap();
    assert!(!losses.is_empty() && losses.len() <= 25);
    let top = |edits: &[&std::path::Path]| top50(&model, prompt, edits);
    assert_ne!(top(&[&edit_file]), top(&[]));
    for (args, want) in [
        (
            vec!["--layers", "1", "--norm-constraint", "x"],
            "a number or none",
        ),
        (vec!["--layers", "9"], "out of range"),
        (vec!["--layer", "1"], "--layers"),
        (
            vec!["--layers", "1", "--ft-objective", "kl"],
            "last_token or sequence",
        ),
    ] {
        refused(&edit(&args), want);
    }
    eval_two_cases(&model, &["--method", "ft", "--layers", "1"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn grace_edits_without_changing_weights_and_its_file_reapplies() {
    let dir = std::env::temp_dir().join(format!("loci-grace-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = tiny("tiny-llama");
    // GRACE answers the prompt as the request fills it in.
    let prompt = "Eiffel Tower is located in the city of";
    let edit_file = dir.join("grace.safetensors");
    let edit = |extra: &[&str]| method_edit(&model, "grace", prompt, extra);
    let saved = [
        "--layer",
        "2",
        "--json",
        "--save-edit",
        edit_file.to_str().unwrap(),
    ];
    let v = json(&edit(&saved));
    assert_eq!(
        (&v["layer"], &v["delta_norm"]),
        (&2.into(), &0.0.into()),
        "{v}"
    );
    let p = |side: &str| v[side]["rewrite"]["target_new"].as_f64().unwrap();
    assert!(p("after") > 10.0 * p("before"), "{v}");
    assert_eq!(
        v["v_losses"].as_array().unwrap().len(),
        100,
        "the paper's 100 steps"
    );
    let top = |edits: &[&std::path::Path]| top50(&model, prompt, edits);
    assert_ne!(top(&[&edit_file]), top(&[]));
    let other = "Michael Jordan plays the sport of";
    assert_eq!(
        top50(&model, other, &[&edit_file]),
        top50(&model, other, &[])
    );
    for (args, want) in [
        (vec!["--layers", "1,2"], "one --layer"),
        (vec!["--layer", "9"], "out of range"),
        (vec!["--hparams", r#"{"eps": -1}"#], "must be positive"),
    ] {
        refused(&edit(&args), want);
    }
    eval_two_cases(&model, &["--method", "grace", "--layer", "2"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_applies_and_undoes_every_case() {
    let dir = std::env::temp_dir().join(format!("loci-eval-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let data = root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json");
    let out_file = dir.join("results.jsonl");
    // Attribute snippets (ROME's format) for the two cases: texts about each new target.
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    let snippets: Vec<serde_json::Value> = cases.as_array().unwrap()[..2]
        .iter()
        .map(|c| {
            let rw = &c["requested_rewrite"];
            let target = rw["target_new"]["str"].as_str().unwrap();
            serde_json::json!({
                "relation_id": rw["relation_id"], "target_id": rw["target_new"]["id"],
                "samples": [{"name": "x", "text": format!("{target} is a place. People in {target} speak of {target}.")}],
            })
        })
        .collect();
    let snippets_file = dir.join("snippets.json");
    std::fs::write(&snippets_file, serde_json::to_string(&snippets).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args([
            "eval",
            "--model",
            &tiny("tiny-gpt2"),
            "--layer",
            "1",
            "--n",
            "2",
            "--v-steps",
            "3",
            "--stats-tokens",
            "2000",
            "--summary",
        ])
        .arg("--dataset")
        .arg(&data)
        .arg("--corpus")
        .arg(&corpus)
        .arg("--stats")
        .arg(dir.join("stats"))
        .arg("--out")
        .arg(&out_file)
        .arg("--snippets")
        .arg(&snippets_file)
        .output()
        .unwrap();
    let s = json(&out);
    assert_eq!(s["cases"], 2);
    for k in ["consistency_pre", "consistency_post"] {
        let v = s[k].as_f64().unwrap_or(-1.0);
        assert!((0.0..=100.0).contains(&v), "{k} = {v}");
    }
    for k in [
        "efficacy_score",
        "paraphrase_score",
        "neighborhood_score",
        "hase_target_score",
        "score",
    ] {
        let v = s[k].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&v), "{k} = {v}");
    }
    assert!(s["fluency_post"].as_f64().unwrap() > 0.0);
    let lines = jsonl(&out_file);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["request"]["relation_id"], "P30");
    assert!(lines[0]["metrics"]["consistency_post"].is_number());
    assert!(!lines[0]["post"]["generations"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        lines[0]["pre"]["neighborhood"].as_array().unwrap().len(),
        10
    );
    assert_eq!(lines[0]["pre"]["paraphrase"].as_array().unwrap().len(), 2);
    // EasyEdit's flattened format reads too.
    let flat = root().join("../shared/data/counterfact/easyedit_counterfact-edit.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args([
            "eval",
            "--model",
            &tiny("tiny-gpt2"),
            "--layer",
            "1",
            "--n",
            "1",
            "--v-steps",
            "2",
            "--no-generation",
            "--summary",
        ])
        .arg("--dataset")
        .arg(&flat)
        .arg("--stats")
        .arg(dir.join("stats"))
        .output()
        .unwrap();
    assert_eq!(json(&out)["cases"], 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_scores_zsre_questions_by_token_accuracy() {
    let dir = std::env::temp_dir().join(format!("loci-zsre-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = root().join("../shared/data/zsre/zsre_mend_train-1k.json");
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let out_file = dir.join("zsre.jsonl");
    // Two questions written by one MEMIT edit, then a third alone.
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args(["eval", "--model", &tiny("tiny-gpt2"), "--method", "memit"])
        .args([
            "--layers",
            "1,2",
            "--n",
            "3",
            "--batch",
            "2",
            "--v-steps",
            "2",
        ])
        .args([
            "--stats-tokens",
            "2000",
            "--zsre-target",
            "alt",
            "--summary",
        ])
        .arg("--dataset")
        .arg(&data)
        .arg("--corpus")
        .arg(&corpus)
        .arg("--stats")
        .arg(dir.join("stats"))
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap();
    let s = json(&out);
    assert_eq!(s["cases"], 3);
    for k in [
        "efficacy_pre",
        "efficacy",
        "paraphrase_pre",
        "paraphrase",
        "specificity_pre",
        "specificity",
        "locality",
    ] {
        let v = s[k].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&v), "{k} = {v}");
    }
    let lines = jsonl(&out_file);
    assert_eq!(lines.len(), 3);
    let first = &lines[0];
    assert_eq!(first["request"]["target_new"]["str"], "unmanned aircraft");
    assert_eq!(
        first["request"]["prompt"],
        "What is the product made by {}?"
    );
    let n = &first["post"]["neighborhood"];
    assert!(n["prompt"].as_str().unwrap().ends_with('?'));
    assert_eq!(
        n["target"].as_array().unwrap().len(),
        n["predicted"].as_array().unwrap().len()
    );
    assert_eq!(
        lines[0]["edit_seconds"], lines[1]["edit_seconds"],
        "one edit shared by the batch"
    );
    // A stopped evaluation continues: the first three cases are kept, the fourth is added,
    // after a last line cut short by the stop is dropped.
    let text = std::fs::read_to_string(&out_file).unwrap();
    std::fs::write(&out_file, format!("{text}{{\"case_id\": 9")).unwrap();
    let more = |n: &str, extra: &[&str], out: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_loci"))
            .args(["eval", "--model", &tiny("tiny-gpt2")])
            .args(["--n", n, "--v-steps", "2", "--summary"])
            .args(extra)
            .arg("--dataset")
            .arg(&data)
            .arg("--stats")
            .arg(dir.join("stats"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let memit = [
        "--method",
        "memit",
        "--layers",
        "1,2",
        "--batch",
        "2",
        "--zsre-target",
        "alt",
    ];
    let out = more("4", &memit, &out_file);
    assert_eq!(json(&out)["cases"], 4);
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 cases already in"));
    let again = std::fs::read_to_string(&out_file).unwrap();
    assert!(again.starts_with(&text), "the kept lines are untouched");
    assert_eq!(again.lines().count(), 4);
    assert!(again.ends_with('\n'));
    // Nor can another run continue it: each line names the model and settings that made it.
    assert!(again.lines().all(
        |l| l.contains(r#""run":"tiny-gpt2: MEMIT at layers [1, 2], 2 per edit, writing alt""#)
    ));
    let out = more("5", &["--layer", "1"], &out_file);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another run"));
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), again);
    // A sequence cannot continue a file of undone edits.
    let out = more("4", &["--layer", "1", "--sequential"], &out_file);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no saved sequence to continue"));

    // In sequence: every record is scored after its own edit and after the last, and every
    // case edited so far at each checkpoint (the retention curve), with the model's health at
    // the start, each checkpoint and the end (all drawn).
    let out_file = dir.join("sequence.jsonl");
    let curve = dir.join("curve.svg");
    let corpus = corpus.to_str().unwrap();
    let health = [
        "--corpus",
        corpus,
        "--health-facts",
        "20",
        "--health-texts",
        "4",
    ];
    let sequence = [
        &["--layer", "1", "--sequential", "--checkpoint-every", "1"][..],
        &["--plot", curve.to_str().unwrap()],
        &health,
    ]
    .concat();
    let s = json(&more("3", &sequence, &out_file));
    assert_eq!(s["method"], "rome");
    assert_eq!(s["after_own_edit"]["cases"], 3);
    assert_eq!(s["after_all_edits"]["cases"], 3);
    let lines = jsonl(&out_file);
    let kind = |k: &'static str| lines.iter().filter(move |l| l["kind"] == k);
    let records: Vec<_> = kind("case").collect();
    assert_eq!(records.len(), 3);
    assert!(records
        .iter()
        .all(|l| l["last_metrics"]["locality"].is_number()));
    assert_eq!(
        records[2]["post"], records[2]["last"],
        "nothing after the last edit"
    );
    let points: Vec<(u64, Option<u64>)> = kind("checkpoint")
        .map(|c| {
            (
                c["cases_done"].as_u64().unwrap(),
                c["summary"]["cases"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        points,
        [(0, None), (1, Some(1)), (2, Some(2)), (3, Some(3))]
    );
    assert_eq!(s["checkpoints"][3]["summary"], s["after_all_edits"]);
    let health = |i: usize| &s["checkpoints"][i]["health"];
    let ppl = |i: usize| health(i)["perplexity"].as_f64().unwrap();
    assert!(ppl(0) > 1.0 && ppl(3) > 1.0);
    assert!((0.0..=100.0).contains(&health(3)["known_top1"].as_f64().unwrap()));
    assert_eq!(health(0)["layers"][0]["growth"], 1.0, "no edit yet");
    assert_ne!(
        health(3)["layers"][0]["growth"],
        1.0,
        "ROME changed the layer"
    );
    let svg = std::fs::read_to_string(&curve).unwrap();
    for panel in [
        "cases edited",
        "locality",
        "perplexity change",
        "weight norm growth",
    ] {
        assert!(svg.contains(panel), "{panel}");
    }
    let out = more(
        "3",
        &["--layer", "1", "--checkpoint-every", "1"],
        &dir.join("x.jsonl"),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("is for --sequential"));

    // The study poses zsRE as Hase et al. do: a wrapped question, another record's answer.
    let study = dir.join("study.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args(["study", "run", "--model", &tiny("tiny-gpt2"), "--n", "1"])
        .args([
            "--methods",
            "rome",
            "--problems",
            "error_injection,fact_amplification",
        ])
        .args([
            "--layers",
            "1",
            "--all-cases",
            "--min-prob",
            "0",
            "--samples",
            "2",
        ])
        .args(["--v-steps", "2", "--no-essence", "--json", "--dataset"])
        .arg(&data)
        .arg("--stats")
        .arg(dir.join("stats"))
        .arg("--out")
        .arg(&study)
        .output()
        .unwrap();
    json(&out);
    let lines = jsonl(&study);
    assert_eq!(lines.len(), 3, "the case's two edits, then the case");
    let case = &lines[2];
    assert_eq!(case["record"], "case");
    assert_eq!(case["target_true"], "uniform");
    assert!(case["prompt"]
        .as_str()
        .unwrap()
        .starts_with("Question: What is"));
    let edit = lines
        .iter()
        .find(|l| l["problem"] == "error_injection")
        .unwrap();
    assert!(edit["error"].is_null(), "{edit}");
    let new = edit["target"].as_str().unwrap();
    assert!(!new.is_empty() && new != "uniform", "{new}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_study_localises_by_attribution_patching_and_edits_with_the_new_methods() {
    let dir = std::env::temp_dir().join(format!("loci-study-atp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json");
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let study = dir.join("study.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_loci"))
        .args(["study", "run", "--model", &tiny("tiny-gpt2"), "--n", "1"])
        .args([
            "--methods",
            "emmet,alphaedit",
            "--problems",
            "error_injection",
        ])
        .args([
            "--layers",
            "2",
            "--all-cases",
            "--min-prob",
            "0",
            "--samples",
            "2",
        ])
        .args([
            "--v-steps",
            "2",
            "--no-essence",
            "--localization",
            "attribution",
        ])
        .args(["--stats-tokens", "2000", "--json", "--dataset"])
        .arg(&data)
        .arg("--corpus")
        .arg(&corpus)
        .arg("--stats")
        .arg(dir.join("stats"))
        .arg("--out")
        .arg(&study)
        .output()
        .unwrap();
    json(&out);
    let lines = jsonl(&study);
    let case = lines.iter().find(|l| l["record"] == "case").unwrap();
    let effect = case["trace"]["max_fraction_restored"].as_array().unwrap();
    assert_eq!(effect.len(), 4, "one per layer: {case}");
    let edits: Vec<&serde_json::Value> = lines.iter().filter(|l| l["record"] == "edit").collect();
    let methods: Vec<&str> = edits
        .iter()
        .map(|e| e["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["emmet", "alphaedit"]);
    assert!(edits[0]["error"].is_null(), "{}", edits[0]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_device_compares_every_test_model_and_dtype() {
    // Here the compute device is the CPU; on a GPU machine tests/gpu/run.sh runs the same command.
    let v = json(&loci(&["check-device"]));
    assert_eq!(v["pass"], true);
    let checks = v["checks"].as_array().unwrap();
    // 3 models × (3 dtypes × 3 read-outs + 5 more in f32: the whole-answer trace, ROME's
    // vectors, key statistics, and the probabilities after a MEMIT and a fine-tuning edit).
    assert_eq!(checks.len(), 3 * 14);
    for what in [
        "whole-answer trace grid (relative)",
        "key statistics (relative)",
        "probabilities after a MEMIT edit",
        "probabilities after a fine-tuning edit",
    ] {
        assert_eq!(checks.iter().filter(|c| c["what"] == what).count(), 3);
    }
    for c in checks {
        if c["dtype"] == "f32" {
            assert_eq!(c["value"], 0.0, "{c}");
        }
    }
    // bf16 differs from f32 (the check can fail), within its tolerance.
    assert!(checks
        .iter()
        .any(|c| c["dtype"] == "bf16" && c["value"].as_f64().unwrap() > 1e-4));
    let out = loci(&["check-device", "--models", "no/such/model"]);
    assert!(!out.status.success());
}

#[test]
fn random_preset_models_run_the_benchmarks() {
    let v = json(&loci(&[
        "bench", "forward", "--random", "gpt2", "--tokens", "12", "--reps", "1", "--json",
    ]));
    assert_eq!(v["model"], "random-gpt2");
    assert_eq!(v["tokens"], 12);
    let out = loci(&["bench", "forward", "--random", "gpt5", "--json"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown preset"));
}

#[test]
fn study_sweeps_the_papers_methods_and_every_problem_resumes_and_analyses() {
    let dir = std::env::temp_dir().join(format!("loci-study-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let data = root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json");
    let out_file = dir.join("study.jsonl");
    let plot = dir.join("study.svg");
    // Hase et al.'s four methods (the others have their own test), every problem, two layers,
    // unless `extra` names its own.
    let run = |extra: &[&str]| {
        let mut sweep = vec![];
        for (flag, all) in [
            ("--methods", "rome,memit,ft-1,ft-5"),
            ("--problems", "all"),
            ("--layers", "0,2"),
        ] {
            if !extra.contains(&flag) {
                sweep.extend([flag, all]);
            }
        }
        Command::new(env!("CARGO_BIN_EXE_loci"))
            .args(["study", "run", "--model", &tiny("tiny-gpt2"), "--n", "2"])
            .args(sweep)
            // The tiny model knows no facts: study every case.
            .args(["--all-cases", "--min-prob", "0", "--samples", "3"])
            .args([
                "--v-steps",
                "2",
                "--stats-tokens",
                "2000",
                "--trace-windows",
                "5,1",
            ])
            .args(extra)
            .arg("--dataset")
            .arg(&data)
            .arg("--corpus")
            .arg(&corpus)
            .arg("--stats")
            .arg(dir.join("stats"))
            .arg("--out")
            .arg(&out_file)
            .output()
            .unwrap()
    };
    let out = run(&["--plot", plot.to_str().unwrap(), "--json"]);
    let an = json(&out);
    // Every method and problem was edited at two layers per case: each gets a peak comparison.
    let peak = an["peak"].as_array().unwrap();
    assert_eq!(peak.len(), 4 * 5, "{peak:?}");
    for p in peak {
        assert_eq!(p["cases"], 2);
        for k in ["at_peak", "elsewhere", "at_best_layer"] {
            assert!((0.0..=1.0).contains(&p[k].as_f64().unwrap()), "{p}");
        }
        // Two edits per case, one at its peak: peak and elsewhere split the mean of them all.
        let means = an["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["method"] == p["method"] && m["problem"] == p["problem"])
            .unwrap()["rewrite"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect::<Vec<_>>();
        let all = means.iter().sum::<f64>() / means.len() as f64;
        let split = (p["at_peak"].as_f64().unwrap() + p["elsewhere"].as_f64().unwrap()) / 2.0;
        assert!((all - split).abs() < 1e-6, "{p} {means:?}");
        let best = means.iter().cloned().fold(f64::MIN, f64::max);
        assert!(
            (p["at_best_layer"].as_f64().unwrap() - best).abs() < 1e-9,
            "{p}"
        );
    }
    // The large-effect flag splits each method and problem's 4 edits at one cutoff.
    let le = &an["large_effect"];
    assert!(le["cutoff"].as_f64().unwrap().is_finite(), "{le}");
    let comparisons = le["comparisons"].as_array().unwrap();
    assert_eq!(comparisons.len(), 4 * 5);
    for c in comparisons {
        assert_eq!(
            c["large"].as_u64().unwrap() + c["rest"].as_u64().unwrap(),
            4,
            "{c}"
        );
    }
    let text = std::fs::read_to_string(&out_file).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Per case: 4 methods × 5 problems × 2 layers edits, then its line (last, so a case cut
    // short by a stop has none and is studied again).
    assert_eq!(lines.len(), 2 * (40 + 1));
    assert!(lines[..40].iter().all(|l| l["record"] == "edit"));
    assert_eq!(lines[40]["record"], "case");
    let trace = &lines[40]["trace"];
    assert_eq!(trace["max_fraction_restored"].as_array().unwrap().len(), 4);
    assert_eq!(trace["window"], 5);
    assert_eq!(trace["other_windows"][0]["window"], 1);
    assert_eq!(
        trace["other_windows"][0]["max_fraction_restored"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert!(lines[40]["essence_ppl"].as_f64().unwrap() > 1.0);
    let edits: Vec<&serde_json::Value> = lines.iter().filter(|l| l["record"] == "edit").collect();
    for e in &edits {
        assert!(e["error"].is_null(), "{e}");
        let layer = e["layer"].as_u64().unwrap() as usize;
        let case = lines
            .iter()
            .find(|l| l["record"] == "case" && l["case_id"] == e["case_id"])
            .unwrap();
        assert_eq!(
            e["tracing_effect"], case["trace"]["max_fraction_restored"][layer],
            "joined at the central layer"
        );
        let w = e["edited_layers"].as_array().unwrap().len();
        match e["method"].as_str().unwrap() {
            "rome" | "ft-1" => assert_eq!(w, 1),
            // The window of 5 around layer 0 or 2 of a 4-layer model.
            _ => assert_eq!(w, if layer == 0 { 3 } else { 4 }),
        }
        let target = e["target"].as_str().unwrap();
        let truth = case["target_true"].as_str().unwrap();
        match e["problem"].as_str().unwrap() {
            "fact_erasure" | "fact_amplification" | "fact_forcing" => assert_eq!(target, truth),
            "error_injection" => assert_ne!(target, truth),
            _ => assert!(!target.trim().is_empty()),
        }
        assert!(e["essence_score"].as_f64().is_some());
    }
    assert_eq!(an["cases_used"], 2);
    assert_eq!(an["edits"], 80);
    // 4 methods × 5 problems × 4 scores, each fitted on 2 cases × 2 layers.
    let conds = an["conditions"].as_array().unwrap();
    assert_eq!(conds.len(), 80);
    assert!(conds.iter().all(|c| c["n"] == 4));
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));

    // A second run finds both cases done and adds nothing.
    let out = run(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), text);
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 already in"));
    // The analysis reads the file on its own too.
    let out = loci(&["study", "analyze", out_file.to_str().unwrap(), "--json"]);
    assert_eq!(json(&out), an);
    let out = loci(&["study", "analyze", out_file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("R²layer"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("above the 95th percentile"));
    // Window 1 was traced too: its effects can be regressed instead; window 3 was not.
    let out = loci(&[
        "study",
        "analyze",
        out_file.to_str().unwrap(),
        "--window",
        "1",
        "--json",
    ]);
    let an1 = json(&out);
    assert_eq!(an1["window"], 1);
    assert_eq!(an1["edits"], an["edits"]);
    // The grids are window 5's: no large-effect flag at window 1.
    assert!(an1["large_effect"].is_null(), "{}", an1["large_effect"]);
    let out = loci(&[
        "study",
        "analyze",
        out_file.to_str().unwrap(),
        "--window",
        "3",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("window 3"));
    // Bad settings fail with a message and write nothing.
    for (flag, value, msg) in [
        ("--methods", "rome,knn", "unknown method"),
        ("--problems", "fact_guessing", "unknown editing problem"),
        ("--layers", "9", "out of range"),
        // A continuation must keep the settings the file was made with.
        ("--layers", "0", "other settings"),
    ] {
        let out = run(&[flag, value]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(msg),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), text);
    let out = loci(&["study", "analyze", data.to_str().unwrap()]);
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn study_shards_analyse_as_one_run_and_a_cut_case_is_redone() {
    let dir = std::env::temp_dir().join(format!("loci-study-shards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let shards = dir.join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let data = root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json");
    let run = |out: &std::path::Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_loci"))
            .args(["study", "run", "--model", &tiny("tiny-gpt2"), "--n", "4"])
            .args(["--methods", "rome,ft-1", "--layers", "0,2", "--all-cases"])
            .args(["--min-prob", "0", "--samples", "2", "--v-steps", "2"])
            .args(["--stats-tokens", "2000", "--no-essence"])
            .args(extra)
            .arg("--dataset")
            .arg(&data)
            .arg("--corpus")
            .arg(&corpus)
            .arg("--stats")
            .arg(dir.join("stats"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let whole = dir.join("whole.jsonl");
    ok(run(&whole, &[]));
    for i in 1..=3 {
        let part = shards.join(format!("part{i}.jsonl"));
        ok(run(&part, &["--shard", &format!("{i}/3")]));
    }
    let analysis = |paths: &[&std::path::Path]| {
        let mut args = vec!["study", "analyze", "--json"];
        args.extend(paths.iter().map(|p| p.to_str().unwrap()));
        loci(&args)
    };
    let one = json(&analysis(&[&whole]));
    assert_eq!(one["cases"], 4);
    // The folder of shards, or the shard files named one by one: the same analysis.
    assert_eq!(json(&analysis(&[&shards])), one);
    let parts: Vec<std::path::PathBuf> = (1..=3)
        .map(|i| shards.join(format!("part{i}.jsonl")))
        .collect();
    let named: Vec<&std::path::Path> = parts.iter().map(|p| p.as_path()).collect();
    assert_eq!(json(&analysis(&named)), one);
    // Cases 1 and 4 of the list are shard 1's.
    let part1 = std::fs::read_to_string(&parts[0]).unwrap();
    assert_eq!(
        part1
            .lines()
            .filter(|l| l.contains("\"record\":\"case\""))
            .count(),
        2
    );

    // A task killed while writing its last case leaves that case without its line: the
    // analysis leaves the case out, and the resumed task studies it again.
    std::fs::write(&parts[0], &part1.as_bytes()[..part1.len() - 40]).unwrap();
    let cut = json(&analysis(&[&shards]));
    assert_eq!(cut["cases"], 3);
    ok(run(&parts[0], &["--shard", "1/3"]));
    assert_eq!(json(&analysis(&[&shards])), one);

    // Refused, naming the files: a case given twice, and shards of different settings.
    let out = analysis(&[&whole, &shards]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is in both") && err.contains("whole.jsonl"),
        "{err}"
    );
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    ok(run(&other.join("a.jsonl"), &["--shard", "1/2"]));
    ok(run(
        &other.join("b.jsonl"),
        &["--shard", "2/2", "--seed", "2"],
    ));
    let out = analysis(&[&other]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("different runs") && err.contains("b.jsonl"),
        "{err}"
    );
    // Shard specs out of range.
    for spec in ["0/3", "4/3", "1/0"] {
        let out = run(&dir.join("bad.jsonl"), &["--shard", spec]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(spec));
    }
    assert!(!dir.join("bad.jsonl").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn study_in_batches_equals_the_study_one_case_at_a_time() {
    let dir = std::env::temp_dir().join(format!("loci-study-batch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let data = root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json");
    let run = |out: &std::path::Path, batch: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_loci"))
            .args(["study", "run", "--model", &tiny("tiny-gpt2"), "--n", "5"])
            .args(["--methods", "rome,memit,ft-1", "--layers", "1,2"])
            .args(["--problems", "error_injection,fact_erasure,fact_forcing"])
            .args(["--all-cases", "--min-prob", "0", "--samples", "2"])
            .args(["--v-steps", "4", "--stats-tokens", "4000", "--no-essence"])
            .args(["--batch", batch])
            .arg("--dataset")
            .arg(&data)
            .arg("--corpus")
            .arg(&corpus)
            .arg("--stats")
            .arg(dir.join("stats"))
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        jsonl(out)
    };
    let alone = run(&dir.join("alone.jsonl"), "1");
    let batched = run(&dir.join("batched.jsonl"), "3");
    assert_eq!(alone.len(), batched.len());
    let edits = |lines: &[serde_json::Value]| -> Vec<serde_json::Value> {
        lines
            .iter()
            .filter(|l| l["record"] == "edit")
            .cloned()
            .collect()
    };
    let (ea, eb) = (edits(&alone), edits(&batched));
    assert_eq!(ea.len(), 5 * 3 * 3 * 2);
    let key = |e: &serde_json::Value| {
        format!(
            "{} {} {} {}",
            e["case_id"], e["method"], e["problem"], e["layer"]
        )
    };
    let mut by_key: std::collections::BTreeMap<String, &serde_json::Value> =
        eb.iter().map(|e| (key(e), e)).collect();
    let mut compared = 0;
    for a in &ea {
        let b = by_key.remove(&key(a)).expect("the same edits");
        assert_eq!(a["error"], b["error"], "{}", key(a));
        assert_eq!(a["target"], b["target"]);
        // The random tiny model gives the true object p ≈ 1e-15: erasure's scores divide by
        // that, and Adam's normalised steps on gradients that small turn f32 rounding (the
        // batch's other matrix shapes) into 1e-4 of relative change. Its probabilities are
        // compared relatively; every other score absolutely, within 1e-4.
        let erasure = a["problem"] == "fact_erasure";
        for part in ["pre", "post", "scores"] {
            if erasure && part == "scores" {
                continue;
            }
            for (name, x) in a[part].as_object().unwrap() {
                let (x, y) = (x.as_f64(), b[part][name].as_f64());
                if let (Some(x), Some(y)) = (x, y) {
                    let tol = if erasure {
                        1e-3 * x.abs().max(y.abs())
                    } else {
                        1e-4
                    };
                    assert!((x - y).abs() <= tol, "{} {part}.{name}: {x} vs {y}", key(a));
                    compared += 1;
                } else {
                    assert_eq!(x, y, "{} {part}.{name}", key(a));
                }
            }
        }
    }
    assert!(compared > 100, "{compared}");
    // The case lines (filter, trace) are the same, bit for bit.
    let cases = |lines: &[serde_json::Value]| -> Vec<serde_json::Value> {
        lines
            .iter()
            .filter(|l| l["record"] == "case")
            .cloned()
            .collect()
    };
    assert_eq!(cases(&alone), cases(&batched));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hparams_change_any_setting_and_unknown_ones_are_named() {
    let dir = std::env::temp_dir().join(format!("loci-hparams-cli-{}", std::process::id()));
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let model = tiny("tiny-gpt2");
    let edit = |hparams: &str, save: Option<&std::path::Path>| {
        let mut c = common::eiffel_edit(&model, "2");
        c.args(["--json", "--stats-tokens", "2000", "--hparams", hparams])
            .arg("--corpus")
            .arg(&corpus)
            .arg("--stats")
            .arg(dir.join("stats"));
        if let Some(file) = save {
            c.arg("--save-edit").arg(file);
        }
        c.output().unwrap()
    };
    let out = edit(r#"{"v_num_grad_steps": 3, "kl_factor": 0.5}"#, None);
    let report = json(&out);
    assert_eq!(report["v_losses"].as_array().unwrap().len(), 3);
    // Statistics computed with an edit applied are the unedited model's (they are cached under
    // its fingerprint): layer 3 reads its keys through the edited layer 2.
    let saved = dir.join("edit.safetensors");
    json(&edit(r#"{"v_num_grad_steps": 3}"#, Some(&saved)));
    let stats_of = |folder: &str, edits: &[&std::path::Path]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_loci"));
        c.args([
            "stats", "--model", &model, "--layers", "3", "--tokens", "1000",
        ])
        .arg("--corpus")
        .arg(&corpus)
        .arg("--out")
        .arg(dir.join(folder));
        for e in edits {
            c.arg("--apply-edit").arg(e);
        }
        assert!(c.output().unwrap().status.success());
        // The header as JSON (its metadata's order varies) and the data after it.
        let bytes = std::fs::read(dir.join(folder).join("layer3.safetensors")).unwrap();
        let n = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..n]).unwrap();
        (header, bytes[n..].to_vec())
    };
    assert_eq!(stats_of("with-edit", &[&saved]), stats_of("without", &[]));
    let out = edit(r#"{"v_learning_rate": 0.1}"#, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("has no setting \"v_learning_rate\""));
    assert!(err.contains("v_lr") && err.contains("kl_factor"), "{err}");
    let out = edit(r#"{"v_lr": "fast"}"#, None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ROME's settings"));
    let out = edit("[1]", None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("a JSON object"));
    std::fs::remove_dir_all(&dir).ok();
}

/// `loci eval --sequential --methods rome,memit,alphaedit,grace` on the tiny GPT-2's
/// CounterFact cases, checkpointed after every case, with `extra` (the null-space flag goes to
/// AlphaEdit alone); a `Command` to run or spawn.
fn sequences(dir: &std::path::Path, n: &str, out: &std::path::Path, extra: &[&str]) -> Command {
    let data = root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json");
    let corpus = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    let mut c = Command::new(env!("CARGO_BIN_EXE_loci"));
    c.args([
        "eval",
        "--model",
        &tiny("tiny-gpt2"),
        "--n",
        n,
        "--sequential",
    ])
    .args([
        "--methods",
        "rome,memit,alphaedit,grace",
        "--layer",
        "1",
        "--layers",
        "1,2",
    ])
    .args([
        "--null-energy",
        "0.3",
        "--v-steps",
        "2",
        "--no-generation",
        "--summary",
    ])
    .args([
        "--checkpoint-every",
        "1",
        "--health-facts",
        "20",
        "--health-texts",
        "4",
    ])
    .args(extra)
    .arg("--dataset")
    .arg(&data)
    .arg("--corpus")
    .arg(&corpus)
    .arg("--stats")
    .arg(dir.join("stats"))
    .arg("--out")
    .arg(out);
    c
}

/// Each method's summaries after its own edit and after all, and its points (cases done,
/// perplexity, largest norm growth), from `eval --summary`'s JSON.
fn sequence_results(s: &serde_json::Value) -> Vec<serde_json::Value> {
    s["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let points: Vec<serde_json::Value> = m["checkpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    serde_json::json!([
                        c["cases_done"],
                        c["health"]["perplexity"],
                        c["health"]["layers"]
                    ])
                })
                .collect();
            serde_json::json!([
                m["method"],
                m["after_own_edit"],
                m["after_all_edits"],
                points
            ])
        })
        .collect()
}

#[test]
fn a_sequence_of_several_methods_continues_after_a_stop_exactly_as_if_never_stopped() {
    let dir = std::env::temp_dir().join(format!("loci-cli-sequences-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let whole = dir.join("whole.jsonl");
    let s = json(&sequences(&dir, "5", &whole, &[]).output().unwrap());
    let methods: Vec<&str> = s["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["rome", "memit", "alphaedit", "grace"]);
    let grace = &s["methods"][3]["checkpoints"][5]["health"]["layers"][0];
    assert_eq!(grace["growth"], 1.0, "GRACE leaves the weights: {grace}");
    assert!(grace["codebook_entries"].as_u64().unwrap() >= 1);

    // Stopped (killed) once its first checkpoint is saved, then run again: it continues from
    // there and ends exactly as the run that was never stopped.
    let stopped = dir.join("stopped.jsonl");
    let state = dir.join("stopped.jsonl.state/rome.safetensors");
    let mut child = sequences(&dir, "5", &stopped, &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while !state.exists() {
        assert!(child.try_wait().unwrap().is_none(), "it ran to the end");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let lines = jsonl(&stopped);
    assert!(
        lines.iter().all(|l| l["kind"] == "checkpoint"),
        "no case records yet"
    );
    let out = sequences(&dir, "5", &stopped, &[]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("rome: continuing after"));
    assert_eq!(sequence_results(&json(&out)), sequence_results(&s));
    let records = jsonl(&stopped);
    let cases = records.iter().filter(|l| l["kind"] == "case");
    assert_eq!(
        cases.count(),
        jsonl(&whole).iter().filter(|l| l["kind"] == "case").count()
    );

    // A finished sequence asked for fewer cases, or run with other settings, is refused by
    // name and nothing changes; asked for more cases, it goes on from its end.
    let before = std::fs::read_to_string(&stopped).unwrap();
    let out = sequences(&dir, "4", &stopped, &[]).output().unwrap();
    refused(&out, "more than this run's 4");
    let out = sequences(&dir, "5", &stopped, &["--batch", "2"])
        .output()
        .unwrap();
    refused(
        &out,
        "memit.safetensors holds a sequence run with --batch 1, not 2",
    );
    let out = sequences(&dir, "5", &stopped, &["--health-tokens", "16"])
        .output()
        .unwrap();
    refused(&out, "with --health-tokens 256, not 16");
    assert_eq!(std::fs::read_to_string(&stopped).unwrap(), before);
    let six = dir.join("six.jsonl");
    let once = json(&sequences(&dir, "6", &six, &[]).output().unwrap());
    let out = sequences(&dir, "6", &stopped, &[]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("continuing after 5 of 6"));
    let (a, b) = (sequence_results(&json(&out)), sequence_results(&once));
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(a[2], b[2], "after all edits");
    }
}
