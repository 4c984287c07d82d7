//! The Benchmark screen: how fast this tab traces — a GPT-2-small-shaped model with random
//! weights in one worker per core, all three kinds on a 10-token prompt — and edits (key
//! statistics of layer 6 over 20k tokens, then one ROME edit, in two workers), as a table and
//! the raw JSON (`scripts/bench-tab.sh` reads the JSON).

use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_frontend::bench::{tab_benchmark, tab_edit_benchmark};

use crate::state::{shared, Shared};

#[derive(Clone, Copy)]
pub struct BenchState {
    /// The last benchmark's JSON.
    pub json: RwSignal<String>,
    /// The traced model's shape: a preset's name.
    pub preset: RwSignal<String>,
}

impl BenchState {
    pub fn new() -> Self {
        BenchState {
            json: RwSignal::new(String::new()),
            preset: RwSignal::new("gpt2".into()),
        }
    }
}

fn run(s: Shared, st: BenchState) {
    s.set_running(true);
    st.json.set(String::new());
    spawn_local(async move {
        match tab_benchmark(s.status_writer(), &st.preset.get_untracked()).await {
            Ok(json) => {
                st.json.set(json);
                s.say("done", "Benchmark done.");
            }
            Err(e) => s.say("error", e),
        }
        s.set_running(false);
    });
}

fn run_edit(s: Shared, st: BenchState) {
    s.set_running(true);
    st.json.set(String::new());
    spawn_local(async move {
        let url = crate::screens::edit_tab::WIKI_SLICE_URL;
        match tab_edit_benchmark(s.status_writer(), 2, 6, 20_000, url).await {
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
                <p class="hint">"Traces all three kinds (10 tokens, 10 samples, window 10) on a GPT-2-small-shaped model with random weights, in this tab's workers: one per core. The edit benchmark computes layer 6's key statistics over 20,000 tokens of Wikipedia, then makes one ROME edit there, in two workers."</p>
                <div class="fields">
                    <label for="bench-preset">"Model shape (random weights)"</label>
                    <select id="bench-preset" prop:value=st.preset on:change=move |ev| st.preset.set(event_target_value(&ev))>
                        <option value="gpt2">"GPT-2 small (124M)"</option>
                        <option value="gpt2-xl">"GPT-2 XL (1.5B: more than a worker's 4 GiB in f32)"</option>
                    </select>
                </div>
                <div class="buttons">
                    <button id="bench" class="primary" on:click=move |_| run(s, st) prop:disabled=s.busy>"Run benchmark"</button>
                    <button id="bench-edit" on:click=move |_| run_edit(s, st) prop:disabled=s.busy>"Benchmark an edit"</button>
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
