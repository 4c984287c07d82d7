//! The models match the reference implementation (transformers) on committed golden fixtures.

mod common;

use candle_core::{DType, Device};
use loci_core::hooks::Capture;
use loci_core::{LoadedModel, LogitsAt, Site};

fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f32, f32::max)
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(floats).collect(),
        x => vec![x.as_f64().unwrap() as f32],
    }
}

fn check_tiny(name: &str) {
    let dir = common::fixture(name);
    let lm = LoadedModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let exp = common::read_json(&dir.with_file_name(format!("{name}.expected.json")));
    assert_eq!(exp["family"], lm.model.cfg.family.name());
    for (i, rec) in exp["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = rec["prompt"].as_str().unwrap();
        let ids: Vec<u32> = rec["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            lm.tokenizer.encode(prompt).unwrap(),
            ids,
            "{name}: tokenization of {prompt:?}"
        );
        let t = lm.model.ids_tensor(std::slice::from_ref(&ids)).unwrap();
        let blocks = (0..lm.model.n_layer()).map(Site::Block);
        let mut cap = Capture::new(blocks.chain([Site::MlpKey(1)]));
        let logits = lm
            .model
            .run(&t, &mut cap, None, LogitsAt::All)
            .unwrap()
            .unwrap();
        let got = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let err = max_rel_err(&got, &floats(&rec["logits"]));
        assert!(
            err < 1e-4,
            "{name} prompt {i}: logits differ from transformers by {err}"
        );
        if let Some(top) = rec.get("top_ids") {
            let last = logits.get(0).unwrap().get(ids.len() - 1).unwrap();
            let mut order: Vec<(usize, f32)> = last
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .enumerate()
                .collect();
            order.sort_by(|a, b| b.1.total_cmp(&a.1));
            let want: Vec<usize> = top
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            let got: Vec<usize> = order.iter().take(5).map(|x| x.0).collect();
            assert_eq!(got, want, "{name} prompt {i}: top-5");
        }
        if i == 0 {
            let mut sites = vec![
                (Site::Block(0), "block0".to_string()),
                (Site::MlpKey(1), "mlp_key1".into()),
            ];
            // Newer fixtures record every block's output.
            let every = rec
                .get("blocks")
                .and_then(|b| b.as_array())
                .map_or(0, Vec::len);
            sites.extend((0..every).map(|l| (Site::Block(l), format!("blocks.{l}"))));
            for (site, key) in sites {
                let got = cap
                    .get(site)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let want = match key.split_once('.') {
                    Some((_, l)) => floats(&rec["blocks"][l.parse::<usize>().unwrap()]),
                    None => floats(&rec[key.as_str()]),
                };
                let err = max_rel_err(&got, &want);
                assert!(err < 1e-4, "{name}: {key} differs by {err}");
            }
        }
    }
}

#[test]
fn tiny_gpt2_matches_transformers() {
    check_tiny("tiny-gpt2");
}

#[test]
fn tiny_gptj_matches_transformers() {
    check_tiny("tiny-gptj");
}

#[test]
fn tiny_llama_matches_transformers() {
    check_tiny("tiny-llama");
}

#[test]
fn tiny_neox_parallel_and_partial_rotary_matches_transformers() {
    check_tiny("tiny-neox");
}

#[test]
fn tiny_neox_sequential_matches_transformers() {
    check_tiny("tiny-neox-sequential");
}

#[test]
fn tiny_llama3_rope_scaling_matches_transformers() {
    check_tiny("tiny-llama3");
}

#[test]
fn tiny_qwen2_biases_yarn_and_upper_layer_window_match_transformers() {
    check_tiny("tiny-qwen2");
}

#[test]
fn tiny_mistral_sliding_window_and_linear_rope_match_transformers() {
    check_tiny("tiny-mistral");
}

#[test]
fn tiny_phi3_fused_matrices_partial_rotary_and_window_match_transformers() {
    check_tiny("tiny-phi3");
}

#[test]
fn tiny_gemma_norms_geglu_and_scaled_embeddings_match_transformers() {
    check_tiny("tiny-gemma");
}

#[test]
fn tiny_gemma2_sandwich_norms_softcaps_and_alternating_windows_match_transformers() {
    check_tiny("tiny-gemma2");
}

#[test]
fn batched_rows_equal_single_runs_and_cache_equals_full_pass() {
    let lm = LoadedModel::load(
        &common::fixtures().join("tiny-gptj"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let a = lm.tokenizer.encode("The Eiffel Tower is in").unwrap();
    let b: Vec<u32> = a.iter().rev().copied().collect();
    let both = lm.model.ids_tensor(&[a.clone(), b.clone()]).unwrap();
    let batched = lm.model.logits(&both).unwrap();
    for (row, ids) in [a.clone(), b].into_iter().enumerate() {
        let single = lm
            .model
            .logits(&lm.model.ids_tensor(&[ids]).unwrap())
            .unwrap();
        let diff = (batched.get(row).unwrap() - single.get(0).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    }
    // Incremental decoding with the KV cache gives the full pass's last logits.
    let full = lm
        .model
        .logits(&lm.model.ids_tensor(std::slice::from_ref(&a)).unwrap())
        .unwrap();
    let mut cache = loci_core::KvCache::default();
    let n = a.len();
    let head = lm.model.ids_tensor(&[a[..n - 2].to_vec()]).unwrap();
    lm.model
        .run(
            &head,
            &mut loci_core::NoHook,
            Some(&mut cache),
            LogitsAt::Last,
        )
        .unwrap();
    let tail = lm.model.ids_tensor(&[a[n - 2..].to_vec()]).unwrap();
    let last = lm
        .model
        .run(
            &tail,
            &mut loci_core::NoHook,
            Some(&mut cache),
            LogitsAt::Last,
        )
        .unwrap()
        .unwrap();
    let diff = (last.get(0).unwrap() - full.get(0).unwrap().get(n - 1).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
}

fn check_smol(lm: &LoadedModel) {
    let exp = common::read_json(&common::fixtures().join("smollm2.expected.json"));
    for rec in exp["prompts"].as_array().unwrap() {
        let prompt = rec["prompt"].as_str().unwrap();
        let ids: Vec<u32> = rec["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            lm.tokenizer.encode(prompt).unwrap(),
            ids,
            "tokenization of {prompt:?}"
        );
        let pred = lm.predict(prompt, 5).unwrap();
        let want_ids: Vec<u32> = rec["top_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let want_p = floats(&rec["top_probs"]);
        assert_eq!(pred.top[0].id, want_ids[0], "{prompt:?}: top-1");
        for (tp, (id, p)) in pred.top.iter().zip(want_ids.iter().zip(&want_p)) {
            if tp.id == *id {
                assert!(
                    (tp.prob - p).abs() < 1e-3,
                    "{prompt:?}: p({}) = {} vs {p}",
                    tp.token,
                    tp.prob
                );
            }
        }
        let probs = lm.next_probs(&ids).unwrap();
        for (id, p) in want_ids.iter().zip(&want_p) {
            assert!(
                (probs[*id as usize] - p).abs() < 1e-3,
                "{prompt:?}: p[{id}]"
            );
        }
    }
    for rec in exp["tokenizer"].as_array().unwrap() {
        let text = rec["text"].as_str().unwrap();
        let ids: Vec<u32> = rec["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            lm.tokenizer.encode(text).unwrap(),
            ids,
            "tokenization of {text:?}"
        );
    }
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let Some(lm) = common::smol() else { return };
    check_smol(lm);
    let p = lm
        .predict("The Eiffel Tower is located in the city of", 1)
        .unwrap();
    assert_eq!(p.top[0].token, " Paris");
}

#[test]
fn smollm2_hf_folder_round_trip_matches_transformers() {
    let Some(lm) = common::smol() else { return };
    let dir = std::env::temp_dir().join(format!("loci-smol-hf-{}", std::process::id()));
    lm.save_hf_folder(&dir).unwrap();
    let back = LoadedModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.model.cfg, lm.model.cfg);
    check_smol(&back);
    std::fs::remove_dir_all(&dir).ok();
}
