//! Hostile bytes for every parser that takes outside input: GGUF models, safetensors models and
//! their config, edit files, key-statistics files and CounterFact JSON. Real small files are cut
//! at every length of their header (and at spread points after it), have bits flipped and
//! words overwritten with extreme values, and proptest generates inputs besides. Whatever the
//! input, the parser never panics, never allocates more than the input can justify (a header
//! claiming 2⁴⁰ elements is refused before anything that size exists), and a refusal is an
//! error, not a crash.
//!
//! `LOCI_HOSTILE_CASES` sets the generated cases per parser (default 200; run with 100000 for a
//! long search). Every run prints how many cases it tried.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device};
use loci_core::LoadedModel;
use proptest::prelude::*;

/// The system allocator, noting the largest single allocation made while a thread watches.
struct Watching;

thread_local! {
    static WATCH: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = WATCH.try_with(|w| {
        if w.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

fn cases() -> u32 {
    std::env::var("LOCI_HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// A parse of outside bytes: whether it accepted them.
type Parse = Box<dyn Fn(&[u8]) -> bool>;

/// A parser under test: its name, the most a single allocation may take for an input of `n`
/// bytes, and the parse (whether it accepted the input).
struct Parser {
    name: &'static str,
    budget: fn(usize) -> usize,
    parse: Parse,
}

impl Parser {
    /// Parses `input`: no panic, no allocation beyond the budget.
    fn survives(&self, input: &[u8]) -> bool {
        LARGEST.with(|l| l.set(0));
        WATCH.with(|w| w.set(true));
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.parse)(input)));
        WATCH.with(|w| w.set(false));
        let largest = LARGEST.with(|l| l.get());
        let ok = out.unwrap_or_else(|_| panic!("{}: panicked on {} bytes", self.name, input.len()));
        let budget = (self.budget)(input.len());
        assert!(
            largest <= budget,
            "{}: allocated {largest} bytes at once for an input of {} (budget {budget})",
            self.name,
            input.len()
        );
        ok
    }
}

/// What the parsers meet: every cut of the first `head` bytes, 64 cuts after it, single bit
/// flips at spread positions, and words set to extreme values at aligned positions of the head.
fn mutations(file: &[u8], head: usize) -> Vec<Vec<u8>> {
    let head = head.min(file.len());
    let mut out: Vec<Vec<u8>> = (0..head).map(|n| file[..n].to_vec()).collect();
    for i in 0..64 {
        out.push(file[..head + (file.len() - head) * i / 64].to_vec());
    }
    for i in (0..file.len()).step_by((file.len() / 512).max(1)) {
        let mut f = file.to_vec();
        f[i] ^= 1 << (i % 8);
        out.push(f);
    }
    for at in (0..head.saturating_sub(8)).step_by(4) {
        for word in [u64::MAX, 1 << 40, u32::MAX as u64, 0] {
            let mut f = file.to_vec();
            f[at..at + 8].copy_from_slice(&word.to_le_bytes());
            out.push(f);
        }
    }
    out
}

/// Runs the fixed mutations of `file` and `cases()` generated ones through `p`; the case count.
fn search(p: &Parser, file: &[u8], head: usize) -> usize {
    assert!(p.survives(file), "{}: the real file is refused", p.name);
    let fixed = mutations(file, head);
    for m in &fixed {
        p.survives(m);
    }
    let generated = Cell::new(0);
    let config = ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let strategy = (
        proptest::collection::vec((0..file.len(), any::<u8>()), 1..8),
        0..=file.len(),
        proptest::collection::vec(any::<u8>(), 0..64),
    );
    proptest::test_runner::TestRunner::new(config)
        .run(&strategy, |(flips, cut, tail)| {
            let mut f = file.to_vec();
            for (at, byte) in flips {
                f[at] = byte;
            }
            f.truncate(cut);
            f.extend(tail);
            p.survives(&f);
            generated.set(generated.get() + 1);
            Ok(())
        })
        .unwrap();
    let n = 1 + fixed.len() + generated.get();
    eprintln!("{}: {n} cases", p.name);
    n
}

fn sixteen_times(n: usize) -> usize {
    16 * n + (1 << 20)
}

fn fixture(name: &str, file: &str) -> Vec<u8> {
    std::fs::read(common::fixtures().join(name).join(file)).unwrap()
}

/// tiny-llama as llama.cpp would write it: GGUF v3, its tensors under GGUF names (the norms
/// in f32, the rest in Q8_0), the architecture and the byte-level BPE tokenizer in metadata.
fn tiny_gguf() -> Vec<u8> {
    let lm = common::tiny("tiny-llama");
    let c = &lm.model.cfg;
    let tok: serde_json::Value =
        serde_json::from_slice(&fixture("tiny-llama", "tokenizer.json")).unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let merges: Vec<String> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::Array(p) => {
                format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap())
            }
            s => s.as_str().unwrap().to_string(),
        })
        .collect();
    let strings = |v: Vec<String>| {
        gguf_file::Value::Array(v.into_iter().map(gguf_file::Value::String).collect())
    };
    let u32v = |x: usize| gguf_file::Value::U32(x as u32);
    let metadata: Vec<(&str, gguf_file::Value)> = vec![
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("llama.block_count", u32v(c.n_layer)),
        ("llama.embedding_length", u32v(c.d_model)),
        ("llama.feed_forward_length", u32v(c.d_ff)),
        ("llama.attention.head_count", u32v(c.n_head)),
        ("llama.attention.head_count_kv", u32v(c.n_kv_head)),
        ("llama.context_length", u32v(c.max_positions)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-6),
        ),
        (
            "tokenizer.ggml.model",
            gguf_file::Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.tokens", strings(tokens)),
        ("tokenizer.ggml.merges", strings(merges)),
        ("tokenizer.ggml.eos_token_id", u32v(0)),
    ];
    let weights = candle_core::safetensors::load_buffer(
        &fixture("tiny-llama", "model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let gguf_name = |hf: &str| -> String {
        let fixed = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
        ];
        if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
            return g.to_string();
        }
        let rest = hf.strip_prefix("model.layers.").unwrap();
        let (layer, part) = rest.split_once('.').unwrap();
        let parts = [
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ];
        let module = part.strip_suffix(".weight").unwrap();
        let (_, g) = parts.iter().find(|(h, _)| *h == module).unwrap();
        format!("blk.{layer}.{g}.weight")
    };
    let tensors: HashMap<String, QTensor> = weights
        .iter()
        .map(|(name, t)| {
            let dtype = if t.rank() == 1 {
                GgmlDType::F32
            } else {
                GgmlDType::Q8_0
            };
            (gguf_name(name), QTensor::quantize(t, dtype).unwrap())
        })
        .collect();
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::Cursor::new(vec![]);
    gguf_file::write(&mut out, &md, &ts).unwrap();
    out.into_inner()
}

#[test]
fn gguf_models() {
    let file = tiny_gguf();
    let lm = LoadedModel::from_gguf_bytes("tiny", &file, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(lm.model.n_layer(), 4);
    let p = Parser {
        name: "GGUF model",
        // Q8_0 dequantises to f32: about four times the file.
        budget: sixteen_times,
        parse: Box::new(|b| LoadedModel::from_gguf_bytes("x", b, DType::F32, &Device::Cpu).is_ok()),
    };
    let header = file.len() - lm.model.n_layer() * 30_000;
    search(&p, &file, header.min(24_000));
    // A string that claims 2⁴⁰ bytes.
    let mut huge = file.clone();
    huge[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(!p.survives(&huge));
}

#[test]
fn safetensors_models_and_their_config() {
    let config = fixture("tiny-gpt2", "config.json");
    let tokenizer = fixture("tiny-gpt2", "tokenizer.json");
    let weights = fixture("tiny-gpt2", "model.safetensors");
    let load = |c: &[u8], w: &[u8]| {
        LoadedModel::from_hf_bytes(
            "x",
            c,
            &tokenizer,
            vec![w.to_vec()],
            DType::F32,
            &Device::Cpu,
        )
        .is_ok()
    };
    let (c2, t2) = (config.clone(), tokenizer.clone());
    let p = Parser {
        name: "safetensors model",
        budget: sixteen_times,
        parse: Box::new(move |w| {
            LoadedModel::from_hf_bytes("x", &c2, &t2, vec![w.to_vec()], DType::F32, &Device::Cpu)
                .is_ok()
        }),
    };
    let header = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    search(&p, &weights, header);
    // The config is outside input too: numbers made huge, fields cut.
    let w2 = weights.clone();
    let t3 = tokenizer.clone();
    let q = Parser {
        name: "model config",
        budget: |_| sixteen_times(1 << 20),
        parse: Box::new(move |c| {
            LoadedModel::from_hf_bytes("x", c, &t3, vec![w2.clone()], DType::F32, &Device::Cpu)
                .is_ok()
        }),
    };
    search(&q, &config, config.len());
    let text = String::from_utf8(config.clone()).unwrap();
    for key in ["n_positions", "n_embd", "n_layer", "n_head", "vocab_size"] {
        for huge in ["1099511627776", "4294967296", "0", "-1", "1e300"] {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let mut v = v.as_object().unwrap().clone();
            v.insert(key.into(), serde_json::from_str(huge).unwrap());
            let bad = serde_json::to_vec(&v).unwrap();
            assert!(!q.survives(&bad), "{key} = {huge} accepted");
        }
    }
    assert!(load(&config, &weights));
}

#[test]
fn edit_and_statistics_files() {
    let lm = common::tiny("tiny-gpt2");
    let stats = common::key_stats(&lm, &[1], 3, 32).remove(0);
    let stats_file = stats.to_bytes().unwrap();
    let p = Parser {
        name: "key statistics file",
        budget: sixteen_times,
        parse: Box::new(|b| loci_core::edit::KeyStats::from_bytes(b).is_ok()),
    };
    search(&p, &stats_file, 1024);

    let rome = loci_core::edit::Edit::Rome(loci_core::edit::RomeEdit {
        layer: 1,
        left: (0..lm.model.cfg.d_ff).map(|i| i as f32 * 1e-3).collect(),
        right: (0..lm.model.cfg.d_model).map(|i| i as f32 * 1e-2).collect(),
        request: common::request("{} is in", "Paris", "Rome", "France"),
        hparams: loci_core::edit::RomeHparams::at_layer(1),
        stats: Default::default(),
    });
    let edit_file = rome.to_file(&lm).unwrap();
    let mut target = lm.clone();
    let q = Parser {
        name: "edit file",
        budget: sixteen_times,
        parse: Box::new(move |b| loci_core::edit::Edit::from_bytes(b).is_ok()),
    };
    search(&q, &edit_file, 2048);
    // Applying what parses changes nothing unless it applies whole.
    let original = common::down_bits(&target);
    for m in mutations(&edit_file, 512) {
        if let Ok((_, a)) = target.apply_file(&m) {
            target.undo_edit(a).unwrap();
        }
        assert_eq!(common::down_bits(&target), original);
    }
}

#[test]
fn counterfact_json() {
    let path =
        common::root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json");
    let all: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let two = serde_json::to_vec(&all.as_array().unwrap()[..2]).unwrap();
    let p = Parser {
        name: "CounterFact JSON",
        budget: sixteen_times,
        parse: Box::new(|b| {
            serde_json::from_slice::<Vec<loci_core::eval::CounterFactCase>>(b).is_ok()
        }),
    };
    search(&p, &two, two.len());
}
