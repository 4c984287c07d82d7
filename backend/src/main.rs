//! `loci`: the command-line tool and the server over `loci-core` (the library beside this file
//! holds both; this is their arguments and the process's threads).

use clap::{Parser, Subcommand};
use loci_backend::{cli, server, workspace};

// Tensors are allocated and freed by the thousand; glibc hands big blocks back to the kernel each
// time (page faults, TLB shootdowns across threads), mimalloc keeps them for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "loci",
    version,
    about = "Find where a language model keeps a fact, and rewrite it."
)]
struct Loci {
    /// CPU threads for tensor kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// The linear maps' products on the CPU: f32, or bf16 (operands rounded to bf16, sums in
    /// f32, twice the rate; needs AVX-512 with bf16 dot products). Attention and key statistics
    /// stay f32.
    #[arg(long, global = true, default_value = "f32")]
    products: Products,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Tool(cli::Command),
    /// Serve the web app and the JSON API.
    ///
    /// Capacity, measured by `scripts/load-test.sh --compare` (SmolLM2-135M in f32 on a 2-core
    /// AMD EPYC that also runs the load generator; 100 visitors asking about different known
    /// facts with 1 s of think time while one client traces and another edits): about 31
    /// predictions per second (p50 2.2 s, p99 3.6 s, none refused; 25x the one-lane server),
    /// beside one trace of 3 kinds x 3 samples every ~55 s and one ROME edit every ~48 s. On an
    /// idle machine a prediction takes ~0.07 s, a trace of 3 kinds x 10 samples ~40 s, an edit
    /// ~15 s. `GET /api/capacity` gives this machine's live estimates for each kind.
    Serve(Box<server::ServeArgs>),
}

impl Command {
    /// Commands that spread their work over their own worker threads rather than threading
    /// inside each matrix product (the server runs traces and edits).
    fn parallel_workers(&self) -> bool {
        match self {
            Command::Tool(c) => c.parallel_workers(),
            Command::Serve(_) => true,
        }
    }
}

/// `--products`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Products {
    F32,
    Bf16,
}

fn main() {
    let args = Loci::parse();
    if let Err(e) = loci_core::kernels::gemm::set_maps_in_bf16(args.products == Products::Bf16) {
        eprintln!("error: --products bf16: {e}");
        std::process::exit(2);
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    workspace::WORKERS.set(threads).expect("set once");
    // candle's CPU kernels read this at every operation. Tracing, editing and statistics
    // parallelise over their own workers (one per thread), which beats threading inside each
    // small matrix product; other commands let the kernels use the threads. Set before any other
    // thread exists. On a GPU the device runs the batches: no worker threads.
    let (kernel_threads, core_workers) = if args.cmd.parallel_workers() {
        (1, if cfg!(feature = "cuda") { 1 } else { threads })
    } else {
        (threads, 1)
    };
    std::env::set_var("RAYON_NUM_THREADS", kernel_threads.to_string());
    loci_core::threads::set_workers(core_workers);
    let outcome = match args.cmd {
        Command::Tool(c) => cli::run(c),
        Command::Serve(a) => server::serve(*a),
    };
    if let Err(e) = outcome {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
