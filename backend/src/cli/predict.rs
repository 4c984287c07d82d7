use anyhow::Result;
use loci_core::Sampling;

use super::{print_json, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// How many candidates to show.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn predict(a: PredictArgs) -> Result<()> {
    let lm = a.model.load()?;
    let p = lm.predict(&a.prompt, a.top)?;
    if a.json {
        return print_json(&p);
    }
    println!("{} ({} tokens: {:?})", p.prompt, p.tokens.len(), p.tokens);
    for t in &p.top {
        let bar = "█".repeat((t.prob * 40.0).round() as usize);
        println!("{:>8.4}  {:<20} {bar}", t.prob, format!("{:?}", t.token));
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 30)]
    pub max_new_tokens: usize,
    /// Always take the most likely token (the default unless --top-k is given).
    #[arg(long, conflicts_with = "top_k")]
    pub greedy: bool,
    /// Sample among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: bool,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let lm = a.model.load()?;
    let sampling = match a.top_k {
        Some(k) if !a.greedy => Sampling::TopK { k, seed: a.seed },
        _ => Sampling::Greedy,
    };
    let g = lm.generate(&a.prompt, a.max_new_tokens, sampling)?;
    if a.json {
        return print_json(&g);
    }
    println!("{}", g.text);
    Ok(())
}
