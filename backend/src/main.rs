//! `loci`: the command-line tool (and, with `serve`, the server) over `loci-core`.

mod cli;
mod server;

use clap::Parser;

// Tensors are allocated and freed by the thousand; glibc hands big blocks back to the kernel each
// time (page faults, TLB shootdowns across threads), mimalloc keeps them for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = cli::Cli::parse();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    cli::WORKERS.set(threads).expect("set once");
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
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
