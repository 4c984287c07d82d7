//! Causal tracing (Meng et al. 2022) of one fact: corrupt the subject's token embeddings with
//! noise, restore one state of the clean run at a time (a layer's hidden state, or a window of
//! MLP or attention outputs), and measure how much of the answer's probability comes back.
//!
//! Prints the answer, its probability on the clean run (`high`) and with the subject corrupted
//! (`low`), and per kind the per-layer tracing effect: the largest fraction of `high − low` one
//! restoration brings back, over the prompt's tokens.
//!
//! Run: `cargo run --release -p loci-core --example trace -- MODEL_DIR`
//! (a Hugging Face folder or a `.gguf`; without it, the random `tiny-gpt2` test fixture).

mod common;

use loci_core::trace::{embedding_std, Quiet, TraceKind, TraceRequest};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lm = common::load_model(std::env::args().nth(1))?;
    let mut req = TraceRequest::new("The Eiffel Tower is located in the city of", "Eiffel Tower");
    // Fewer corrupted runs per cell than the default 10: quicker, a little noisier.
    req.samples = 5;
    // The default noise is relative: 3 × the standard deviation of subject embeddings, which
    // ROME measures over many subjects (a few stand in for them here).
    let subjects = [
        "Eiffel Tower",
        "Colosseum",
        "Michael Jordan",
        "Big Ben",
        "Louvre",
    ];
    let std = embedding_std(&lm, &subjects)?;
    let workers = loci_core::threads::workers();
    let r = lm.trace(&req, Some(std), &mut Quiet, workers)?;

    println!("prompt: {:?}", r.prompt);
    println!("tokens: {:?}", r.tokens);
    let [first, end] = r.subject_range;
    println!("subject: tokens {first}..{end}; noise σ = {:.4}", r.noise);
    println!("answer: {:?}", r.answer.token);
    println!(
        "p(answer): clean (high) {:.4}, subject corrupted (low) {:.4}",
        r.high, r.low
    );
    println!("tracing effect per layer (0: nothing restored, 1: all of high − low):");
    for kind in TraceKind::ALL {
        let effect: Vec<String> = r.tracing_effect[&kind]
            .iter()
            .map(|e| format!("{e:.2}"))
            .collect();
        println!("  {:<6} {}", kind.name(), effect.join(" "));
    }
    println!(
        "{:.2}s; {} token-layers computed ({} for the reference algorithm)",
        r.seconds, r.work.token_layers, r.work.naive_token_layers
    );
    Ok(())
}
