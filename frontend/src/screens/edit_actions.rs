//! The Edit screen's jobs: an edit (ROME, MEMIT or FT) from the form, undoing the last edit, and
//! uploading an edit file, each where `edit_engine` puts the model's edits. Here the server's
//! (after each, the tab's model copies follow); the tab's own are in `edit_tab`.

use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_core::edit::{EditMethod, EditReport, MemitReport, NullSpace, RewriteRequest};
use loci_frontend::engine::{edit_engine, Choice, EditListing, Engine};
use loci_frontend::http::{answer, post, url_part};
use serde::Deserialize;
use wasm_bindgen::JsCast;

use super::edit::EditState;
use super::edit_tab;
use crate::state::{layer_list, lines, Shared};

#[derive(Deserialize)]
struct EditResponse {
    #[serde(default)]
    report: Option<EditReport>,
    #[serde(default)]
    memit: Option<MemitReport>,
    edits: Vec<EditListing>,
}

#[derive(Deserialize)]
struct EditsResponse {
    edits: Vec<EditListing>,
}

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

/// The form's facts: the one above, and for MEMIT the further ones.
pub fn requests(st: &EditState) -> Result<Vec<RewriteRequest>, String> {
    let first = RewriteRequest::from_prompt(
        &st.prompt.get_untracked(),
        &st.subject.get_untracked(),
        &st.target.get_untracked(),
    )
    .map_err(|e| e.to_string())?;
    let mut all = vec![first];
    if st.method.get_untracked().takes_many_facts() {
        all.extend(more_facts(&st.more.get_untracked())?);
    }
    Ok(all)
}

/// AlphaEdit's null space as the form gives it (empty: the paper's), None for other methods.
pub fn null_space(st: &EditState) -> Result<Option<NullSpace>, String> {
    let text = st.null_space.get_untracked();
    if st.method.get_untracked() != EditMethod::Alphaedit || text.trim().is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|e: loci_core::LociError| e.to_string())
}

/// What a method does, as the status line says while it runs.
pub fn method_steps(method: EditMethod) -> &'static str {
    match method {
        EditMethod::Rome => "ROME: k*, v*, rank-one update",
        EditMethod::Memit => "MEMIT: a target per fact, then the update spread over the layers",
        EditMethod::Alphaedit => {
            "AlphaEdit: a target per fact, then updates confined to what the model does not use"
        }
        EditMethod::Emmet => "EMMET: a target per fact, then each key's output set exactly",
        EditMethod::Ft => "fine-tuning within an L∞ bound",
        EditMethod::Grace => "GRACE: the prompt's key, then the value it gets, in a codebook",
    }
}

/// The picked model and where its edits (and the study) run; says why not when they cannot.
pub fn placed(s: Shared) -> Option<(Choice, Engine)> {
    let c = s.choice()?;
    match edit_engine(&c, s.mode.get_untracked()) {
        Ok((e, _)) => Some((c, e)),
        Err(e) => {
            s.say("error", e);
            None
        }
    }
}

/// The `/api/edit` body the form describes.
fn edit_body(model: &str, st: &EditState) -> Result<serde_json::Value, String> {
    let layers = layer_list(&st.layer.get_untracked())?;
    let mut body = serde_json::json!({
        "model": model, "prompt": st.prompt.get_untracked(), "subject": st.subject.get_untracked(),
        "target": st.target.get_untracked(),
        "paraphrase": lines(&st.paraphrase.get_untracked()),
        "neighborhood": lines(&st.neighborhood.get_untracked()),
    });
    let method = st.method.get_untracked();
    match method {
        EditMethod::Memit | EditMethod::Alphaedit | EditMethod::Emmet => {
            let more = more_facts(&st.more.get_untracked())?;
            body["method"] = method.name().into();
            body["requests"] = serde_json::to_value(more).expect("requests serialise");
            body["layers"] = layers.into();
            match null_space(st)? {
                Some(NullSpace::Below(t)) => body["null_threshold"] = t.into(),
                Some(NullSpace::Energy(f)) => body["null_energy"] = f.into(),
                None => {}
            }
        }
        EditMethod::Ft => {
            body["method"] = method.name().into();
            body["layers"] = layers.into();
        }
        EditMethod::Rome | EditMethod::Grace => {
            body["method"] = method.name().into();
            match layers[..] {
                [] => {}
                [l] => body["layer"] = l.into(),
                _ => {
                    return Err(format!(
                        "{} edits one layer; MEMIT, AlphaEdit and EMMET take several",
                        method.label()
                    ))
                }
            }
        }
    }
    Ok(body)
}

/// Tells whether the tab's copies followed the server, as the status.
async fn follow(s: Shared, name: String, kind: &str, done: String) {
    match s.sync_tab(name).await {
        Ok(()) => s.say(kind, done),
        Err(e) => s.say(
            "error",
            format!("done on the server, but the tab's copy failed: {e}"),
        ),
    }
}

pub fn edit(s: Shared, st: EditState) {
    let Some((c, engine)) = placed(s) else { return };
    if engine == Engine::Tab {
        return edit_tab::edit(s, st, c);
    }
    let body = match edit_body(&c.name, &st) {
        Ok(b) => b,
        Err(e) => return s.say("error", e),
    };
    s.set_running(true);
    s.say(
        "running",
        format!(
            "Editing on the server ({})…",
            method_steps(st.method.get_untracked())
        ),
    );
    spawn_local(async move {
        match post::<EditResponse>("/api/edit", &body).await {
            Ok(r) => {
                let secs = r
                    .report
                    .as_ref()
                    .map(|x| x.seconds)
                    .or(r.memit.as_ref().map(|x| x.seconds))
                    .unwrap_or_default();
                st.report.set(r.report);
                st.memit.set(r.memit);
                s.edits.set(r.edits);
                follow(s, c.name, "edited", format!("Edited in {secs:.1} s.")).await;
            }
            Err(e) => s.say("error", e),
        }
        s.set_running(false);
    });
}

pub fn undo(s: Shared, st: EditState) {
    let Some((c, engine)) = placed(s) else { return };
    if engine == Engine::Tab {
        return edit_tab::undo(s, st, c);
    }
    s.set_running(true);
    spawn_local(async move {
        let body = serde_json::json!({ "model": c.name });
        match post::<EditsResponse>("/api/undo", &body).await {
            Ok(r) => {
                s.edits.set(r.edits);
                st.report.set(None);
                st.memit.set(None);
                let done = "Undone: the original weights are back.".to_string();
                follow(s, c.name, "undone", done).await;
            }
            Err(e) => s.say("error", e),
        }
        s.set_running(false);
    });
}

/// The bytes of the file an `<input type=file>` event picked.
pub async fn picked_file(ev: &leptos::ev::Event) -> Option<Result<Vec<u8>, String>> {
    let input: web_sys::HtmlInputElement = ev.target()?.unchecked_into();
    let file = input.files().and_then(|f| f.get(0))?;
    // The same file may be picked again later (after an undo, say).
    input.set_value("");
    let read = wasm_bindgen_futures::JsFuture::from(file.array_buffer()).await;
    Some(
        read.map(|buf| js_sys::Uint8Array::new(&buf).to_vec())
            .map_err(|_| "cannot read the file".to_string()),
    )
}

pub fn upload(s: Shared, st: EditState, ev: leptos::ev::Event) {
    let Some((c, engine)) = placed(s) else { return };
    spawn_local(async move {
        let bytes = match picked_file(&ev).await {
            Some(Ok(b)) => b,
            Some(Err(e)) => return s.say("error", e),
            None => return,
        };
        if engine == Engine::Tab {
            return edit_tab::upload(s, st, c, bytes);
        }
        s.set_running(true);
        let sent = async {
            let url = format!("/api/edits/upload?model={}", url_part(&c.name));
            let r = gloo_net::http::Request::post(&url)
                .header("content-type", "application/octet-stream")
                .body(bytes)
                .map_err(|e| e.to_string())?
                .send()
                .await
                .map_err(|e| e.to_string())?;
            answer::<EditsResponse>(r).await
        }
        .await;
        match sent {
            Ok(u) => {
                s.edits.set(u.edits);
                let done = "The uploaded edit is applied.".to_string();
                follow(s, c.name, "edited", done).await;
            }
            Err(e) => s.say("error", e),
        }
        s.set_running(false);
    });
}
