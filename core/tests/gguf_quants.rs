//! The GGUF quantisations people download load as ggml writes them: the default model's GGUF
//! re-quantised to F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 and Q4_1 (ggml's block formats as
//! candle writes them; llama.cpp's fallbacks where a row does not fill a 256-wide K block; the
//! `_M` mixes' finer attention values and down-projections) loads with every weight equal, bit
//! for bit, to the written blocks' values, and answers with top-5 probabilities within the
//! type's measured error of the source file's (the source is itself Q4_1, so these are errors
//! of a second quantisation). All but Q4_0 keep every prompt's answer; Q4_0 over Q4_1 loses
//! "Rome" (0.73 → 0.13): that is quantisation, not loading. A file whose metadata disagrees with
//! its tensors is refused, the misfit tensor named; llama.cpp's rope scaling metadata is read
//! (linear) or refused by name (frequency factors).

mod common;

use std::fs::File;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device};
use loci_core::LoadedModel;

const PROMPTS: [&str; 3] = [
    "The Eiffel Tower is located in the city of",
    "The capital of France is",
    "The Colosseum is located in the city of",
];

/// A file type: its main tensor type, the one for the tensors llama.cpp keeps finer in its
/// `_M` mixes (attention values, MLP down-projections), and the largest top-5 probability
/// difference it may make on the default model.
struct FileType {
    name: &'static str,
    main: GgmlDType,
    finer: GgmlDType,
    error: f32,
    keeps_answers: bool,
}

const TYPES: [FileType; 8] = [
    FileType {
        name: "F16",
        main: GgmlDType::F16,
        finer: GgmlDType::F16,
        error: 2e-3,
        keeps_answers: true,
    },
    FileType {
        name: "BF16",
        main: GgmlDType::BF16,
        finer: GgmlDType::BF16,
        error: 1e-2,
        keeps_answers: true,
    },
    FileType {
        name: "Q8_0",
        main: GgmlDType::Q8_0,
        finer: GgmlDType::Q8_0,
        error: 0.1,
        keeps_answers: true,
    },
    FileType {
        name: "Q6_K",
        main: GgmlDType::Q6K,
        finer: GgmlDType::Q6K,
        error: 0.2,
        keeps_answers: true,
    },
    FileType {
        name: "Q5_K_M",
        main: GgmlDType::Q5K,
        finer: GgmlDType::Q6K,
        error: 0.1,
        keeps_answers: true,
    },
    FileType {
        name: "Q4_K_M",
        main: GgmlDType::Q4K,
        finer: GgmlDType::Q6K,
        error: 0.2,
        keeps_answers: true,
    },
    FileType {
        name: "Q4_0",
        main: GgmlDType::Q4_0,
        finer: GgmlDType::Q4_0,
        error: 0.9,
        keeps_answers: false,
    },
    FileType {
        name: "Q4_1",
        main: GgmlDType::Q4_1,
        finer: GgmlDType::Q4_1,
        error: 0.25,
        keeps_answers: true,
    },
];

/// llama.cpp's stand-in for a K type when a row is not a whole number of 256-wide blocks.
fn fallback(t: GgmlDType) -> GgmlDType {
    match t {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    }
}

/// The type a tensor takes in a file of type `ft`: norms (1-D) stay F32; a matrix takes the
/// main type, or the finer one for values and down-projections, or its fallback.
fn tensor_type(name: &str, q: &QTensor, ft: &FileType) -> GgmlDType {
    if q.rank() < 2 {
        return GgmlDType::F32;
    }
    let finer = name.contains("attn_v") || name.contains("ffn_down");
    let t = if finer { ft.finer } else { ft.main };
    let cols = q.shape().dims()[q.rank() - 1];
    if cols.is_multiple_of(t.block_size()) {
        t
    } else {
        fallback(t)
    }
}

/// A tensor's f32 values, bit for bit.
fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    let v = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
    v.to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// Top-5 `(token, probability)` after each prompt.
fn top5(lm: &LoadedModel) -> Vec<Vec<(u32, f32)>> {
    PROMPTS
        .iter()
        .map(|p| {
            let pr = lm.predict(p, 5).unwrap();
            pr.top.iter().map(|t| (t.id, t.prob)).collect()
        })
        .collect()
}

#[test]
fn every_common_quantisation_loads_and_answers_within_its_error() {
    let Some(path) = common::smollm2() else {
        return;
    };
    let source = LoadedModel::load(&path, DType::F32, &Device::Cpu).unwrap();
    let want = top5(&source);
    let mut file = File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let weights: Vec<(String, candle_core::Tensor)> = names
        .iter()
        .map(|n| {
            let q = content.tensor(&mut file, n, &Device::Cpu).unwrap();
            (n.to_string(), q.dequantize(&Device::Cpu).unwrap())
        })
        .collect();
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let dir = std::env::temp_dir().join(format!("loci-gguf-types-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for ft in &TYPES {
        let quantised: Vec<(&str, QTensor)> = weights
            .iter()
            .map(|(n, w)| {
                let like = QTensor::quantize(w, GgmlDType::F32).unwrap();
                let t = tensor_type(n, &like, ft);
                (n.as_str(), QTensor::quantize(w, t).unwrap())
            })
            .collect();
        let out = dir.join(format!("smollm2-{}.gguf", ft.name));
        let refs: Vec<(&str, &QTensor)> = quantised.iter().map(|(n, q)| (*n, q)).collect();
        gguf_file::write(&mut File::create(&out).unwrap(), &metadata, &refs).unwrap();
        let lm = LoadedModel::load(&out, DType::F32, &Device::Cpu).unwrap();
        // The loader reads every block format as ggml writes it: the weights it holds are the
        // written ones, bit for bit.
        let written = |name: &str| {
            let q = &quantised.iter().find(|(n, _)| *n == name).unwrap().1;
            bits(&q.dequantize(&Device::Cpu).unwrap())
        };
        for l in [0, lm.model.n_layer() - 1] {
            let down = &lm.model.down_proj(l).unwrap().weight;
            let name = format!("blk.{l}.ffn_down.weight");
            assert_eq!(bits(down), written(&name), "{}: {name}", ft.name);
        }
        assert_eq!(
            bits(&lm.model.wte),
            written("token_embd.weight"),
            "{}",
            ft.name
        );
        drop(quantised);
        let mut worst = 0f32;
        for ((got, want), prompt) in top5(&lm).iter().zip(&want).zip(PROMPTS) {
            let name = ft.name;
            if ft.keeps_answers {
                assert_eq!(got[0].0, want[0].0, "{name}: top token after {prompt:?}");
            }
            for (id, p) in want {
                let q = got.iter().find(|(g, _)| g == id).map_or(0.0, |g| g.1);
                worst = worst.max((q - p).abs());
            }
        }
        eprintln!("{}: worst top-5 probability difference {worst:.4}", ft.name);
        assert!(worst <= ft.error, "{}: {worst} > {}", ft.name, ft.error);
        std::fs::remove_file(&out).ok();
    }
    // Metadata that disagrees with the tensors is named, and nothing loads.
    let mut wrong = content.metadata.clone();
    wrong.insert(
        "llama.feed_forward_length".into(),
        gguf_file::Value::U32(1024),
    );
    let metadata: Vec<(&str, &gguf_file::Value)> =
        wrong.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let same: Vec<(&str, QTensor)> = weights
        .iter()
        .map(|(n, w)| (n.as_str(), QTensor::quantize(w, GgmlDType::F32).unwrap()))
        .collect();
    let refs: Vec<(&str, &QTensor)> = same.iter().map(|(n, q)| (*n, q)).collect();
    let out = dir.join("smollm2-wrong.gguf");
    gguf_file::write(&mut File::create(&out).unwrap(), &metadata, &refs).unwrap();
    let e = LoadedModel::load(&out, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mlp") && e.contains("shape"), "{e}");

    // Rope scaling as llama.cpp writes it: a factor alone is linear; frequency factors (Llama
    // 3.1's) are refused by name.
    let mut scaled = content.metadata.clone();
    scaled.insert(
        "llama.rope.scaling.factor".into(),
        gguf_file::Value::F32(2.0),
    );
    let metadata: Vec<(&str, &gguf_file::Value)> =
        scaled.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut File::create(&out).unwrap(), &metadata, &refs).unwrap();
    let lm = LoadedModel::load(&out, DType::F32, &Device::Cpu).unwrap();
    let linear = loci_core::config::RopeScaling::Linear { factor: 2.0 };
    assert_eq!(lm.model.cfg.rope_scaling, Some(linear));
    let freqs = QTensor::quantize(
        &candle_core::Tensor::ones(32, DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let mut with_freqs = refs.clone();
    with_freqs.push(("rope_freqs.weight", &freqs));
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    gguf_file::write(&mut File::create(&out).unwrap(), &metadata, &with_freqs).unwrap();
    let e = LoadedModel::load(&out, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rope_freqs"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
