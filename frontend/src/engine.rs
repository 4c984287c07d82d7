//! Where a job runs. The app offers the server's models, or a static build's (`models.json`),
//! and GPT-2 from the Hugging Face hub; a model small enough runs in this tab's worker pool,
//! else on the server, unless the user says otherwise. `Runner` is the one interface both
//! engines implement, with the core's request and result types. Edits follow `edit_engine`:
//! a server model's on the server (the tab's copies follow them), a tab-only model's in the tab.

use std::cell::RefCell;
use std::rc::Rc;

use leptos::prelude::*;
use loci_core::trace::{TraceHeader, TraceKind, TraceMethod, TraceRequest, TraceResult};
use loci_core::Prediction;
use serde::Deserialize;

use crate::files;
use crate::http::{get, get_bytes, post, server_trace, url_part};
use crate::pool::{cores, pool_size, Pool};
use crate::protocol::FileRef;

/// Memory the tab's model copies may take together, and the largest model the tab runs.
pub const TAB_BUDGET_BYTES: u64 = 2_500_000_000;
pub const TAB_MODEL_LIMIT_BYTES: u64 = 1_500_000_000;
pub const HF_GPT2: &str = "https://huggingface.co/openai-community/gpt2/resolve/main";
/// Relative, so a static build works at any path of its host.
pub const SUBJECTS_URL: &str = "static/data/known_1000.json";
/// The static build's list of the models it ships (`scripts/build-static.sh`).
pub const STATIC_MODELS_URL: &str = "models.json";

#[derive(Clone, Debug, Deserialize)]
pub struct ServerFile {
    pub name: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ModelListing {
    pub name: String,
    pub format: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub files: Vec<ServerFile>,
    /// Key statistics shipped beside a static build's model.
    #[serde(default)]
    pub stats: Vec<ShippedStats>,
}

/// A statistics file shipped with a static build, relative to its model's folder.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ShippedStats {
    pub layer: usize,
    pub file: String,
}

/// A model the picker offers, and where it can run.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub name: String,
    pub label: String,
    pub on_server: bool,
    /// Files the tab downloads to run it itself (empty: server only).
    pub files: Vec<FileRef>,
    /// Its weights in f32, the tab's working precision.
    pub f32_bytes: u64,
    /// Key statistics files that come with it, by layer (a static build's).
    pub stats: Vec<(usize, String)>,
}

/// f32 bytes of a model from its listed size (GGUF files are 4-bit: about 7x once dequantised).
fn f32_size(m: &ModelListing) -> u64 {
    if m.format == "gguf" {
        m.size_bytes * 7
    } else {
        m.size_bytes
    }
}

/// The models a static build ships (its `models.json`): files beside the page, tab only.
pub fn static_choices(list: &[ModelListing]) -> Vec<Choice> {
    let mut v: Vec<Choice> = list
        .iter()
        .map(|m| {
            let base = format!("models/{}", url_part(&m.name));
            Choice {
                name: m.name.clone(),
                label: format!(
                    "{} ({}, {:.0} MB, shipped with this page)",
                    m.name,
                    m.format,
                    m.size_bytes as f64 / 1e6
                ),
                on_server: false,
                files: m
                    .files
                    .iter()
                    .map(|f| FileRef {
                        name: f.name.clone(),
                        url: format!("{base}/{}", url_part(&f.name)),
                    })
                    .collect(),
                f32_bytes: f32_size(m),
                stats: m
                    .stats
                    .iter()
                    .map(|s| (s.layer, format!("{base}/{}", s.file)))
                    .collect(),
            }
        })
        .collect();
    if v.iter().all(|c| c.name != "gpt2") {
        v.push(hub_gpt2());
    }
    v
}

/// GPT-2 small from the Hugging Face hub (the tab fetches these three files when online).
fn hub_gpt2() -> Choice {
    Choice {
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
        stats: vec![],
    }
}

pub fn choices(list: &[ModelListing]) -> Vec<Choice> {
    let mut v: Vec<Choice> = list
        .iter()
        .map(|m| {
            let f32_bytes = f32_size(m);
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
                        url: format!(
                            "/api/models/{}/files/{}",
                            url_part(&m.name),
                            url_part(&f.name)
                        ),
                    })
                    .collect(),
                f32_bytes,
                stats: vec![],
            }
        })
        .collect();
    if v.iter().all(|c| c.name != "gpt2") {
        v.push(hub_gpt2());
    }
    v
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Auto,
    Tab,
    Server,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Engine {
    Tab,
    Server,
}

pub fn pick_engine(c: &Choice, mode: Mode) -> Result<Engine, String> {
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

/// Where an edit of `c` runs under `mode`, and why: on the server when it has the model (its
/// key statistics are there, and its edits are this visitor's own session's), unless the user picks this
/// tab; in the tab for a model only the tab has.
pub fn edit_engine(c: &Choice, mode: Mode) -> Result<(Engine, String), String> {
    match mode {
        Mode::Server if c.on_server => Ok((Engine::Server, "you chose the server".into())),
        Mode::Server => Err(format!(
            "{} is not on this server; run it in the tab",
            c.name
        )),
        Mode::Tab if !c.files.is_empty() => Ok((
            Engine::Tab,
            "you chose this tab: its statistics and edits are this tab's own".into(),
        )),
        Mode::Tab => Err(format!("{} can only run on the server", c.name)),
        Mode::Auto if c.on_server => Ok((
            Engine::Server,
            "the server has this model and its key statistics; choose the engine \"in this tab\" to edit here"
                .into(),
        )),
        Mode::Auto if !c.files.is_empty() => Ok((
            Engine::Tab,
            format!(
                "{} runs only in this tab: statistics and edits are made here",
                c.name
            ),
        )),
        Mode::Auto => Err(format!("{} has no files for the tab", c.name)),
    }
}

/// The tab's loaded model: a pool of workers, each with a copy.
pub struct TabModel {
    pub name: String,
    pub info: loci_core::ModelInfo,
    pub pool: Rc<Pool>,
    /// The server's edits the tab's copies carry, oldest first.
    pub edits: Rc<RefCell<Vec<u64>>>,
}

pub type Status = WriteSignal<(String, String)>;

pub fn say(status: Status, kind: &str, text: impl Into<String>) {
    status.set((kind.to_string(), text.into()));
}

/// Bytes downloaded and expected, while a model file downloads.
pub type Download = WriteSignal<Option<(u64, u64)>>;

pub async fn tab_pool(
    slot: &Rc<RefCell<Option<TabModel>>>,
    c: &Choice,
    mode: Mode,
    status: Status,
    download: Download,
) -> Result<Rc<Pool>, String> {
    // Chosen explicitly, the tab's copy keeps its own edits; else it follows the server's.
    let follow = c.on_server && mode != Mode::Tab;
    let reused = slot
        .borrow()
        .as_ref()
        .filter(|t| t.name == c.name)
        .map(|t| (t.pool.clone(), t.edits.clone()));
    if let Some((pool, edits)) = reused {
        if follow {
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
    let info = pool.load(&c.name, c.files.clone(), SUBJECTS_URL).await?;
    let edits = Rc::new(RefCell::new(vec![]));
    if follow {
        sync_edits(&pool, &edits, &c.name).await?;
    }
    *slot.borrow_mut() = Some(TabModel {
        name: c.name.clone(),
        info,
        pool: pool.clone(),
        edits,
    });
    Ok(pool)
}

/// Gives the tab's model copies exactly the edits the server's model has now (whoever made
/// them): the missing newer ones are applied; if the histories differ, all are undone and the
/// server's re-applied. Checked before every tab job on a server model.
pub async fn sync_edits(pool: &Pool, have: &RefCell<Vec<u64>>, model: &str) -> Result<(), String> {
    let server: Vec<u64> =
        get::<Vec<EditListing>>(&format!("/api/edits?model={}", url_part(model)))
            .await?
            .into_iter()
            .map(|e| e.id)
            .collect();
    let mine = have.borrow().clone();
    // Edits the tab made (or undid) itself are not the server's: following it drops them.
    let own = pool.own_edits();
    if server == mine && !own {
        return Ok(());
    }
    let keep = if server.starts_with(&mine) && !own {
        mine.len()
    } else {
        pool.undo_edit(true).await?;
        pool.set_own_edits(false);
        have.borrow_mut().clear();
        0
    };
    for &id in &server[keep..] {
        let bytes = get_bytes(&format!("/api/edits/{id}/file?model={}", url_part(model))).await?;
        pool.apply_edit(bytes).await?;
        have.borrow_mut().push(id);
    }
    Ok(())
}

/// The engine a job runs on. Both take the same requests and give the same result types.
pub enum Runner {
    Tab(Rc<Pool>),
    Server,
}

impl Runner {
    /// Gets the engine for model `c` under `mode`, loading the tab's copy when needed.
    pub async fn open(
        slot: &Rc<RefCell<Option<TabModel>>>,
        c: &Choice,
        mode: Mode,
        status: Status,
        download: Download,
    ) -> Result<Self, String> {
        Ok(match pick_engine(c, mode)? {
            Engine::Tab => Runner::Tab(tab_pool(slot, c, mode, status, download).await?),
            Engine::Server => Runner::Server,
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Runner::Tab(p) => format!("this tab, {} workers", p.workers()),
            Runner::Server => "the server".into(),
        }
    }

    pub async fn predict(
        &self,
        model: &str,
        prompt: &str,
        top: usize,
    ) -> Result<Prediction, String> {
        match self {
            Runner::Tab(pool) => pool.predict(prompt, top).await,
            Runner::Server => {
                let body = serde_json::json!({ "model": model, "prompt": prompt, "top": top });
                post("/api/predict", &body).await
            }
        }
    }

    /// Streams rows to `on_row` (false cancels) and returns the whole result. Attribution
    /// patching's and knowledge neurons' rows all come at the end in the tab.
    pub async fn trace(
        &self,
        (model, method): (&str, TraceMethod),
        req: &TraceRequest,
        mut on_header: impl FnMut(&TraceHeader),
        mut on_row: impl FnMut(TraceKind, usize, Vec<f32>) -> bool,
    ) -> Result<TraceResult, String> {
        match self {
            Runner::Server => server_trace((model, method), req, on_header, on_row).await,
            Runner::Tab(pool) if method != TraceMethod::Exact => {
                let started = files::now_ms();
                let mut r = pool.trace_whole(method, req).await?;
                r.model = model.to_string();
                on_header(&r.header());
                for (&kind, grid) in &r.scores {
                    for (token, row) in grid.iter().enumerate() {
                        if !on_row(kind, token, row.clone()) {
                            return Err("cancelled".into());
                        }
                    }
                }
                r.seconds = (files::now_ms() - started) / 1e3;
                Ok(r)
            }
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

#[derive(Clone, Debug, Deserialize)]
pub struct EditListing {
    pub id: u64,
    /// The method that made the edit.
    pub method: loci_core::edit::EditMethod,
    pub layers: Vec<usize>,
    pub requests: Vec<loci_core::edit::RewriteRequest>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(name: &str, format: &str, size_bytes: u64) -> ModelListing {
        ModelListing {
            name: name.into(),
            format: format.into(),
            size_bytes,
            files: vec![ServerFile {
                name: format!("{name}.{format}"),
            }],
            stats: vec![],
        }
    }

    #[test]
    fn a_static_build_ships_its_models_and_statistics_for_the_tab() {
        let mut smol = listing("smol", "gguf", 98_000_000);
        smol.stats.push(ShippedStats {
            layer: 4,
            file: "stats/layer4.safetensors".into(),
        });
        let c = static_choices(&[smol]);
        assert_eq!(c.len(), 2, "GPT-2 from the hub too");
        let smol = &c[0];
        assert!(!smol.on_server);
        // Relative URLs: the build works at any path of its host.
        assert_eq!(smol.files[0].url, "models/smol/smol.gguf");
        assert_eq!(
            smol.stats,
            vec![(4, "models/smol/stats/layer4.safetensors".to_string())]
        );
        assert_eq!(pick_engine(smol, Mode::Auto), Ok(Engine::Tab));
        let (engine, why) = edit_engine(smol, Mode::Auto).unwrap();
        assert_eq!(engine, Engine::Tab);
        assert!(why.contains("only in this tab"), "{why}");
        assert!(edit_engine(smol, Mode::Server).is_err());
    }

    #[test]
    fn edits_of_a_server_model_run_on_the_server_unless_the_tab_is_chosen() {
        let c = choices(&[listing("smol", "gguf", 98_000_000)]);
        assert_eq!(edit_engine(&c[0], Mode::Auto).unwrap().0, Engine::Server);
        assert_eq!(edit_engine(&c[0], Mode::Tab).unwrap().0, Engine::Tab);
        assert_eq!(
            edit_engine(&c[1], Mode::Auto).unwrap().0,
            Engine::Tab,
            "the hub's GPT-2"
        );
    }

    #[test]
    fn small_models_run_in_the_tab_big_ones_on_the_server() {
        let c = choices(&[
            listing("smol", "gguf", 98_000_000),
            listing("gptj", "safetensors", 24_000_000_000),
        ]);
        // The hub's GPT-2 is offered too, for the tab only.
        assert_eq!(c.len(), 3);
        let (smol, gptj, gpt2) = (&c[0], &c[1], &c[2]);
        assert_eq!(smol.f32_bytes, 7 * 98_000_000, "GGUF counts as dequantised");
        assert_eq!(smol.files[0].url, "/api/models/smol/files/smol.gguf");
        assert_eq!(pick_engine(smol, Mode::Auto), Ok(Engine::Tab));
        assert_eq!(pick_engine(smol, Mode::Server), Ok(Engine::Server));
        assert_eq!(pick_engine(gptj, Mode::Auto), Ok(Engine::Server));
        assert_eq!(
            pick_engine(gptj, Mode::Tab),
            Ok(Engine::Tab),
            "the user may insist"
        );
        assert!(!gpt2.on_server);
        assert_eq!(pick_engine(gpt2, Mode::Auto), Ok(Engine::Tab));
        assert!(pick_engine(gpt2, Mode::Server).is_err());
        // A server-only model (no files) never runs in the tab.
        let mut bare = listing("bare", "safetensors", 1_000);
        bare.files.clear();
        let bare = &choices(&[bare])[0];
        assert_eq!(pick_engine(bare, Mode::Auto), Ok(Engine::Server));
        assert!(pick_engine(bare, Mode::Tab).is_err());
    }
}
