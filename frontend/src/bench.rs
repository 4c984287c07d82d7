//! The in-tab benchmark the page's button runs (and `scripts/bench-tab.sh` drives).

use std::cell::Cell;
use std::rc::Rc;

use loci_core::trace::{NoiseSpec, TraceKind, TraceRequest};

use crate::engine::{say, Status, TAB_BUDGET_BYTES};
use crate::files;
use crate::pool::{cores, pool_size, Pool};

/// In-tab tracing speed: a model of `preset`'s shape (random weights; "gpt2" by default) in a
/// pool of one worker per core; all three kinds on a 10-token prompt, 10 samples, window 10.
/// Returns JSON. A shape bigger than a worker's memory ends in the pool's out-of-memory error.
pub async fn tab_benchmark(status: Status, preset: &str) -> Result<String, String> {
    // One worker per core while the copies fit the tab's budget (a model bigger than it gets
    // one worker, which then meets the memory limit alone).
    let cfg = loci_core::presets::preset_config(preset).map_err(|e| e.to_string())?;
    let weights = cfg.n_layer * cfg.block_weights().total() + cfg.vocab_size * cfg.d_model;
    let workers = pool_size(cores(), 4 * weights as u64, TAB_BUDGET_BYTES);
    say(
        status,
        "running",
        format!("Benchmark: making a random {preset} model in {workers} workers…"),
    );
    let pool = Pool::new(workers);
    let t0 = files::now_ms();
    let info = pool.load_random(preset).await?;
    let load_seconds = (files::now_ms() - t0) / 1e3;
    say(
        status,
        "running",
        "Benchmark: timing the workers' best product…".to_string(),
    );
    let peak = pool.peak().await?;
    let (flops_before, _) = pool.work().await?;
    let tok = loci_core::Tokenizer::from_json(loci_core::presets::BENCH_TOKENIZER, None)
        .map_err(|e| e.to_string())?;
    let (prompt, subject) =
        loci_core::presets::bench_prompt(&tok, 10).map_err(|e| e.to_string())?;
    let mut per_kind = serde_json::Map::new();
    let mut total = 0.0;
    for kind in TraceKind::ALL {
        let mut req = TraceRequest::new(prompt.clone(), subject.clone());
        req.kinds = vec![kind];
        req.noise = NoiseSpec::Fixed(0.1);
        say(
            status,
            "running",
            format!("Benchmark: tracing {}…", kind.name()),
        );
        let start = files::now_ms();
        let first = Rc::new(Cell::new(None::<f64>));
        let f2 = first.clone();
        let mut header_at = None;
        pool.trace(
            &req,
            |_| header_at = Some(files::now_ms()),
            move |_, _, _| {
                if f2.get().is_none() {
                    f2.set(Some(files::now_ms()));
                }
                true
            },
        )
        .await?;
        let secs = (files::now_ms() - start) / 1e3;
        total += secs;
        per_kind.insert(
            kind.name().into(),
            serde_json::json!({
                "seconds": secs,
                "seconds_to_first_row": first.get().map(|f| (f - start) / 1e3),
                "seconds_to_header": header_at.map(|f| (f - start) / 1e3),
            }),
        );
    }
    let (flops_after, heap) = pool.work().await?;
    let r = serde_json::json!({
        "bench": "tab-trace", "model": format!("{} ({} layers, d {})", info.name, info.n_layer, info.d_model),
        "workers": workers,
        "tokens": 10, "samples": 10, "window": 10, "load_seconds": load_seconds,
        "kinds": per_kind, "seconds_all_kinds": total,
        "speed": speed(flops_after.saturating_sub(flops_before), total, peak, workers),
        "peak_heap_mib": heap as f64 / (1 << 20) as f64,
    });
    Ok(serde_json::to_string_pretty(&r).expect("json"))
}

/// Work against the tab's peak, as `loci bench` reports it natively: the FLOPs of the matrix
/// products the workers did, and the workers' best product speed all at once.
fn speed(flops: u64, seconds: f64, peak: f64, workers: usize) -> serde_json::Value {
    let kernel = format!("candle gemm (WebAssembly SIMD128), {workers} workers at once");
    serde_json::to_value(loci_core::flops::Speed::new(flops, seconds, peak, kernel)).expect("json")
}

/// In-tab editing speed: a GPT-2-small-shaped model (random weights) in `workers` workers; key
/// statistics of `layer` over `tokens` tokens of the bundled Wikipedia slice (spread over the
/// workers, merged, given to every worker), then one ROME edit at `layer` with them (v*'s rows
/// shared by the workers, each step's parts and gradients exchanged). The same work as `loci
/// bench edit --random gpt2`. Returns JSON.
pub async fn tab_edit_benchmark(
    status: Status,
    workers: usize,
    layer: usize,
    tokens: u64,
    slice_url: &str,
) -> Result<String, String> {
    use loci_core::edit::{EditMethod, Probes, RewriteRequest};
    say(
        status,
        "running",
        format!("Edit benchmark: making a random GPT-2-small model in {workers} workers…"),
    );
    let pool = Pool::new(workers);
    pool.load_random("gpt2").await?;
    let texts: Vec<String> = serde_json::from_slice(&files::bytes(slice_url).await?)
        .map_err(|e| format!("{slice_url}: {e}"))?;
    say(
        status,
        "running",
        format!("Edit benchmark: statistics of layer {layer}…"),
    );
    let peak = pool.peak().await?;
    let (flops0, _) = pool.work().await?;
    let t0 = files::now_ms();
    let first = Cell::new(None::<f64>);
    let mut merged = pool
        .collect_stats(&[layer], 1024, &texts, "wikipedia-slice", tokens, |n| {
            if n > 0 && first.get().is_none() {
                first.set(Some(files::now_ms()));
            }
            true
        })
        .await?;
    // Collected and merged; giving them to the workers follows.
    let collect_seconds = (files::now_ms() - t0) / 1e3;
    let merged = merged.remove(0);
    let seen = merged.provenance.tokens;
    pool.use_stats(vec![merged.to_bytes().map_err(|e| e.to_string())?])
        .await?;
    let stats_seconds = (files::now_ms() - t0) / 1e3;
    say(
        status,
        "running",
        format!("Edit benchmark: ROME at layer {layer}…"),
    );
    let req = RewriteRequest::from_prompt("{} is located in the city of", "Eiffel Tower", "Rome")
        .map_err(|e| e.to_string())?;
    let job = crate::protocol::EditJob {
        method: EditMethod::Rome,
        requests: vec![req],
        layers: vec![layer],
        probes: Probes::default(),
        null_space: None,
    };
    let (flops1, _) = pool.work().await?;
    let steps = Cell::new(0usize);
    let t1 = files::now_ms();
    let outcome = pool
        .edit(job, |_, step, _, _| {
            steps.set(step);
            true
        })
        .await?;
    let edit_seconds = (files::now_ms() - t1) / 1e3;
    let (flops2, heap) = pool.work().await?;
    let crate::pool::EditOutcome::Done(e) = outcome else {
        return Err("the edit asked for statistics it was given".into());
    };
    let p_new_after = e.report.map(|r| r.after.rewrite.target_new);
    // Where the edit's time went, from the edit's own file (ROME records its phases).
    let phases = match loci_core::edit::Edit::from_bytes(&e.file) {
        Ok(loci_core::edit::Edit::Rome(r)) => serde_json::to_value(&r.stats.seconds).ok(),
        _ => None,
    };
    let r = serde_json::json!({
        "bench": "tab-edit", "model": "random-gpt2 (12 layers, d 768)", "workers": workers,
        "layer": layer, "stats_tokens": seen, "stats_seconds": stats_seconds,
        "stats_seconds_to_first_progress": first.get().map(|f| (f - t0) / 1e3),
        "stats_collect_seconds": collect_seconds,
        "stats_seconds_per_100k_tokens": stats_seconds * 1e5 / seen.max(1) as f64,
        "edit_seconds": edit_seconds, "edit_phases": phases, "v_steps": steps.get(),
        "p_new_after": p_new_after,
        "stats_speed": speed(flops1.saturating_sub(flops0), stats_seconds, peak, workers),
        "edit_speed": speed(flops2.saturating_sub(flops1), edit_seconds, peak, workers),
        "peak_heap_mib": heap as f64 / (1 << 20) as f64,
    });
    Ok(serde_json::to_string_pretty(&r).expect("json"))
}
