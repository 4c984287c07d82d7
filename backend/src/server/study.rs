//! `POST /api/eval` (one CounterFact case: edit, score, undo) and `POST /api/study` (Hase et
//! al.'s layer sweep for one fact, streamed).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use loci_core::eval::CounterFactCase;
use loci_core::study::{EditProblem, StudyMethod, StudyObserver};
use loci_core::LociError;
use serde::{Deserialize, Serialize};

use super::edit::{edit_hparams, MAX_PROBES};
use super::jobs::*;
use super::trace::TraceQuery;
use super::AppState;

#[derive(Deserialize)]
pub struct EvalBody {
    model: String,
    /// A CounterFact record (ROME's format).
    case: CounterFactCase,
    #[serde(default)]
    layer: Option<usize>,
    #[serde(default)]
    generation: bool,
}

/// Scores a CounterFact case before and after its ROME edit; the edit is undone afterwards.
pub async fn eval_case(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    b: Result<Json<EvalBody>, JsonRejection>,
) -> Response {
    let work = |st: &AppState, b: &EvalBody| {
        let tokens = units::tokens_of(&b.case.requested_rewrite.prompt) + 4;
        Work::new(
            &v,
            Kind::Eval,
            units::edit(tokens, shape(st, &b.model), 20, 1),
        )
    };
    let who = v.clone();
    json_job(st, b, work, move |st, b| {
        let v = who;
        let c = &b.case;
        if c.paraphrase_prompts.len() + c.neighborhood_prompts.len() + c.generation_prompts.len()
            > 3 * MAX_PROBES
        {
            return Err(bad("the case has too many prompts"));
        }
        for p in std::iter::once(&c.requested_rewrite.prompt)
            .chain(&c.paraphrase_prompts)
            .chain(&c.neighborhood_prompts)
            .chain(&c.generation_prompts)
        {
            check_prompt(p)?;
        }
        // On the visitor's private copy: the edit and its undo touch no one else's model.
        let (mut lm, _) = private_copy(st, &v, &b.model)?;
        let hp = edit_hparams(&lm, b.layer)?;
        let stats = shared_stats(st, &b.model, &[hp.layer])?.remove(0);
        Ok(lm.eval_case(c, &hp, Some(&stats), b.generation, None)?)
    })
    .await
}

/// Edits one study request may make (each a full edit, scored and undone).
const MAX_STUDY_EDITS: usize = 48;

fn default_study_methods() -> Vec<StudyMethod> {
    vec![StudyMethod::Rome]
}

fn default_study_problems() -> Vec<EditProblem> {
    vec![EditProblem::ErrorInjection]
}

fn default_study_samples() -> usize {
    10
}

#[derive(Deserialize)]
pub struct StudyBody {
    model: String,
    /// A CounterFact case: its rewrite (with `target_true`), first paraphrase and neighbour
    /// prompts are scored.
    case: CounterFactCase,
    #[serde(default = "default_study_methods")]
    methods: Vec<StudyMethod>,
    #[serde(default = "default_study_problems")]
    problems: Vec<EditProblem>,
    /// Central layers; default: every fourth, ROME's layer and the last.
    #[serde(default)]
    layers: Vec<usize>,
    #[serde(default = "default_study_samples")]
    samples: usize,
    /// Study the fact even if the model does not know it.
    #[serde(default)]
    all_cases: bool,
    /// Measure essence drift (5 generated texts, rescored after each edit).
    #[serde(default)]
    essence: bool,
}

#[derive(Serialize)]
struct StudyResult {
    case: loci_core::study::CaseLine,
    edits: Vec<loci_core::study::EditLine>,
    analysis: loci_core::study::StudyAnalysis,
}

struct SseStudy {
    tx: tokio::sync::mpsc::Sender<Event>,
}

impl StudyObserver for SseStudy {
    fn on_case(&mut self, case: &loci_core::study::CaseLine) {
        send_event(&self.tx, "case", case);
    }
    fn on_edit(&mut self, edit: &loci_core::study::EditLine) -> bool {
        !should_stop() && send_event(&self.tx, "edit", edit)
    }
}

/// The study's GET form (the request JSON in `q`), for browsers' EventSource.
pub async fn study_get(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    query: axum::extract::Query<TraceQuery>,
) -> Response {
    match serde_json::from_str::<StudyBody>(&query.q) {
        Ok(b) => study_stream(st, v, b).await,
        Err(e) => bad(format!("bad request: {e}")).into_response(),
    }
}

/// Hase et al.'s layer sweep on one fact, streamed: `case` (the fact traced, or why it is left
/// out), an `edit` per scored edit, then `result` (the case, its edits and their analysis) or
/// `error`. Every edit is undone; closing the stream stops the sweep after the current edit.
pub async fn study(
    State(st): State<Arc<AppState>>,
    Extension(v): Extension<Visitor>,
    b: Result<Json<StudyBody>, JsonRejection>,
) -> Response {
    match body(b) {
        Ok(b) => study_stream(st, v, b).await,
        Err(e) => e.into_response(),
    }
}

async fn study_stream(st: Arc<AppState>, v: Visitor, b: StudyBody) -> Response {
    if let Some(e) = study_refusal(&st, &b) {
        return e.into_response();
    }
    let tokens = units::tokens_of(&b.case.requested_rewrite.prompt) + 4;
    let m = shape(&st, &b.model);
    let work = Work::new(&v, Kind::Study, units::study(tokens, m, m.layers, 20));
    sse_job(st, work, move |st, tx| {
        // The sweep applies and undoes edits on the visitor's private copy: no one else sees
        // them, and no one waits for them.
        let (mut lm, _) = private_copy(st, &v, &b.model)?;
        let cfg = study_settings(&lm, &b)?;
        let mut obs = SseStudy { tx: tx.clone() };
        let result = lm.study_case(
            &b.case,
            &cfg,
            &mut |_, layers| {
                shared_stats(st, &b.model, layers).map_err(|e| LociError::input(e.message))
            },
            &mut obs,
        )?;
        let lines = [loci_core::study::StudyLine::Case(result.case.clone())]
            .into_iter()
            .chain(
                result
                    .edits
                    .iter()
                    .cloned()
                    .map(loci_core::study::StudyLine::Edit),
            )
            .collect::<Vec<_>>();
        Ok(StudyResult {
            analysis: loci_core::study::analyze(&lines),
            case: result.case,
            edits: result.edits,
        })
    })
    .await
}

/// Why a study request is refused before any work, if it is.
fn study_refusal(st: &AppState, b: &StudyBody) -> Option<ApiError> {
    let c = &b.case;
    let cells = b.methods.len() * b.problems.len() * b.layers.len().max(1);
    if b.methods.is_empty() || b.problems.is_empty() {
        Some(bad("a study needs at least one method and one problem"))
    } else if cells > MAX_STUDY_EDITS {
        Some(bad(format!(
            "a study request makes at most {MAX_STUDY_EDITS} edits (methods × problems × layers)"
        )))
    } else if b.samples == 0 || b.samples > 64 {
        Some(bad("samples must be 1..=64"))
    } else if c.requested_rewrite.target_true.is_none() {
        Some(bad(
            "the case needs its true target (requested_rewrite.target_true)",
        ))
    } else if c.paraphrase_prompts.len() + c.neighborhood_prompts.len() > MAX_PROBES {
        Some(bad("the case has too many prompts"))
    } else if st.registry.names().iter().all(|n| n != &b.model) {
        Some(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown model {:?}", b.model),
        ))
    } else {
        std::iter::once(&c.requested_rewrite.prompt)
            .chain(&c.paraphrase_prompts)
            .chain(&c.neighborhood_prompts)
            .find_map(|p| check_prompt(p).err())
    }
}

/// The study's defaults for this model with the request's choices; refused when the default
/// layers would make too many edits.
fn study_settings(
    lm: &loci_core::LoadedModel,
    b: &StudyBody,
) -> Result<loci_core::study::StudyConfig, ApiError> {
    let mut cfg = crate::workspace::study_config(
        lm,
        b.methods.clone(),
        b.problems.clone(),
        &b.layers,
        loci_core::trace::NoiseSpec::Relative(3.0),
        &Default::default(),
    )
    .map_err(|e| bad(format!("{e:#}")))?;
    cfg.trace_samples = b.samples;
    cfg.correct_only = !b.all_cases;
    if b.all_cases {
        cfg.min_prob = 0.0;
    }
    cfg.essence = b.essence;
    if cfg.cells().len() > MAX_STUDY_EDITS {
        return Err(bad(format!(
            "a study request makes at most {MAX_STUDY_EDITS} edits; the default layers make {} here: name fewer \"layers\"",
            cfg.cells().len()
        )));
    }
    Ok(cfg)
}
