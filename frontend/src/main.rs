//! Loci's web app (leptos, client-side rendered): the Trace, Edit, Study and Benchmark screens.
//! Jobs run on the engine `loci_frontend::engine` picks: this tab's workers or the server.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_core::edit::{EditReport, EditSide, MemitReport, PromptProbs, RewriteRequest, TargetStr};
use loci_core::study::{analyze, StudyLine};
use loci_core::trace::{TraceHeader, TraceKind, TraceRequest, TraceResult};
use loci_core::{plot, Prediction};
use loci_frontend::bench::tab_benchmark;
use loci_frontend::engine::{
    choices, pick_engine, say, sync_edits, Choice, EditListing, Engine, Mode, ModelListing, Runner,
    TabModel, SUBJECTS_URL, TAB_BUDGET_BYTES,
};
use loci_frontend::files;
use loci_frontend::http::{answer, get, post, server_study, url_part};
use loci_frontend::pool::{cores, pool_size};
use serde::Deserialize;
use wasm_bindgen::JsCast;

#[derive(Clone, Debug, Deserialize)]
struct Fact {
    subject: String,
    prompt: String,
}

#[derive(Clone, Debug, Deserialize)]
struct RewriteCase {
    case_id: u64,
    requested_rewrite: loci_core::edit::RewriteRequest,
    #[serde(default)]
    paraphrase_prompts: Vec<String>,
    #[serde(default)]
    neighborhood_prompts: Vec<String>,
}

#[derive(Deserialize)]
struct EditResponse {
    #[serde(default)]
    report: Option<EditReport>,
    #[serde(default)]
    memit: Option<MemitReport>,
    edits: Vec<EditListing>,
}

/// The study's methods and problems: API name, label.
const STUDY_METHODS: [(&str, &str); 4] = [
    ("rome", "ROME"),
    ("memit", "MEMIT (window 5)"),
    ("ft-1", "FT-1"),
    ("ft-5", "FT-5"),
];
const STUDY_PROBLEMS: [(&str, &str); 5] = [
    ("error_injection", "error injection"),
    ("tracing_reversal", "tracing reversal"),
    ("fact_erasure", "fact erasure"),
    ("fact_amplification", "fact amplification"),
    ("fact_forcing", "fact forcing"),
];

/// MEMIT's extra facts, one per line: `prompt | subject | new target`.
fn more_facts(text: &str) -> Result<Vec<RewriteRequest>, String> {
    lines(text)
        .iter()
        .map(
            |l| match l.split('|').map(str::trim).collect::<Vec<_>>()[..] {
                [p, s, t] => RewriteRequest::from_prompt(p, s, t).map_err(|e| e.to_string()),
                _ => Err(format!("{l:?}: write prompt | subject | new target")),
            },
        )
        .collect()
}

/// Layers typed as "6" or "2,3,4" (empty: the model's defaults).
fn layer_list(text: &str) -> Result<Vec<usize>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse()
                .map_err(|_| format!("layer {x:?} is not a number"))
        })
        .collect()
}

/// A table row of before → after probabilities.
fn prob_row(label: &str, b: &PromptProbs, a: &PromptProbs) -> impl IntoView {
    let p = |x: f32| {
        if x >= 1e-3 || x == 0.0 {
            format!("{x:.4}")
        } else {
            format!("{x:.1e}")
        }
    };
    let label = label.to_string();
    let prompt = b.prompt.clone();
    view! { <tr><td>{label}</td><td>{prompt}</td>
    <td class="num">{p(b.target_new)}</td><td class="num">{p(a.target_new)}</td>
    <td class="num">{p(b.target_true)}</td><td class="num">{p(a.target_true)}</td></tr> }
}

/// The rows of one request's table: the rewrite prompt, paraphrases, neighbours.
fn side_rows(before: &EditSide, after: &EditSide) -> Vec<AnyView> {
    let pairs = |b: &[PromptProbs], a: &[PromptProbs], label: &'static str| {
        b.iter()
            .zip(a)
            .map(move |(b, a)| prob_row(label, b, a).into_any())
            .collect::<Vec<_>>()
    };
    let mut rows = vec![prob_row("rewrite", &before.rewrite, &after.rewrite).into_any()];
    rows.extend(pairs(&before.paraphrase, &after.paraphrase, "paraphrase"));
    rows.extend(pairs(
        &before.neighborhood,
        &after.neighborhood,
        "neighbourhood",
    ));
    rows
}

/// The header row of a probability table for one request.
fn prob_header(r: &RewriteRequest) -> impl IntoView {
    let old = r
        .target_true
        .as_ref()
        .map(|t| t.str.clone())
        .unwrap_or_default();
    view! { <tr><th></th><th>"prompt"</th><th colspan="2">{format!("p({:?}) before → after", r.target_new.str)}</th><th colspan="2">{format!("p({old:?}) before → after")}</th></tr> }
}

#[derive(Deserialize)]
struct UndoResponse {
    edits: Vec<EditListing>,
}

fn lines(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn kinds_of(hidden: bool, mlp: bool, attn: bool) -> Vec<TraceKind> {
    [
        (hidden, TraceKind::Hidden),
        (mlp, TraceKind::Mlp),
        (attn, TraceKind::Attn),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(|(_, k)| k)
    .collect()
}

#[component]
fn App() -> impl IntoView {
    let (models, set_models) = signal(Vec::<Choice>::new());
    let (model, set_model) = signal(String::new());
    let (mode, set_mode) = signal(Mode::Auto);
    let (prompt, set_prompt) = signal("The Eiffel Tower is located in the city of".to_string());
    let (subject, set_subject) = signal("Eiffel Tower".to_string());
    let (samples, set_samples) = signal(10usize);
    let (window, set_window) = signal(10usize);
    let (kinds, set_kinds) = signal((true, true, true));
    let (status, set_status) =
        signal(("loading".to_string(), "Loading the model list…".to_string()));
    let (busy, set_busy) = signal(false);
    let (prediction, set_prediction) = signal(None::<Prediction>);
    let (trace, set_trace) = signal(None::<TraceResult>);
    // Drawn in the Trace and the Edit screens: rendered once per update.
    let curves = Memo::new(move |_| trace.with(|t| t.as_ref().map(plot::tracing_effect_svg)));
    let (trace_engine, set_trace_engine) = signal(String::new());
    let (progress, set_progress) = signal((0usize, 0usize));
    let (facts, set_facts) = signal(Vec::<Fact>::new());
    let (cases, set_cases) = signal(Vec::<RewriteCase>::new());
    let cancel = Rc::new(Cell::new(false));
    let tab: Rc<RefCell<Option<TabModel>>> = Rc::new(RefCell::new(None));

    // Edit screen.
    let (e_prompt, set_e_prompt) = signal("The Eiffel Tower is located in the city of".to_string());
    let (e_subject, set_e_subject) = signal("Eiffel Tower".to_string());
    let (e_target, set_e_target) = signal("Rome".to_string());
    let (e_layer, set_e_layer) = signal(String::new());
    let (e_para, set_e_para) =
        signal("Where is the Eiffel Tower? It is in the city of".to_string());
    let (e_neigh, set_e_neigh) = signal(
        "The Colosseum is located in the city of\nThe Louvre is located in the city of".to_string(),
    );
    let (e_method, set_e_method) = signal("rome".to_string());
    let (e_more, set_e_more) =
        signal("The capital of Germany is the city of | Germany | Madrid".to_string());
    let (report, set_report) = signal(None::<EditReport>);
    let (memit_report, set_memit_report) = signal(None::<MemitReport>);
    let (edits, set_edits) = signal(Vec::<EditListing>::new());
    // Study screen (the fact comes from the Edit screen).
    let (s_true, set_s_true) = signal("Paris".to_string());
    let (s_methods, set_s_methods) = signal([true, false, false, false]);
    let (s_problems, set_s_problems) = signal([true, false, false, false, false]);
    let (s_layers, set_s_layers) = signal(String::new());
    let (s_all, set_s_all) = signal(false);
    let (study, set_study) = signal(Vec::<StudyLine>::new());
    let study_chart = Memo::new(move |_| {
        study.with(|l| {
            l.iter()
                .any(|x| matches!(x, StudyLine::Edit(_)))
                .then(|| plot::study_svg(&analyze(l)))
        })
    });
    let (bench, set_bench) = signal(String::new());
    let (download, set_download) = signal(None::<(u64, u64)>);

    spawn_local(async move {
        match get::<Vec<ModelListing>>("/api/models").await {
            Ok(m) => {
                let c = choices(&m);
                if let Some(first) = c.first() {
                    set_model.set(first.name.clone());
                }
                set_models.set(c);
                say(set_status, "ready", "Ready.");
            }
            Err(e) => say(
                set_status,
                "error",
                format!("The server did not answer: {e}"),
            ),
        }
        if let Ok(f) = get::<Vec<Fact>>(SUBJECTS_URL).await {
            set_facts.set(f);
        }
        if let Ok(c) = get::<Vec<RewriteCase>>("/static/data/counterfact_50.json").await {
            set_cases.set(c);
        }
    });

    // The edits the server holds for the chosen model (they survive page reloads).
    Effect::new(move |_| {
        let name = model.get();
        let on_server = models.with(|m| m.iter().any(|c| c.name == name && c.on_server));
        if !on_server {
            set_edits.set(vec![]);
            return;
        }
        spawn_local(async move {
            if let Ok(e) =
                get::<Vec<EditListing>>(&format!("/api/edits?model={}", url_part(&name))).await
            {
                set_edits.set(e);
            }
        });
    });

    let choice = move || {
        models
            .get_untracked()
            .into_iter()
            .find(|c| c.name == model.get_untracked())
    };
    let engine_label = move || {
        let m = models.get();
        let Some(c) = m.iter().find(|c| c.name == model.get()) else {
            return String::new();
        };
        match pick_engine(c, mode.get()) {
            Ok(Engine::Tab) => format!(
                "runs in this tab ({} workers)",
                pool_size(cores(), c.f32_bytes, TAB_BUDGET_BYTES)
            ),
            Ok(Engine::Server) => "runs on the server".to_string(),
            Err(e) => e,
        }
    };

    let tab_p = tab.clone();
    let on_predict = move |_| {
        let Some(c) = choice() else { return };
        let p = prompt.get_untracked();
        let tab = tab_p.clone();
        set_busy.set(true);
        spawn_local(async move {
            let result = async {
                let engine =
                    Runner::open(&tab, &c, mode.get_untracked(), set_status, set_download).await?;
                say(
                    set_status,
                    "running",
                    format!("Predicting in {}…", engine.describe()),
                );
                engine.predict(&c.name, &p, 10).await
            }
            .await;
            match result {
                Ok(pred) => {
                    set_prediction.set(Some(pred));
                    say(set_status, "ready", "Done.");
                }
                Err(e) => say(set_status, "error", e),
            }
            set_busy.set(false);
        });
    };

    let tab_t = tab.clone();
    let cancel_t = cancel.clone();
    let on_trace = move |_| {
        let Some(c) = choice() else { return };
        let mut req = TraceRequest::new(prompt.get_untracked(), subject.get_untracked());
        req.samples = samples.get_untracked();
        req.window = window.get_untracked();
        let (h, m, a) = kinds.get_untracked();
        req.kinds = kinds_of(h, m, a);
        if req.kinds.is_empty() {
            return say(
                set_status,
                "error",
                "Pick at least one kind of state to restore.",
            );
        }
        set_trace.set(None);
        set_progress.set((0, 0));
        set_busy.set(true);
        cancel_t.set(false);
        let (tab, cancel) = (tab_t.clone(), cancel_t.clone());
        spawn_local(async move {
            let name = c.name.clone();
            let started = files::now_ms();
            let on_header = |h: &TraceHeader| {
                set_progress.set((0, h.total_rows));
                set_trace.set(Some(TraceResult::from_header(h, &name, &req)));
                say(
                    set_status,
                    "running",
                    format!("Tracing {:?} → {:?}…", req.prompt, h.answer.token),
                );
            };
            let cancel2 = cancel.clone();
            let on_row = move |kind, token, scores| {
                set_trace.update(|t| {
                    if let Some(t) = t.as_mut() {
                        t.set_row(kind, token, scores);
                    }
                });
                set_progress.update(|p| p.0 += 1);
                !cancel2.get()
            };
            let outcome = async {
                let engine =
                    Runner::open(&tab, &c, mode.get_untracked(), set_status, set_download).await?;
                set_trace_engine.set(engine.describe());
                say(
                    set_status,
                    "running",
                    "Tracing: the clean and corrupted passes…",
                );
                engine.trace(&c.name, &req, on_header, on_row).await
            }
            .await;
            match outcome {
                Ok(r) => {
                    let (hi, lo) = (r.high, r.low);
                    set_trace.set(Some(r));
                    say(
                        set_status,
                        "done",
                        format!(
                            "Traced: clean p = {hi:.3}, corrupted p = {lo:.3} ({:.1} s).",
                            (files::now_ms() - started) / 1e3
                        ),
                    );
                }
                Err(e) if e == "cancelled" => say(set_status, "ready", "Trace cancelled."),
                Err(e) => say(set_status, "error", e),
            }
            set_busy.set(false);
        });
    };
    let cancel_c = cancel.clone();
    let on_cancel = move |_| cancel_c.set(true);

    // After an edit, undo or upload on the server, the tab's copies of that model follow.
    let sync_tab = {
        let tab = tab.clone();
        move |name: String| {
            let tab = tab.clone();
            async move {
                let loaded = tab
                    .borrow()
                    .as_ref()
                    .filter(|t| t.name == name)
                    .map(|t| (t.pool.clone(), t.edits.clone()));
                match loaded {
                    Some((pool, edits)) => sync_edits(&pool, &edits, &name).await,
                    None => Ok(()),
                }
            }
        }
    };

    let sync_e = sync_tab.clone();
    let on_edit = move |_| {
        let Some(c) = choice() else { return };
        if !c.on_server {
            return say(
                set_status,
                "error",
                "Edits need the server's key statistics: pick a model the server has.",
            );
        }
        let layers = match layer_list(&e_layer.get_untracked()) {
            Ok(l) => l,
            Err(e) => return say(set_status, "error", e),
        };
        let method = e_method.get_untracked();
        let memit = method == "memit";
        let mut body = serde_json::json!({
            "model": c.name, "prompt": e_prompt.get_untracked(), "subject": e_subject.get_untracked(),
            "target": e_target.get_untracked(),
            "paraphrase": lines(&e_para.get_untracked()), "neighborhood": lines(&e_neigh.get_untracked()),
        });
        if memit {
            let more = match more_facts(&e_more.get_untracked()) {
                Ok(m) => m,
                Err(e) => return say(set_status, "error", e),
            };
            body["method"] = "memit".into();
            body["requests"] = serde_json::to_value(more).expect("requests serialise");
            body["layers"] = layers.into();
        } else if method == "ft" {
            body["method"] = "ft".into();
            body["layers"] = layers.into();
        } else {
            match layers[..] {
                [] => {}
                [l] => body["layer"] = l.into(),
                _ => {
                    return say(
                        set_status,
                        "error",
                        "ROME edits one layer; MEMIT takes several",
                    )
                }
            }
        }
        set_busy.set(true);
        say(
            set_status,
            "running",
            match method.as_str() {
                "memit" => "Editing on the server (MEMIT: a target per fact, then the update spread over the layers)…",
                "ft" => "Editing on the server (fine-tuning the layers within an L∞ bound)…",
                _ => "Editing on the server (ROME: k*, v*, rank-one update)…",
            },
        );
        let sync = sync_e.clone();
        spawn_local(async move {
            match post::<EditResponse>("/api/edit", &body).await {
                Ok(r) => {
                    let secs = r
                        .report
                        .as_ref()
                        .map(|x| x.seconds)
                        .or(r.memit.as_ref().map(|x| x.seconds))
                        .unwrap_or_default();
                    set_report.set(r.report);
                    set_memit_report.set(r.memit);
                    set_edits.set(r.edits);
                    match sync(c.name.clone()).await {
                        Ok(()) => say(set_status, "edited", format!("Edited in {secs:.1} s.")),
                        Err(e) => say(
                            set_status,
                            "error",
                            format!("edited on the server, but the tab's copy failed: {e}"),
                        ),
                    }
                }
                Err(e) => say(set_status, "error", e),
            }
            set_busy.set(false);
        });
    };

    let sync_u = sync_tab.clone();
    let on_undo = move |_| {
        let Some(c) = choice() else { return };
        set_busy.set(true);
        let sync = sync_u.clone();
        spawn_local(async move {
            let body = serde_json::json!({ "model": c.name });
            match post::<UndoResponse>("/api/undo", &body).await {
                Ok(r) => {
                    set_edits.set(r.edits);
                    set_report.set(None);
                    set_memit_report.set(None);
                    match sync(c.name.clone()).await {
                        Ok(()) => say(
                            set_status,
                            "undone",
                            "Undone: the original weights are back.",
                        ),
                        Err(e) => say(set_status, "error", e),
                    }
                }
                Err(e) => say(set_status, "error", e),
            }
            set_busy.set(false);
        });
    };

    let sync_up = sync_tab.clone();
    let on_upload = move |ev: leptos::ev::Event| {
        let Some(c) = choice() else { return };
        let input: web_sys::HtmlInputElement = event_target(&ev);
        let Some(file) = input.files().and_then(|f| f.get(0)) else {
            return;
        };
        set_busy.set(true);
        let sync = sync_up.clone();
        spawn_local(async move {
            let result = async {
                let buf = wasm_bindgen_futures::JsFuture::from(file.array_buffer())
                    .await
                    .map_err(|_| "cannot read the file".to_string())?;
                let bytes = js_sys::Uint8Array::new(&buf).to_vec();
                let r = gloo_net::http::Request::post(&format!(
                    "/api/edits/upload?model={}",
                    url_part(&c.name)
                ))
                .header("content-type", "application/octet-stream")
                .body(bytes)
                .map_err(|e| e.to_string())?
                .send()
                .await
                .map_err(|e| e.to_string())?;
                #[derive(Deserialize)]
                struct Uploaded {
                    edits: Vec<EditListing>,
                }
                let u: Uploaded = answer(r).await?;
                set_edits.set(u.edits);
                sync(c.name.clone()).await
            }
            .await;
            match result {
                Ok(()) => say(set_status, "edited", "The uploaded edit is applied."),
                Err(e) => say(set_status, "error", e),
            }
            set_busy.set(false);
        });
    };

    let cancel_st = cancel.clone();
    let on_study_cancel = move |_| cancel_st.set(true);
    let cancel_s = cancel.clone();
    let on_study = move |_| {
        let Some(c) = choice() else { return };
        if !c.on_server {
            return say(
                set_status,
                "error",
                "The study edits with the server's key statistics: pick a model the server has.",
            );
        }
        let layers = match layer_list(&s_layers.get_untracked()) {
            Ok(l) => l,
            Err(e) => return say(set_status, "error", e),
        };
        let mut request = match RewriteRequest::from_prompt(
            &e_prompt.get_untracked(),
            &e_subject.get_untracked(),
            &e_target.get_untracked(),
        ) {
            Ok(r) => r,
            Err(e) => return say(set_status, "error", e.to_string()),
        };
        request.target_true = Some(TargetStr::new(s_true.get_untracked()));
        let pick = |on: &[bool], names: &[&str]| -> Vec<String> {
            on.iter()
                .zip(names)
                .filter(|(b, _)| **b)
                .map(|(_, n)| n.to_string())
                .collect()
        };
        let methods = pick(&s_methods.get_untracked(), &STUDY_METHODS.map(|m| m.0));
        let problems = pick(&s_problems.get_untracked(), &STUDY_PROBLEMS.map(|p| p.0));
        let body = serde_json::json!({
            "model": c.name,
            "case": {
                "case_id": 0, "requested_rewrite": request,
                "paraphrase_prompts": lines(&e_para.get_untracked()),
                "neighborhood_prompts": lines(&e_neigh.get_untracked()),
            },
            "methods": methods, "problems": problems, "layers": layers,
            "all_cases": s_all.get_untracked(),
        });
        set_study.set(vec![]);
        set_busy.set(true);
        cancel_s.set(false);
        say(
            set_status,
            "running",
            "Studying on the server: tracing the true object…",
        );
        let cancel = cancel_s.clone();
        spawn_local(async move {
            let outcome = server_study(&body, |line| {
                let msg = match &line {
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
                };
                say(set_status, "running", msg);
                set_study.update(|l| l.push(line));
                !cancel.get()
            })
            .await;
            match outcome {
                Ok(()) => {
                    let skipped = study.with_untracked(|l| {
                        l.iter().find_map(|x| match x {
                            StudyLine::Case(c) => c.skipped.clone(),
                            _ => None,
                        })
                    });
                    match skipped {
                        Some(why) => say(
                            set_status,
                            "done",
                            format!("Left out of the study: {why} (tick \"study it anyway\")."),
                        ),
                        None => say(set_status, "done", "Study done; every edit was undone."),
                    }
                }
                Err(e) => say(set_status, "error", e),
            }
            set_busy.set(false);
        });
    };

    let on_bench = move |_| {
        set_busy.set(true);
        set_bench.set(String::new());
        spawn_local(async move {
            match tab_benchmark(set_status).await {
                Ok(json) => {
                    set_bench.set(json);
                    say(set_status, "done", "Benchmark done.");
                }
                Err(e) => say(set_status, "error", e),
            }
            set_busy.set(false);
        });
    };

    let pick_fact = move |ev: leptos::ev::Event| {
        let i: usize = event_target_value(&ev).parse().unwrap_or(usize::MAX);
        if let Some(f) = facts.get_untracked().get(i) {
            set_prompt.set(f.prompt.clone());
            set_subject.set(f.subject.clone());
        }
    };
    let pick_case = move |ev: leptos::ev::Event| {
        let i: usize = event_target_value(&ev).parse().unwrap_or(usize::MAX);
        if let Some(c) = cases.get_untracked().get(i) {
            let r = &c.requested_rewrite;
            set_e_prompt.set(r.filled());
            set_e_subject.set(r.subject.clone());
            set_e_target.set(r.target_new.str.clone());
            set_e_para.set(c.paraphrase_prompts.join("\n"));
            set_e_neigh.set(c.neighborhood_prompts.join("\n"));
            if let Some(t) = &r.target_true {
                set_s_true.set(t.str.clone());
            }
        }
    };

    view! {
        <main>
            <h1>"Loci"</h1>
            <p class="lede">"Find where a language model keeps a fact — and rewrite it."</p>
            <section class="controls" aria-label="Model">
                <label>"Model "
                    <select id="model" on:change=move |ev| set_model.set(event_target_value(&ev)) prop:value=model>
                        {move || models.get().into_iter().map(|m| {
                            view! { <option value=m.name.clone()>{m.label.clone()}</option> }
                        }).collect_view()}
                    </select>
                </label>
                <label>"Engine "
                    <select id="engine" on:change=move |ev| set_mode.set(match event_target_value(&ev).as_str() {
                        "tab" => Mode::Tab, "server" => Mode::Server, _ => Mode::Auto })>
                        <option value="auto">"automatic"</option>
                        <option value="tab">"in this tab"</option>
                        <option value="server">"on the server"</option>
                    </select>
                </label>
                <span id="engine-choice" class="hint">{engine_label}</span>
            </section>
            <p id="status" role="status" data-status=move || status.get().0>{move || status.get().1}</p>
            {move || download.get().map(|(got, total)| view! {
                <progress id="download" max=total.to_string() value=got.to_string()></progress>
            })}

            <h2>"Trace"</h2>
            <section class="controls" aria-label="Trace">
                <label>"Known fact "
                    <select id="fact" on:change=pick_fact>
                        <option value="">"pick one of known_1000…"</option>
                        {move || facts.get().into_iter().enumerate().take(300).map(|(i, f)| {
                            view! { <option value=i.to_string()>{f.prompt.clone()}</option> }
                        }).collect_view()}
                    </select>
                </label>
                <label>"Prompt "
                    <input id="prompt" size="45" prop:value=prompt on:input=move |ev| set_prompt.set(event_target_value(&ev)) />
                </label>
                <label>"Subject "
                    <input id="subject" size="18" prop:value=subject on:input=move |ev| set_subject.set(event_target_value(&ev)) />
                </label>
                <label>"Samples "
                    <input id="samples" type="number" min="1" max="64" prop:value=move || samples.get().to_string()
                        on:input=move |ev| set_samples.set(event_target_value(&ev).parse().unwrap_or(10)) />
                </label>
                <label>"Window "
                    <input id="window" type="number" min="1" max="40" prop:value=move || window.get().to_string()
                        on:input=move |ev| set_window.set(event_target_value(&ev).parse().unwrap_or(10)) />
                </label>
                <fieldset class="kinds">
                    <legend>"Restore"</legend>
                    <label><input type="checkbox" id="kind-hidden" prop:checked=move || kinds.get().0 on:change=move |ev| set_kinds.update(|k| k.0 = event_target_checked(&ev)) />"hidden"</label>
                    <label><input type="checkbox" id="kind-mlp" prop:checked=move || kinds.get().1 on:change=move |ev| set_kinds.update(|k| k.1 = event_target_checked(&ev)) />"MLP"</label>
                    <label><input type="checkbox" id="kind-attn" prop:checked=move || kinds.get().2 on:change=move |ev| set_kinds.update(|k| k.2 = event_target_checked(&ev)) />"attention"</label>
                </fieldset>
                <button id="predict" on:click=on_predict prop:disabled=busy>"Predict"</button>
                <button id="trace" on:click=on_trace prop:disabled=busy>"Trace"</button>
                <button id="cancel" on:click=on_cancel prop:disabled=move || !busy.get()>"Cancel"</button>
            </section>
            {move || prediction.get().map(|p| view! {
                <section id="prediction">
                    <h3>"Next token after " <q>{p.prompt.clone()}</q></h3>
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
                let scores = serde_json::to_string(&t.scores).unwrap_or_default();
                view! {
                    <section id="trace-result" data-cells=cells.to_string() data-rows-done=done.to_string()
                        data-rows-total=total.to_string() data-engine=trace_engine.get() data-scores=scores
                        data-high=t.high.to_string() data-low=t.low.to_string()>
                        <p class="hint">{format!("Computed in {}.", trace_engine.get())}</p>
                        <div class="heatmap" inner_html=plot::trace_heatmap_svg(&t)></div>
                        <div class="curves" inner_html=move || curves.get().unwrap_or_default()></div>
                    </section>
                }
            })}

            <h2>"Edit"</h2>
            <section class="controls" aria-label="Edit">
                <label>"CounterFact case "
                    <select id="case" on:change=pick_case>
                        <option value="">"pick one…"</option>
                        {move || cases.get().into_iter().enumerate().map(|(i, c)| {
                            let r = &c.requested_rewrite;
                            let label = format!("#{}: {} → {}", c.case_id, r.filled(), r.target_new.str);
                            view! { <option value=i.to_string()>{label}</option> }
                        }).collect_view()}
                    </select>
                </label>
                <label>"Prompt "
                    <input id="edit-prompt" size="45" prop:value=e_prompt on:input=move |ev| set_e_prompt.set(event_target_value(&ev)) />
                </label>
                <label>"Subject "
                    <input id="edit-subject" size="18" prop:value=e_subject on:input=move |ev| set_e_subject.set(event_target_value(&ev)) />
                </label>
                <label>"New target "
                    <input id="edit-target" size="12" prop:value=e_target on:input=move |ev| set_e_target.set(event_target_value(&ev)) />
                </label>
                <label>"Method "
                    <select id="edit-method" on:change=move |ev| set_e_method.set(event_target_value(&ev))>
                        <option value="rome" selected=true>"ROME (one fact, one layer)"</option>
                        <option value="memit">"MEMIT (several facts and layers)"</option>
                        <option value="ft">"FT (constrained fine-tuning)"</option>
                    </select>
                </label>
                <label>{move || if e_method.get() == "rome" { "Layer " } else { "Layers " }}
                    <input id="edit-layer" size="8" placeholder="default" prop:value=e_layer on:input=move |ev| set_e_layer.set(event_target_value(&ev)) />
                </label>
                <label class="wide" class:hidden=move || e_method.get() != "memit">"More facts for MEMIT (one per line: prompt | subject | new target) "
                    <textarea id="edit-more" rows="2" prop:value=e_more on:input=move |ev| set_e_more.set(event_target_value(&ev))></textarea>
                </label>
                <label class="wide">"Paraphrases (one per line) "
                    <textarea id="edit-paraphrase" rows="2" prop:value=e_para on:input=move |ev| set_e_para.set(event_target_value(&ev))></textarea>
                </label>
                <label class="wide">"Neighbourhood (should not change) "
                    <textarea id="edit-neighborhood" rows="2" prop:value=e_neigh on:input=move |ev| set_e_neigh.set(event_target_value(&ev))></textarea>
                </label>
                <button id="edit" on:click=on_edit prop:disabled=busy>"Edit"</button>
                <button id="undo" on:click=on_undo prop:disabled=move || busy.get() || edits.get().is_empty()>"Undo"</button>
                <label class="upload">"Upload an edit "
                    <input id="upload-edit" type="file" accept=".safetensors" on:change=on_upload />
                </label>
            </section>
            <p class="hint">"Edits run on the server (they need the layers' key statistics); the tab's model copies get the same edit."</p>
            {move || trace.get().map(|t| view! {
                <details id="edit-curves" open>
                    <summary>{format!("Tracing effect of the last trace ({:?}), to choose the layer", t.subject)}</summary>
                    <div class="curves" inner_html=move || curves.get().unwrap_or_default()></div>
                </details>
            })}
            <section id="edits" data-count=move || edits.get().len().to_string()>
                {move || {
                    let m = model.get();
                    edits.get().into_iter().map(|e| {
                        let href = format!("/api/edits/{}/file?model={}", e.id, url_part(&m));
                        let facts: Vec<String> = e.requests.iter().map(|r| format!("{} → {}", r.filled(), r.target_new.str)).collect();
                        let layers = match &e.layers[..] {
                            [l] => format!("layer {l}"),
                            ls => format!("layers {}", ls.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",")),
                        };
                        let label = format!("#{} {} {layers}: {}", e.id, e.method.to_uppercase(), facts.join("; "));
                        view! { <p class="edit-item">{label}" " <a href=href download="">"download"</a></p> }
                    }).collect_view()
                }}
            </section>
            {move || report.get().map(|r| {
                let rows = side_rows(&r.before, &r.after);
                let gens: Vec<_> = r.generations.before.iter().zip(&r.generations.after).map(|(b, a)| {
                    view! { <tr><td>{b.clone()}</td><td>{a.clone()}</td></tr> }
                }).collect();
                view! {
                    <section id="edit-result" data-p-new-after=r.after.rewrite.target_new.to_string()>
                        <h3>{format!("{} → {} at layer {} (‖ΔW‖ = {:.2}, {:.1} s)", r.request.filled(), r.request.target_new.str, r.layer, r.delta_norm, r.seconds)}</h3>
                        <table class="probs">{prob_header(&r.request)}{rows}</table>
                        <h3>"Generations"</h3>
                        <table class="gens"><tr><th>"before"</th><th>"after"</th></tr>{gens}</table>
                    </section>
                }
            })}
            {move || memit_report.get().map(|r| {
                let norms: Vec<String> = r.delta_norms.iter().map(|n| format!("{n:.2}")).collect();
                let facts: Vec<_> = r.requests.iter().map(|q| {
                    let rows = side_rows(&q.before, &q.after);
                    let gens: Vec<_> = q.generations.after.iter().map(|g| view! { <li>{g.clone()}</li> }).collect();
                    view! {
                        <h4>{format!("{} → {}", q.request.filled(), q.request.target_new.str)}</h4>
                        <table class="probs">{prob_header(&q.request)}{rows}</table>
                        <ul class="gens">{gens}</ul>
                    }
                }).collect();
                view! {
                    <section id="memit-result" data-facts=r.requests.len().to_string()>
                        <h3>{format!("MEMIT: {} facts at layers {:?} (‖ΔW‖ per layer {}, {:.1} s)", r.requests.len(), r.layers, norms.join(", "), r.seconds)}</h3>
                        {facts}
                    </section>
                }
            })}

            <h2>"Study"</h2>
            <p class="hint">"Does localization inform editing? (Hase et al. 2023). The fact of the Edit screen is traced (its true object's whole probability, MLP window 5), then edited at every chosen layer by every method for every problem; each edit is scored and undone on the server."</p>
            <section class="controls" aria-label="Study">
                <label>"True object "
                    <input id="study-true" size="12" prop:value=s_true on:input=move |ev| set_s_true.set(event_target_value(&ev)) />
                </label>
                <fieldset class="kinds">
                    <legend>"Methods"</legend>
                    {STUDY_METHODS.iter().enumerate().map(|(i, (name, label))| view! {
                        <label><input type="checkbox" id=format!("study-method-{name}") prop:checked=move || s_methods.get()[i]
                            on:change=move |ev| set_s_methods.update(|m| m[i] = event_target_checked(&ev)) />{*label}</label>
                    }).collect_view()}
                </fieldset>
                <fieldset class="kinds">
                    <legend>"Problems"</legend>
                    {STUDY_PROBLEMS.iter().enumerate().map(|(i, (name, label))| view! {
                        <label><input type="checkbox" id=format!("study-problem-{name}") prop:checked=move || s_problems.get()[i]
                            on:change=move |ev| set_s_problems.update(|p| p[i] = event_target_checked(&ev)) />{*label}</label>
                    }).collect_view()}
                </fieldset>
                <label>"Layers "
                    <input id="study-layers" size="14" placeholder="every 4th" prop:value=s_layers on:input=move |ev| set_s_layers.set(event_target_value(&ev)) />
                </label>
                <label><input type="checkbox" id="study-all" prop:checked=s_all on:change=move |ev| set_s_all.set(event_target_checked(&ev)) />"study it anyway if the model does not know it"</label>
                <button id="study" on:click=on_study prop:disabled=busy>"Run study"</button>
                <button id="study-cancel" on:click=on_study_cancel prop:disabled=move || !busy.get()>"Stop"</button>
            </section>
            {move || {
                let l = study.get();
                let edits: Vec<_> = l.iter().filter_map(|x| match x { StudyLine::Edit(e) => Some(e.clone()), _ => None }).collect();
                let case = l.iter().find_map(|x| match x { StudyLine::Case(c) => Some(c.clone()), _ => None });
                case.map(|c| {
                    let fmt = |v: Option<f32>| v.map_or("—".to_string(), |x| format!("{x:.3}"));
                    let rows: Vec<_> = edits.iter().map(|e| view! {
                        <tr><td>{e.method.name()}</td><td>{e.problem.name()}</td><td class="num">{e.layer}</td>
                            <td class="num">{format!("{:.3}", e.tracing_effect)}</td>
                            <td class="num">{format!("{:.3}", e.scores.rewrite)}</td>
                            <td class="num">{fmt(e.scores.paraphrase)}</td>
                            <td class="num">{fmt(e.scores.neighborhood)}</td>
                            <td class="num">{format!("{:.1} s", e.seconds)}</td></tr>
                    }).collect();
                    view! {
                        <section id="study-result" data-edits=edits.len().to_string() data-skipped=c.skipped.is_some().to_string()
                            data-high=c.trace.as_ref().map_or(String::new(), |t| t.high.to_string())>
                            <p class="hint">{match (&c.skipped, &c.trace) {
                                (Some(why), _) => format!("Left out: {why}."),
                                (None, Some(t)) => format!("p({:?}) = {:.3} clean, {:.3} with the subject corrupted.", c.target_true, t.high, t.low),
                                _ => String::new(),
                            }}</p>
                            <div class="curves" inner_html=move || study_chart.get().unwrap_or_default()></div>
                            <table class="probs"><tr><th>"method"</th><th>"problem"</th><th>"layer"</th><th>"tracing effect"</th>
                                <th>"rewrite"</th><th>"paraphrase"</th><th>"neighbourhood"</th><th>"time"</th></tr>{rows}</table>
                        </section>
                    }
                })
            }}

            <h2>"Benchmark"</h2>
            <section class="controls">
                <button id="bench" on:click=on_bench prop:disabled=busy>"Benchmark this tab"</button>
                <span class="hint">"Traces all three kinds (10 tokens, 10 samples) on a GPT-2-small-shaped model with random weights, in this tab's workers."</span>
            </section>
            <pre id="bench-result">{bench}</pre>
        </main>
    }
}

fn event_target<T: JsCast>(ev: &leptos::ev::Event) -> T {
    ev.target().expect("an event target").unchecked_into()
}

fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}
