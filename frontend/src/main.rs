//! Loci's web app (leptos, client-side rendered). For now every job runs on the server engine
//! (`loci serve`'s API); the heatmap fills in row by row as the trace streams.

use futures_util::StreamExt;
use gloo_net::eventsource::futures::EventSource;
use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_core::trace::{TraceHeader, TraceKind, TraceRequest, TraceResult};
use loci_core::{plot, Prediction};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
struct ModelListing {
    name: String,
    format: String,
    size_bytes: u64,
}

#[derive(Deserialize)]
struct RowMsg {
    kind: TraceKind,
    token: usize,
    scores: Vec<f32>,
}

#[derive(Deserialize)]
struct ErrorMsg {
    error: String,
}

async fn fetch_models() -> Result<Vec<ModelListing>, String> {
    let r = gloo_net::http::Request::get("/api/models")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    r.json().await.map_err(|e| e.to_string())
}

async fn post_predict(model: &str, prompt: &str) -> Result<Prediction, String> {
    let body = serde_json::json!({ "model": model, "prompt": prompt, "top": 10 });
    let r = gloo_net::http::Request::post("/api/predict")
        .json(&body)
        .map_err(|e| e.to_string())?
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.ok() {
        r.json().await.map_err(|e| e.to_string())
    } else {
        Err(r
            .json::<ErrorMsg>()
            .await
            .map(|e| e.error)
            .unwrap_or_else(|_| format!("HTTP {}", r.status())))
    }
}

#[component]
fn App() -> impl IntoView {
    let (models, set_models) = signal(Vec::<ModelListing>::new());
    let (model, set_model) = signal(String::new());
    let (prompt, set_prompt) = signal("The Eiffel Tower is located in the city of".to_string());
    let (subject, set_subject) = signal("Eiffel Tower".to_string());
    let (samples, set_samples) = signal(10usize);
    let (status, set_status) =
        signal(("loading".to_string(), "Loading the model list…".to_string()));
    let (prediction, set_prediction) = signal(None::<Prediction>);
    let (trace, set_trace) = signal(None::<TraceResult>);
    let (progress, set_progress) = signal((0usize, 0usize));

    spawn_local(async move {
        match fetch_models().await {
            Ok(m) => {
                if let Some(first) = m.first() {
                    set_model.set(first.name.clone());
                }
                set_models.set(m);
                set_status.set(("ready".into(), "Ready. Jobs run on the server.".into()));
            }
            Err(e) => set_status.set(("error".into(), format!("The server did not answer: {e}"))),
        }
    });

    let on_predict = move |_| {
        let (m, p) = (model.get_untracked(), prompt.get_untracked());
        set_status.set(("running".into(), "Predicting…".into()));
        spawn_local(async move {
            match post_predict(&m, &p).await {
                Ok(pred) => {
                    set_prediction.set(Some(pred));
                    set_status.set(("ready".into(), "Done.".into()));
                }
                Err(e) => set_status.set(("error".into(), e)),
            }
        });
    };

    let on_trace = move |_| {
        let mut req = TraceRequest::new(prompt.get_untracked(), subject.get_untracked());
        req.samples = samples.get_untracked();
        let m = model.get_untracked();
        let mut body = serde_json::to_value(&req).expect("request serialises");
        body["model"] = serde_json::json!(m);
        let url = format!(
            "/api/trace?q={}",
            js_sys::encode_uri_component(&body.to_string())
        );
        set_trace.set(None);
        set_progress.set((0, 0));
        set_status.set((
            "running".into(),
            "Tracing: running the clean and corrupted passes…".into(),
        ));
        spawn_local(async move {
            let mut es = match EventSource::new(&url) {
                Ok(es) => es,
                Err(e) => {
                    return set_status.set(("error".into(), format!("cannot open the stream: {e}")))
                }
            };
            let subs: Vec<_> = ["start", "row", "result", "error"]
                .iter()
                .filter_map(|n| es.subscribe(*n).ok())
                .collect();
            let mut events = futures_util::stream::select_all(subs);
            while let Some(ev) = events.next().await {
                let Ok((name, msg)) = ev else {
                    set_status.set((
                        "error".into(),
                        "the connection to the server was lost".into(),
                    ));
                    break;
                };
                let data = msg.data().as_string().unwrap_or_default();
                match name.as_str() {
                    "start" => {
                        if let Ok(h) = serde_json::from_str::<TraceHeader>(&data) {
                            set_progress.set((0, h.total_rows));
                            set_trace.set(Some(TraceResult::from_header(&h, &m, &req)));
                            set_status.set((
                                "running".into(),
                                format!("Tracing {:?} → {:?}…", req.prompt, h.answer.token),
                            ));
                        }
                    }
                    "row" => {
                        if let Ok(r) = serde_json::from_str::<RowMsg>(&data) {
                            set_trace.update(|t| {
                                if let Some(t) = t.as_mut() {
                                    t.set_row(r.kind, r.token, r.scores);
                                }
                            });
                            set_progress.update(|p| p.0 += 1);
                        }
                    }
                    "result" => {
                        if let Ok(r) = serde_json::from_str::<TraceResult>(&data) {
                            set_status.set((
                                "done".into(),
                                format!(
                                    "Traced: clean p = {:.3}, corrupted p = {:.3}.",
                                    r.high, r.low
                                ),
                            ));
                            set_trace.set(Some(r));
                        }
                        break;
                    }
                    _ => {
                        let e = serde_json::from_str::<ErrorMsg>(&data)
                            .map(|e| e.error)
                            .unwrap_or_else(|_| "the trace failed".into());
                        set_status.set(("error".into(), e));
                        break;
                    }
                }
            }
            // Closing stops the browser from reconnecting (and cancels a running trace).
            es.close();
        });
    };

    view! {
        <main>
            <h1>"Loci"</h1>
            <p class="lede">"Find where a language model keeps a fact — and rewrite it."</p>
            <section class="controls">
                <label>"Model "
                    <select id="model" on:change=move |ev| set_model.set(event_target_value(&ev)) prop:value=model>
                        {move || models.get().into_iter().map(|m| {
                            let label = format!("{} ({}, {:.0} MB, server)", m.name, m.format, m.size_bytes as f64 / 1e6);
                            view! { <option value=m.name.clone()>{label}</option> }
                        }).collect_view()}
                    </select>
                </label>
                <label>"Prompt "
                    <input id="prompt" size="50" prop:value=prompt on:input=move |ev| set_prompt.set(event_target_value(&ev)) />
                </label>
                <label>"Subject "
                    <input id="subject" size="20" prop:value=subject on:input=move |ev| set_subject.set(event_target_value(&ev)) />
                </label>
                <label>"Samples "
                    <input id="samples" type="number" min="1" max="64" prop:value=move || samples.get().to_string()
                        on:input=move |ev| set_samples.set(event_target_value(&ev).parse().unwrap_or(10)) />
                </label>
                <button id="predict" on:click=on_predict>"Predict"</button>
                <button id="trace" on:click=on_trace>"Trace"</button>
            </section>
            <p id="status" data-status=move || status.get().0>{move || status.get().1}</p>
            {move || prediction.get().map(|p| view! {
                <section id="prediction">
                    <h2>"Next token after " <q>{p.prompt.clone()}</q></h2>
                    <table>
                        {p.top.iter().map(|t| {
                            let width = format!("width: {:.1}%", t.prob * 100.0);
                            view! { <tr><td class="tok">{format!("{:?}", t.token)}</td><td class="num">{format!("{:.4}", t.prob)}</td><td class="barcell"><div class="bar" style=width></div></td></tr> }
                        }).collect_view()}
                    </table>
                </section>
            })}
            {move || trace.get().map(|t| {
                let (done, total) = progress.get();
                let cells: usize = t.scores.values().map(|g| g.len() * g.first().map_or(0, Vec::len)).sum();
                view! {
                    <section id="trace-result" data-cells=cells.to_string() data-rows-done=done.to_string() data-rows-total=total.to_string()>
                        <h2>"Causal trace"</h2>
                        <div class="heatmap" inner_html=plot::trace_heatmap_svg(&t)></div>
                        <div class="curves" inner_html=plot::tracing_effect_svg(&t)></div>
                    </section>
                }
            })}
        </main>
    }
}

fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}
