//! The Benchmark screen: how fast this tab traces — a GPT-2-small-shaped model with random
//! weights in one worker per core, all three kinds on a 10-token prompt — as a table and the
//! raw JSON (`scripts/bench-tab.sh` reads the JSON).

use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_frontend::bench::tab_benchmark;

use crate::state::{shared, Shared};

#[derive(Clone, Copy)]
pub struct BenchState {
    /// The last benchmark's JSON.
    pub json: RwSignal<String>,
}

impl BenchState {
    pub fn new() -> Self {
        BenchState {
            json: RwSignal::new(String::new()),
        }
    }
}

fn run(s: Shared, st: BenchState) {
    s.set_running(true);
    st.json.set(String::new());
    spawn_local(async move {
        match tab_benchmark(s.status_writer()).await {
            Ok(json) => {
                st.json.set(json);
                s.say("done", "Benchmark done.");
            }
            Err(e) => s.say("error", e),
        }
        s.set_running(false);
    });
}

/// (kind, seconds, seconds to the first row) from the benchmark's JSON.
fn kind_rows(json: &str) -> Vec<(String, f64, Option<f64>)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    v["kinds"]
        .as_object()
        .map(|k| {
            k.iter()
                .map(|(name, x)| {
                    let secs = x["seconds"].as_f64().unwrap_or(f64::NAN);
                    (name.clone(), secs, x["seconds_to_first_row"].as_f64())
                })
                .collect()
        })
        .unwrap_or_default()
}

#[component]
pub fn BenchScreen() -> impl IntoView {
    let s = shared();
    let st = expect_context::<BenchState>();
    let table = move || {
        let json = st.json.get();
        let rows = kind_rows(&json);
        (!rows.is_empty()).then(|| {
            let rows: Vec<_> = rows.into_iter().map(|(k, secs, first)| view! {
                <tr><th scope="row">{k}</th><td class="num">{format!("{secs:.2} s")}</td>
                <td class="num">{first.map_or("—".into(), |f| format!("{f:.2} s"))}</td></tr>
            }).collect();
            view! { <table class="metrics"><tr><th scope="col">"kind"</th><th scope="col">"trace"</th><th scope="col">"first row"</th></tr>{rows}</table> }
        })
    };
    view! {
        <div class="screen">
            <section class="form card" aria-labelledby="bench-h">
                <h2 id="bench-h">"Benchmark this tab"</h2>
                <p class="hint">"Traces all three kinds (10 tokens, 10 samples, window 10) on a GPT-2-small-shaped model with random weights, in this tab's workers: one per core."</p>
                <div class="buttons">
                    <button id="bench" class="primary" on:click=move |_| run(s, st) prop:disabled=s.busy>"Run benchmark"</button>
                </div>
            </section>
            <div class="results">
                <section class="card" aria-label="Benchmark result">
                    <h3>"Result"</h3>
                    {table}
                    <pre id="bench-result" tabindex="0">{move || st.json.get()}</pre>
                </section>
            </div>
        </div>
    }
}
