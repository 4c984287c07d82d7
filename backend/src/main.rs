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
    // candle's CPU kernels read this at every operation. Tracing parallelises over its own
    // workers (one per thread), which beats threading inside each small matrix product; other
    // commands let the kernels use the threads. Set before any other thread exists.
    let kernel_threads = if args.cmd.parallel_workers() {
        1
    } else {
        threads
    };
    std::env::set_var("RAYON_NUM_THREADS", kernel_threads.to_string());
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
