//! The other ways in: sharded checkpoints, bytes (the browser), half precision.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use loci_core::LoadedModel;

fn last_logits(lm: &LoadedModel, prompt: &str) -> Vec<f32> {
    let ids = lm.tokenizer.encode(prompt).unwrap();
    let t = lm.model.ids_tensor(&[ids]).unwrap();
    lm.model
        .run(&t, &mut loci_core::NoHook, None, loci_core::LogitsAt::Last)
        .unwrap()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

const PROMPT: &str = "The Eiffel Tower is located in the city of";

#[test]
fn a_sharded_checkpoint_loads_like_a_single_file() {
    let src = common::fixtures().join("tiny-gptj");
    let whole = LoadedModel::load(&src, DType::F32, &Device::Cpu).unwrap();
    let dir = std::env::temp_dir().join(format!("loci-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let part: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), serde_json::json!(file));
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let sharded = LoadedModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(last_logits(&whole, PROMPT), last_logits(&sharded, PROMPT));

    // A missing shard is named, and nothing loads.
    let second = dir.join("model-00002-of-00002.safetensors");
    let kept = std::fs::read(&second).unwrap();
    std::fs::remove_file(&second).unwrap();
    let e = LoadedModel::load(&dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    std::fs::write(&second, kept).unwrap();

    // An index that points outside the folder is refused.
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": {"lm_head.weight": "../../etc/passwd"}}).to_string(),
    )
    .unwrap();
    let e = LoadedModel::load(&dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad shard name"), "{e}");
}

/// The model in folder `src` loaded from its files' bytes, as a browser tab loads it.
fn from_bytes(src: &std::path::Path, name: &str) -> LoadedModel {
    let read = |f: &str| std::fs::read(src.join(f)).unwrap();
    LoadedModel::from_hf_bytes(
        name,
        &read("config.json"),
        &read("tokenizer.json"),
        vec![read("model.safetensors")],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// Every family loads from bytes (the tab's way) as from its files.
#[test]
fn every_family_loads_from_bytes_as_in_the_browser() {
    for name in ["tiny-neox", "tiny-qwen2", "tiny-phi3", "tiny-gemma2"] {
        let src = common::fixture(name);
        let from_bytes = from_bytes(&src, name);
        let from_files = LoadedModel::load(&src, DType::F32, &Device::Cpu).unwrap();
        let (a, b) = (
            last_logits(&from_files, PROMPT),
            last_logits(&from_bytes, PROMPT),
        );
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn models_load_from_bytes_as_in_the_browser() {
    let src = common::fixtures().join("tiny-llama");
    let read = |f: &str| std::fs::read(src.join(f)).unwrap();
    let from_files = LoadedModel::load(&src, DType::F32, &Device::Cpu).unwrap();
    let from_bytes = from_bytes(&src, "tiny-llama");
    assert_eq!(
        last_logits(&from_files, PROMPT),
        last_logits(&from_bytes, PROMPT)
    );
    // The same fingerprint either way: statistics `loci stats` makes fit the tab's copy.
    assert_eq!(from_files.info.fingerprint, from_bytes.info.fingerprint);
    let other = LoadedModel::load(
        &common::fixtures().join("tiny-gpt2"),
        DType::F32,
        &Device::Cpu,
    );
    assert_ne!(other.unwrap().info.fingerprint, from_files.info.fingerprint);
    let e = LoadedModel::from_hf_bytes(
        "x",
        &read("config.json"),
        &read("tokenizer.json"),
        vec![vec![1, 2, 3]],
        DType::F32,
        &Device::Cpu,
    );
    assert!(e.is_err());

    if let Some(gguf) = common::smollm2() {
        let bytes = std::fs::read(&gguf).unwrap();
        let lm = LoadedModel::from_gguf_bytes("smollm2", &bytes, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(lm.predict(PROMPT, 1).unwrap().top[0].token, " Paris");
        let on_disk = LoadedModel::load(&gguf, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(lm.info.fingerprint, on_disk.info.fingerprint);
    }
}

#[test]
fn half_precision_stays_close_to_f32() {
    for name in common::every_family() {
        let src = common::fixture(name);
        let full = last_logits(
            &LoadedModel::load(&src, DType::F32, &Device::Cpu).unwrap(),
            PROMPT,
        );
        let scale = full.iter().fold(0f32, |m, x| m.max(x.abs()));
        for dtype in [DType::F16, DType::BF16] {
            let lm = LoadedModel::load(&src, dtype, &Device::Cpu).unwrap();
            assert_eq!(lm.model.dtype, dtype);
            let half = last_logits(&lm, PROMPT);
            let err = full
                .iter()
                .zip(&half)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
                / scale;
            // Gemma-2's logits are capped to ±3 here: the same error reads larger against them.
            let (f16, bf16) = match name {
                "tiny-gemma2" => (2e-2, 1e-1),
                _ => (6e-3, 5e-2),
            };
            let tol = if dtype == DType::F16 { f16 } else { bf16 };
            assert!(err < tol, "{name} {dtype:?}: relative error {err}");
        }
    }
}
