//! Loci's web app (leptos, client-side rendered). Every job runs on one of two engines with the
//! same request and result types: in this tab (model workers, `loci_frontend::pool`) or on the
//! server (`loci serve`'s API). The app picks the tab when the model is small enough and its
//! files can be fetched; the user can override. Edits are computed on the server (it holds the
//! key statistics) and applied to the tab's model copies too.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use futures_util::StreamExt;
use gloo_net::eventsource::futures::EventSource;
use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_core::edit::EditReport;
use loci_core::trace::{NoiseSpec, TraceHeader, TraceKind, TraceRequest, TraceResult};
use loci_core::{plot, Prediction};
use loci_frontend::files;
use loci_frontend::pool::{cores, pool_size, Pool};
use loci_frontend::protocol::FileRef;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use wasm_bindgen::JsCast;

/// Memory the tab's model copies may take together, and the largest model the tab runs.
const TAB_BUDGET_BYTES: u64 = 2_500_000_000;
const TAB_MODEL_LIMIT_BYTES: u64 = 1_500_000_000;
const HF_GPT2: &str = "https://huggingface.co/openai-community/gpt2/resolve/main";
const SUBJECTS_URL: &str = "/static/data/known_1000.json";

#[derive(Clone, Debug, Deserialize)]
struct ServerFile {
    name: String,
}

#[derive(Clone, Debug, Deserialize)]
struct ModelListing {
    name: String,
    format: String,
    size_bytes: u64,
    #[serde(default)]
    files: Vec<ServerFile>,
}

/// A model the picker offers, and where it can run.
#[derive(Clone, Debug, PartialEq)]
struct Choice {
    name: String,
    label: String,
    on_server: bool,
    /// Files the tab downloads to run it itself (empty: server only).
    files: Vec<FileRef>,
    /// Its weights in f32, the tab's working precision.
    f32_bytes: u64,
}

fn choices(list: &[ModelListing]) -> Vec<Choice> {
    let mut v: Vec<Choice> = list
        .iter()
        .map(|m| {
            // GGUF files are 4-bit: about 7x bigger once dequantised.
            let f32_bytes = if m.format == "gguf" {
                m.size_bytes * 7
            } else {
                m.size_bytes
            };
            Choice {
                name: m.name.clone(),
                label: format!(
                    "{} ({}, {:.0} MB)",
                    m.name,
                    m.format,
                    m.size_bytes as f64 / 1e6
                ),
                on_server: true,
                files: m
                    .files
                    .iter()
                    .map(|f| FileRef {
                        name: f.name.clone(),
                        url: format!("/api/models/{}/files/{}", m.name, f.name),
                    })
                    .collect(),
                f32_bytes,
            }
        })
        .collect();
    if v.iter().all(|c| c.name != "gpt2") {
        v.push(Choice {
            name: "gpt2".into(),
            label: "gpt2 (Hugging Face hub, 548 MB, this tab only, needs internet)".into(),
            on_server: false,
            files: ["config.json", "tokenizer.json", "model.safetensors"]
                .iter()
                .map(|f| FileRef {
                    name: f.to_string(),
                    url: format!("{HF_GPT2}/{f}"),
                })
                .collect(),
            f32_bytes: 548_000_000,
        });
    }
    v
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Auto,
    Tab,
    Server,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Engine {
    Tab,
    Server,
}

fn pick_engine(c: &Choice, mode: Mode) -> Result<Engine, String> {
    let tab_ok = !c.files.is_empty() && c.f32_bytes <= TAB_MODEL_LIMIT_BYTES;
    match mode {
        Mode::Auto if tab_ok => Ok(Engine::Tab),
        Mode::Auto | Mode::Server if c.on_server => Ok(Engine::Server),
        Mode::Tab if !c.files.is_empty() => Ok(Engine::Tab),
        Mode::Tab => Err(format!("{} can only run on the server", c.name)),
        _ => Err(format!(
            "{} is not on this server; run it in the tab",
            c.name
        )),
    }
}

/// The tab's loaded model: a pool of workers, each with a copy.
struct TabModel {
    name: String,
    pool: Rc<Pool>,
    /// The server's edits the tab's copies carry, oldest first.
    edits: Rc<RefCell<Vec<u64>>>,
}

type Status = WriteSignal<(String, String)>;

fn say(status: Status, kind: &str, text: impl Into<String>) {
    status.set((kind.to_string(), text.into()));
}

/// Bytes downloaded and expected, while a model file downloads.
type Download = WriteSignal<Option<(u64, u64)>>;

async fn tab_pool(
    slot: &Rc<RefCell<Option<TabModel>>>,
    c: &Choice,
    status: Status,
    download: Download,
) -> Result<Rc<Pool>, String> {
    let reused = slot
        .borrow()
        .as_ref()
        .filter(|t| t.name == c.name)
        .map(|t| (t.pool.clone(), t.edits.clone()));
    if let Some((pool, edits)) = reused {
        if c.on_server {
            sync_edits(&pool, &edits, &c.name).await?;
        }
        return Ok(pool);
    }
    // Dropping the old pool ends its workers and frees their memory.
    slot.borrow_mut().take();
    for f in &c.files {
        let cached = files::is_cached(&f.url).await;
        let mut shown = u64::MAX;
        files::download(&f.url, |got, total| {
            let pct = (got * 100).checked_div(total).unwrap_or(0);
            if pct != shown {
                shown = pct;
                download.set(Some((got, total)));
                say(
                    status,
                    "loading",
                    format!(
                        "Downloading {} for this tab: {pct}% of {:.0} MB (kept for next time)",
                        f.name,
                        total as f64 / 1e6
                    ),
                );
            }
        })
        .await
        .inspect_err(|_| download.set(None))?;
        download.set(None);
        if cached {
            say(
                status,
                "loading",
                format!("{} is in the browser cache", f.name),
            );
        }
    }
    let n = pool_size(cores(), c.f32_bytes, TAB_BUDGET_BYTES);
    say(
        status,
        "loading",
        format!("Loading {} into {n} workers of this tab…", c.name),
    );
    let pool = Pool::new(n);
    pool.load(&c.name, c.files.clone(), SUBJECTS_URL).await?;
    let edits = Rc::new(RefCell::new(vec![]));
    if c.on_server {
        sync_edits(&pool, &edits, &c.name).await?;
    }
    *slot.borrow_mut() = Some(TabModel {
        name: c.name.clone(),
        pool: pool.clone(),
        edits,
    });
    Ok(pool)
}

/// Gives the tab's model copies exactly the edits the server's model has now (whoever made
/// them): the missing newer ones are applied; if the histories differ, all are undone and the
/// server's re-applied. Checked before every tab job on a server model.
async fn sync_edits(pool: &Pool, have: &RefCell<Vec<u64>>, model: &str) -> Result<(), String> {
    let server: Vec<u64> = get::<Vec<EditListing>>(&format!("/api/edits?model={model}"))
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect();
    let mine = have.borrow().clone();
    if server == mine {
        return Ok(());
    }
    let keep = if server.starts_with(&mine) {
        mine.len()
    } else {
        pool.undo_edit(true).await?;
        have.borrow_mut().clear();
        0
    };
    for &id in &server[keep..] {
        let bytes = get_bytes(&format!("/api/edits/{id}/file?model={model}")).await?;
        pool.apply_edit(bytes).await?;
        have.borrow_mut().push(id);
    }
    Ok(())
}

/// The engine a job runs on. Both take the same requests and give the same result types.
enum Runner {
    Tab(Rc<Pool>),
    Server,
}

impl Runner {
    /// Gets the engine for model `c` under `mode`, loading the tab's copy when needed.
    async fn open(
        slot: &Rc<RefCell<Option<TabModel>>>,
        c: &Choice,
        mode: Mode,
        status: Status,
        download: Download,
    ) -> Result<Self, String> {
        Ok(match pick_engine(c, mode)? {
            Engine::Tab => Runner::Tab(tab_pool(slot, c, status, download).await?),
            Engine::Server => Runner::Server,
        })
    }

    fn describe(&self) -> String {
        match self {
            Runner::Tab(p) => format!("this tab, {} workers", p.workers()),
            Runner::Server => "the server".into(),
        }
    }

    async fn predict(&self, model: &str, prompt: &str, top: usize) -> Result<Prediction, String> {
        match self {
            Runner::Tab(pool) => pool.predict(prompt, top).await,
            Runner::Server => {
                let body = serde_json::json!({ "model": model, "prompt": prompt, "top": top });
                post("/api/predict", &body).await
            }
        }
    }

    /// Streams rows to `on_row` (false cancels) and returns the whole result.
    async fn trace(
        &self,
        model: &str,
        req: &TraceRequest,
        mut on_header: impl FnMut(&TraceHeader),
        mut on_row: impl FnMut(TraceKind, usize, Vec<f32>) -> bool,
    ) -> Result<TraceResult, String> {
        match self {
            Runner::Server => server_trace(model, req, on_header, on_row).await,
            Runner::Tab(pool) => {
                // The tab lays the result out from the header and fills it row by row.
                let result = RefCell::new(None::<TraceResult>);
                let started = files::now_ms();
                pool.trace(
                    req,
                    |h| {
                        *result.borrow_mut() = Some(TraceResult::from_header(h, model, req));
                        on_header(h);
                    },
                    |kind, token, scores| {
                        if let Some(r) = result.borrow_mut().as_mut() {
                            r.set_row(kind, token, scores.clone());
                        }
                        on_row(kind, token, scores)
                    },
                )
                .await?;
                let mut r = result.into_inner().ok_or("the trace produced no rows")?;
                r.seconds = (files::now_ms() - started) / 1e3;
                Ok(r)
            }
        }
    }
}

#[derive(Deserialize)]
struct ErrorMsg {
    error: String,
}

async fn answer<T: DeserializeOwned>(r: gloo_net::http::Response) -> Result<T, String> {
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

async fn post<T: DeserializeOwned>(path: &str, body: &serde_json::Value) -> Result<T, String> {
    let r = gloo_net::http::Request::post(path)
        .json(body)
        .map_err(|e| e.to_string())?
        .send()
        .await
        .map_err(|e| e.to_string())?;
    answer(r).await
}

async fn get<T: DeserializeOwned>(path: &str) -> Result<T, String> {
    let r = gloo_net::http::Request::get(path)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    answer(r).await
}

async fn get_bytes(path: &str) -> Result<Vec<u8>, String> {
    let r = gloo_net::http::Request::get(path)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.ok() {
        return Err(format!("HTTP {}", r.status()));
    }
    r.binary().await.map_err(|e| e.to_string())
}

#[derive(Deserialize)]
struct RowMsg {
    kind: TraceKind,
    token: usize,
    scores: Vec<f32>,
}

/// A trace on the server, streamed; `on_row` returning false cancels (closing the stream).
async fn server_trace(
    model: &str,
    req: &TraceRequest,
    mut on_header: impl FnMut(&TraceHeader),
    mut on_row: impl FnMut(TraceKind, usize, Vec<f32>) -> bool,
) -> Result<TraceResult, String> {
    let mut body = serde_json::to_value(req).expect("request serialises");
    body["model"] = serde_json::json!(model);
    let url = format!(
        "/api/trace?q={}",
        js_sys::encode_uri_component(&body.to_string())
    );
    let mut es = EventSource::new(&url).map_err(|e| format!("cannot open the stream: {e}"))?;
    let subs: Vec<_> = ["start", "row", "result", "error"]
        .iter()
        .filter_map(|n| es.subscribe(*n).ok())
        .collect();
    let mut events = futures_util::stream::select_all(subs);
    let outcome = loop {
        let Some(ev) = events.next().await else {
            break Err("the stream ended early".to_string());
        };
        let Ok((name, msg)) = ev else {
            break Err("the connection to the server was lost".into());
        };
        let data = msg.data().as_string().unwrap_or_default();
        match name.as_str() {
            "start" => {
                if let Ok(h) = serde_json::from_str::<TraceHeader>(&data) {
                    on_header(&h);
                }
            }
            "row" => {
                if let Ok(r) = serde_json::from_str::<RowMsg>(&data) {
                    if !on_row(r.kind, r.token, r.scores) {
                        break Err("cancelled".into());
                    }
                }
            }
            "result" => {
                break serde_json::from_str::<TraceResult>(&data).map_err(|e| e.to_string());
            }
            _ => {
                break Err(serde_json::from_str::<ErrorMsg>(&data)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| "the trace failed".into()));
            }
        }
    };
    // Closing stops the browser from reconnecting (and cancels a running trace).
    es.close();
    outcome
}

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

#[derive(Clone, Debug, Deserialize)]
struct EditListing {
    id: u64,
    layer: usize,
    request: loci_core::edit::RewriteRequest,
}

#[derive(Deserialize)]
struct EditResponse {
    report: EditReport,
    edits: Vec<EditListing>,
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
    let (report, set_report) = signal(None::<EditReport>);
    let (edits, set_edits) = signal(Vec::<EditListing>::new());
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
            if let Ok(e) = get::<Vec<EditListing>>(&format!("/api/edits?model={name}")).await {
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
        let layer = e_layer.get_untracked().trim().parse::<usize>().ok();
        let body = serde_json::json!({
            "model": c.name, "prompt": e_prompt.get_untracked(), "subject": e_subject.get_untracked(),
            "target": e_target.get_untracked(), "layer": layer,
            "paraphrase": lines(&e_para.get_untracked()), "neighborhood": lines(&e_neigh.get_untracked()),
        });
        set_busy.set(true);
        say(
            set_status,
            "running",
            "Editing on the server (ROME: k*, v*, rank-one update)…",
        );
        let sync = sync_e.clone();
        spawn_local(async move {
            match post::<EditResponse>("/api/edit", &body).await {
                Ok(r) => {
                    let secs = r.report.seconds;
                    set_report.set(Some(r.report));
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
                let r =
                    gloo_net::http::Request::post(&format!("/api/edits/upload?model={}", c.name))
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
                        <div class="curves" inner_html=plot::tracing_effect_svg(&t)></div>
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
                <label>"Layer "
                    <input id="edit-layer" size="4" placeholder="default" prop:value=e_layer on:input=move |ev| set_e_layer.set(event_target_value(&ev)) />
                </label>
                <label class="wide">"Paraphrases (one per line) "
                    <textarea id="edit-paraphrase" rows="2" prop:value=e_para on:input=move |ev| set_e_para.set(event_target_value(&ev))></textarea>
                </label>
                <label class="wide">"Neighbourhood (should not change) "
                    <textarea id="edit-neighborhood" rows="2" prop:value=e_neigh on:input=move |ev| set_e_neigh.set(event_target_value(&ev))></textarea>
                </label>
                <button id="edit" on:click=on_edit prop:disabled=busy>"Edit (ROME)"</button>
                <button id="undo" on:click=on_undo prop:disabled=move || busy.get() || edits.get().is_empty()>"Undo"</button>
                <label class="upload">"Upload an edit "
                    <input id="upload-edit" type="file" accept=".safetensors" on:change=on_upload />
                </label>
            </section>
            <p class="hint">"ROME runs on the server (it needs the layer's key statistics); the tab's model copies get the same edit."</p>
            {move || trace.get().map(|t| view! {
                <details id="edit-curves" open>
                    <summary>{format!("Tracing effect of the last trace ({:?}), to choose the layer", t.subject)}</summary>
                    <div class="curves" inner_html=plot::tracing_effect_svg(&t)></div>
                </details>
            })}
            <section id="edits" data-count=move || edits.get().len().to_string()>
                {move || {
                    let m = model.get();
                    edits.get().into_iter().map(|e| {
                        let href = format!("/api/edits/{}/file?model={m}", e.id);
                        let label = format!("#{} layer {}: {} → {}", e.id, e.layer, e.request.filled(), e.request.target_new.str);
                        view! { <p class="edit-item">{label}" " <a href=href download="">"download"</a></p> }
                    }).collect_view()
                }}
            </section>
            {move || report.get().map(|r| {
                let row = |label: &str, b: &loci_core::edit::PromptProbs, a: &loci_core::edit::PromptProbs| {
                    let p = |x: f32| if x >= 1e-3 || x == 0.0 { format!("{x:.4}") } else { format!("{x:.1e}") };
                    let label = label.to_string();
                    let prompt = b.prompt.clone();
                    view! { <tr><td>{label}</td><td>{prompt}</td>
                        <td class="num">{p(b.target_new)}</td><td class="num">{p(a.target_new)}</td>
                        <td class="num">{p(b.target_true)}</td><td class="num">{p(a.target_true)}</td></tr> }
                };
                let old = r.request.target_true.as_ref().map(|t| t.str.clone()).unwrap_or_default();
                let mut rows = vec![row("rewrite", &r.before.rewrite, &r.after.rewrite)];
                rows.extend(r.before.paraphrase.iter().zip(&r.after.paraphrase).map(|(b, a)| row("paraphrase", b, a)));
                rows.extend(r.before.neighborhood.iter().zip(&r.after.neighborhood).map(|(b, a)| row("neighbourhood", b, a)));
                let gens: Vec<_> = r.generations.before.iter().zip(&r.generations.after).map(|(b, a)| {
                    view! { <tr><td>{b.clone()}</td><td>{a.clone()}</td></tr> }
                }).collect();
                view! {
                    <section id="edit-result" data-p-new-after=r.after.rewrite.target_new.to_string()>
                        <h3>{format!("{} → {} at layer {} (‖ΔW‖ = {:.2}, {:.1} s)", r.request.filled(), r.request.target_new.str, r.layer, r.delta_norm, r.seconds)}</h3>
                        <table class="probs">
                            <tr><th></th><th>"prompt"</th><th colspan="2">{format!("p({:?}) before → after", r.request.target_new.str)}</th><th colspan="2">{format!("p({old:?}) before → after")}</th></tr>
                            {rows}
                        </table>
                        <h3>"Generations"</h3>
                        <table class="gens"><tr><th>"before"</th><th>"after"</th></tr>{gens}</table>
                    </section>
                }
            })}

            <h2>"Benchmark"</h2>
            <section class="controls">
                <button id="bench" on:click=on_bench prop:disabled=busy>"Benchmark this tab"</button>
                <span class="hint">"Traces all three kinds (10 tokens, 10 samples) on a GPT-2-small-shaped model with random weights, in this tab's workers."</span>
            </section>
            <pre id="bench-result">{bench}</pre>
        </main>
    }
}

/// In-tab tracing speed: a GPT-2-small-shaped model (random weights) in a pool of one worker
/// per core; all three kinds on a 10-token prompt, 10 samples, window 10. Returns JSON.
async fn tab_benchmark(status: Status) -> Result<String, String> {
    let workers = cores();
    say(
        status,
        "running",
        format!("Benchmark: making a random GPT-2-small model in {workers} workers…"),
    );
    let pool = Pool::new(workers);
    let t0 = files::now_ms();
    pool.load_random("gpt2").await?;
    let load_seconds = (files::now_ms() - t0) / 1e3;
    let tok = loci_core::Tokenizer::from_json(loci_core::presets::BENCH_TOKENIZER, None)
        .map_err(|e| e.to_string())?;
    let (prompt, subject) =
        loci_core::presets::bench_prompt(&tok, 10).map_err(|e| e.to_string())?;
    let mut per_kind = serde_json::Map::new();
    let mut total = 0.0;
    for kind in TraceKind::ALL {
        let mut req = TraceRequest::new(prompt.clone(), subject.clone());
        req.kinds = vec![kind];
        req.noise = NoiseSpec::Fixed(0.1);
        say(
            status,
            "running",
            format!("Benchmark: tracing {}…", kind.name()),
        );
        let start = files::now_ms();
        let first = Rc::new(Cell::new(None::<f64>));
        let f2 = first.clone();
        let mut header_at = None;
        pool.trace(
            &req,
            |_| header_at = Some(files::now_ms()),
            move |_, _, _| {
                if f2.get().is_none() {
                    f2.set(Some(files::now_ms()));
                }
                true
            },
        )
        .await?;
        let secs = (files::now_ms() - start) / 1e3;
        total += secs;
        per_kind.insert(
            kind.name().into(),
            serde_json::json!({
                "seconds": secs,
                "seconds_to_first_row": first.get().map(|f| (f - start) / 1e3),
                "seconds_to_header": header_at.map(|f| (f - start) / 1e3),
            }),
        );
    }
    let r = serde_json::json!({
        "bench": "tab-trace", "model": "random-gpt2 (12 layers, d 768)", "workers": workers,
        "tokens": 10, "samples": 10, "window": 10, "load_seconds": load_seconds,
        "kinds": per_kind, "seconds_all_kinds": total,
    });
    Ok(serde_json::to_string_pretty(&r).expect("json"))
}

fn event_target<T: JsCast>(ev: &leptos::ev::Event) -> T {
    ev.target().expect("an event target").unchecked_into()
}

fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}
