//! Shapes of well-known models (their Hugging Face configs), for random-weight benchmarks of models
//! whose weights are not at hand: GPT-2 small (the browser's model), GPT-2 XL (1.5B: more than a
//! browser worker's 4 GiB holds in f32) and GPT-J-6B (the GPU's).

use candle_core::{DType, Device};

use crate::config::ModelConfig;
use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::tokenizer::Tokenizer;

/// `(name, config.json)` of each preset.
pub const PRESETS: [(&str, &str); 3] = [
    ("gpt2", include_str!("../presets/gpt2.json")),
    ("gpt2-xl", include_str!("../presets/gpt2-xl.json")),
    ("gptj-6b", include_str!("../presets/gptj-6b.json")),
];

/// A small BPE tokenizer (512 tokens) for random models: ids fit any vocabulary; the compute of
/// a forward pass does not depend on which ids they are.
pub const BENCH_TOKENIZER: &[u8] = include_bytes!("../presets/bench-tokenizer.json");

/// The config of preset `name` (one of [`PRESETS`]); an error names the known presets.
pub fn preset_config(name: &str) -> Result<ModelConfig> {
    let (_, json) = PRESETS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        LociError::input(format!(
            "unknown preset {name:?} (known: {})",
            names.join(", ")
        ))
    })?;
    ModelConfig::from_hf_json(json)
}

/// A full-size model of a preset's shape with random weights, made on `device`.
pub fn random_model(name: &str, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let cfg = preset_config(name)?;
    LoadedModel::random(
        &format!("random-{name}"),
        &cfg,
        BENCH_TOKENIZER,
        dtype,
        device,
    )
}

/// A prompt of exactly `n` tokens and its subject under `tok` (words of a fixed sentence,
/// repeated as needed), so timings are comparable across runs and engines.
pub fn bench_prompt(tok: &Tokenizer, n: usize) -> Result<(String, String)> {
    let words = "The Space Needle is located in the city of Seattle in the state of Washington";
    let subject = "The Space Needle";
    let mut prompt = String::new();
    for w in words.split(' ').cycle().take(200) {
        let next = if prompt.is_empty() {
            w.to_string()
        } else {
            format!("{prompt} {w}")
        };
        if tok.encode(&next)?.len() > n {
            break;
        }
        prompt = next;
    }
    // Pad with single characters to hit n exactly.
    while tok.encode(&prompt)?.len() < n {
        prompt.push('.');
    }
    if tok.encode(&prompt)?.len() != n || !prompt.starts_with(subject) {
        return Err(LociError::input(format!("cannot make a {n}-token prompt")));
    }
    Ok((prompt, subject.to_string()))
}
