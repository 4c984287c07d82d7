//! The Edit screen's jobs on the server: an edit (ROME, MEMIT or FT) from the form, undoing
//! the last edit, and uploading an edit file; after each, the tab's model copies follow.

use leptos::prelude::*;
use leptos::task::spawn_local;
use loci_core::edit::{EditMethod, EditReport, MemitReport, RewriteRequest};
use loci_frontend::engine::EditListing;
use loci_frontend::http::{answer, post, url_part};
use serde::Deserialize;
use wasm_bindgen::JsCast;

use super::edit::EditState;
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
        EditMethod::Memit => {
            let more = more_facts(&st.more.get_untracked())?;
            body["method"] = method.name().into();
            body["requests"] = serde_json::to_value(more).expect("requests serialise");
            body["layers"] = layers.into();
        }
        EditMethod::Ft => {
            body["method"] = method.name().into();
            body["layers"] = layers.into();
        }
        EditMethod::Rome => match layers[..] {
            [] => {}
            [l] => body["layer"] = l.into(),
            _ => return Err("ROME edits one layer; MEMIT takes several".into()),
        },
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
    let Some(c) = s.server_choice("Edits need the server's key statistics") else {
        return;
    };
    let body = match edit_body(&c.name, &st) {
        Ok(b) => b,
        Err(e) => return s.say("error", e),
    };
    s.set_running(true);
    s.say(
        "running",
        match st.method.get_untracked() {
            EditMethod::Memit => "Editing on the server (MEMIT: a target per fact, then the update spread over the layers)…",
            EditMethod::Ft => "Editing on the server (fine-tuning the layers within an L∞ bound)…",
            EditMethod::Rome => "Editing on the server (ROME: k*, v*, rank-one update)…",
        },
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
    let Some(c) = s.choice() else { return };
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

pub fn upload(s: Shared, ev: leptos::ev::Event) {
    let Some(c) = s.choice() else { return };
    let input: web_sys::HtmlInputElement = ev.target().expect("an event target").unchecked_into();
    let Some(file) = input.files().and_then(|f| f.get(0)) else {
        return;
    };
    s.set_running(true);
    spawn_local(async move {
        let sent = async {
            let buf = wasm_bindgen_futures::JsFuture::from(file.array_buffer())
                .await
                .map_err(|_| "cannot read the file".to_string())?;
            let bytes = js_sys::Uint8Array::new(&buf).to_vec();
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
