//! `POST /api/edit`, `GET /api/edits`, `POST /api/undo`, edit files (download and upload): edits
//! of the served model, each undone exactly.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use loci_core::edit::{Edit, EditMethod, KeyMode, KeyStats, Probes, RewriteRequest};
use serde::{Deserialize, Serialize};

use super::jobs::*;
use super::AppState;

/// Edit files are small (two vectors per fact and layer); a GPT-J ROME edit is about 100 KB.
pub const MAX_EDIT_FILE: usize = 4 * 1024 * 1024;
pub(super) const MAX_PROBES: usize = 20;
/// Facts one MEMIT request may write (each costs a v* optimisation).
const MAX_MEMIT_REQUESTS: usize = 16;

fn default_generate_tokens() -> usize {
    10
}

#[derive(Deserialize)]
pub struct EditBody {
    model: String,
    /// A CounterFact `requested_rewrite` object…
    #[serde(default)]
    request: Option<RewriteRequest>,
    /// …or a prompt holding the subject, the subject and the new target.
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    target: Option<String>,
    /// "rome" (default: one fact at `layer`), "memit" (all facts at once over `layers`) or "ft"
    /// (constrained fine-tuning of one fact at `layers`).
    #[serde(default)]
    method: Option<String>,
    /// MEMIT: more facts, written with the one above (if any).
    #[serde(default)]
    requests: Vec<RewriteRequest>,
    #[serde(default)]
    layer: Option<usize>,
    #[serde(default)]
    layers: Vec<usize>,
    /// "rrome" (default) or "original".
    #[serde(default)]
    key_mode: Option<String>,
    #[serde(default)]
    paraphrase: Vec<String>,
    #[serde(default)]
    neighborhood: Vec<String>,
    #[serde(default = "default_generate_tokens")]
    generate_tokens: usize,
}

#[derive(Serialize)]
struct EditResponse {
    id: u64,
    /// ROME's read-out…
    #[serde(skip_serializing_if = "Option::is_none")]
    report: Option<loci_core::edit::EditReport>,
    /// …or MEMIT's, one per fact.
    #[serde(skip_serializing_if = "Option::is_none")]
    memit: Option<loci_core::edit::MemitReport>,
    edits: Vec<super::models::EditListing>,
}

/// Computes a ROME, MEMIT or fine-tuning edit, applies it on top of the model's other edits and
/// reports before/after.
pub async fn edit(
    State(st): State<Arc<AppState>>,
    b: Result<Json<EditBody>, JsonRejection>,
) -> Response {
    json_job(st, b, move |st, b| {
        let (method, reqs) = edit_requests(&b)?;
        let m = model(st, &b.model)?;
        let mut guard = write(&m);
        let state = &mut *guard;
        let probes = Probes {
            paraphrase: b.paraphrase.clone(),
            neighborhood: b.neighborhood.clone(),
            generate_tokens: b.generate_tokens.min(50),
        };
        let (edit, applied, report, memit) = match method {
            EditMethod::Ft => {
                let hp = crate::workspace::ft_hparams(&state.lm, &b.layers, &Default::default())
                    .map_err(|e| bad(format!("{e:#}")))?;
                let req = reqs.into_iter().next().expect("one request");
                let (e, applied, report) = state.lm.ft_with_report(req, &hp, &probes)?;
                (Edit::Ft(e), applied, Some(report), None)
            }
            EditMethod::Memit => {
                let hp = crate::workspace::memit_hparams(&state.lm, &b.layers)
                    .map_err(|e| bad(format!("{e:#}")))?;
                let stats = layers_stats(st, &state.lm, &hp.layers)?;
                let (e, applied, report) =
                    (state.lm).memit_with_report(reqs, &hp, &stats, &probes, &mut |_| {})?;
                (Edit::Memit(e), applied, None, Some(report))
            }
            EditMethod::Rome => {
                let mut hp = edit_hparams(&state.lm, b.layer)?;
                hp.key_mode = key_mode(b.key_mode.as_deref())?;
                let stats = layers_stats(st, &state.lm, &[hp.layer])?.remove(0);
                let req = reqs.into_iter().next().expect("one request");
                let (e, applied, report) =
                    (state.lm).rome_with_report(req, &hp, Some(&stats), &probes)?;
                (Edit::Rome(e), applied, Some(report), None)
            }
        };
        let id = state.record(edit, applied);
        Ok(EditResponse {
            id,
            report,
            memit,
            edits: state.listing(),
        })
    })
    .await
}

/// The method and the facts of an edit request, checked against what the method takes and
/// against the server's bounds before any work.
fn edit_requests(b: &EditBody) -> Result<(EditMethod, Vec<RewriteRequest>), ApiError> {
    let single = match (&b.request, &b.prompt, &b.subject, &b.target) {
        (Some(r), None, None, None) => Some(r.clone()),
        (None, Some(p), Some(s), Some(t)) => Some(RewriteRequest::from_prompt(p, s, t)?),
        (None, None, None, None) if !b.requests.is_empty() => None,
        _ => return Err(bad(
            "give either \"request\" (a requested_rewrite) or \"prompt\", \"subject\" and \"target\"",
        )),
    };
    let method: EditMethod = b.method.as_deref().unwrap_or("rome").parse()?;
    let reqs: Vec<RewriteRequest> = single.into_iter().chain(b.requests.clone()).collect();
    let refusal = match method {
        EditMethod::Rome if reqs.len() != 1 || !b.layers.is_empty() => Some(
            "ROME edits one fact at one \"layer\"; use \"method\": \"memit\" for \"requests\" and \"layers\"".to_string(),
        ),
        EditMethod::Ft if reqs.len() != 1 || b.layer.is_some() => {
            Some("fine-tuning edits one fact at its \"layers\"".to_string())
        }
        EditMethod::Memit if b.layer.is_some() => {
            Some("MEMIT edits its \"layers\", not one \"layer\"".to_string())
        }
        EditMethod::Memit if reqs.len() > MAX_MEMIT_REQUESTS => Some(format!(
            "MEMIT writes at most {MAX_MEMIT_REQUESTS} facts at once"
        )),
        _ => None,
    };
    if let Some(r) = refusal {
        return Err(bad(r));
    }
    if b.paraphrase.len() + b.neighborhood.len() > MAX_PROBES {
        return Err(bad(format!(
            "at most {MAX_PROBES} paraphrase and neighborhood prompts"
        )));
    }
    for p in reqs
        .iter()
        .map(|r| &r.prompt)
        .chain(&b.paraphrase)
        .chain(&b.neighborhood)
    {
        check_prompt(p)?;
    }
    Ok((method, reqs))
}

/// ROME's key mode by its API name (default: r-ROME's).
fn key_mode(name: Option<&str>) -> Result<KeyMode, ApiError> {
    match name {
        None | Some("rrome") => Ok(KeyMode::Rrome),
        Some("original") => Ok(KeyMode::Original),
        Some(other) => Err(bad(format!("key_mode {other:?}: use rrome or original"))),
    }
}

/// The shipped hyper-parameters at `layer` (or the model's default layer), refused before any
/// statistics are computed when the layer does not exist.
pub(super) fn edit_hparams(
    lm: &loci_core::LoadedModel,
    layer: Option<usize>,
) -> Result<loci_core::edit::RomeHparams, ApiError> {
    let hp = crate::workspace::rome_hparams(lm, layer).map_err(|e| bad(format!("{e:#}")))?;
    if hp.layer >= lm.model.n_layer() {
        return Err(bad(format!(
            "layer {} out of range (the model has {} layers)",
            hp.layer,
            lm.model.n_layer()
        )));
    }
    Ok(hp)
}

/// Layers' key statistics from the shared cache (computed in one pass over the corpus when
/// their files are missing).
pub(super) fn layers_stats(
    st: &AppState,
    lm: &loci_core::LoadedModel,
    layers: &[usize],
) -> Result<Vec<KeyStats>, ApiError> {
    Ok(st.stats.get(lm, layers)?)
}

#[derive(Deserialize)]
pub struct ModelQuery {
    model: String,
}

type ModelQueryArg =
    Result<axum::extract::Query<ModelQuery>, axum::extract::rejection::QueryRejection>;

/// The model a `?model=NAME` query names.
fn model_query(q: ModelQueryArg) -> Result<String, ApiError> {
    q.map(|axum::extract::Query(q)| q.model)
        .map_err(|_| bad("add ?model=NAME"))
}

/// The edits applied to a model, oldest first.
pub async fn edits(State(st): State<Arc<AppState>>, q: ModelQueryArg) -> Response {
    let name = match model_query(q) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    job(st, move |st| {
        let m = model(st, &name)?;
        let list = read(&m).listing();
        Ok(list)
    })
    .await
}

#[derive(Deserialize)]
pub struct UndoBody {
    model: String,
    /// Must name the newest edit when given (edits are undone newest first).
    #[serde(default)]
    id: Option<u64>,
    /// Undo every edit: the model's original weights, bit for bit.
    #[serde(default)]
    all: bool,
}

/// Undoes the model's last edit, or the one named, with every edit made after it, restoring the
/// weights bit for bit.
pub async fn undo(
    State(st): State<Arc<AppState>>,
    b: Result<Json<UndoBody>, JsonRejection>,
) -> Response {
    json_job(st, b, move |st, b| {
        let m = model(st, &b.model)?;
        let mut state = write(&m);
        if state.edits.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "the model has no edits to undo",
            ));
        }
        if let Some(id) = b.id {
            let newest = state.edits.last().map(|e| e.id);
            if newest != Some(id) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "edit {id} is not the newest edit ({newest:?}); undo newer edits first"
                    ),
                ));
            }
        }
        let mut undone = vec![];
        while let Some(id) = state.pop()? {
            undone.push(id);
            if !b.all {
                break;
            }
        }
        Ok(serde_json::json!({ "undone": undone, "edits": state.listing() }))
    })
    .await
}

/// Downloads an applied edit as a small safetensors file (re-apply it with `--apply-edit` or
/// `/api/edits/upload`).
pub async fn edit_file(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<u64>,
    q: ModelQueryArg,
) -> Response {
    let name = match model_query(q) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let bytes = run_job(st, move |st| -> Result<Vec<u8>, ApiError> {
        let m = model(st, &name)?;
        let state = read(&m);
        let e = state
            .edits
            .iter()
            .find(|e| e.id == id)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no edit {id}")))?;
        Ok(e.edit.to_file(&state.lm)?)
    })
    .await;
    match bytes {
        Ok(b) => (
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    "application/octet-stream".to_string(),
                ),
                (
                    axum::http::header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"loci-edit-{id}.safetensors\""),
                ),
            ],
            b,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /api/models/{name}/stats/{layer}`: a layer's key statistics as the file `loci stats`
/// writes (computed once from the server's corpus when missing), for a tab that edits itself.
pub async fn stats_file(
    State(st): State<Arc<AppState>>,
    axum::extract::Path((name, layer)): axum::extract::Path<(String, usize)>,
) -> Response {
    let bytes = run_job(st, move |st| -> Result<Vec<u8>, ApiError> {
        let m = model(st, &name)?;
        let state = read(&m);
        if layer >= state.lm.model.n_layer() {
            return Err(bad(format!(
                "layer {layer} out of range (the model has {} layers)",
                state.lm.model.n_layer()
            )));
        }
        Ok(layers_stats(st, &state.lm, &[layer])?
            .remove(0)
            .to_bytes()?)
    })
    .await;
    match bytes {
        Ok(b) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            )],
            b,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Applies an edit file (the raw bytes of a saved edit) on top of the model's edits.
pub async fn upload_edit(
    State(st): State<Arc<AppState>>,
    q: ModelQueryArg,
    bytes: axum::body::Bytes,
) -> Response {
    let name = match model_query(q) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    job(st, move |st| {
        let m = model(st, &name)?;
        let mut state = write(&m);
        let (e, applied) = state.lm.apply_file(&bytes)?;
        let id = state.record(e, applied);
        Ok(serde_json::json!({ "id": id, "edits": state.listing() }))
    })
    .await
}
