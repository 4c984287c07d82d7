//! `POST /api/edit`, `GET /api/edits`, `POST /api/undo`, edit files (download and upload) and
//! session files: each visitor's edits of the served models (the operator's: of the shared
//! model), each undone exactly.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use loci_core::edit::overlay::view_bytes;
use loci_core::edit::{Edit, EditMethod, KeyMode, Preserved, Probes, RewriteRequest};
use loci_core::LoadedModel;
use serde::{Deserialize, Serialize};

use super::jobs::*;
use super::models::{listing, EditListing};
use super::sessions::gone;
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
    /// "rome" (default: one fact at `layer`), "memit", "alphaedit" or "emmet" (all facts at
    /// once over `layers`) or "ft" (constrained fine-tuning of one fact at `layers`).
    #[serde(default)]
    method: Option<String>,
    /// AlphaEdit's null space and L2, EMMET's emmet_lambda, MEMIT's and EMMET's mom2 weight.
    #[serde(flatten)]
    rule: crate::workspace::RuleSettings,
    /// The MEMIT family: more facts, written with the one above (if any).
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
    edits: Vec<EditListing>,
}

/// A computed edit and its read-out.
struct Made {
    edit: Edit,
    report: Option<loci_core::edit::EditReport>,
    memit: Option<loci_core::edit::MemitReport>,
}

/// Computes a ROME, MEMIT or fine-tuning edit on top of the visitor's other edits and reports
/// before/after. It applies to the visitor's own requests; with the operator's token, to the
/// shared model that everyone sees.
pub async fn edit(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    b: Result<Json<EditBody>, JsonRejection>,
) -> Response {
    let work = |st: &AppState, b: &EditBody| {
        let prompt = b
            .prompt
            .as_deref()
            .or(b.request.as_ref().map(|r| r.prompt.as_str()));
        let tokens = prompt.map_or(16, units::tokens_of);
        Work::new(
            &v,
            Kind::Edit,
            units::edit(tokens, shape(st, &b.model), 20, b.requests.len()),
        )
    };
    let who = v.clone();
    json_job(st, b, work, move |st, b| {
        let v = who;
        let (method, reqs) = edit_requests(&b)?;
        // Computed on a private copy: other requests go on meanwhile.
        let (mut copy, version) = private_copy(st, &v, &b.model)?;
        let made = compute_edit(st, (&b, &v), &mut copy, method, reqs)?;
        let (ids, edits) = keep(st, &v, &b.model, vec![made.edit], version)?;
        Ok(EditResponse {
            id: ids[0],
            report: made.report,
            memit: made.memit,
            edits,
        })
    })
    .await
}

/// The AlphaEdit edits a visitor's copy of `name` carries, oldest first: the shared model's,
/// then the visitor's own (none for the operator, who edits the shared model). Their recorded
/// keys are what a new AlphaEdit edit keeps.
fn alphaedit_edits_under(
    st: &AppState,
    v: &Visitor,
    name: &str,
) -> Result<Vec<Arc<Edit>>, ApiError> {
    let alpha = |e: &Edit| e.method() == EditMethod::Alphaedit;
    let served = model(st, name)?;
    let mut out: Vec<Arc<Edit>> = read(&served)
        .edits
        .iter()
        .filter(|e| alpha(&e.edit))
        .map(|e| Arc::new(e.edit.clone()))
        .collect();
    out.extend(session_edits(st, v, name).into_iter().filter(|e| alpha(e)));
    Ok(out)
}

/// The edit `b` asks for, computed on `lm` (which it changes), a copy of `v`'s view.
fn compute_edit(
    st: &AppState,
    (b, v): (&EditBody, &Visitor),
    lm: &mut LoadedModel,
    method: EditMethod,
    reqs: Vec<RewriteRequest>,
) -> Result<Made, ApiError> {
    let probes = Probes {
        paraphrase: b.paraphrase.clone(),
        neighborhood: b.neighborhood.clone(),
        generate_tokens: b.generate_tokens.min(50),
    };
    let req = reqs.first().cloned();
    Ok(match method {
        EditMethod::Grace => {
            let hp = loci_core::edit::GraceHparams::defaults(&lm.model.cfg, b.layer)?;
            let req = req.expect("one request");
            let (e, _, report) = lm.grace_with_report(req, &hp, &probes)?;
            Made {
                edit: Edit::Grace(e),
                report: Some(report),
                memit: None,
            }
        }
        EditMethod::Ft => {
            let hp = crate::workspace::ft_hparams(lm, &b.layers, &Default::default())
                .map_err(|e| bad(format!("{e:#}")))?;
            let (e, _, report) = lm.ft_with_report(req.expect("one request"), &hp, &probes)?;
            Made {
                edit: Edit::Ft(e),
                report: Some(report),
                memit: None,
            }
        }
        EditMethod::Memit | EditMethod::Alphaedit | EditMethod::Emmet => {
            let hp = crate::workspace::memit_hparams(lm, method, &b.layers, &b.rule)
                .map_err(|e| bad(format!("{e:#}")))?;
            let stats = shared_stats(st, &b.model, &hp.layers)?;
            let earlier = match method {
                EditMethod::Alphaedit => alphaedit_edits_under(st, v, &b.model)?,
                _ => vec![],
            };
            let preserved = Preserved::of(earlier.iter().map(|e| e.as_ref()));
            let (e, _, report) =
                lm.memit_with_report(reqs, &hp, &stats, &preserved, &probes, &mut |_| {})?;
            Made {
                edit: Edit::Memit(e),
                report: None,
                memit: Some(report),
            }
        }
        EditMethod::Rome => {
            let mut hp = edit_hparams(lm, b.layer)?;
            hp.key_mode = key_mode(b.key_mode.as_deref())?;
            let stats = shared_stats(st, &b.model, &[hp.layer])?.remove(0);
            let req = req.expect("one request");
            let (e, _, report) = lm.rome_with_report(req, &hp, Some(&stats), &probes)?;
            Made {
                edit: Edit::Rome(e),
                report: Some(report),
                memit: None,
            }
        }
    })
}

/// Keeps edits computed on a copy made at the shared model's `version`: on the visitor's stack,
/// or (the operator's) applied to the shared model, refused when it changed meanwhile. Their
/// ids, and the edits the visitor now has.
fn keep(
    st: &AppState,
    v: &Visitor,
    name: &str,
    edits: Vec<Edit>,
    version: u64,
) -> Result<(Vec<u64>, Vec<EditListing>), ApiError> {
    let m = model(st, name)?;
    if should_stop() {
        // The client left (or the time ran out) while the edit was computed: it never learns
        // the edit's id, so the edit is not kept.
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "the request ended before its edit was ready; the edit is not kept",
        ));
    }
    if !v.admin {
        let layer_bytes = layer_bytes(&read(&m).lm);
        let sized = edits
            .into_iter()
            .map(|e| {
                let bytes = view_bytes(&e, layer_bytes);
                (e, bytes)
            })
            .collect();
        let ids = st.sessions.push(&v.session, name, sized)?;
        return Ok((ids, session_listing(st, v, name)?));
    }
    let mut state = write(&m);
    if state.version != version {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "the shared model changed while the edit was computed; repeat the request",
        ));
    }
    let mut ids = vec![];
    for e in edits {
        let applied = state.lm.apply(&e)?;
        ids.push(state.record(e, applied));
    }
    Ok((ids, state.listing()))
}

/// The bytes of one down-projection (what a view copies for a dense change).
fn layer_bytes(lm: &LoadedModel) -> usize {
    let c = &lm.model.cfg;
    (c.d_model * c.d_ff + c.d_model) * lm.model.dtype.size_in_bytes()
}

/// The visitor's edits of `name` as a client sees them (410 when the session is gone).
fn session_listing(st: &AppState, v: &Visitor, name: &str) -> Result<Vec<EditListing>, ApiError> {
    st.sessions
        .with_stack(&v.session, name, |s| {
            listing(s.iter().map(|e| (e.id, e.edit.as_ref())))
        })
        .ok_or_else(gone)
}

/// The edits `v` has made on `name` (the operator: the shared model's), oldest first.
fn visitor_edits(
    st: &AppState,
    v: &Visitor,
    name: &str,
) -> Result<Vec<(u64, Arc<Edit>)>, ApiError> {
    if v.admin {
        let m = model(st, name)?;
        let state = read(&m);
        return Ok(state
            .edits
            .iter()
            .map(|e| (e.id, Arc::new(e.edit.clone())))
            .collect());
    }
    model(st, name)?;
    st.sessions
        .with_stack(&v.session, name, |s| {
            s.iter().map(|e| (e.id, e.edit.clone())).collect()
        })
        .ok_or_else(gone)
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
    b.rule
        .check_for(method)
        .map_err(|e| bad(format!("{e:#}")))?;
    let reqs: Vec<RewriteRequest> = single.into_iter().chain(b.requests.clone()).collect();
    let refusal = match method {
        EditMethod::Rome if reqs.len() != 1 || !b.layers.is_empty() => Some(
            "ROME edits one fact at one \"layer\"; use \"method\": \"memit\" for \"requests\" and \"layers\"".to_string(),
        ),
        EditMethod::Ft if reqs.len() != 1 || b.layer.is_some() => {
            Some("fine-tuning edits one fact at its \"layers\"".to_string())
        }
        EditMethod::Grace if reqs.len() != 1 || !b.layers.is_empty() => {
            Some("GRACE edits one fact at one \"layer\"".to_string())
        }
        m if m.takes_many_facts() && b.layer.is_some() => Some(format!(
            "{} edits its \"layers\", not one \"layer\"",
            m.label()
        )),
        m if m.takes_many_facts() && reqs.len() > MAX_MEMIT_REQUESTS => Some(format!(
            "{} writes at most {MAX_MEMIT_REQUESTS} facts at once",
            m.label()
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

/// The visitor's edits of a model (the operator's: the shared model's), oldest first.
pub async fn edits(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    q: ModelQueryArg,
) -> Response {
    let name = match model_query(q) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    respond(
        quick(st, move |st| {
            let list = visitor_edits(st, &v, &name)?;
            Ok(listing(list.iter().map(|(id, e)| (*id, e.as_ref()))))
        })
        .await,
    )
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

/// Undoes the visitor's last edit, or the one named, with every edit made after it (the
/// operator: the shared model's, restoring its weights bit for bit).
pub async fn undo(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    b: Result<Json<UndoBody>, JsonRejection>,
) -> Response {
    let b = match body(b) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let undone = quick(st, move |st| {
        let m = model(st, &b.model)?;
        if v.admin {
            let mut state = write(&m);
            let ids: Vec<u64> = state.edits.iter().map(|e| e.id).collect();
            let n = undo_count(&ids, &b)?;
            let mut undone = vec![];
            for _ in 0..n {
                undone.extend(state.pop()?);
            }
            return Ok(serde_json::json!({ "undone": undone, "edits": state.listing() }));
        }
        let undone = st
            .sessions
            .with_stack(&v.session, &b.model, |s| {
                let ids: Vec<u64> = s.iter().map(|e| e.id).collect();
                let n = undo_count(&ids, &b)?;
                Ok::<_, ApiError>(
                    s.drain(s.len() - n..)
                        .rev()
                        .map(|e| e.id)
                        .collect::<Vec<_>>(),
                )
            })
            .ok_or_else(gone)??;
        let edits = session_listing(st, &v, &b.model)?;
        Ok(serde_json::json!({ "undone": undone, "edits": edits }))
    })
    .await;
    respond(undone)
}

/// How many of the edits `ids` (oldest first) an undo request takes off, or why none.
fn undo_count(ids: &[u64], b: &UndoBody) -> Result<usize, ApiError> {
    let Some(&newest) = ids.last() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "the model has no edits of yours to undo",
        ));
    };
    if let Some(id) = b.id.filter(|&id| id != newest) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("edit {id} is not the newest edit ({newest}); undo newer edits first"),
        ));
    }
    Ok(if b.all { ids.len() } else { 1 })
}

/// A download's headers: binary, saved under `filename`.
fn attachment(bytes: Vec<u8>, filename: &str, content_type: &str) -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, content_type.to_string()),
            (
                axum::http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        bytes,
    )
        .into_response()
}

/// Downloads one of the visitor's edits as a small safetensors file (re-apply it with
/// `--apply-edit` or `/api/edits/upload`).
pub async fn edit_file(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    axum::extract::Path(id): axum::extract::Path<u64>,
    q: ModelQueryArg,
) -> Response {
    let name = match model_query(q) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let bytes = quick(st, move |st| -> Result<Vec<u8>, ApiError> {
        let edits = visitor_edits(st, &v, &name)?;
        let (_, e) = edits
            .iter()
            .find(|(i, _)| *i == id)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no edit {id}")))?;
        let m = model(st, &name)?;
        let file = e.to_file(&read(&m).lm)?;
        Ok(file)
    })
    .await;
    match bytes {
        Ok(b) => attachment(
            b,
            &format!("loci-edit-{id}.safetensors"),
            "application/octet-stream",
        ),
        Err(e) => e.into_response(),
    }
}

/// `GET /api/models/{name}/stats/{layer}`: a layer's key statistics as the file `loci stats`
/// writes (computed once from the server's corpus when missing), for a tab that edits itself.
pub async fn stats_file(
    State(st): State<Arc<AppState>>,
    axum::extract::Path((name, layer)): axum::extract::Path<(String, usize)>,
) -> Response {
    let work = Work::unowned(Kind::Other, 1.0);
    let bytes = run_job(st, work, move |st| -> Result<Vec<u8>, ApiError> {
        let m = model(st, &name)?;
        let state = read(&m);
        if layer >= state.lm.model.n_layer() {
            return Err(bad(format!(
                "layer {layer} out of range (the model has {} layers)",
                state.lm.model.n_layer()
            )));
        }
        Ok(st.stats.get(&state.lm, &[layer])?.remove(0).to_bytes()?)
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

/// Applies an edit file (the raw bytes of a saved edit) on top of the visitor's edits.
pub async fn upload_edit(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    q: ModelQueryArg,
    bytes: axum::body::Bytes,
) -> Response {
    let name = match model_query(q) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let work = Work::new(&v, Kind::Other, 1.0);
    job(st, work, move |st| {
        // Checked on a copy (the model it was made for, its shapes), kept only when it applies.
        let (mut copy, version) = private_copy(st, &v, &name)?;
        // Whatever is wrong with an uploaded file is the client's to fix.
        let (e, _) = copy.apply_file(&bytes).map_err(|e| bad(e.to_string()))?;
        let (ids, edits) = keep(st, &v, &name, vec![e], version)?;
        Ok(serde_json::json!({ "id": ids[0], "edits": edits }))
    })
    .await
}

/// A session's edits in one file: each edit's own file, base64, oldest first.
#[derive(Serialize, Deserialize)]
pub struct SessionFile {
    /// Always `"loci-session"`.
    format: String,
    /// The model they were made on (for messages; each edit file names its model itself).
    model: String,
    edits: Vec<String>,
}

const SESSION_FORMAT: &str = "loci-session";

/// `GET /api/session/export?model=NAME`: the visitor's edits of a model as one file.
pub async fn export_session(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    q: ModelQueryArg,
) -> Response {
    use base64::Engine;
    let name = match model_query(q) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let file = quick(st, move |st| -> Result<Vec<u8>, ApiError> {
        let edits = visitor_edits(st, &v, &name)?;
        let m = model(st, &name)?;
        let lm = &read(&m).lm;
        let files = edits
            .iter()
            .map(|(_, e)| Ok(base64::engine::general_purpose::STANDARD.encode(e.to_file(lm)?)))
            .collect::<Result<Vec<_>, ApiError>>()?;
        let f = SessionFile {
            format: SESSION_FORMAT.into(),
            model: name,
            edits: files,
        };
        Ok(serde_json::to_vec(&f).map_err(anyhow::Error::from)?)
    })
    .await;
    match file {
        Ok(b) => attachment(b, "loci-session.json", "application/json"),
        Err(e) => e.into_response(),
    }
}

/// `POST /api/session/import?model=NAME`: stacks a session file's edits on the visitor's, all
/// or none.
pub async fn import_session(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    q: ModelQueryArg,
    bytes: axum::body::Bytes,
) -> Response {
    use base64::Engine;
    let name = match model_query(q) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let work = Work::new(&v, Kind::Other, 1.0);
    job(st, work, move |st| {
        let f: SessionFile = serde_json::from_slice(&bytes)
            .ok()
            .filter(|f: &SessionFile| f.format == SESSION_FORMAT)
            .ok_or_else(|| bad("not a Loci session file"))?;
        let (mut copy, version) = private_copy(st, &v, &name)?;
        let mut edits = vec![];
        for (i, b64) in f.edits.iter().enumerate() {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| bad(format!("edit {} of the session file is not base64", i + 1)))?;
            let (e, _) = copy
                .apply_file(&raw)
                .map_err(|e| bad(format!("edit {} of the session file: {e}", i + 1)))?;
            edits.push(e);
        }
        let (ids, edits) = keep(st, &v, &name, edits, version)?;
        Ok(serde_json::json!({ "ids": ids, "edits": edits }))
    })
    .await
}
