//! `loci`: the command-line tool (and, with `serve`, the server) over `loci-core`.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Some(n) = args.threads {
        // candle's CPU kernels size their thread pools from this, once, at first use.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
