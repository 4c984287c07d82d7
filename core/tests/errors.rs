//! Bad input gets a clear error, never a panic.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use loci_core::LoadedModel;

fn load(p: &Path) -> Result<LoadedModel, String> {
    LoadedModel::load(p, DType::F32, &Device::Cpu).map_err(|e| e.to_string())
}

/// A writable copy of a fixture model folder.
fn copy_of(name: &str, tag: &str) -> PathBuf {
    let src = common::fixtures().join(name);
    let dst = std::env::temp_dir().join(format!("loci-err-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

#[test]
fn missing_path_is_reported() {
    let e = load(Path::new("/nonexistent/model")).unwrap_err();
    assert!(e.contains("/nonexistent/model"), "{e}");
}

#[test]
fn truncated_safetensors_is_reported() {
    let d = copy_of("tiny-gpt2", "trunc");
    let f = d.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&d).unwrap_err();
    assert!(e.contains("safetensors"), "{e}");
    std::fs::write(&f, b"not a safetensors file at all").unwrap();
    let e = load(&d).unwrap_err();
    assert!(e.contains("safetensors"), "{e}");
}

#[test]
fn corrupt_gguf_is_reported() {
    let p = std::env::temp_dir().join(format!("loci-bad-{}.gguf", std::process::id()));
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00garbage-garbage-garbage").unwrap();
    let e = load(&p).unwrap_err();
    assert!(e.contains("GGUF"), "{e}");
    std::fs::write(&p, b"").unwrap();
    assert!(load(&p).is_err());
}

#[test]
fn config_that_does_not_match_tensors_is_reported() {
    let d = copy_of("tiny-llama", "mismatch");
    let cfg_path = d.join("config.json");
    let mut cfg = common::read_json(&cfg_path);
    cfg["intermediate_size"] = serde_json::json!(96);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load(&d).unwrap_err();
    assert!(e.contains("shape") && e.contains("mlp"), "{e}");

    cfg["intermediate_size"] = serde_json::json!(128);
    cfg["num_hidden_layers"] = serde_json::json!(5);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load(&d).unwrap_err();
    assert!(e.contains("model.layers.4") && e.contains("missing"), "{e}");

    cfg["model_type"] = serde_json::json!("t5");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load(&d).unwrap_err();
    assert!(e.contains("unsupported") && e.contains("t5"), "{e}");
}

#[test]
fn bad_prompts_are_rejected() {
    let lm = load(&common::fixtures().join("tiny-gpt2")).unwrap();
    let e = lm.predict("", 5).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let e = lm.predict("   ", 5).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let long = "Paris is a city. ".repeat(100);
    let e = lm.predict(&long, 5).unwrap_err().to_string();
    assert!(e.contains("context of 64"), "{e}");
    let bad = lm.model.ids_tensor(&[vec![1, 100_000]]).unwrap();
    let e = lm.model.logits(&bad).unwrap_err().to_string();
    assert!(e.contains("vocabulary"), "{e}");
}

#[test]
fn nan_weights_give_an_error_not_garbage() {
    let mut lm = load(&common::fixtures().join("tiny-gpt2")).unwrap();
    let w = lm.model.down_proj(1).unwrap().weight.clone();
    let nan = (w.ones_like().unwrap() * f64::NAN).unwrap();
    lm.model.set_down_proj_weight(1, nan).unwrap();
    let e = lm
        .predict("The Eiffel Tower is", 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN"), "{e}");
    let e = lm
        .model
        .set_down_proj_weight(1, w.narrow(0, 0, 2).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not match"), "{e}");
    assert!(lm.model.set_down_proj_weight(9, w).is_err());
}
