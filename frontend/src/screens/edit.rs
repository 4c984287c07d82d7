//! The Edit screen: rewrite a fact with ROME, MEMIT or constrained fine-tuning on the server,
//! see the before → after probabilities and generations, list, download, undo and upload the
//! model's edits (the tab's model copies follow). The last trace's tracing effect helps to
//! choose the layer.

use leptos::prelude::*;
use loci_core::edit::{EditMethod, EditReport, MemitReport};

use super::edit_actions::{edit, undo, upload};
use super::trace::TraceState;
use crate::components::chart::Chart;
use crate::components::probs::edit_table;
use crate::state::shared;
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
    /// rome, memit or ft.
    pub method: RwSignal<EditMethod>,
    /// MEMIT's further facts, one per line: prompt | subject | new target.
    pub more: RwSignal<String>,
    pub report: RwSignal<Option<EditReport>>,
    pub memit: RwSignal<Option<MemitReport>>,
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
            more: RwSignal::new("The capital of Germany is the city of | Germany | Madrid".into()),
            report: RwSignal::new(None),
            memit: RwSignal::new(None),
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
        EditMethod::Ft => "FT (constrained fine-tuning)",
    }
}

#[component]
pub fn EditScreen() -> impl IntoView {
    let s = shared();
    let st = expect_context::<EditState>();
    let curves = expect_context::<TraceState>().curves;
    let memit = move || st.method.get() == EditMethod::Memit;
    view! {
        <div class="screen">
            <section class="form card" aria-labelledby="edit-h">
                <h2 id="edit-h">"Edit a fact"</h2>
                <p class="hint">"Edits run on the server (they need the layers' key statistics); the tab's model copies get the same edit."</p>
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
                    <label for="edit-more" class:hidden=move || !memit()>"More facts for MEMIT (prompt | subject | new target, one per line)"</label>
                    <textarea id="edit-more" rows="2" class:hidden=move || !memit() prop:value=st.more on:input=move |ev| st.more.set(event_target_value(&ev))></textarea>
                    {text_area("edit-paraphrase", "Paraphrases (one per line)", st.paraphrase)}
                    {text_area("edit-neighborhood", "Neighbourhood (should not change)", st.neighborhood)}
                </div>
                <div class="buttons">
                    <button id="edit" class="primary" on:click=move |_| edit(s, st) prop:disabled=s.busy>"Edit"</button>
                    <button id="undo" on:click=move |_| undo(s, st) prop:disabled=move || s.busy.get() || s.edits.with(Vec::is_empty)>"Undo"</button>
                </div>
                <label for="upload-edit" class="upload">"Upload an edit (.safetensors)"</label>
                <input id="upload-edit" type="file" accept=".safetensors" on:change=move |ev| upload(s, ev) />
            </section>
            <div class="results">
                <EditList />
                {move || st.report.get().map(|r| view! { <RomeReport r=r /> })}
                {move || st.memit.get().map(|r| view! { <MemitReportView r=r /> })}
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

/// The server's edits of the model, newest last, each downloadable.
#[component]
fn EditList() -> impl IntoView {
    let s = shared();
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
                        view! { <p class="edit-item">{label}" " <a href=href download="" aria-label=format!("download edit #{}", e.id)>"download"</a></p> }
                    }).collect_view().into_any()
                }}
            </div>
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
        <section id="edit-result" class="card" aria-label="Edit result" data-p-new-after=r.after.rewrite.target_new.to_string()>
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
        "MEMIT: {} facts at layers {:?} (‖ΔW‖ per layer {}, {:.1} s)",
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
        <section id="memit-result" class="card" aria-label="MEMIT result" data-facts=r.requests.len().to_string()>
            <h3>{title}</h3>
            {facts}
        </section>
    }
}
