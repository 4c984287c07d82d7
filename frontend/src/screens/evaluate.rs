//! The Evaluate screen: a bundled CounterFact case scored on the server before and after its
//! ROME edit (`POST /api/eval`; the edit is undone after) — the metrics of ROME and of Hase et
//! al. in one table, and every prompt's probabilities before → after.

use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_core::eval::{CaseMetrics, CaseRecord, CaseScores, PromptScores};
use loci_frontend::http::post;

use super::edit::CasePicker;
use super::sequence_view::SequenceView;
use crate::components::probs::{prob, prob_header, prob_row};
use crate::state::{layer_list, shared, Shared};

#[derive(Clone, Copy)]
pub struct EvalState {
    /// The picked case's index in the bundled list.
    pub case: RwSignal<Option<usize>>,
    pub layer: RwSignal<String>,
    pub generate: RwSignal<bool>,
    pub record: RwSignal<Option<CaseRecord>>,
    /// The points of the sequential run's results file opened here.
    pub sequence: RwSignal<Vec<loci_core::eval::SequencePoint>>,
}

impl EvalState {
    pub fn new() -> Self {
        EvalState {
            case: RwSignal::new(None),
            layer: RwSignal::new(String::new()),
            generate: RwSignal::new(false),
            record: RwSignal::new(None),
            sequence: RwSignal::new(vec![]),
        }
    }
}

fn run(s: Shared, st: EvalState) {
    let Some(c) = s.server_choice("The evaluation edits with the server's key statistics") else {
        return;
    };
    let case = st
        .case
        .get_untracked()
        .and_then(|i| s.cases.with_untracked(|c| c.get(i).cloned()));
    let Some(case) = case else {
        return s.say("error", "Pick a CounterFact case first.");
    };
    let layer = match layer_list(&st.layer.get_untracked()).as_deref() {
        Ok([]) => None,
        Ok([l]) => Some(*l),
        Ok(_) => return s.say("error", "The evaluation's ROME edit takes one layer."),
        Err(e) => return s.say("error", e),
    };
    let body = serde_json::json!({
        "model": c.name, "case": case, "layer": layer, "generation": st.generate.get_untracked(),
    });
    st.record.set(None);
    s.set_running(true);
    s.say(
        "running",
        format!(
            "Evaluating case #{} on the server: scoring, editing with ROME, scoring again…",
            case.case_id
        ),
    );
    spawn_local(async move {
        match post::<CaseRecord>("/api/eval", &body).await {
            Ok(r) => {
                let msg = format!(
                    "Evaluated case #{}: efficacy {:.2} (edit {:.1} s); the edit is undone.",
                    r.case_id, r.metrics.efficacy_score, r.edit_seconds
                );
                st.record.set(Some(r));
                s.say("done", msg);
            }
            Err(e) => s.say("error", e),
        }
        s.set_running(false);
    });
}

#[component]
pub fn EvaluateScreen() -> impl IntoView {
    let s = shared();
    let st = expect_context::<EvalState>();
    let picked = move || {
        st.case
            .get()
            .and_then(|i| s.cases.with(|c| c.get(i).cloned()))
            .map(|c| {
                let r = &c.requested_rewrite;
                let old = r.target_true.as_ref().map_or("?".into(), |t| t.str.clone());
                format!(
                    "{} {} → {}: {} paraphrases, {} neighbours",
                    r.filled(),
                    old,
                    r.target_new.str,
                    c.paraphrase_prompts.len(),
                    c.neighborhood_prompts.len()
                )
            })
    };
    view! {
        <div class="screen">
            <section class="form card" aria-labelledby="eval-h">
                <h2 id="eval-h">"Evaluate an edit"</h2>
                <p class="hint">"Scores a CounterFact case, edits it in with ROME, scores it again and undoes the edit — on the server, which holds the key statistics."</p>
                <div class="fields">
                    <CasePicker id="eval-case" on_pick=move |i| st.case.set(Some(i)) />
                    <label for="eval-layer">"Layer"</label>
                    <input id="eval-layer" placeholder="default" prop:value=st.layer on:input=move |ev| st.layer.set(event_target_value(&ev)) />
                    <label class="check"><input type="checkbox" id="eval-generate" prop:checked=st.generate
                        on:change=move |ev| st.generate.set(event_target_checked(&ev)) />"generate text too (fluency; slower)"</label>
                </div>
                <p class="fact">{picked}</p>
                <div class="buttons">
                    <button id="eval-run" class="primary" on:click=move |_| run(s, st) prop:disabled=move || s.busy.get() || st.case.get().is_none()>"Evaluate"</button>
                </div>
            </section>
            <div class="results">
                {move || match st.record.get() {
                    Some(r) => view! { <EvalResult r=r /> }.into_any(),
                    None => view! { <section class="card"><h3>"Metrics"</h3><p class="hint">"No evaluation yet: pick a case and press Evaluate."</p></section> }.into_any(),
                }}
                <SequenceView points=st.sequence />
            </div>
        </div>
    }
}

fn pct(x: f32) -> String {
    format!("{:.1}%", x * 100.0)
}

fn opt(x: Option<f32>) -> String {
    x.map_or("—".into(), prob)
}

/// Every prompt's probabilities before → after.
fn score_rows(pre: &CaseScores, post: &CaseScores) -> Vec<AnyView> {
    let row = |label: &str, b: &PromptScores, a: &PromptScores| {
        let p = [
            b.target_new.prob,
            a.target_new.prob,
            b.target_true.prob,
            a.target_true.prob,
        ];
        prob_row(label, &b.prompt, p)
    };
    [
        ("rewrite", &pre.rewrite, &post.rewrite),
        ("paraphrase", &pre.paraphrase, &post.paraphrase),
        ("neighbourhood", &pre.neighborhood, &post.neighborhood),
    ]
    .into_iter()
    .flat_map(|(label, b, a)| {
        b.iter()
            .zip(a)
            .map(move |(b, a)| row(label, b, a))
            .collect::<Vec<_>>()
    })
    .collect()
}

/// The metrics table's rows: id (as in `CaseMetrics`), name, value, meaning.
fn metric_rows(m: &CaseMetrics) -> [(&'static str, &'static str, String, &'static str); 11] {
    [
        (
            "efficacy_score",
            "efficacy",
            pct(m.efficacy_score),
            "p(new) > p(true) on the rewrite prompt",
        ),
        (
            "efficacy_magnitude",
            "efficacy magnitude",
            prob(m.efficacy_magnitude),
            "p(new) − p(true)",
        ),
        (
            "paraphrase_score",
            "paraphrase",
            pct(m.paraphrase_score),
            "share of paraphrases where p(new) > p(true)",
        ),
        (
            "paraphrase_magnitude",
            "paraphrase magnitude",
            prob(m.paraphrase_magnitude),
            "mean p(new) − p(true)",
        ),
        (
            "neighborhood_score",
            "neighbourhood",
            pct(m.neighborhood_score),
            "share of neighbours still preferring the true object",
        ),
        (
            "neighborhood_magnitude",
            "neighbourhood magnitude",
            prob(m.neighborhood_magnitude),
            "mean p(true) − p(new)",
        ),
        (
            "hase_rewrite",
            "Hase rewrite",
            prob(m.hase_rewrite),
            "normalised rewrite score",
        ),
        (
            "hase_paraphrase",
            "Hase paraphrase",
            prob(m.hase_paraphrase),
            "normalised paraphrase score",
        ),
        (
            "hase_neighborhood",
            "Hase neighbourhood",
            prob(m.hase_neighborhood),
            "normalised neighbourhood score",
        ),
        (
            "hase_target_score",
            "Hase target score",
            prob(m.hase_target_score),
            "their harmonic mean",
        ),
        (
            "fluency",
            "fluency before → after",
            format!("{} → {}", opt(m.fluency_pre), opt(m.fluency_post)),
            "bi/tri-gram entropy of generations",
        ),
    ]
}

#[component]
fn EvalResult(r: CaseRecord) -> impl IntoView {
    let m = &r.metrics;
    let rows = metric_rows(m).map(|(id, name, v, what)| {
        view! { <tr data-metric=id><th scope="row">{name}</th><td class="num">{v}</td><td class="hint">{what}</td></tr> }
    });
    let req = &r.request;
    let old = req
        .target_true
        .as_ref()
        .map_or(String::new(), |t| t.str.clone());
    let title = format!(
        "Case #{}: {} → {} (edit {:.1} s)",
        r.case_id,
        req.filled(),
        req.target_new.str,
        r.edit_seconds
    );
    view! {
        <section id="eval-result" class="card" aria-label="Evaluation" data-case=r.case_id.to_string()
            data-efficacy=m.efficacy_score.to_string()>
            <h3>{title}</h3>
            <table class="metrics"><tr><th scope="col">"metric"</th><th scope="col">"value"</th><th scope="col">"meaning"</th></tr>{rows}</table>
            <h4>"Probabilities before → after the edit"</h4>
            <div class="scroll" tabindex="0" role="region" aria-label="Probabilities before and after">
                <table class="probs">{prob_header(&req.target_new.str, &old)}{score_rows(&r.pre, &r.post)}</table>
            </div>
        </section>
    }
}
