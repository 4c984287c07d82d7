//! `loci bench batch`: what batching across requests buys. The same N requests (different
//! known facts) one at a time and batched as the server batches them — predictions in passes of
//! similar lengths, generations decoded together — in one run: requests per second each way,
//! the ratio, and how far the batched answers are from the one-at-a-time ones.

use std::time::Instant;

use anyhow::{bail, Result};
use loci_core::{DecodeBatch, GenerationStart, LoadedModel, NoHook, Sampling};
use serde::Serialize;

use super::{peak_rss_mib, threads};
use crate::cli::{print_json, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct BatchBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Requests each way (the first N bundled known facts' prompts).
    #[arg(long, default_value_t = 32)]
    rows: usize,
    /// New tokens per generation.
    #[arg(long, default_value_t = 16)]
    new_tokens: usize,
    #[arg(long)]
    json: bool,
}

/// One way of serving the requests: seconds and requests per second.
#[derive(Serialize)]
struct Way {
    seconds: f64,
    per_second: f64,
}

impl Way {
    fn new(seconds: f64, n: usize) -> Self {
        Self {
            seconds,
            per_second: n as f64 / seconds,
        }
    }
}

#[derive(Serialize)]
struct BatchBench {
    bench: &'static str,
    model: String,
    device: String,
    dtype: String,
    threads: usize,
    rows: usize,
    mean_prompt_tokens: f64,
    new_tokens: usize,
    predict_one_at_a_time: Way,
    predict_batched: Way,
    predict_speedup: f64,
    /// The largest difference of a next-token probability, batched vs alone.
    predict_max_prob_difference: f32,
    generate_one_at_a_time: Way,
    generate_batched: Way,
    generate_speedup: f64,
    /// Whether every batched generation is the one made alone, token for token.
    generations_identical: bool,
    peak_rss_mib: Option<f64>,
}

pub fn batch_bench(a: BatchBenchArgs) -> Result<()> {
    if a.rows == 0 {
        bail!("--rows must be positive");
    }
    let lm = a.model.load()?;
    let prompts: Vec<String> = crate::workspace::bundled_fact_prompts()
        .into_iter()
        .filter(|p| lm.encode_prompt(p).is_ok())
        .take(a.rows)
        .collect();
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| lm.encode_prompt(p))
        .collect::<loci_core::Result<_>>()?;
    let n = ids.len();
    // Warm-up (allocator pools, kernels on a GPU) outside the timings.
    lm.next_probs(&ids[0])?;
    let s = Instant::now();
    let alone: Vec<Vec<f32>> = ids
        .iter()
        .map(|r| lm.next_probs(r))
        .collect::<loci_core::Result<_>>()?;
    let predict_alone = sync_seconds(&lm, s)?;
    let s = Instant::now();
    let batched = lm.next_probs_by_length(&ids, &mut |_| Ok(Box::new(NoHook)))?;
    let predict_batched = sync_seconds(&lm, s)?;
    let diff = alone
        .iter()
        .zip(&batched)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    let (gen_alone, gen_batched, identical) = generations(&lm, &prompts, &ids, a.new_tokens)?;
    let r = BatchBench {
        bench: "batch",
        model: lm.name.clone(),
        device: lm.info.device.clone(),
        dtype: lm.info.dtype.clone(),
        threads: threads(),
        rows: n,
        mean_prompt_tokens: ids.iter().map(Vec::len).sum::<usize>() as f64 / n as f64,
        new_tokens: a.new_tokens,
        predict_speedup: predict_alone / predict_batched,
        predict_one_at_a_time: Way::new(predict_alone, n),
        predict_batched: Way::new(predict_batched, n),
        predict_max_prob_difference: diff,
        generate_speedup: gen_alone / gen_batched,
        generate_one_at_a_time: Way::new(gen_alone, n),
        generate_batched: Way::new(gen_batched, n),
        generations_identical: identical,
        peak_rss_mib: peak_rss_mib(),
    };
    if a.json {
        return print_json(&r);
    }
    println!(
        "{}: {n} predictions {:.1}/s alone, {:.1}/s batched ({:.1}x, max difference {:.1e}); \
         {n} generations of {} tokens {:.2}/s alone, {:.2}/s decoded together ({:.1}x, identical: {})",
        r.model,
        r.predict_one_at_a_time.per_second,
        r.predict_batched.per_second,
        r.predict_speedup,
        r.predict_max_prob_difference,
        a.new_tokens,
        r.generate_one_at_a_time.per_second,
        r.generate_batched.per_second,
        r.generate_speedup,
        r.generations_identical
    );
    Ok(())
}

/// Greedy generations of every prompt one at a time, then decoded together: the seconds of
/// each, and whether they agree token for token.
fn generations(
    lm: &LoadedModel,
    prompts: &[String],
    ids: &[Vec<u32>],
    new: usize,
) -> Result<(f64, f64, bool)> {
    let s = Instant::now();
    let alone: Vec<_> = prompts
        .iter()
        .map(|p| lm.generate(p, new, Sampling::Greedy))
        .collect::<loci_core::Result<_>>()?;
    let seconds_alone = sync_seconds(lm, s)?;
    let s = Instant::now();
    let mut batch = DecodeBatch::default();
    let starts = prompts
        .iter()
        .zip(ids)
        .enumerate()
        .map(|(i, (p, r))| GenerationStart {
            tag: i,
            prompt: p.clone(),
            ids: r.clone(),
            max_new: new,
            sampling: Sampling::Greedy,
        })
        .collect();
    batch.admit(lm, starts, &mut NoHook)?;
    let mut done = batch.take_finished();
    while !batch.is_empty() {
        batch.step(lm, &mut NoHook)?;
        done.extend(batch.take_finished());
    }
    let seconds_batched = sync_seconds(lm, s)?;
    done.sort_by_key(|d| d.0);
    let identical = done.len() == alone.len()
        && done
            .into_iter()
            .zip(&alone)
            .all(|((_, g), a)| g.is_ok_and(|g| &g == a));
    Ok((seconds_alone, seconds_batched, identical))
}

/// Seconds since `s`, once the device has finished its queued work.
fn sync_seconds(lm: &LoadedModel, s: Instant) -> Result<f64> {
    lm.model.device.synchronize()?;
    Ok(s.elapsed().as_secs_f64())
}
