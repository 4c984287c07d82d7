//! The Edit screen: rewrite a fact with ROME, MEMIT or constrained fine-tuning, on the server
//! or in this tab (with the key statistics the tab holds), see the before → after
//! probabilities and generations, list, download, undo and upload the model's edits. The last
//! trace's tracing effect helps to choose the layer.

use leptos::prelude::*;
use loci_core::edit::{EditMethod, EditReport, MemitReport};

use super::edit_actions::{edit, picked_file, undo, upload};
use super::edit_tab::{self, HeldStats, StatsFrom};
use super::trace::TraceState;
use crate::components::chart::Chart;
use crate::components::probs::edit_table;
use crate::components::progress::Progress;
use crate::components::save::save_bytes;
use crate::link::{edit_link, ShareLink};
use crate::state::shared;
use loci_frontend::engine::{edit_engine, Engine};
use loci_frontend::http::url_part;

/// The Edit screen's state; the Study screen studies this fact.
#[derive(Clone, Copy)]
pub struct EditState {
    pub prompt: RwSignal<String>,
    pub subject: RwSignal<String>,
    pub target: RwSignal<String>,
    /// The true object (the Study screen's; filled from a CounterFact case).
    pub target_true: RwSignal<String>,
    pub layer: RwSignal<String>,
    pub paraphrase: RwSignal<String>,
    pub neighborhood: RwSignal<String>,
    /// rome, memit, alphaedit, emmet, ft or grace.
    pub method: RwSignal<EditMethod>,
    /// AlphaEdit's null space: a threshold ("2e-2") or a share of the trace ("30%"); empty: the
    /// paper's.
    pub null_space: RwSignal<String>,
    /// MEMIT's further facts, one per line: prompt | subject | new target.
    pub more: RwSignal<String>,
    pub report: RwSignal<Option<EditReport>>,
    pub memit: RwSignal<Option<MemitReport>>,
    /// A tab edit's optimisation: the step done and the most steps, and each step's loss.
    pub steps: RwSignal<(usize, usize)>,
    pub losses: RwSignal<Vec<f32>>,
    /// Layers whose statistics the last tab edit asked for.
    pub needed: RwSignal<Vec<usize>>,
    /// Statistics the tab holds.
    pub stats: RwSignal<Vec<HeldStats>>,
    /// The statistics panel's layers, token goal and URL.
    pub stats_layers: RwSignal<String>,
    pub stats_tokens: RwSignal<String>,
    pub stats_url: RwSignal<String>,
    /// Tokens seen and wanted while the tab computes statistics.
    pub stats_progress: RwSignal<(usize, usize)>,
    /// Digest of the tab's edited weights (every layer's down-projection), after each change.
    pub digest: RwSignal<String>,
}

impl EditState {
    pub fn new() -> Self {
        EditState {
            prompt: RwSignal::new("The Eiffel Tower is located in the city of".into()),
            subject: RwSignal::new("Eiffel Tower".into()),
            target: RwSignal::new("Rome".into()),
            target_true: RwSignal::new("Paris".into()),
            layer: RwSignal::new(String::new()),
            paraphrase: RwSignal::new("Where is the Eiffel Tower? It is in the city of".into()),
            neighborhood: RwSignal::new(
                "The Colosseum is located in the city of\nThe Louvre is located in the city of"
                    .into(),
            ),
            method: RwSignal::new(EditMethod::Rome),
            null_space: RwSignal::new(String::new()),
            more: RwSignal::new("The capital of Germany is the city of | Germany | Madrid".into()),
            report: RwSignal::new(None),
            memit: RwSignal::new(None),
            steps: RwSignal::new((0, 0)),
            losses: RwSignal::new(vec![]),
            needed: RwSignal::new(vec![]),
            stats: RwSignal::new(vec![]),
            stats_layers: RwSignal::new(String::new()),
            stats_tokens: RwSignal::new("20000".into()),
            stats_url: RwSignal::new(String::new()),
            stats_progress: RwSignal::new((0, 0)),
            digest: RwSignal::new(String::new()),
        }
    }

    /// Fills the form from bundled CounterFact case `i`.
    pub fn pick_case(&self, i: usize) {
        let Some(c) = shared().cases.with_untracked(|c| c.get(i).cloned()) else {
            return;
        };
        let r = &c.requested_rewrite;
        self.prompt.set(r.filled());
        self.subject.set(r.subject.clone());
        self.target.set(r.target_new.str.clone());
        self.paraphrase.set(c.paraphrase_prompts.join("\n"));
        self.neighborhood.set(c.neighborhood_prompts.join("\n"));
        if let Some(t) = &r.target_true {
            self.target_true.set(t.str.clone());
        }
    }
}

/// A text input bound to `sig`, labelled.
pub fn text_field(id: &'static str, label: &'static str, sig: RwSignal<String>) -> impl IntoView {
    view! {
        <label for=id>{label}</label>
        <input id=id prop:value=sig on:input=move |ev| sig.set(event_target_value(&ev)) />
    }
}

/// A textarea bound to `sig`, labelled.
pub fn text_area(id: &'static str, label: &'static str, sig: RwSignal<String>) -> impl IntoView {
    view! {
        <label for=id>{label}</label>
        <textarea id=id rows="2" prop:value=sig on:input=move |ev| sig.set(event_target_value(&ev))></textarea>
    }
}

/// The bundled CounterFact cases as a select that fills the form.
#[component]
pub fn CasePicker(id: &'static str, on_pick: impl Fn(usize) + 'static) -> impl IntoView {
    let s = shared();
    view! {
        <label for=id>"CounterFact case"</label>
        <select id=id on:change=move |ev| on_pick(event_target_value(&ev).parse().unwrap_or(usize::MAX))>
            <option value="">"pick one…"</option>
            {move || s.cases.get().into_iter().enumerate().map(|(i, c)| {
                let r = &c.requested_rewrite;
                let label = format!("#{}: {} → {}", c.case_id, r.filled(), r.target_new.str);
                view! { <option value=i.to_string()>{label}</option> }
            }).collect_view()}
        </select>
    }
}

/// How the method menu offers `m`.
fn method_choice(m: EditMethod) -> &'static str {
    match m {
        EditMethod::Rome => "ROME (one fact, one layer)",
        EditMethod::Memit => "MEMIT (several facts and layers)",
        EditMethod::Alphaedit => "AlphaEdit (MEMIT that keeps what is known and earlier edits)",
        EditMethod::Emmet => "EMMET (several facts, each written exactly)",
        EditMethod::Ft => "FT (constrained fine-tuning)",
        EditMethod::Grace => "GRACE (a codebook entry, the weights untouched)",
    }
}

#[component]
pub fn EditScreen() -> impl IntoView {
    let s = shared();
    let st = expect_context::<EditState>();
    let curves = expect_context::<TraceState>().curves;
    let memit = move || st.method.get().takes_many_facts();
    // Where edits of the picked model run, and why (the tab's need its statistics panel).
    let place = Memo::new(move |_| {
        s.current()
            .map(|c| edit_engine(&c, s.mode.get()).map(|(e, why)| (e == Engine::Tab, why)))
    });
    let in_tab = move || matches!(place.get(), Some(Ok((true, _))));
    let hint = move || match place.get() {
        Some(Ok((true, why))) => {
            format!("Edits run in this tab: {why}. Every worker's copy gets the same edit.")
        }
        Some(Ok((false, why))) => {
            format!(
                "Edits run on the server: {why}. They are yours alone (other visitors see the model \
                 unedited) and the tab's model copies get the same edit."
            )
        }
        Some(Err(e)) => e,
        None => String::new(),
    };
    let editing = move || s.busy.get() && st.steps.get().1 > 0;
    view! {
        <div class="screen">
            <section class="form card" aria-labelledby="edit-h">
                <h2 id="edit-h">"Edit a fact"</h2>
                <p class="hint" id="edit-where">{hint}</p>
                <div class="fields">
                    <CasePicker id="case" on_pick=move |i| st.pick_case(i) />
                    {text_field("edit-prompt", "Prompt", st.prompt)}
                    {text_field("edit-subject", "Subject", st.subject)}
                    {text_field("edit-target", "New target", st.target)}
                    <label for="edit-method">"Method"</label>
                    <select id="edit-method" prop:value=move || st.method.get().name()
                        on:change=move |ev| {
                            if let Ok(m) = event_target_value(&ev).parse() {
                                st.method.set(m);
                            }
                        }>
                        {EditMethod::ALL.map(|m| view! { <option value=m.name()>{method_choice(m)}</option> }).to_vec()}
                    </select>
                    <label for="edit-layer">{move || if st.method.get() == EditMethod::Rome { "Layer" } else { "Layers" }}</label>
                    <input id="edit-layer" placeholder="default" prop:value=st.layer on:input=move |ev| st.layer.set(event_target_value(&ev)) />
                    <label for="edit-null" class:hidden=move || st.method.get() != EditMethod::Alphaedit>"Null space (eigenvalues below, or % of the trace)"</label>
                    <input id="edit-null" placeholder="2e-2" class:hidden=move || st.method.get() != EditMethod::Alphaedit prop:value=st.null_space on:input=move |ev| st.null_space.set(event_target_value(&ev)) />
                    <label for="edit-more" class:hidden=move || !memit()>"More facts (prompt | subject | new target, one per line)"</label>
                    <textarea id="edit-more" rows="2" class:hidden=move || !memit() prop:value=st.more on:input=move |ev| st.more.set(event_target_value(&ev))></textarea>
                    {text_area("edit-paraphrase", "Paraphrases (one per line)", st.paraphrase)}
                    {text_area("edit-neighborhood", "Neighbourhood (should not change)", st.neighborhood)}
                </div>
                <div class="buttons">
                    <button id="edit" class="primary" on:click=move |_| edit(s, st) prop:disabled=s.busy>"Edit"</button>
                    <ShareLink link=Signal::derive(move || edit_link(s, st)) />
                    <button id="undo" on:click=move |_| undo(s, st) prop:disabled=move || s.busy.get() || s.edits.with(Vec::is_empty)>"Undo"</button>
                </div>
                <Show when=in_tab>
                    <Progress done=st.steps running=Signal::derive(editing) id="edit-cancel" unit="steps" />
                    <p class="hint" id="edit-loss">{move || st.losses.with(|l| l.last().map(|x| format!("loss {x:.4} at step {}", l.len())).unwrap_or_default())}</p>
                </Show>
                <label for="upload-edit" class="upload">"Upload an edit (.safetensors)"</label>
                <input id="upload-edit" type="file" accept=".safetensors" on:change=move |ev| upload(s, st, ev) />
            </section>
            <div class="results">
                <EditList in_tab=Signal::derive(in_tab) />
                {move || st.report.get().map(|r| view! { <RomeReport r=r /> })}
                {move || st.memit.get().map(|r| view! { <MemitReportView r=r /> })}
                <Show when=in_tab>
                    <StatsPanel />
                </Show>
                <Show when=move || curves.with(Option::is_some)>
                    <section class="card" aria-labelledby="curves-h">
                        <h3 id="curves-h">"The last trace, to choose the layer"</h3>
                        <Chart svg=curves stem="tracing-effect" title="Tracing effect per layer" />
                    </section>
                </Show>
            </div>
        </div>
    }
}

/// The key statistics this tab holds, and the ways to get more: computed here from the
/// bundled Wikipedia slice (progress, Cancel, kept in the browser), a file, or a URL.
#[component]
fn StatsPanel() -> impl IntoView {
    let s = shared();
    let st = expect_context::<EditState>();
    let computing = move || s.busy.get() && st.stats_progress.get().1 > 0 && st.steps.get().1 == 0;

    view! {
        <section class="form card" aria-labelledby="stats-h" id="stats-panel">
            <h3 id="stats-h">"Key statistics in this tab"</h3>
            <ul id="stats-held" data-count=move || st.stats.get().len().to_string()>
                {move || st.stats.get().into_iter().map(|h| {
                    let p = h.provenance;
                    view! { <li>{format!("layer {}: {} tokens of {} ({} texts), {}", p.layer, p.tokens, p.corpus, p.texts, h.source)}</li> }
                }).collect_view()}
            </ul>
            <p class="hint">{move || {
                let n = st.needed.get();
                if n.is_empty() {
                    "ROME, MEMIT and EMMET whiten their update with C = E[k kᵀ] of a layer's MLP keys, AlphaEdit writes into its null space; fine-tuning needs none.".to_string()
                } else {
                    format!("The last edit needs layer {}.", n.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", "))
                }
            }}</p>
            <div class="fields">
                <label for="stats-layers">"Layers"</label>
                <input id="stats-layers" placeholder="what the edit needs" prop:value=st.stats_layers on:input=move |ev| st.stats_layers.set(event_target_value(&ev)) />
                <label for="stats-tokens">"Tokens"</label>
                <input id="stats-tokens" inputmode="numeric" prop:value=st.stats_tokens on:input=move |ev| st.stats_tokens.set(event_target_value(&ev)) />
            </div>
            <div class="buttons">
                <button id="stats-compute" on:click=move |_| if let Some(c) = s.choice() { edit_tab::compute_stats(s, st, c) } prop:disabled=s.busy>"Compute in this tab"</button>
            </div>
            <Progress done=st.stats_progress running=Signal::derive(computing) id="stats-cancel" unit="tokens" />
            <label for="stats-file" class="upload">"Load a statistics file (.safetensors from loci stats)"</label>
            <input id="stats-file" type="file" accept=".safetensors" on:change=move |ev| {
                leptos::task::spawn_local(async move {
                    match picked_file(&ev).await {
                        Some(Ok(b)) => if let Some(c) = s.choice() { edit_tab::load_stats(s, st, c, StatsFrom::File(b)) },
                        Some(Err(e)) => s.say("error", e),
                        None => {}
                    }
                });
            } />
            <div class="fields">
                <label for="stats-url">"Or download from a URL"</label>
                <input id="stats-url" type="url" placeholder="https://…/layer6.safetensors" prop:value=st.stats_url on:input=move |ev| st.stats_url.set(event_target_value(&ev)) />
            </div>
            <div class="buttons">
                <button id="stats-fetch" on:click=move |_| {
                    let url = st.stats_url.get_untracked();
                    if let Some(c) = s.choice() { edit_tab::load_stats(s, st, c, StatsFrom::Url(url)) }
                } prop:disabled=move || s.busy.get() || st.stats_url.with(|u| u.trim().is_empty())>"Download"</button>
            </div>
        </section>
    }
}

/// The model's edits (the server's, or this tab's own), newest last, each downloadable.
#[component]
fn EditList(in_tab: Signal<bool>) -> impl IntoView {
    let s = shared();
    let st = expect_context::<EditState>();
    let save_tab_edit = move |i: usize| {
        let files = s
            .tab_pool_of(&s.model.get_untracked())
            .map(|p| p.edit_files());
        if let Some(f) = files.and_then(|f| f.get(i).cloned()) {
            save_bytes(&format!("loci-edit-{}.safetensors", i + 1), &f);
        }
    };
    view! {
        <section class="card" aria-labelledby="edits-h">
            <h3 id="edits-h">"Edits of this model"</h3>
            <div id="edits" data-count=move || s.edits.get().len().to_string()>
                {move || {
                    let m = s.model.get();
                    let list = s.edits.get();
                    if list.is_empty() {
                        return view! { <p class="hint">"None: the model has its original weights."</p> }.into_any();
                    }
                    list.into_iter().map(|e| {
                        let href = format!("/api/edits/{}/file?model={}", e.id, url_part(&m));
                        let facts: Vec<String> = e.requests.iter().map(|r| format!("{} → {}", r.filled(), r.target_new.str)).collect();
                        let layers = match &e.layers[..] {
                            [l] => format!("layer {l}"),
                            ls => format!("layers {}", ls.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",")),
                        };
                        let label = format!("#{} {} {layers}: {}", e.id, e.method.name().to_uppercase(), facts.join("; "));
                        let id = e.id;
                        let link = if in_tab.get() {
                            view! { <button type="button" class="link" aria-label=format!("download edit #{id}") on:click=move |_| save_tab_edit(id as usize - 1)>"download"</button> }.into_any()
                        } else {
                            view! { <a href=href download="" aria-label=format!("download edit #{id}")>"download"</a> }.into_any()
                        };
                        view! { <p class="edit-item">{label}" " {link}</p> }
                    }).collect_view().into_any()
                }}
            </div>
            <p class="hint" id="weights-digest" class:hidden=move || !in_tab.get() || st.digest.with(String::is_empty)>
                {move || format!("Digest of the edited weights: {} (equal digests: equal bits)", st.digest.get())}
            </p>
        </section>
    }
}

#[component]
fn RomeReport(r: EditReport) -> impl IntoView {
    let gens: Vec<_> = r
        .generations
        .before
        .iter()
        .zip(&r.generations.after)
        .map(|(b, a)| view! { <tr><td>{b.clone()}</td><td>{a.clone()}</td></tr> })
        .collect();
    let title = format!(
        "{} → {} at layer {} (‖ΔW‖ = {:.2}, {:.1} s)",
        r.request.filled(),
        r.request.target_new.str,
        r.layer,
        r.delta_norm,
        r.seconds
    );
    view! {
        <section id="edit-result" class="card" aria-label="Edit result" data-p-new-before=r.before.rewrite.target_new.to_string() data-p-new-after=r.after.rewrite.target_new.to_string()>
            <h3>{title}</h3>
            {edit_table(&r.request, &r.before, &r.after)}
            <h4>"Generations"</h4>
            <table class="gens"><tr><th scope="col">"before"</th><th scope="col">"after"</th></tr>{gens}</table>
        </section>
    }
}

#[component]
fn MemitReportView(r: MemitReport) -> impl IntoView {
    let norms: Vec<String> = r.delta_norms.iter().map(|n| format!("{n:.2}")).collect();
    let title = format!(
        "{}: {} facts at layers {:?} (‖ΔW‖ per layer {}, {:.1} s)",
        r.method.label(),
        r.requests.len(),
        r.layers,
        norms.join(", "),
        r.seconds
    );
    let facts: Vec<_> = r
        .requests
        .iter()
        .map(|q| {
            let gens: Vec<_> = q
                .generations
                .after
                .iter()
                .map(|g| view! { <li>{g.clone()}</li> })
                .collect();
            view! {
                <h4>{format!("{} → {}", q.request.filled(), q.request.target_new.str)}</h4>
                {edit_table(&q.request, &q.before, &q.after)}
                <ul class="gens">{gens}</ul>
            }
        })
        .collect();
    view! {
        <section id="memit-result" class="card" aria-label="Many-fact edit result" data-facts=r.requests.len().to_string()>
            <h3>{title}</h3>
            {facts}
        </section>
    }
}
