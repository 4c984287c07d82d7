//! Speed lives here, never in tests: each benchmark prints one JSON object with --json.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Subcommand;
use loci_core::NoHook;
use serde::Serialize;

use super::{print_json, ModelArgs};

mod attribution;
mod batch;
mod kernels;
mod known;
mod methods;
mod neurons;
mod peak;
mod study;

use peak::{counted, Peak, Speed};

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Forward passes over N tokens: tokens per second and peak memory.
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        /// Timed repetitions (after one warm-up).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Run on candle's reference kernels, then on Loci's, and print the ratio.
        #[arg(long)]
        compare: bool,
        #[arg(long)]
        json: bool,
    },
    /// Key statistics and one ROME edit (Eiffel Tower → Rome): seconds per phase; with
    /// --methods, every method's sequence of --edits edits too: edits per second and memory.
    Edit(Box<EditBenchArgs>),
    /// Key statistics over N tokens of the corpus at one layer.
    Stats(kernels::StatsBenchArgs),
    /// The model's matrix products at one batch size, with candle's kernel and the system BLAS,
    /// against this machine's peak.
    Matmul(kernels::MatmulBenchArgs),
    /// The study's edits per hour on CounterFact cases, one at a time and batched (their v*
    /// optimised together), in one run.
    Study(Box<study::StudyBenchArgs>),
    /// The same requests (different known facts) one at a time and batched as the server
    /// batches them (predictions in one pass, generations decoded together), in one run:
    /// requests per second each way and the ratio.
    Batch(batch::BatchBenchArgs),
    /// Causal tracing on a ~10-token prompt, each kind alone and all three in one trace:
    /// seconds, and the work done against the reference algorithm's.
    Trace(TraceBenchArgs),
}

/// What `loci bench trace` traces.
#[derive(clap::Args, Debug)]
pub struct TraceBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "The Eiffel Tower is located in the city of")]
    prompt: String,
    #[arg(long, default_value = "Eiffel Tower")]
    subject: String,
    #[arg(long, default_value_t = 10)]
    samples: usize,
    #[arg(long, default_value_t = 10)]
    window: usize,
    /// With --random: a prompt of this many tokens.
    #[arg(long, default_value_t = 10)]
    prompt_tokens: usize,
    /// Also trace the first N bundled known facts the model predicts right both exactly and
    /// by attribution patching: the speed-up, and Pearson's r of the grids per kind.
    #[arg(long)]
    attribution: Option<usize>,
    /// Also localise the first N bundled known facts the model predicts right by MLP tracing
    /// and by knowledge neurons: their costs, and Spearman's ρ of the per-layer effects.
    #[arg(long)]
    neurons: Option<usize>,
    /// Points of the integrated-gradient path with --neurons (Dai et al.'s 20).
    #[arg(long, default_value_t = 20)]
    neuron_steps: usize,
    /// Run on candle's reference kernels, then on Loci's, and print the ratio.
    #[arg(long)]
    compare: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct EditBench {
    bench: &'static str,
    model: String,
    threads: usize,
    layer: usize,
    stats_tokens: u64,
    stats_seconds: f64,
    stats_seconds_per_100k_tokens: f64,
    edit_seconds: f64,
    edit_phases: std::collections::BTreeMap<String, f64>,
    v_steps: usize,
    p_new_after: f32,
    /// The edit's work against the peak.
    #[serde(flatten)]
    speed: Speed,
    /// The statistics' work against the peak.
    stats_speed: Speed,
    peak: Peak,
    peak_rss_mib: Option<f64>,
    /// With --methods: each method's sequence of edits.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    methods: Vec<methods::MethodBench>,
}

#[derive(Serialize)]
struct TraceBench {
    bench: &'static str,
    model: String,
    device: String,
    threads: usize,
    tokens: usize,
    samples: usize,
    window: usize,
    /// Each kind traced alone.
    seconds: std::collections::BTreeMap<String, f64>,
    /// All kinds in one trace.
    seconds_all_kinds: f64,
    token_layers: u64,
    naive_token_layers: u64,
    gflop: f64,
    naive_gflop: f64,
    work_ratio: f64,
    gflop_per_second: f64,
    /// All kinds' trace against the peak (FLOPs counted from the shapes computed, attention
    /// and the vocabulary head included).
    #[serde(flatten)]
    speed: Speed,
    peak: Peak,
    peak_rss_mib: Option<f64>,
    /// With --attribution N: exact tracing against attribution patching on N known facts.
    #[serde(skip_serializing_if = "Option::is_none")]
    attribution: Option<attribution::AttributionBench>,
    /// With --neurons N: MLP tracing against knowledge neurons on N known facts.
    #[serde(skip_serializing_if = "Option::is_none")]
    neurons: Option<neurons::NeuronsBench>,
}

#[derive(clap::Args, Debug)]
pub struct EditBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 6)]
    layer: usize,
    /// Tokens of key statistics to time (the edit then uses them).
    #[arg(long, default_value_t = 20_000)]
    stats_tokens: u64,
    #[arg(long)]
    corpus: Option<std::path::PathBuf>,
    /// Also time each of these methods making --edits edits in sequence (comma-separated:
    /// rome, memit, alphaedit, emmet, ft; or all), around --layer.
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// Edits in each method's sequence.
    #[arg(long, default_value_t = 10)]
    edits: usize,
    /// The MEMIT family's settings, each given to the methods it belongs to.
    #[command(flatten)]
    rule: crate::workspace::RuleSettings,
    /// Run on candle's reference kernels, then on Loci's, and print the ratio.
    #[arg(long)]
    compare: bool,
    #[arg(long)]
    json: bool,
}

/// The methods `--methods` names (`all`: every one).
fn edit_methods(names: &[String]) -> Result<Vec<loci_core::edit::EditMethod>> {
    if names.iter().any(|n| n == "all") {
        return Ok(loci_core::edit::EditMethod::ALL.to_vec());
    }
    names.iter().map(|n| Ok(n.parse()?)).collect()
}

fn edit_bench(a: EditBenchArgs) -> Result<()> {
    let json = a.json;
    compare_or_once(
        a.compare,
        json,
        |r: &EditBench| r.edit_seconds,
        || edit_once(&a),
    )
}

fn edit_once(a: &EditBenchArgs) -> Result<EditBench> {
    use loci_core::edit::{RewriteRequest, RomeHparams, TargetStr};
    // The corpus is checked before the (possibly 6B-parameter) model is made.
    let corpus = crate::workspace::corpus_file(a.corpus.as_deref())?;
    let methods = edit_methods(&a.methods)?;
    let mut lm = a.model.load()?;
    let peak = peak::measure(&lm.model.device, lm.model.dtype, threads())?;
    let ((stats, tokens), stats_flops, stats_seconds) =
        counted(|| kernels::key_stats(&lm, a.layer, &corpus, a.stats_tokens))?;
    let mut req =
        RewriteRequest::from_prompt("{} is located in the city of", "Eiffel Tower", "Rome")?;
    req.target_true = Some(TargetStr::new("Paris"));
    let hp = RomeHparams::at_layer(a.layer);
    let ((edit, applied), flops, edit_seconds) = counted(|| {
        let edit = lm.rome(&req, &hp, Some(&stats))?;
        let applied = lm.apply_edit(&edit)?;
        Ok((edit, applied))
    })?;
    let p_new_after = lm.target_prob(&req.filled(), "Rome")?;
    lm.undo_edit(applied)?;
    let peak_rss = peak_rss_mib();
    let at = (a.edits, a.layer);
    let which = (&methods[..], &a.rule);
    let methods = methods::run(&mut lm, which, at, (&corpus, a.stats_tokens), &peak)?;
    let r = EditBench {
        bench: "edit",
        model: lm.name.clone(),
        threads: threads(),
        layer: a.layer,
        stats_tokens: tokens,
        stats_seconds,
        stats_seconds_per_100k_tokens: stats_seconds * 100_000.0 / tokens.max(1) as f64,
        edit_seconds,
        edit_phases: edit.stats.seconds.clone(),
        v_steps: edit.stats.losses.len(),
        p_new_after,
        speed: peak.speed(flops, edit_seconds),
        stats_speed: peak.speed(stats_flops, stats_seconds),
        peak,
        peak_rss_mib: peak_rss,
        methods,
    };
    if !a.json {
        println!(
            "{}: statistics {:.1} s per 100k tokens ({:.0}% of peak); one ROME edit {:.1} s {:?} ({:.0} GFLOP/s, {:.0}% of {:.0} by {}); p(Rome) after = {:.3}",
            r.model,
            r.stats_seconds_per_100k_tokens,
            100.0 * r.stats_speed.fraction_of_peak,
            r.edit_seconds,
            r.edit_phases,
            r.speed.achieved_gflops,
            100.0 * r.speed.fraction_of_peak,
            r.speed.peak_gflops,
            r.speed.peak_kernel,
            r.p_new_after
        );
        for m in &r.methods {
            println!("  {}", m.describe());
        }
    }
    Ok(r)
}

/// Runs `once` and prints its result; with `compare`, runs it on candle's reference kernels,
/// then on Loci's, and prints both with the speed-up (`seconds` of the reference over Loci's).
fn compare_or_once<R: Serialize>(
    compare: bool,
    json: bool,
    seconds: impl Fn(&R) -> f64,
    mut once: impl FnMut() -> Result<R>,
) -> Result<()> {
    if !compare {
        let r = once()?;
        return if json { print_json(&r) } else { Ok(()) };
    }
    #[derive(Serialize)]
    struct Compared<R> {
        compare: &'static str,
        reference: R,
        fast: R,
        speedup: f64,
    }
    loci_core::kernels::set_fast(false);
    let reference = once();
    loci_core::kernels::set_fast(true);
    let reference = reference?;
    let fast = once()?;
    let speedup = seconds(&reference) / seconds(&fast);
    if !json {
        println!("Loci's kernels over candle's reference operations: {speedup:.2}x");
    }
    let r = Compared {
        compare: "candle's operations (reference) vs Loci's kernels (fast), same work",
        reference,
        fast,
        speedup,
    };
    if json {
        print_json(&r)
    } else {
        Ok(())
    }
}

#[derive(Serialize)]
struct ForwardBench {
    bench: &'static str,
    model: String,
    dtype: String,
    device: String,
    threads: usize,
    tokens: usize,
    reps: usize,
    seconds_per_forward: f64,
    best_seconds: f64,
    tokens_per_second: f64,
    load_seconds: f64,
    /// The mean forward pass against the peak.
    #[serde(flatten)]
    speed: Speed,
    peak: Peak,
    peak_rss_mib: Option<f64>,
}

/// Peak resident memory of this process (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn threads() -> usize {
    crate::workspace::workers()
}

/// FLOPs of one token through one block (2 per weight of the attention and MLP matrices): the
/// trace's work in the reference algorithm's units.
fn flops_per_token_layer(cfg: &loci_core::ModelConfig) -> f64 {
    2.0 * cfg.block_weights().total() as f64
}

fn trace_bench(a: &TraceBenchArgs) -> Result<TraceBench> {
    use loci_core::trace::{NoiseSpec, Quiet, TraceKind, TraceRequest};
    if (a.attribution.is_some() || a.neurons.is_some()) && a.model.random.is_some() {
        bail!(
            "--attribution and --neurons trace known facts: a model with random weights knows none"
        );
    }
    let (samples, window) = (a.samples, a.window);
    let lm = a.model.load()?;
    let (prompt, subject) = if a.model.random.is_some() {
        loci_core::presets::bench_prompt(&lm.tokenizer, a.prompt_tokens)?
    } else {
        (a.prompt.clone(), a.subject.clone())
    };
    let mut req = TraceRequest::new(prompt, subject);
    req.samples = samples;
    req.window = window;
    // A fixed σ keeps the benchmark independent of the subjects file; the work is the same.
    req.noise = NoiseSpec::Fixed(0.1);
    let workers = crate::workspace::trace_workers(&lm.model.device);
    // Warm-up (kernel loading on a GPU, allocator pools) outside the timings.
    req.kinds = vec![TraceKind::Hidden];
    req.samples = samples.min(2);
    lm.trace(&req, None, &mut Quiet, workers)?;
    req.samples = samples;
    // Each kind alone, then all of them in one trace (their cells share every layer's passes).
    let mut seconds = std::collections::BTreeMap::new();
    for kind in TraceKind::ALL {
        req.kinds = vec![kind];
        let s = Instant::now();
        lm.trace(&req, None, &mut Quiet, workers)?;
        seconds.insert(kind.name().to_string(), s.elapsed().as_secs_f64());
    }
    req.kinds = TraceKind::ALL.to_vec();
    let peak = peak::measure(&lm.model.device, lm.model.dtype, workers)?;
    let (r, flops, total) = counted(|| Ok(lm.trace(&req, None, &mut Quiet, workers)?))?;
    let (work, naive, tokens) = (
        r.work.token_layers,
        r.work.naive_token_layers,
        r.tokens.len(),
    );
    let f = flops_per_token_layer(&lm.model.cfg);
    let r = TraceBench {
        bench: "trace",
        model: lm.name.clone(),
        device: lm.info.device.clone(),
        threads: workers,
        tokens,
        samples,
        window,
        seconds,
        seconds_all_kinds: total,
        token_layers: work,
        naive_token_layers: naive,
        gflop: work as f64 * f / 1e9,
        naive_gflop: naive as f64 * f / 1e9,
        work_ratio: naive as f64 / work as f64,
        gflop_per_second: work as f64 * f / 1e9 / total,
        speed: peak.speed(flops, total),
        peak,
        peak_rss_mib: peak_rss_mib(),
        attribution: a
            .attribution
            .map(|n| attribution::run(&lm, &req, n, workers))
            .transpose()?,
        neurons: a
            .neurons
            .map(|n| neurons::run(&lm, &req, (n, a.neuron_steps), workers))
            .transpose()?,
    };
    if !a.json {
        println!(
            "{}: all kinds in {:.1} s ({:?}); {:.0} GFLOP vs {:.0} for the reference algorithm ({:.1}x less); {:.0} GFLOP/s counted, {:.0}% of {:.0} by {}",
            r.model,
            total,
            r.seconds,
            r.gflop,
            r.naive_gflop,
            r.work_ratio,
            r.speed.achieved_gflops,
            100.0 * r.speed.fraction_of_peak,
            r.speed.peak_gflops,
            r.speed.peak_kernel
        );
        if let Some(at) = &r.attribution {
            println!("  {}", at.describe());
        }
        if let Some(kn) = &r.neurons {
            println!("  {}", kn.describe());
        }
    }
    Ok(r)
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Edit(a) => edit_bench(*a),
        BenchCmd::Stats(a) => kernels::stats_bench(a),
        BenchCmd::Matmul(a) => kernels::matmul_bench(a),
        BenchCmd::Study(a) => study::study_bench(*a),
        BenchCmd::Batch(a) => batch::batch_bench(a),
        BenchCmd::Trace(a) => compare_or_once(
            a.compare,
            a.json,
            |r: &TraceBench| r.seconds_all_kinds,
            || trace_bench(&a),
        ),
        BenchCmd::Forward {
            model,
            tokens,
            reps,
            compare,
            json,
        } => {
            if tokens == 0 || reps == 0 {
                bail!("--tokens and --reps must be positive");
            }
            compare_or_once(
                compare,
                json,
                |r: &ForwardBench| r.seconds_per_forward,
                || forward_bench(&model, tokens, reps, json),
            )
        }
    }
}

fn forward_bench(
    model: &ModelArgs,
    tokens: usize,
    reps: usize,
    json: bool,
) -> Result<ForwardBench> {
    let t0 = Instant::now();
    let lm = model.load()?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let text = "The Eiffel Tower is located in the city of Paris, which is the capital of France. ";
    let base = lm.tokenizer.encode_plain(text)?;
    let ids: Vec<u32> = base.iter().copied().cycle().take(tokens).collect();
    let t = lm.model.ids_tensor(&[ids])?;
    lm.model
        .run(&t, &mut NoHook, None, loci_core::LogitsAt::All)?;
    lm.model.device.synchronize()?;
    let peak = peak::measure(&lm.model.device, lm.model.dtype, threads())?;
    let mut times = Vec::with_capacity(reps);
    let mut flops = 0;
    for _ in 0..reps {
        let ((), f, seconds) = counted(|| {
            lm.model
                .run(&t, &mut NoHook, None, loci_core::LogitsAt::All)?;
            // GPU kernels run asynchronously: time them to the end.
            lm.model.device.synchronize()?;
            Ok(())
        })?;
        times.push(seconds);
        flops = f;
    }
    let mean = times.iter().sum::<f64>() / reps as f64;
    let r = ForwardBench {
        bench: "forward",
        model: lm.name.clone(),
        dtype: lm.info.dtype.clone(),
        device: lm.info.device.clone(),
        threads: threads(),
        tokens,
        reps,
        seconds_per_forward: mean,
        best_seconds: times.iter().copied().fold(f64::INFINITY, f64::min),
        tokens_per_second: tokens as f64 / mean,
        load_seconds,
        speed: peak.speed(flops, mean),
        peak,
        peak_rss_mib: peak_rss_mib(),
    };
    if !json {
        println!(
            "{}: {} tokens in {:.1} ms ({:.0} tokens/s, {} threads, {:.0} GFLOP/s = {:.0}% of {:.0} by {}, peak {:.0} MiB)",
            r.model,
            tokens,
            mean * 1e3,
            r.tokens_per_second,
            r.threads,
            r.speed.achieved_gflops,
            100.0 * r.speed.fraction_of_peak,
            r.speed.peak_gflops,
            r.speed.peak_kernel,
            r.peak_rss_mib.unwrap_or(0.0)
        );
    }
    Ok(r)
}
