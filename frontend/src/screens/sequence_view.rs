//! A sequential run's results, opened on the Evaluate screen: the file `loci eval --sequential
//! --out FILE` writes (or continues) is read in the tab, and each method's scores of the cases
//! edited so far and the model's health are drawn against the cases edited, with the last
//! point of each method in a table.

use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_core::eval::{sequence_points, SequencePoint};
use loci_core::plot;

use super::edit_actions::picked_file;
use crate::components::chart::Chart;
use crate::state::{shared, Shared};

/// Reads the picked file's points (or says why not).
fn open(s: Shared, points: RwSignal<Vec<SequencePoint>>, ev: leptos::ev::Event) {
    spawn_local(async move {
        let read = match picked_file(&ev).await {
            Some(r) => r,
            None => return,
        };
        let parsed = read
            .and_then(|b| String::from_utf8(b).map_err(|_| "the file is not text".to_string()))
            .and_then(|t| sequence_points(&t).map_err(|e| e.to_string()));
        match parsed {
            Ok(p) => {
                s.say("done", format!("{} points of a sequential run.", p.len()));
                points.set(p);
            }
            Err(e) => s.say("error", e),
        }
    });
}

/// Each method's last point: cases edited, headline scores, perplexity and known facts (start
/// → end), and the largest norm growth.
fn last_rows(points: &[SequencePoint]) -> Vec<AnyView> {
    // The methods in the order the run made them.
    let mut methods: Vec<&str> = vec![];
    for p in points {
        if !methods.contains(&p.method.as_str()) {
            methods.push(&p.method);
        }
    }
    let opt = |v: Option<f32>| v.map_or("—".to_string(), |v| format!("{v:.2}"));
    methods
        .into_iter()
        .filter_map(|m| {
            let mine = points.iter().filter(|p| p.method == m);
            let first = mine.clone().min_by_key(|p| p.cases_done)?;
            let last = mine.max_by_key(|p| p.cases_done)?;
            let scores = last
                .headline
                .iter()
                .map(|(n, v)| format!("{n} {v:.1}"))
                .collect::<Vec<_>>()
                .join(", ");
            let ppl = format!(
                "{} → {}",
                opt(first.health.perplexity),
                opt(last.health.perplexity)
            );
            let known = format!(
                "{} → {}",
                opt(first.health.known_top1),
                opt(last.health.known_top1)
            );
            let growth = format!("{:.3}×", last.health.max_growth());
            Some(
                view! {
                    <tr data-method=m.to_string()>
                        <th scope="row">{m.to_string()}</th>
                        <td class="num">{last.cases_done}</td>
                        <td>{scores}</td>
                        <td class="num">{ppl}</td>
                        <td class="num">{known}</td>
                        <td class="num">{growth}</td>
                    </tr>
                }
                .into_any(),
            )
        })
        .collect()
}

#[component]
pub fn SequenceView(
    /// The opened file's points (kept while other screens show).
    points: RwSignal<Vec<SequencePoint>>,
) -> impl IntoView {
    let s = shared();
    let chart = Memo::new(move |_| {
        points.with(|p| (!p.is_empty()).then(|| plot::sequence_svg("Sequential edits", p)))
    });
    view! {
        <section class="card" id="sequence-run">
            <h3>"A sequential run"</h3>
            <p class="hint">
                "Open the results of "<code>"loci eval --sequential --methods … --out FILE"</code>
                ": each method's edits so far and the model's health, against the cases edited."
            </p>
            <label for="sequence-file" class="upload">"Open a results file (.jsonl)"</label>
            <input id="sequence-file" type="file" accept=".jsonl,.json" on:change=move |ev| open(s, points, ev) />
            <Show when=move || points.with(|p| !p.is_empty())>
                <table class="sequence-last">
                    <thead><tr>
                        <th>"method"</th><th>"cases"</th><th>"scores (×100)"</th>
                        <th>"perplexity"</th><th>"known facts top-1"</th><th>"norm growth"</th>
                    </tr></thead>
                    <tbody>{move || points.with(|p| last_rows(p))}</tbody>
                </table>
            </Show>
            <Chart svg=chart stem="sequence" title="Sequential edits" />
        </section>
    }
}
