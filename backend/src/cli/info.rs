//! `loci info MODEL`: what a model is, read from its headers without loading its weights —
//! family and shapes, how its weights are stored (dtype or GGUF quantisation) and what loading
//! makes of them, the matrix edits rewrite, and the memory it needs on the CPU, a GPU and in a
//! browser tab.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use loci_core::config::ModelConfig;
use loci_core::model::describe::{edit_site, weight_bytes, EditSite};
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// A Hugging Face folder or a .gguf file (default: the fetched SmolLM2-135M).
    pub model: Option<PathBuf>,
    /// Print JSON instead of lines.
    #[arg(long)]
    pub json: bool,
}

/// Tensors stored in one type, and their bytes on disk.
#[derive(Serialize, Default)]
struct Stored {
    tensors: usize,
    bytes: u64,
}

/// What the weights take once loaded, in bytes.
#[derive(Serialize)]
struct Memory {
    /// On the CPU in f32 (the default `--dtype`).
    cpu_f32: u64,
    /// On a GPU in bf16 (`--dtype bf16`; f16 the same).
    gpu_bf16: u64,
    /// In a browser tab, which holds f32 weights in WebAssembly memory.
    tab_f32: u64,
    /// Whether they fit a tab: wasm32 addresses 4 GiB; Loci wants the weights under 2 GiB to
    /// leave room for activations, statistics and the edit's copies.
    fits_tab: bool,
}

#[derive(Serialize)]
struct Info {
    path: String,
    /// `"safetensors"` or `"gguf"`.
    format: &'static str,
    config: ModelConfig,
    params: usize,
    /// Tensors by stored type (`F32`, `BF16`, `Q4_K`, …).
    stored: BTreeMap<String, Stored>,
    /// What loading does to the stored weights.
    on_load: String,
    edit_site: EditSite,
    memory: Memory,
}

pub fn run(a: InfoArgs) -> Result<()> {
    let path = match a.model {
        Some(p) => p,
        None => crate::workspace::default_model()?,
    };
    let info = match loci_core::loader::gguf_path(&path) {
        Some(gguf) => gguf_info(&gguf)?,
        None => folder_info(&path)?,
    };
    if a.json {
        return super::print_json(&info);
    }
    print_lines(&info);
    Ok(())
}

fn gguf_info(path: &Path) -> Result<Info> {
    let (config, tensors) = loci_core::model::load::gguf_header(path)?;
    let mut stored: BTreeMap<String, Stored> = BTreeMap::new();
    for (t, bytes) in tensors {
        let s = stored.entry(t).or_default();
        s.tensors += 1;
        s.bytes += bytes;
    }
    let quantised: Vec<&String> = stored.keys().filter(|k| *k != "F32").collect();
    let on_load = format!(
        "every {} tensor dequantised to f32 (editing needs real matrices), then cast to --dtype",
        quantised
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(" / ")
    );
    Ok(describe(path, "gguf", config, stored, on_load))
}

fn folder_info(dir: &Path) -> Result<Info> {
    let text = std::fs::read_to_string(dir.join("config.json"))
        .with_context(|| format!("reading {}/config.json", dir.display()))?;
    let config = ModelConfig::from_hf_json(&text)?;
    let mut stored: BTreeMap<String, Stored> = BTreeMap::new();
    for file in loci_core::loader::safetensors_files(dir)? {
        for (dtype, count, bytes) in safetensors_types(&file)? {
            let s = stored.entry(dtype).or_default();
            s.tensors += count;
            s.bytes += bytes;
        }
    }
    let on_load = "weights kept in their stored dtype when --dtype names it, else converted \
                   (f32 by default); memory-mapped"
        .to_string();
    Ok(describe(dir, "safetensors", config, stored, on_load))
}

/// `(dtype, tensors, bytes)` of one safetensors file, from its JSON header.
fn safetensors_types(file: &Path) -> Result<Vec<(String, usize, u64)>> {
    let mut f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    anyhow::ensure!(len < 100 << 20, "{}: implausible header", file.display());
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .with_context(|| format!("{}: header is not JSON", file.display()))?;
    let mut by: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for (name, t) in v.as_object().into_iter().flatten() {
        if name == "__metadata__" {
            continue;
        }
        let dtype = t["dtype"].as_str().unwrap_or("?").to_string();
        let offsets = &t["data_offsets"];
        let (start, end) = (offsets[0].as_u64(), offsets[1].as_u64());
        let bytes = match (start, end) {
            (Some(s), Some(e)) if e >= s => e - s,
            _ => anyhow::bail!("{}: tensor {name} has bad data offsets", file.display()),
        };
        let e = by.entry(dtype).or_default();
        e.0 += 1;
        e.1 += bytes;
    }
    Ok(by.into_iter().map(|(d, (n, b))| (d, n, b)).collect())
}

fn describe(
    path: &Path,
    format: &'static str,
    config: ModelConfig,
    stored: BTreeMap<String, Stored>,
    on_load: String,
) -> Info {
    let f32 = weight_bytes(&config, 4);
    Info {
        path: path.display().to_string(),
        format,
        params: config.n_params(),
        stored,
        on_load,
        edit_site: edit_site(&config),
        memory: Memory {
            cpu_f32: f32,
            gpu_bf16: weight_bytes(&config, 2),
            tab_f32: f32,
            fits_tab: f32 < 2 << 30,
        },
        config,
    }
}

/// Bytes in GiB, or MiB below one GiB.
fn size(b: u64) -> String {
    let mib = b as f64 / (1u64 << 20) as f64;
    if mib < 1024.0 {
        format!("{mib:.1} MiB")
    } else {
        format!("{:.2} GiB", mib / 1024.0)
    }
}

/// The family's pieces that differ from its plain layout, in words.
fn pieces(c: &ModelConfig) -> Vec<String> {
    let q = &c.quirks;
    let mut out = vec![];
    let mut say = |on: bool, what: &str| {
        if on {
            out.push(what.to_string())
        }
    };
    say(q.parallel_residual, "attention and MLP in parallel");
    say(q.gelu_exact, "exact GELU");
    say(q.glu_gelu, "GeGLU");
    say(c.attn_bias, "q/k/v biases");
    say(q.attn_out_bias, "an output-projection bias");
    say(
        q.sandwich_norms,
        "norms on the attention's and MLP's outputs",
    );
    if let Some(s) = q.embed_scale {
        out.push(format!("embeddings × {s:.2}"));
    }
    if let Some(s) = q.query_pre_attn_scalar {
        out.push(format!("scores × {s}^-½"));
    }
    if let Some(cap) = q.attn_softcap {
        out.push(format!("scores capped at {cap}"));
    }
    if let Some(cap) = q.final_softcap {
        out.push(format!("logits capped at {cap}"));
    }
    out
}

fn print_lines(i: &Info) {
    let c = &i.config;
    println!("{} ({})", i.path, i.format);
    println!(
        "  family {}: {} layers, width {}, {} heads ({} key/value) of {}, MLP {}, vocabulary {}, \
         context {}",
        c.family.name(),
        c.n_layer,
        c.d_model,
        c.n_head,
        c.n_kv_head,
        c.head_dim,
        c.d_ff,
        c.vocab_size,
        c.max_positions
    );
    let rope = match &c.rope_scaling {
        Some(s) => format!(", scaled {s:?}"),
        None => String::new(),
    };
    println!(
        "  rotary {} of {} dimensions, base {}{rope}",
        c.rotary_dim, c.head_dim, c.rope_theta
    );
    if let Some(w) = c.sliding_window {
        let layers = (0..c.n_layer).filter(|&l| c.window_of(l).is_some()).count();
        println!(
            "  sliding window {w} positions on {layers} of {} layers",
            c.n_layer
        );
    }
    let pieces = pieces(c);
    if !pieces.is_empty() {
        println!("  pieces: {}", pieces.join(", "));
    }
    println!("  {:.1} M parameters", i.params as f64 / 1e6);
    for (t, s) in &i.stored {
        println!("  stored {t}: {} tensors, {}", s.tensors, size(s.bytes));
    }
    println!("  on load: {}", i.on_load);
    let e = &i.edit_site;
    let bias = if e.bias { ", with its bias" } else { "" };
    println!("  edits rewrite {}{bias}; its key is {}", e.matrix, e.key);
    let m = &i.memory;
    let tab = if m.fits_tab { "fits" } else { "too big for" };
    println!(
        "  weights: {} on the CPU (f32), {} on a GPU (bf16), {} in a tab (f32: {tab} a tab)",
        size(m.cpu_f32),
        size(m.gpu_bf16),
        size(m.tab_f32)
    );
}
