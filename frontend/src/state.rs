//! The state every screen shares, provided once as context: the model list, the picked model
//! and engine mode, the status line, whether a job runs (one at a time: the tab's workers and
//! the server's queue are shared), the tab's loaded model, the server's edits of the model, and
//! the bundled known facts and CounterFact cases.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;

use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_core::eval::CounterFactCase;
use loci_frontend::engine::{
    choices, say, static_choices, sync_edits, tab_pool, Choice, EditListing, Mode, ModelListing,
    Runner, TabModel, STATIC_MODELS_URL, SUBJECTS_URL,
};
use loci_frontend::http::{get, url_part};
use loci_frontend::pool::Pool;
use serde::Deserialize;

/// One of `known_1000.json`'s facts.
#[derive(Clone, Debug, Deserialize)]
pub struct Fact {
    pub subject: String,
    pub prompt: String,
}

pub const CASES_URL: &str = "static/data/counterfact_50.json";

#[derive(Clone, Copy)]
pub struct Shared {
    pub models: RwSignal<Vec<Choice>>,
    pub model: RwSignal<String>,
    pub mode: RwSignal<Mode>,
    /// (kind, text): kind is one of loading, ready, running, done, edited, undone, error.
    pub status: ReadSignal<(String, String)>,
    set_status: WriteSignal<(String, String)>,
    pub busy: RwSignal<bool>,
    /// Whether a Loci server answers (None: not known yet). Without one, the page is a static
    /// build and every job runs in this tab.
    pub server: RwSignal<Option<bool>>,
    /// Bytes downloaded and expected while a model file downloads into the tab.
    pub download: ReadSignal<Option<(u64, u64)>>,
    set_download: WriteSignal<Option<(u64, u64)>>,
    pub edits: RwSignal<Vec<EditListing>>,
    pub facts: RwSignal<Vec<Fact>>,
    pub cases: RwSignal<Vec<CounterFactCase>>,
    tab: StoredValue<Rc<RefCell<Option<TabModel>>>, LocalStorage>,
    stop: StoredValue<Rc<Cell<bool>>, LocalStorage>,
}

impl Shared {
    pub fn new() -> Self {
        let (status, set_status) =
            signal(("loading".to_string(), "Loading the model list…".to_string()));
        let (download, set_download) = signal(None);
        Shared {
            models: RwSignal::new(vec![]),
            model: RwSignal::new(String::new()),
            mode: RwSignal::new(Mode::Auto),
            status,
            set_status,
            busy: RwSignal::new(false),
            server: RwSignal::new(None),
            download,
            set_download,
            edits: RwSignal::new(vec![]),
            facts: RwSignal::new(vec![]),
            cases: RwSignal::new(vec![]),
            tab: StoredValue::new_local(Rc::new(RefCell::new(None))),
            stop: StoredValue::new_local(Rc::new(Cell::new(false))),
        }
    }

    /// Fetches the model list, the known facts and the CounterFact cases; keeps the list of the
    /// server's edits of the picked model current (they survive page reloads).
    pub fn load(self) {
        spawn_local(async move {
            let listed = match get::<Vec<ModelListing>>("/api/models").await {
                Ok(m) => {
                    self.server.set(Some(true));
                    Ok((choices(&m), "Ready."))
                }
                Err(server) => match get::<Vec<ModelListing>>(STATIC_MODELS_URL).await {
                    Ok(m) => {
                        self.server.set(Some(false));
                        Ok((
                            static_choices(&m),
                            "Ready. No Loci server here: everything runs in this tab.",
                        ))
                    }
                    Err(_) => Err(format!("The server did not answer: {server}")),
                },
            };
            match listed {
                Ok((c, ready)) => {
                    let wanted = self.model.get_untracked();
                    if let Some(first) = c.iter().find(|m| m.name == wanted).or(c.first()) {
                        self.model.set(first.name.clone());
                    }
                    self.models.set(c);
                    self.say("ready", ready);
                }
                Err(e) => self.say("error", e),
            }
            if let Ok(f) = get::<Vec<Fact>>(SUBJECTS_URL).await {
                self.facts.set(f);
            }
            if let Ok(c) = get::<Vec<CounterFactCase>>(CASES_URL).await {
                self.cases.set(c);
            }
        });
        Effect::new(move |_| {
            let name = self.model.get();
            let on_server = self
                .models
                .with(|m| m.iter().any(|c| c.name == name && c.on_server));
            if !on_server {
                self.edits.set(vec![]);
                return;
            }
            spawn_local(async move {
                let url = format!("/api/edits?model={}", url_part(&name));
                if let Ok(e) = get::<Vec<EditListing>>(&url).await {
                    self.edits.set(e);
                }
            });
        });
    }

    pub fn say(&self, kind: &str, text: impl Into<String>) {
        say(self.set_status, kind, text);
    }

    /// The picked model (read without tracking).
    pub fn choice(&self) -> Option<Choice> {
        let name = self.model.get_untracked();
        self.models
            .with_untracked(|m| m.iter().find(|c| c.name == name).cloned())
    }

    /// The picked model, when the server has it (else says why `job` needs it).
    pub fn server_choice(&self, job: &str) -> Option<Choice> {
        let c = self.choice()?;
        if c.on_server {
            Some(c)
        } else {
            self.say(
                "error",
                format!("{job} on the server: pick a model the server has."),
            );
            None
        }
    }

    /// The picked model, tracked: for views.
    pub fn current(&self) -> Option<Choice> {
        let name = self.model.get();
        self.models
            .with(|m| m.iter().find(|c| c.name == name).cloned())
    }

    /// Marks a job as running (clearing the cancel flag) or as over.
    pub fn set_running(&self, on: bool) {
        if on {
            self.stop.with_value(|c| c.set(false));
        }
        self.busy.set(on);
    }

    /// Asks the running job to stop at its next row or line.
    pub fn cancel(&self) {
        self.stop.with_value(|c| c.set(true));
    }

    /// The flag a running job polls.
    pub fn cancel_flag(&self) -> Rc<Cell<bool>> {
        self.stop.get_value()
    }

    /// The engine for `c` under the picked mode, loading the tab's copy when needed.
    pub async fn runner(&self, c: &Choice) -> Result<Runner, String> {
        let tab = self.tab.get_value();
        let mode = self.mode.get_untracked();
        Runner::open(&tab, c, mode, self.set_status, self.set_download).await
    }

    /// This tab's copy of `c`, loaded if needed (whatever the engine mode says: the caller has
    /// decided the job runs here).
    pub async fn tab(&self, c: &Choice) -> Result<(Rc<Pool>, loci_core::ModelInfo), String> {
        let tab = self.tab.get_value();
        let mode = self.mode.get_untracked();
        let pool = tab_pool(&tab, c, mode, self.set_status, self.set_download).await?;
        let info = tab
            .borrow()
            .as_ref()
            .map(|t| t.info.clone())
            .ok_or("the tab's model is gone")?;
        Ok((pool, info))
    }

    /// The tab's pool when it holds model `name`.
    pub fn tab_pool_of(&self, name: &str) -> Option<Rc<Pool>> {
        let tab = self.tab.get_value();
        let t = tab.borrow();
        t.as_ref()
            .filter(|t| t.name == name)
            .map(|t| t.pool.clone())
    }

    /// The engine's status and download signals, for jobs that report on their own.
    pub fn status_writer(&self) -> WriteSignal<(String, String)> {
        self.set_status
    }

    /// After an edit, undo or upload on the server, the tab's copies of that model follow.
    pub fn sync_tab(&self, name: String) -> impl Future<Output = Result<(), String>> {
        let tab = self.tab.get_value();
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
}

/// The shared state, from context.
pub fn shared() -> Shared {
    expect_context::<Shared>()
}

/// Non-empty trimmed lines.
pub fn lines(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Layers typed as "6" or "2,3,4" (empty: the model's defaults).
pub fn layer_list(text: &str) -> Result<Vec<usize>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse()
                .map_err(|_| format!("layer {x:?} is not a number"))
        })
        .collect()
}
