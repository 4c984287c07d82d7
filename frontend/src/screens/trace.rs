//! The Trace screen: a fact's prompt and subject in, the next-token prediction and the causal
//! trace out — heatmaps filled row by row as they stream from the engine, and the per-layer
//! tracing effect — on the engine the header shows.

use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_core::plot;
use loci_core::trace::{TraceHeader, TraceKind, TraceMethod, TraceRequest, TraceResult};
use loci_core::Prediction;
use loci_frontend::files;

use crate::components::chart::Chart;
use crate::components::heatmap::Heatmaps;
use crate::components::probs::PredictionTable;
use crate::components::progress::Progress;
use crate::link::{trace_link, ShareLink};
use crate::state::{shared, Shared};

/// The Trace screen's state; kept while other screens show (the Edit screen draws its curves).
#[derive(Clone, Copy)]
pub struct TraceState {
    pub prompt: RwSignal<String>,
    pub subject: RwSignal<String>,
    pub samples: RwSignal<usize>,
    pub window: RwSignal<usize>,
    /// Restore the hidden state, MLP outputs, attention outputs.
    pub kinds: RwSignal<[bool; 3]>,
    /// Exact causal tracing, attribution patching's one-backward-pass estimate, or knowledge
    /// neurons' integrated gradients.
    pub method: RwSignal<TraceMethod>,
    pub prediction: RwSignal<Option<Prediction>>,
    pub trace: RwSignal<Option<TraceResult>>,
    /// Where the last trace ran, in words.
    pub engine: RwSignal<String>,
    /// Rows done and expected.
    pub progress: RwSignal<(usize, usize)>,
    pub tracing: RwSignal<bool>,
    /// The per-layer tracing effect of the trace, drawn once per update.
    pub curves: Memo<Option<String>>,
}

impl TraceState {
    pub fn new() -> Self {
        let trace = RwSignal::new(None::<TraceResult>);
        TraceState {
            prompt: RwSignal::new("The Eiffel Tower is located in the city of".into()),
            subject: RwSignal::new("Eiffel Tower".into()),
            samples: RwSignal::new(10),
            window: RwSignal::new(10),
            kinds: RwSignal::new([true; 3]),
            method: RwSignal::new(TraceMethod::Exact),
            prediction: RwSignal::new(None),
            trace,
            engine: RwSignal::new(String::new()),
            progress: RwSignal::new((0, 0)),
            tracing: RwSignal::new(false),
            curves: Memo::new(move |_| trace.with(|t| t.as_ref().map(plot::tracing_effect_svg))),
        }
    }

    fn request(&self) -> Result<TraceRequest, String> {
        let mut req = TraceRequest::new(self.prompt.get_untracked(), self.subject.get_untracked());
        req.samples = self.samples.get_untracked();
        req.window = self.window.get_untracked();
        req.kinds = TraceKind::ALL
            .into_iter()
            .zip(self.kinds.get_untracked())
            .filter(|(_, on)| *on)
            .map(|(k, _)| k)
            .collect();
        if self.method.get_untracked() == TraceMethod::Neurons {
            // Knowledge neurons are the MLP's: the other kinds have none.
            req.kinds = vec![TraceKind::Mlp];
        }
        if req.kinds.is_empty() {
            return Err("Pick at least one kind of state to restore.".into());
        }
        Ok(req)
    }
}

fn predict(s: Shared, st: TraceState) {
    let Some(c) = s.choice() else { return };
    let prompt = st.prompt.get_untracked();
    s.set_running(true);
    spawn_local(async move {
        let result = async {
            let engine = s.runner(&c).await?;
            s.say("running", format!("Predicting in {}…", engine.describe()));
            engine.predict(&c.name, &prompt, 10).await
        }
        .await;
        match result {
            Ok(p) => {
                st.prediction.set(Some(p));
                s.say("ready", "Done.");
            }
            Err(e) => s.say("error", e),
        }
        s.set_running(false);
    });
}

/// Traces the form's fact on the engine the header shows.
pub fn run_trace(s: Shared, st: TraceState) {
    let Some(c) = s.choice() else { return };
    let req = match st.request() {
        Ok(r) => r,
        Err(e) => return s.say("error", e),
    };
    // The last trace stays until the new one's header: its grid holds the space.
    st.progress.set((0, 0));
    st.tracing.set(true);
    s.set_running(true);
    let cancel = s.cancel_flag();
    spawn_local(async move {
        let started = files::now_ms();
        let on_header = |h: &TraceHeader| {
            st.progress.set((0, h.total_rows));
            st.trace
                .set(Some(TraceResult::from_header(h, &c.name, &req)));
            let msg = format!("Tracing {:?} → {:?}…", req.prompt, h.answer.token);
            s.say("running", msg);
        };
        let on_row = move |kind, token, scores| {
            st.trace.update(|t| {
                if let Some(t) = t.as_mut() {
                    t.set_row(kind, token, scores);
                }
            });
            st.progress.update(|p| p.0 += 1);
            !cancel.get()
        };
        let outcome = async {
            let engine = s.runner(&c).await?;
            st.engine.set(engine.describe());
            s.say("running", "Tracing: the clean and corrupted passes…");
            let how = (c.name.as_str(), st.method.get_untracked());
            engine.trace(how, &req, on_header, on_row).await
        }
        .await;
        match outcome {
            Ok(r) => {
                let secs = (files::now_ms() - started) / 1e3;
                let how = match r.method {
                    TraceMethod::Exact => "Traced",
                    TraceMethod::Attribution => "Estimated by attribution patching",
                    TraceMethod::Neurons => "Attributed to knowledge neurons",
                };
                let msg = match r.method {
                    TraceMethod::Neurons => format!(
                        "{how}: clean p = {:.3}; {} neurons pass the threshold ({secs:.1} s).",
                        r.high,
                        r.neurons.len()
                    ),
                    _ => format!(
                        "{how}: clean p = {:.3}, corrupted p = {:.3} ({secs:.1} s).",
                        r.high, r.low
                    ),
                };
                st.trace.set(Some(r));
                s.say("done", msg);
            }
            Err(e) if e == "cancelled" => s.say("ready", "Trace cancelled."),
            Err(e) => s.say("error", e),
        }
        st.tracing.set(false);
        s.set_running(false);
    });
}

#[component]
pub fn TraceScreen() -> impl IntoView {
    let s = shared();
    let st = expect_context::<TraceState>();
    view! {
        <div class="screen">
            <section class="form card" aria-labelledby="trace-h">
                <h2 id="trace-h">"Trace a fact"</h2>
                <p class="hint">"Corrupt the subject's embeddings, then restore one state at a time: where restoring brings the answer back is where the model recalls the fact (Meng et al. 2022)."</p>
                <TraceForm st=st />
                <div class="buttons">
                    <button id="predict" on:click=move |_| predict(s, st) prop:disabled=s.busy>"Predict"</button>
                    <button id="trace" class="primary" on:click=move |_| run_trace(s, st) prop:disabled=s.busy>"Trace"</button>
                    <ShareLink link=Signal::derive(move || trace_link(s, st)) />
                </div>
                <Progress done=st.progress running=st.tracing id="cancel" unit="rows" />
            </section>
            <div class="results">
                <TraceResultView st=st />
                {move || match st.prediction.get() {
                    Some(p) => view! { <PredictionTable p=p /> }.into_any(),
                    None => view! { <section class="card"><h3>"Prediction"</h3><p class="hint">"Press Predict to see the model's next tokens for the prompt."</p></section> }.into_any(),
                }}
            </div>
        </div>
    }
}

#[component]
fn TraceForm(st: TraceState) -> impl IntoView {
    let s = shared();
    let pick_fact = move |ev: leptos::ev::Event| {
        let i: usize = event_target_value(&ev).parse().unwrap_or(usize::MAX);
        if let Some(f) = s.facts.with_untracked(|f| f.get(i).cloned()) {
            st.prompt.set(f.prompt);
            st.subject.set(f.subject);
        }
    };
    let kind = |i: usize, id: &'static str, label: &'static str| {
        view! { <label><input type="checkbox" id=id prop:checked=move || st.kinds.get()[i]
        on:change=move |ev| st.kinds.update(|k| k[i] = event_target_checked(&ev)) />{label}</label> }
    };
    let number = |sig: RwSignal<usize>, default: usize| {
        move |ev: leptos::ev::Event| sig.set(event_target_value(&ev).parse().unwrap_or(default))
    };
    view! {
        <div class="fields">
            <label for="fact">"Known fact"</label>
            <select id="fact" on:change=pick_fact>
                <option value="">"pick one of known_1000…"</option>
                {move || s.facts.get().into_iter().enumerate().take(300).map(|(i, f)| {
                    view! { <option value=i.to_string()>{f.prompt}</option> }
                }).collect_view()}
            </select>
            <label for="prompt">"Prompt"</label>
            <input id="prompt" prop:value=st.prompt on:input=move |ev| st.prompt.set(event_target_value(&ev)) />
            <label for="subject">"Subject"</label>
            <input id="subject" prop:value=st.subject on:input=move |ev| st.subject.set(event_target_value(&ev)) />
            <div class="pair">
                <label>"Samples" <input id="samples" type="number" min="1" max="64"
                    prop:value=move || st.samples.get().to_string() on:input=number(st.samples, 10) /></label>
                <label>"Window" <input id="window" type="number" min="1" max="40"
                    prop:value=move || st.window.get().to_string() on:input=number(st.window, 10) /></label>
            </div>
            <label for="trace-method">"Method"</label>
            <select id="trace-method" prop:value=move || st.method.get().name()
                on:change=move |ev| {
                    if let Ok(m) = event_target_value(&ev).parse() {
                        st.method.set(m);
                    }
                }>
                <option value="exact">"Causal tracing (every cell run)"</option>
                <option value="attribution">"Attribution patching (first-order estimate, one backward pass)"</option>
                <option value="neurons">"Knowledge neurons (integrated gradients over MLP neurons)"</option>
            </select>
            <fieldset class="checks">
                <legend>"Restore"</legend>
                {kind(0, "kind-hidden", "hidden")}
                {kind(1, "kind-mlp", "MLP")}
                {kind(2, "kind-attn", "attention")}
            </fieldset>
        </div>
    }
}

#[component]
fn TraceResultView(st: TraceState) -> impl IntoView {
    let attrs = Memo::new(move |_| {
        st.trace.with(|t| {
            t.as_ref().map(|t| {
                let cells: usize = t
                    .scores
                    .values()
                    .map(|g| g.len() * g.first().map_or(0, Vec::len))
                    .sum();
                let scores = serde_json::to_string(&t.scores).unwrap_or_default();
                (cells, scores, t.high, t.low)
            })
        })
    });
    let attr = move |f: fn(&(usize, String, f32, f32)) -> String| {
        move || attrs.with(|a| a.as_ref().map(f).unwrap_or_default())
    };
    let caption = move || match (st.tracing.get(), st.engine.get()) {
        (_, e) if e.is_empty() => "No trace yet: pick a fact and press Trace.".to_string(),
        (true, e) => format!("Tracing in {e}…"),
        (false, e) => format!("Computed in {e}."),
    };
    view! {
        <section id="trace-result" class="card" aria-label="Trace result"
            data-cells=attr(|a| a.0.to_string()) data-scores=attr(|a| a.1.clone())
            data-high=attr(|a| a.2.to_string()) data-low=attr(|a| a.3.to_string())
            data-rows-done=move || st.progress.get().0.to_string()
            data-rows-total=move || st.progress.get().1.to_string() data-engine=st.engine>
            <h3>"Causal trace"</h3>
            <p class="hint">{caption}</p>
            <Heatmaps trace=st.trace />
            <Chart svg=st.curves stem="tracing-effect" title="Tracing effect per layer" />
        </section>
    }
}
