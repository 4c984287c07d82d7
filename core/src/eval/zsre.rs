//! zsRE question-answering edits, ROME's and MEMIT's second benchmark
//! (docs/evaluation.md#zsre-metrics): each edit makes the model answer a question about its
//! subject, scored by top-1 token accuracy under teacher forcing on the question, its rephrasing
//! and an unrelated Natural Questions prompt.

use serde::{Deserialize, Serialize};

use super::TokenPredictions;
use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::request::RewriteRequest;

/// Which answer a zsRE edit writes.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ZsreTarget {
    /// `answers[0]`, as ROME's and MEMIT's evaluation (`dsets/zsre.py`) does.
    #[default]
    Answer,
    /// `alt`, the alternative answer that MEND and EasyEdit write.
    Alt,
}

impl std::str::FromStr for ZsreTarget {
    type Err = LociError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "answer" => Ok(ZsreTarget::Answer),
            "alt" => Ok(ZsreTarget::Alt),
            _ => Err(LociError::input(format!(
                "zsRE target {s:?}: use answer or alt"
            ))),
        }
    }
}

/// One zsRE record (MEND's `zsre_mend_eval.json` schema, which ROME and EasyEdit read).
#[derive(Deserialize)]
struct Record {
    subject: String,
    src: String,
    answers: Vec<String>,
    #[serde(default)]
    alt: Option<String>,
    rephrase: String,
    loc: String,
    loc_ans: String,
}

/// A question and the answer scored after it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct QaPrompt {
    /// The question, as the model reads it.
    pub prompt: String,
    /// The answer whose tokens are scored after it.
    pub answer: String,
}

/// One zsRE edit: the question (with `{}` where the subject is) and its new answer, the
/// question rephrased, and an unrelated question the edit should leave alone.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ZsreCase {
    /// The record's position in the file.
    pub case_id: u64,
    /// The question as a template (`{}` for the subject), the subject and the answer to write.
    pub requested_rewrite: RewriteRequest,
    /// The record's own answer (`answers[0]`), whichever answer the edit writes.
    pub answer: String,
    /// The question rephrased (the record's `rephrase`), subject included.
    pub paraphrase_prompts: Vec<String>,
    /// The unrelated Natural Questions prompt (`loc` with a `?`) and its answer (`loc_ans`).
    pub neighborhood: QaPrompt,
}

/// Whether a JSON record is a zsRE one.
pub(crate) fn is_record(v: &serde_json::Value) -> bool {
    v.get("src").is_some() && v.get("answers").is_some()
}

/// A zsRE file's cases, and the records that cannot be posed as an edit.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ZsreSet {
    /// The records that make an edit, in file order.
    pub cases: Vec<ZsreCase>,
    /// Why each skipped record was skipped (e.g. an empty `alt`: 2 of MEND's train sample).
    pub skipped: Vec<String>,
}

/// Reads a JSON list of zsRE records; case ids are their positions, as in ROME.
pub fn parse_zsre(text: &str, target: ZsreTarget) -> Result<ZsreSet> {
    from_values(super::json_values(text, "the zsRE file")?, target)
}

pub(crate) fn from_values(values: Vec<serde_json::Value>, target: ZsreTarget) -> Result<ZsreSet> {
    let mut set = ZsreSet::default();
    for (i, v) in values.into_iter().enumerate() {
        let r: Record = serde_json::from_value(v).map_err(|e| LociError::Json {
            what: format!("zsRE record {i}"),
            source: e,
        })?;
        match case(i, r, target) {
            Ok(c) => set.cases.push(c),
            Err(why) => set.skipped.push(format!("record {i}: {why}")),
        }
    }
    Ok(set)
}

fn case(i: usize, r: Record, target: ZsreTarget) -> std::result::Result<ZsreCase, String> {
    let answer = match target {
        ZsreTarget::Answer => r.answers.first().ok_or("no answers")?,
        ZsreTarget::Alt => r.alt.as_ref().ok_or("no alt answer")?,
    };
    if answer.trim().is_empty() || r.loc_ans.trim().is_empty() {
        return Err("an empty answer".into());
    }
    let rewrite =
        RewriteRequest::from_prompt(&r.src, &r.subject, answer).map_err(|e| e.to_string())?;
    Ok(ZsreCase {
        case_id: i as u64,
        requested_rewrite: rewrite,
        answer: r.answers.first().cloned().unwrap_or_default(),
        paraphrase_prompts: vec![r.rephrase],
        // ROME asks the NQ question with its "nq question: " prefix and a "?".
        neighborhood: QaPrompt {
            prompt: format!("{}?", r.loc),
            answer: r.loc_ans,
        },
    })
}

impl ZsreSet {
    /// The cases as Hase et al. pose zsRE for their study (belief-localization's
    /// `dsets/zsre.py`): the question wrapped as "Question: … Answer:", the record's answer as
    /// the true object, a new object drawn uniformly from the file's other distinct answers
    /// (numpy's `setdiff1d`; SplitMix64 seeded by `seed` and the case id, so a case's draw does
    /// not depend on which cases are kept), the rephrasing wrapped alike, and the NQ question as
    /// the neighbour with its own answer.
    pub fn hase_cases(&self, seed: u64) -> Vec<super::CounterFactCase> {
        let wrap = |q: &str| format!("Question: {q} Answer:");
        let mut pool: Vec<&str> = self
            .cases
            .iter()
            .map(|c| c.answer.as_str())
            .filter(|a| !a.trim().is_empty())
            .collect();
        pool.sort_unstable();
        pool.dedup();
        self.cases
            .iter()
            .filter_map(|c| {
                // Uniform over the pool without the true answer: skip its slot.
                let own = pool.binary_search(&c.answer.as_str()).ok();
                let choices = pool.len() - own.is_some() as usize;
                if choices == 0 || c.answer.trim().is_empty() {
                    return None;
                }
                let mut rng = crate::rng::SplitMix64::new(seed ^ c.case_id.wrapping_mul(0x9E37));
                let mut k = (rng.next_u64() % choices as u64) as usize;
                if own.is_some_and(|o| k >= o) {
                    k += 1;
                }
                let rw = &c.requested_rewrite;
                let mut request =
                    RewriteRequest::from_prompt(&wrap(&rw.prompt), &rw.subject, pool[k]).ok()?;
                request.target_true = Some(crate::request::TargetStr::new(c.answer.clone()));
                Some(super::CounterFactCase {
                    case_id: c.case_id,
                    requested_rewrite: request,
                    paraphrase_prompts: c.paraphrase_prompts.iter().map(|p| wrap(p)).collect(),
                    neighborhood_prompts: vec![c.neighborhood.prompt.clone()],
                    attribute_prompts: vec![],
                    generation_prompts: vec![],
                    neighborhood_true: Some(c.neighborhood.answer.clone()),
                })
            })
            .collect()
    }
}

/// The model's teacher-forced predictions of one answer after one prompt.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct QaScore {
    /// The question scored.
    pub prompt: String,
    /// The answer scored after it.
    pub answer: String,
    /// The answer's token ids and the model's top-1 at each (serialised inline).
    #[serde(flatten)]
    pub tokens: TokenPredictions,
}

/// A zsRE case's tests as the model is now.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ZsreScores {
    /// The new answer after the question.
    pub rewrite: QaScore,
    /// The new answer after each rephrasing.
    pub paraphrase: Vec<QaScore>,
    /// The NQ answer after the unrelated question.
    pub neighborhood: QaScore,
}

/// A case's accuracies (fractions of answer tokens predicted) before and after its edit.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ZsreMetrics {
    /// The new answer's token accuracy after the question, before the edit.
    pub efficacy_pre: f32,
    /// ROME's efficacy: the new answer's token accuracy after the question.
    pub efficacy: f32,
    /// The new answer's mean token accuracy over the rephrasings, before the edit (NaN
    /// without any).
    pub paraphrase_pre: f32,
    /// The same after the edit (ROME's paraphrase accuracy).
    pub paraphrase: f32,
    /// The NQ answer's token accuracy before the edit.
    pub specificity_pre: f32,
    /// ROME's specificity: the NQ answer's token accuracy after the edit.
    pub specificity: f32,
    /// EasyEdit's locality: the share of the NQ answer's positions whose top-1 token the edit
    /// left unchanged (right or wrong).
    pub locality: f32,
}

/// One evaluated zsRE case.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ZsreCaseRecord {
    /// The case's position in the file.
    pub case_id: u64,
    /// The case's rewrite, as edited.
    pub request: RewriteRequest,
    /// Scores before the edit.
    pub pre: ZsreScores,
    /// Scores right after the edit.
    pub post: ZsreScores,
    /// Metrics of `pre` → `post`.
    pub metrics: ZsreMetrics,
    /// Wall-clock seconds to compute and apply the edit, shared over the cases it wrote.
    pub edit_seconds: f64,
    /// Sequential editing: the scores and metrics after the last edit of the sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<ZsreScores>,
    /// Sequential editing: metrics of `pre` → `last`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_metrics: Option<ZsreMetrics>,
}

/// Dataset means, ×100 like ROME's tables.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ZsreSummary {
    /// Number of cases summarised.
    pub cases: usize,
    /// Mean efficacy before the edits (each mean skips cases without the metric).
    pub efficacy_pre: f32,
    /// Mean efficacy after the edits.
    pub efficacy: f32,
    /// Mean paraphrase accuracy before the edits.
    pub paraphrase_pre: f32,
    /// Mean paraphrase accuracy after the edits.
    pub paraphrase: f32,
    /// Mean specificity before the edits.
    pub specificity_pre: f32,
    /// Mean specificity after the edits.
    pub specificity: f32,
    /// Mean locality (EasyEdit's).
    pub locality: f32,
}

fn mean_accuracy(v: &[QaScore]) -> f32 {
    super::mean(v.iter().map(|s| s.tokens.accuracy()))
}

/// A case's [`ZsreMetrics`] from its scores before and after the edit.
pub fn zsre_metrics(pre: &ZsreScores, post: &ZsreScores) -> ZsreMetrics {
    let (a, b) = (&pre.neighborhood.tokens, &post.neighborhood.tokens);
    ZsreMetrics {
        efficacy_pre: pre.rewrite.tokens.accuracy(),
        efficacy: post.rewrite.tokens.accuracy(),
        paraphrase_pre: mean_accuracy(&pre.paraphrase),
        paraphrase: mean_accuracy(&post.paraphrase),
        specificity_pre: a.accuracy(),
        specificity: b.accuracy(),
        locality: super::share_same(&a.predicted, &b.predicted),
    }
}

/// Averages per-case metrics into the data set's summary (×100).
pub fn summarize_zsre(ms: &[ZsreMetrics]) -> ZsreSummary {
    let avg = |f: &dyn Fn(&ZsreMetrics) -> f32| super::percent(ms, f);
    ZsreSummary {
        cases: ms.len(),
        efficacy_pre: avg(&|m| m.efficacy_pre),
        efficacy: avg(&|m| m.efficacy),
        paraphrase_pre: avg(&|m| m.paraphrase_pre),
        paraphrase: avg(&|m| m.paraphrase),
        specificity_pre: avg(&|m| m.specificity_pre),
        specificity: avg(&|m| m.specificity),
        locality: avg(&|m| m.locality),
    }
}

impl LoadedModel {
    /// A zsRE case's tests as the model is now (one batch).
    pub fn score_zsre(&self, case: &ZsreCase) -> Result<ZsreScores> {
        let rw = &case.requested_rewrite;
        let new = &rw.target_new.str;
        let mut asked: Vec<QaPrompt> = std::iter::once(rw.filled())
            .chain(case.paraphrase_prompts.iter().cloned())
            .map(|prompt| QaPrompt {
                prompt,
                answer: new.clone(),
            })
            .collect();
        asked.push(case.neighborhood.clone());
        let pairs: Vec<(String, String)> = asked
            .iter()
            .map(|q| (q.prompt.clone(), q.answer.clone()))
            .collect();
        let mut scores: Vec<QaScore> = asked
            .into_iter()
            .zip(self.target_predictions(&pairs)?)
            .map(|(q, tokens)| QaScore {
                prompt: q.prompt,
                answer: q.answer,
                tokens,
            })
            .collect();
        let neighborhood = scores.pop().expect("the neighbourhood question");
        let rewrite = scores.remove(0);
        Ok(ZsreScores {
            rewrite,
            paraphrase: scores,
            neighborhood,
        })
    }

    /// Scores the cases, applies the one edit `make` computes from their rewrites, scores each
    /// again and undoes the edit (the model ends bit-identical, also on error).
    pub fn eval_zsre_with(
        &mut self,
        cases: &[ZsreCase],
        make: impl FnOnce(&mut LoadedModel, &[RewriteRequest]) -> Result<crate::edit::Edit>,
    ) -> Result<Vec<ZsreCaseRecord>> {
        let (pre, post, edit_seconds) = self.edit_and_rescore(
            cases,
            |c| &c.requested_rewrite,
            |lm, c| lm.score_zsre(c),
            make,
        )?;
        Ok(cases
            .iter()
            .zip(pre)
            .zip(post)
            .map(|((case, pre), post)| record(case, pre, post, edit_seconds))
            .collect())
    }

    /// zsRE cases edited in sequence (`edit_in_sequence`): each record's `post` is right after
    /// its own edit and `last` after the whole sequence.
    pub fn eval_zsre_sequence(
        &mut self,
        cases: &[ZsreCase],
        opts: super::SequenceOptions,
        make: impl FnMut(&mut LoadedModel, &[RewriteRequest]) -> Result<crate::edit::Edit>,
        progress: &mut dyn FnMut(usize, Option<&ZsreScores>),
    ) -> Result<super::SequenceEval<ZsreCaseRecord, ZsreMetrics>> {
        let seq = self.edit_in_sequence(
            cases,
            opts,
            |c| &c.requested_rewrite,
            |lm, c| lm.score_zsre(c),
            make,
            progress,
        )?;
        Ok(zsre_sequence_records(cases, seq))
    }
}

/// The records of a finished zsRE sequence: `post` right after each case's own edit, `last`
/// after the whole sequence, and each checkpoint's metrics.
pub fn zsre_sequence_records(
    cases: &[ZsreCase],
    seq: super::Sequence<ZsreScores>,
) -> super::SequenceEval<ZsreCaseRecord, ZsreMetrics> {
    seq.evaluate(
        cases,
        |case, pre, post, last, seconds| {
            let mut r = record(case, pre, post, seconds);
            r.last_metrics = Some(zsre_metrics(&r.pre, &last));
            r.last = Some(last);
            r
        },
        |_, pre, s| zsre_metrics(pre, s),
    )
}

/// A case's record from its scores before and after its edit.
fn record(case: &ZsreCase, pre: ZsreScores, post: ZsreScores, edit_seconds: f64) -> ZsreCaseRecord {
    ZsreCaseRecord {
        case_id: case.case_id,
        request: case.requested_rewrite.clone(),
        metrics: zsre_metrics(&pre, &post),
        pre,
        post,
        edit_seconds,
        last: None,
        last_metrics: None,
    }
}
