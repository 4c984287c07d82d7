//! The Study screen: does localization inform editing? (Hase et al. 2023). The Edit screen's
//! fact is traced (its true object's probability, MLP window 5), then edited at every chosen
//! layer by every chosen method for every problem, each edit scored and undone; the edits
//! stream into a table and the summary chart. It runs where the model's edits run: on the
//! server, or in one of this tab's workers (with the tab's key statistics).

use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_core::edit::{RewriteRequest, TargetStr};
use loci_core::plot;
use loci_core::study::{analyze, StudyLine};
use loci_frontend::engine::{Choice, Engine};
use loci_frontend::http::server_study;
use loci_frontend::protocol::StudyJob;

use super::edit::EditState;
use super::edit_actions::placed;
use super::edit_tab::{after_change, ensure_stats, on_tab};
use crate::components::chart::Chart;
use crate::components::progress::Progress;
use crate::state::{layer_list, lines, shared, Shared};

/// The study's methods and problems: API name, label.
const METHODS: [(&str, &str); 7] = [
    ("rome", "ROME"),
    ("memit", "MEMIT (window 5)"),
    ("alphaedit", "AlphaEdit (window 5)"),
    ("emmet", "EMMET"),
    ("ft-1", "FT-1"),
    ("ft-5", "FT-5"),
    ("grace", "GRACE"),
];
const PROBLEMS: [(&str, &str); 5] = [
    ("error_injection", "error injection"),
    ("tracing_reversal", "tracing reversal"),
    ("fact_erasure", "fact erasure"),
    ("fact_amplification", "fact amplification"),
    ("fact_forcing", "fact forcing"),
];

#[derive(Clone, Copy)]
pub struct StudyState {
    pub methods: RwSignal<[bool; 7]>,
    pub problems: RwSignal<[bool; 5]>,
    pub layers: RwSignal<String>,
    /// Study the fact even when the model does not know it.
    pub all: RwSignal<bool>,
    pub lines: RwSignal<Vec<StudyLine>>,
    pub running: RwSignal<bool>,
    pub chart: Memo<Option<String>>,
}

impl StudyState {
    pub fn new() -> Self {
        let lines = RwSignal::new(Vec::<StudyLine>::new());
        StudyState {
            methods: RwSignal::new([true, false, false, false, false, false, false]),
            problems: RwSignal::new([true, false, false, false, false]),
            layers: RwSignal::new(String::new()),
            all: RwSignal::new(false),
            lines,
            running: RwSignal::new(false),
            chart: Memo::new(move |_| {
                lines.with(|l| {
                    l.iter()
                        .any(|x| matches!(x, StudyLine::Edit(_)))
                        .then(|| plot::study_svg(&analyze(l)))
                })
            }),
        }
    }

    /// The `/api/study` body: the Edit screen's fact with this screen's choices.
    fn body(&self, model: &str, e: &EditState) -> Result<serde_json::Value, String> {
        let layers = layer_list(&self.layers.get_untracked())?;
        let mut request = RewriteRequest::from_prompt(
            &e.prompt.get_untracked(),
            &e.subject.get_untracked(),
            &e.target.get_untracked(),
        )
        .map_err(|x| x.to_string())?;
        request.target_true = Some(TargetStr::new(e.target_true.get_untracked()));
        let pick = |on: &[bool], names: &[&str]| -> Vec<String> {
            on.iter()
                .zip(names)
                .filter(|(b, _)| **b)
                .map(|(_, n)| n.to_string())
                .collect()
        };
        Ok(serde_json::json!({
            "model": model,
            "case": {
                "case_id": 0, "requested_rewrite": request,
                "paraphrase_prompts": lines(&e.paraphrase.get_untracked()),
                "neighborhood_prompts": lines(&e.neighborhood.get_untracked()),
            },
            "methods": pick(&self.methods.get_untracked(), &METHODS.map(|m| m.0)),
            "problems": pick(&self.problems.get_untracked(), &PROBLEMS.map(|p| p.0)),
            "layers": layers, "all_cases": self.all.get_untracked(),
        }))
    }
}

fn line_status(line: &StudyLine) -> String {
    match line {
        StudyLine::Case(c) => match &c.skipped {
            Some(why) => format!("Left out: {why}."),
            None => "Traced; editing at every layer…".to_string(),
        },
        StudyLine::Edit(e) => format!(
            "{} {} at layer {}: rewrite score {:.2}…",
            e.method.name(),
            e.problem.name(),
            e.layer,
            e.scores.rewrite
        ),
    }
}

impl StudyState {
    /// The study the form describes, for the tab's worker (the same fields `/api/study` takes).
    fn job(&self, e: &EditState) -> Result<StudyJob, String> {
        fn parse<T: serde::de::DeserializeOwned>(
            b: &serde_json::Value,
            k: &str,
        ) -> Result<T, String> {
            serde_json::from_value(b[k].clone()).map_err(|x| format!("{k}: {x}"))
        }
        let b = self.body("", e)?;
        Ok(StudyJob {
            case: parse(&b, "case")?,
            methods: parse(&b, "methods")?,
            problems: parse(&b, "problems")?,
            layers: parse(&b, "layers")?,
            all_cases: self.all.get_untracked(),
        })
    }
}

fn run(s: Shared, st: StudyState, e: EditState) {
    let Some((c, engine)) = placed(s) else { return };
    if engine == Engine::Tab {
        return run_in_tab(s, st, e, c);
    }
    let body = match st.body(&c.name, &e) {
        Ok(b) => b,
        Err(x) => return s.say("error", x),
    };
    st.lines.set(vec![]);
    st.running.set(true);
    s.set_running(true);
    s.say(
        "running",
        "Studying on the server: tracing the true object…",
    );
    let cancel = s.cancel_flag();
    spawn_local(async move {
        let outcome = server_study(&body, |line| {
            s.say("running", line_status(&line));
            st.lines.update(|l| l.push(line));
            !cancel.get()
        })
        .await;
        let skipped = st.lines.with_untracked(|l| {
            l.iter().find_map(|x| match x {
                StudyLine::Case(c) => c.skipped.clone(),
                _ => None,
            })
        });
        match (outcome, skipped) {
            (Ok(()), Some(why)) => s.say(
                "done",
                format!("Left out of the study: {why} (tick \"study it anyway\")."),
            ),
            (Ok(()), None) => s.say("done", "Study done; every edit was undone."),
            (Err(x), _) if x == "cancelled" => s.say("ready", "Study stopped."),
            (Err(x), _) => s.say("error", x),
        }
        st.running.set(false);
        s.set_running(false);
    });
}

/// The study in one of this tab's workers; the key statistics it needs are found or computed
/// first.
fn run_in_tab(s: Shared, st: StudyState, e: EditState, c: Choice) {
    let job = match st.job(&e) {
        Ok(j) => j,
        Err(x) => return s.say("error", x),
    };
    st.lines.set(vec![]);
    st.running.set(true);
    let cancel = s.cancel_flag();
    on_tab(s, c.clone(), move |pool, info| async move {
        let mut outcome = Ok(Some(vec![]));
        for _ in 0..2 {
            s.say("running", "Studying in this tab: tracing the true object…");
            outcome = pool
                .study(job.clone(), |line| {
                    s.say("running", line_status(&line));
                    st.lines.update(|l| l.push(line));
                    !cancel.get()
                })
                .await;
            let Ok(Some(layers)) = &outcome else { break };
            match ensure_stats(s, e, &c, &pool, &info, layers).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(x) => {
                    outcome = Err(x);
                    break;
                }
            }
        }
        st.running.set(false);
        // The digest shows the study left the weights as they were.
        after_change(s, e, &pool).await;
        let skipped = st.lines.with_untracked(|l| {
            l.iter().find_map(|x| match x {
                StudyLine::Case(c) => c.skipped.clone(),
                _ => None,
            })
        });
        match (outcome, skipped) {
            (Ok(None), Some(why)) => s.say(
                "done",
                format!("Left out of the study: {why} (tick \"study it anyway\")."),
            ),
            (Ok(None), None) => s.say("done", "Study done in this tab; every edit was undone."),
            (Ok(Some(_)), _) => s.say(
                "ready",
                "Study stopped: its key statistics were not computed.",
            ),
            (Err(x), _) if x == "cancelled" => s.say("ready", "Study stopped."),
            (Err(x), _) => s.say("error", x),
        }
        Ok(())
    })
}

fn checks<const N: usize>(
    prefix: &'static str,
    items: &'static [(&'static str, &'static str); N],
    sig: RwSignal<[bool; N]>,
) -> impl IntoView {
    items
        .iter()
        .enumerate()
        .map(|(i, (name, label))| {
            view! { <label><input type="checkbox" id=format!("{prefix}-{name}") prop:checked=move || sig.get()[i]
            on:change=move |ev| sig.update(|m| m[i] = event_target_checked(&ev)) />{*label}</label> }
        })
        .collect_view()
}

#[component]
pub fn StudyScreen() -> impl IntoView {
    let s = shared();
    let st = expect_context::<StudyState>();
    let e = expect_context::<EditState>();
    let fact = move || {
        format!(
            "{} → {} (true: {})",
            e.prompt.get(),
            e.target.get(),
            e.target_true.get()
        )
    };
    let done = Signal::derive(move || {
        let n = st
            .lines
            .with(|l| l.iter().filter(|x| matches!(x, StudyLine::Edit(_))).count());
        (n, 0)
    });
    view! {
        <div class="screen">
            <section class="form card" aria-labelledby="study-h">
                <h2 id="study-h">"Study a fact"</h2>
                <p class="hint">"Does localization inform editing? (Hase et al. 2023). The Edit screen's fact is traced (its true object's whole probability, MLP window 5), then edited at every chosen layer by every method for every problem; each edit is scored and undone, where the model's edits run (the header says where)."</p>
                <p class="fact"><span class="hint">"Fact: "</span>{fact}</p>
                <div class="fields">
                    <label for="study-true">"True object"</label>
                    <input id="study-true" prop:value=e.target_true on:input=move |ev| e.target_true.set(event_target_value(&ev)) />
                    <label for="study-layers">"Layers"</label>
                    <input id="study-layers" placeholder="every 4th" prop:value=st.layers on:input=move |ev| st.layers.set(event_target_value(&ev)) />
                    <fieldset class="checks"><legend>"Methods"</legend>{checks("study-method", &METHODS, st.methods)}</fieldset>
                    <fieldset class="checks"><legend>"Problems"</legend>{checks("study-problem", &PROBLEMS, st.problems)}</fieldset>
                    <label class="check"><input type="checkbox" id="study-all" prop:checked=st.all on:change=move |ev| st.all.set(event_target_checked(&ev)) />
                        "study it anyway if the model does not know it"</label>
                </div>
                <div class="buttons">
                    <button id="study" class="primary" on:click=move |_| run(s, st, e) prop:disabled=s.busy>"Run study"</button>
                </div>
                <Progress done=done running=st.running id="study-cancel" unit="edits" stop="Stop" />
            </section>
            <div class="results"><StudyResult st=st /></div>
        </div>
    }
}

#[component]
fn StudyResult(st: StudyState) -> impl IntoView {
    move || {
        let l = st.lines.get();
        let case = l.iter().find_map(|x| match x {
            StudyLine::Case(c) => Some(c.clone()),
            _ => None,
        });
        let Some(c) = case else {
            return view! { <section class="card"><h3>"Study"</h3><p class="hint">"No study yet."</p></section> }.into_any();
        };
        let fmt = |v: Option<f32>| v.map_or("—".to_string(), |x| format!("{x:.3}"));
        let rows: Vec<_> = l.iter().filter_map(|x| match x { StudyLine::Edit(e) => Some(e), _ => None }).map(|e| view! {
            <tr><td>{e.method.name()}</td><td>{e.problem.name()}</td><td class="num">{e.layer}</td>
                <td class="num">{format!("{:.3}", e.tracing_effect)}</td>
                <td class="num">{format!("{:.3}", e.scores.rewrite)}</td>
                <td class="num">{fmt(e.scores.paraphrase)}</td>
                <td class="num">{fmt(e.scores.neighborhood)}</td>
                <td class="num">{format!("{:.1} s", e.seconds)}</td></tr>
        }).collect();
        let n = rows.len();
        let summary = match (&c.skipped, &c.trace) {
            (Some(why), _) => format!("Left out: {why}."),
            (None, Some(t)) => format!(
                "p({:?}) = {:.3} clean, {:.3} with the subject corrupted.",
                c.target_true, t.high, t.low
            ),
            _ => String::new(),
        };
        view! {
            <section id="study-result" class="card" aria-label="Study result" data-edits=n.to_string()
                data-skipped=c.skipped.is_some().to_string()
                data-high=c.trace.as_ref().map_or(String::new(), |t| t.high.to_string())>
                <h3>"Study"</h3>
                <p class="hint">{summary}</p>
                <Chart svg=st.chart stem="study" title="Rewrite score against layer and tracing effect" />
                <div class="scroll" tabindex="0" role="region" aria-label="Study edits">
                <table class="probs"><tr><th scope="col">"method"</th><th scope="col">"problem"</th><th scope="col">"layer"</th><th scope="col">"tracing effect"</th>
                    <th scope="col">"rewrite"</th><th scope="col">"paraphrase"</th><th scope="col">"neighbourhood"</th><th scope="col">"time"</th></tr>{rows}</table>
                </div>
            </section>
        }.into_any()
    }
}
