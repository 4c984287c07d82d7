//! `loci bench stats` (key statistics, the longest contexts Loci runs) and `loci bench matmul`
//! (the model's products one by one, each kernel against the peak).

use anyhow::{bail, Result};
use loci_core::kernels::gemm::Precision;
use serde::Serialize;

use super::peak::{self, counted, Peak, Speed};
use super::{compare_or_once, peak_rss_mib, print_json, threads, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct StatsBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 6)]
    layer: usize,
    /// Tokens of the corpus to read (texts of up to 1024 tokens, as ROME's statistics).
    #[arg(long, default_value_t = 20_000)]
    tokens: u64,
    #[arg(long)]
    corpus: Option<std::path::PathBuf>,
    /// Run on candle's reference kernels, then on Loci's, and print the ratio.
    #[arg(long)]
    compare: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct StatsBench {
    bench: &'static str,
    model: String,
    threads: usize,
    layer: usize,
    tokens: u64,
    seconds: f64,
    seconds_per_100k_tokens: f64,
    #[serde(flatten)]
    speed: Speed,
    peak: Peak,
    peak_rss_mib: Option<f64>,
}

pub fn stats_bench(a: StatsBenchArgs) -> Result<()> {
    if a.tokens == 0 {
        bail!("--tokens must be positive");
    }
    let corpus = crate::workspace::corpus_file(a.corpus.as_deref())?;
    let lm = a.model.load()?;
    let once = || -> Result<StatsBench> {
        let peak = peak::measure(&lm.model.device, lm.model.dtype, threads())?;
        let ((_, tokens), flops, seconds) = counted(|| key_stats(&lm, a.layer, &corpus, a.tokens))?;
        let r = StatsBench {
            bench: "stats",
            model: lm.name.clone(),
            threads: threads(),
            layer: a.layer,
            tokens,
            seconds,
            seconds_per_100k_tokens: seconds * 100_000.0 / tokens.max(1) as f64,
            speed: peak.speed(flops, seconds),
            peak,
            peak_rss_mib: peak_rss_mib(),
        };
        if !a.json {
            println!(
                "{}: {} tokens at layer {} in {:.1} s ({:.1} s per 100k), {:.0} GFLOP/s = {:.0}% of {:.0} by {}",
                r.model,
                r.tokens,
                r.layer,
                r.seconds,
                r.seconds_per_100k_tokens,
                r.speed.achieved_gflops,
                100.0 * r.speed.fraction_of_peak,
                r.speed.peak_gflops,
                r.speed.peak_kernel
            );
        }
        Ok(r)
    };
    compare_or_once(a.compare, a.json, |r: &StatsBench| r.seconds, once)
}

/// Key statistics of `layer` over `tokens` of `corpus` (texts of up to 1024 tokens), and the
/// tokens they saw: the work `bench stats` times, and `bench edit` before its edit.
pub fn key_stats(
    lm: &loci_core::LoadedModel,
    layer: usize,
    corpus: &std::path::Path,
    tokens: u64,
) -> Result<(loci_core::edit::KeyStats, u64)> {
    let mut acc = loci_core::edit::StatsAccumulator::new(lm, &[layer], 1024)?;
    crate::workspace::feed(&mut acc, lm, corpus, tokens, |_| true)?;
    let seen = acc.tokens();
    let stats = acc.finish(lm, &corpus.display().to_string())?.remove(0);
    Ok((stats, seen))
}

#[derive(clap::Args, Debug)]
pub struct MatmulBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Rows of each product (tokens × batch).
    #[arg(long, default_value_t = 256)]
    rows: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct ProductSpeed {
    name: &'static str,
    /// `[rows, in] · [in, out]`.
    shape: [usize; 3],
    candle_gflops: f64,
    blas_gflops: Option<f64>,
    /// Loci's AVX-512 kernel (`loci_core::kernels::gemm`), where the processor has it.
    loci_gflops: Option<f64>,
    /// The same in bf16 (`--products bf16`), where the processor has bf16 dot products.
    loci_bf16_gflops: Option<f64>,
    /// The kernel the passes use (Loci's where it runs, else candle's) against the peak.
    fraction_of_peak: f64,
}

#[derive(Serialize)]
struct MatmulBench {
    bench: &'static str,
    model: String,
    threads: usize,
    products: Vec<ProductSpeed>,
    peak: Peak,
}

/// The model's block maps and vocabulary head at `--rows` rows, timed with candle's kernel and
/// (for f32 on the CPU) the system BLAS with the same threads.
pub fn matmul_bench(a: MatmulBenchArgs) -> Result<()> {
    if a.rows == 0 {
        bail!("--rows must be positive");
    }
    let lm = a.model.load()?;
    let (c, dev, dtype) = (&lm.model.cfg, &lm.model.device, lm.model.dtype);
    let (d, q, kv) = (c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
    use loci_core::Family;
    let up = if matches!(c.family, Family::Llama | Family::Phi3 | Family::Gemma) {
        2 * c.d_ff
    } else {
        c.d_ff
    };
    let shapes = [
        ("qkv", d, q + 2 * kv),
        ("attn_out", q, d),
        ("mlp_up", d, up),
        ("mlp_down", c.d_ff, d),
        ("vocab_head", d, c.vocab_size),
    ];
    let peak = peak::measure(dev, dtype, threads())?;
    let blas = loci_core::blas::system().filter(|_| dev.is_cpu() && dtype == loci_core::DType::F32);
    if let Some(b) = blas {
        b.set_threads(threads());
    }
    let mut products = vec![];
    for (name, d_in, d_out) in shapes {
        let x = loci_core::Tensor::randn(0f32, 1.0, (a.rows, d_in), dev)?.to_dtype(dtype)?;
        let w = loci_core::Tensor::randn(0f32, 0.05, (d_out, d_in), dev)?.to_dtype(dtype)?;
        let flops = 2.0 * (a.rows * d_in * d_out) as f64;
        let candle = loci_core::kernels::best_gflops(flops, 0.5, || -> Result<()> {
            x.matmul(&w.t()?)?;
            dev.synchronize()?;
            Ok(())
        })?;
        let flat = |t: &loci_core::Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (loci_gflops, loci_bf16_gflops) = match dtype == loci_core::DType::F32 && dev.is_cpu() {
            true => {
                let (xs, ws, shape) = (flat(&x)?, flat(&w)?, [a.rows, d_in, d_out]);
                (
                    loci_product(&xs, &ws, shape, Precision::F32)?,
                    loci_product(&xs, &ws, shape, Precision::Bf16)?,
                )
            }
            false => (None, None),
        };
        let blas_gflops = match blas {
            Some(b) => {
                let (xs, ws) = (flat(&x)?, flat(&w)?);
                let mut out = vec![0f32; a.rows * d_out];
                Some(loci_core::kernels::best_gflops(
                    flops,
                    0.5,
                    || -> Result<()> {
                        b.matmul_bt(&xs, &ws, &mut out, a.rows, d_out, d_in);
                        Ok(())
                    },
                )?)
            }
            None => None,
        };
        products.push(ProductSpeed {
            name,
            shape: [a.rows, d_in, d_out],
            candle_gflops: candle,
            blas_gflops,
            loci_gflops,
            loci_bf16_gflops,
            // The kernel the passes use at these rows, in their precision.
            fraction_of_peak: match a.rows >= loci_core::kernels::gemm::MIN_ROWS {
                true => match loci_core::kernels::gemm::maps_precision() {
                    Precision::Bf16 => loci_bf16_gflops.or(loci_gflops).unwrap_or(candle),
                    Precision::F32 => loci_gflops.unwrap_or(candle),
                },
                false => candle,
            } / peak.peak_gflops,
        });
    }
    if let Some(b) = blas {
        b.set_threads(1);
    }
    let r = MatmulBench {
        bench: "matmul",
        model: lm.name.clone(),
        threads: threads(),
        products,
        peak,
    };
    if a.json {
        return print_json(&r);
    }
    println!(
        "{}: peak {:.0} GFLOP/s by {} ({} threads)",
        r.model, r.peak.peak_gflops, r.peak.peak_kernel, r.threads
    );
    for p in &r.products {
        println!(
            "  {:<10} {:?}: candle {:.0} GFLOP/s{}{}{} ({:.0}% of peak)",
            p.name,
            p.shape,
            p.candle_gflops,
            p.loci_gflops
                .map(|g| format!(", Loci {g:.0}"))
                .unwrap_or_default(),
            p.loci_bf16_gflops
                .map(|g| format!(", Loci bf16 {g:.0}"))
                .unwrap_or_default(),
            p.blas_gflops
                .map(|g| format!(", BLAS {g:.0}"))
                .unwrap_or_default(),
            100.0 * p.fraction_of_peak,
        );
    }
    Ok(())
}

/// The best speed of Loci's own kernel on `x · wᵀ` of `[rows, in, out]` in `precision` on the
/// process's threads, when it runs here.
fn loci_product(
    x: &[f32],
    w: &[f32],
    [rows, d_in, d_out]: [usize; 3],
    precision: Precision,
) -> Result<Option<f64>> {
    use loci_core::kernels::gemm::{product_in, runs_in, Lhs, Rhs};
    if !runs_in(precision) {
        return Ok(None);
    }
    let (lhs, rhs) = (Lhs::Plain(x), Rhs::Transposed(w));
    let threads = loci_core::kernels::kernel_threads();
    let flops = 2.0 * (rows * d_in * d_out) as f64;
    let gflops = loci_core::kernels::best_gflops(flops, 0.5, || -> Result<()> {
        drop(product_in(precision, lhs, rows, d_in, rhs, d_out, threads));
        Ok(())
    })?;
    Ok(Some(gflops))
}
