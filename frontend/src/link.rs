//! Shareable links: the page's state in the URL — the screen, model and engine, the trace's
//! prompt, subject, kinds and method, the edit's request, method, layer, the MEMIT family's
//! further facts and the probes — so a link opens another tab on the same trace or edit; with `run=1` it runs it
//! there once the model list is in: a trace, or an edit made in that tab. An edit that would
//! change a server's shared model, or a link whose model is not offered, waits for a click.

use leptos::prelude::*;
use loci_core::edit::EditMethod;
use loci_frontend::engine::{edit_engine, Engine, Mode};

use crate::nav::Screen;
use crate::screens::edit::EditState;
use crate::screens::trace::TraceState;
use crate::state::Shared;

/// The kinds' names in a link, in `TraceState::kinds` order.
const KINDS: [&str; 3] = ["hidden", "mlp", "attn"];

fn query() -> Option<web_sys::UrlSearchParams> {
    let search = window().location().search().ok()?;
    web_sys::UrlSearchParams::new_with_str(&search).ok()
}

/// Fills the screens' state from the URL, and runs its job once the models are listed when
/// the link says `run=1`.
pub fn follow(s: Shared, trace: TraceState, edit: EditState) {
    let Some(q) = query() else { return };
    let text = |key: &str| q.get(key);
    let linked_model = text("model");
    if let Some(m) = &linked_model {
        s.model.set(m.clone());
    }
    match text("engine").as_deref() {
        Some("tab") => s.mode.set(Mode::Tab),
        Some("server") => s.mode.set(Mode::Server),
        _ => {}
    }
    let screen = text("screen").and_then(|x| Screen::from_slug(&x));
    let (prompt, subject) = match screen {
        Some(Screen::Edit) => (edit.prompt, edit.subject),
        _ => (trace.prompt, trace.subject),
    };
    if let Some(p) = text("prompt") {
        prompt.set(p);
    }
    if let Some(x) = text("subject") {
        subject.set(x);
    }
    if let Some(k) = text("kinds") {
        let on: Vec<&str> = k.split(',').collect();
        trace.kinds.set(KINDS.map(|name| on.contains(&name)));
    }
    if let Some(m) = text("trace_method").and_then(|m| m.parse().ok()) {
        trace.method.set(m);
    }
    if let Some(t) = text("target") {
        edit.target.set(t);
    }
    if let Some(m) = text("method").and_then(|m| m.parse::<EditMethod>().ok()) {
        edit.method.set(m);
    }
    if let Some(l) = text("layer") {
        edit.layer.set(l);
    }
    for (key, sig) in [
        ("more", edit.more),
        ("paraphrase", edit.paraphrase),
        ("neighborhood", edit.neighborhood),
    ] {
        if let Some(v) = text(key) {
            sig.set(v);
        }
    }
    if text("run").as_deref() != Some("1") {
        return;
    }
    let pending = StoredValue::new(screen);
    Effect::new(move |_| {
        let listed = s.models.with(|m| !m.is_empty()) && s.status.with(|st| st.0 == "ready");
        if !listed || s.busy.get() {
            return;
        }
        let job = pending.get_value();
        pending.set_value(Some(Screen::Bench)); // decided once: nothing more to do
        let Some(c) = s.choice() else { return };
        if linked_model.as_ref().is_some_and(|m| *m != c.name) {
            return s.say(
                "error",
                format!(
                    "The link's model {:?} is not offered here.",
                    linked_model.clone().unwrap_or_default()
                ),
            );
        }
        match job {
            Some(Screen::Edit) => match edit_engine(&c, s.mode.get_untracked()) {
                Ok((Engine::Tab, _)) => crate::screens::edit_actions::edit(s, edit),
                _ => s.say(
                    "ready",
                    "The link's edit is in the form: press Edit to make it on the server.",
                ),
            },
            Some(Screen::Trace) | None => crate::screens::trace::run_trace(s, trace),
            _ => {}
        }
    });
}

/// A link to this page at `screen` with `pairs` (and the model and engine).
fn link(s: Shared, screen: Screen, pairs: &[(&str, String)]) -> String {
    let q = web_sys::UrlSearchParams::new().expect("URLSearchParams");
    q.append("screen", screen.slug());
    q.append("model", &s.model.get());
    match s.mode.get() {
        Mode::Tab => q.append("engine", "tab"),
        Mode::Server => q.append("engine", "server"),
        Mode::Auto => {}
    }
    for (k, v) in pairs {
        q.append(k, v);
    }
    q.append("run", "1");
    let loc = window().location();
    let base = format!(
        "{}{}",
        loc.origin().unwrap_or_default(),
        loc.pathname().unwrap_or_default()
    );
    format!("{base}?{}", String::from(q.to_string()))
}

/// The link to the trace the Trace screen's form describes.
pub fn trace_link(s: Shared, st: TraceState) -> String {
    let kinds: Vec<&str> = KINDS
        .iter()
        .zip(st.kinds.get())
        .filter(|(_, on)| *on)
        .map(|(k, _)| *k)
        .collect();
    link(
        s,
        Screen::Trace,
        &[
            ("prompt", st.prompt.get()),
            ("subject", st.subject.get()),
            ("kinds", kinds.join(",")),
            ("trace_method", st.method.get().name().to_string()),
        ],
    )
}

/// The link to the edit the Edit screen's form describes.
pub fn edit_link(s: Shared, st: EditState) -> String {
    link(
        s,
        Screen::Edit,
        &[
            ("prompt", st.prompt.get()),
            ("subject", st.subject.get()),
            ("target", st.target.get()),
            ("method", st.method.get().name().to_string()),
            ("layer", st.layer.get()),
            ("more", st.more.get()),
            ("paraphrase", st.paraphrase.get()),
            ("neighborhood", st.neighborhood.get()),
        ],
    )
}

/// A button that copies `link` (kept current in `data-link`) and says so.
#[component]
pub fn ShareLink(#[prop(into)] link: Signal<String>) -> impl IntoView {
    let copied = RwSignal::new(false);
    let copy = move |_| {
        let clip = window().navigator().clipboard();
        let _ = clip.write_text(&link.get_untracked());
        copied.set(true);
    };
    view! {
        <button type="button" id="copy-link" data-link=link on:click=copy
            title="A link that opens this form in another tab and runs it">
            {move || if copied.get() { "Link copied" } else { "Copy link" }}
        </button>
    }
}
