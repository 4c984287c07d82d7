//! The in-tab benchmark the page's button runs (and `scripts/bench-tab.sh` drives).

use std::cell::Cell;
use std::rc::Rc;

use loci_core::trace::{NoiseSpec, TraceKind, TraceRequest};

use crate::engine::{say, Status};
use crate::files;
use crate::pool::{cores, Pool};

/// In-tab tracing speed: a GPT-2-small-shaped model (random weights) in a pool of one worker
/// per core; all three kinds on a 10-token prompt, 10 samples, window 10. Returns JSON.
pub async fn tab_benchmark(status: Status) -> Result<String, String> {
    let workers = cores();
    say(
        status,
        "running",
        format!("Benchmark: making a random GPT-2-small model in {workers} workers…"),
    );
    let pool = Pool::new(workers);
    let t0 = files::now_ms();
    pool.load_random("gpt2").await?;
    let load_seconds = (files::now_ms() - t0) / 1e3;
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
    let r = serde_json::json!({
        "bench": "tab-trace", "model": "random-gpt2 (12 layers, d 768)", "workers": workers,
        "tokens": 10, "samples": 10, "window": 10, "load_seconds": load_seconds,
        "kinds": per_kind, "seconds_all_kinds": total,
    });
    Ok(serde_json::to_string_pretty(&r).expect("json"))
}
