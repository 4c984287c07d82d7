//! Scoring a model around its edits: the benchmarks (CounterFact in `counterfact`, zsRE in
//! `zsre`), teacher-forced target scores and predictions, and the loops that edit, score and
//! undo — one edit at a time, or a sequence of kept edits.

pub mod counterfact;
pub mod zsre;

pub use counterfact::*;

use serde::{Deserialize, Serialize};

use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::request::{spaced, RewriteRequest};

/// A benchmark file's cases.
#[derive(Clone, Debug, PartialEq)]
pub enum Dataset {
    /// CounterFact cases (counterfactual rewrites with paraphrase and neighbourhood prompts).
    CounterFact(Vec<CounterFactCase>),
    /// zsRE cases (question answering with paraphrased questions and unrelated ones).
    Zsre(zsre::ZsreSet),
}

impl Dataset {
    /// Number of cases.
    pub fn len(&self) -> usize {
        match self {
            Dataset::CounterFact(c) => c.len(),
            Dataset::Zsre(c) => c.cases.len(),
        }
    }

    /// Whether there are no cases.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` cases.
    pub fn truncate(&mut self, n: usize) {
        match self {
            Dataset::CounterFact(c) => c.truncate(n),
            Dataset::Zsre(c) => c.cases.truncate(n),
        }
    }
}

/// Reads CounterFact (ROME's format or EasyEdit's flattened records) or zsRE (MEND's schema,
/// told apart by its `src` and `answers` fields), writing `zsre_target` for zsRE.
pub fn parse_dataset(text: &str, zsre_target: zsre::ZsreTarget) -> Result<Dataset> {
    let values = json_values(text, "the dataset file")?;
    if values.first().is_some_and(zsre::is_record) {
        Ok(Dataset::Zsre(zsre::from_values(values, zsre_target)?))
    } else {
        Ok(Dataset::CounterFact(counterfact::from_values(values)?))
    }
}

/// The records of a JSON list; an error names `what` was being read.
pub(crate) fn json_values(text: &str, what: &str) -> Result<Vec<serde_json::Value>> {
    serde_json::from_str(text).map_err(|e| LociError::Json {
        what: what.into(),
        source: e,
    })
}

/// A target's token ids and the model's top-1 prediction at each of their positions (teacher
/// forcing).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TokenPredictions {
    /// The target's token ids (with the leading space it gets after a prompt).
    pub target: Vec<u32>,
    /// The model's top-1 token at each target position, given the prompt and the target
    /// tokens before it; as long as `target`.
    pub predicted: Vec<u32>,
}

impl TokenPredictions {
    /// The share of target tokens predicted (0 for an empty target).
    pub fn accuracy(&self) -> f32 {
        share_same(&self.target, &self.predicted)
    }
}

/// The share of `a`'s positions where `b` holds the same token (0 for an empty `a`).
pub(crate) fn share_same(a: &[u32], b: &[u32]) -> f32 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f32 / a.len().max(1) as f32
}

/// Mean per-token NLL (ROME) and full-sequence probability (Hase) of a target after a prompt.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TargetScore {
    /// Mean over the target's tokens of −ln p(token | prompt, earlier target tokens).
    pub nll: f32,
    /// p(whole target | prompt): the product of the per-token probabilities.
    pub prob: f32,
}

impl LoadedModel {
    /// Scores of `(prompt, target)` pairs, one padded batch.
    pub fn score_targets(&self, pairs: &[(String, String)]) -> Result<Vec<TargetScore>> {
        self.score_targets_with(pairs, &mut crate::hooks::NoHook)
    }

    /// `score_targets` with `hook` on the pass (row i of the batch is pair i, right-padded).
    pub fn score_targets_with(
        &self,
        pairs: &[(String, String)],
        hook: &mut dyn crate::hooks::Hook,
    ) -> Result<Vec<TargetScore>> {
        let Some((logp, targets)) = self.target_log_probs(pairs, hook)? else {
            return Ok(vec![]);
        };
        let ids: Vec<u32> = targets.iter().flatten().copied().collect();
        let picked = logp
            .gather(
                &candle_core::Tensor::new(ids.as_slice(), logp.device())?.unsqueeze(1)?,
                1,
            )?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut offset = 0;
        targets
            .iter()
            .map(|target| {
                let lp = &picked[offset..offset + target.len()];
                offset += target.len();
                let total: f32 = lp.iter().sum();
                if !total.is_finite() {
                    return Err(LociError::model(
                        "the model produced NaN or infinite values",
                    ));
                }
                Ok(TargetScore {
                    nll: -total / target.len() as f32,
                    prob: total.exp(),
                })
            })
            .collect()
    }

    /// Teacher-forced predictions of `(prompt, target)` pairs (one padded batch): for each pair,
    /// the target's token ids and the model's top-1 token at each of their positions (zsRE's and
    /// MEMIT's token accuracy).
    pub fn target_predictions(&self, pairs: &[(String, String)]) -> Result<Vec<TokenPredictions>> {
        let Some((logp, targets)) = self.target_log_probs(pairs, &mut crate::hooks::NoHook)? else {
            return Ok(vec![]);
        };
        let top = logp.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
        let mut offset = 0;
        Ok(targets
            .into_iter()
            .map(|target| {
                let predicted = top[offset..offset + target.len()].to_vec();
                offset += target.len();
                TokenPredictions { target, predicted }
            })
            .collect())
    }

    /// Log-probabilities `[Σ target lengths, vocab]` at the positions that predict each pair's
    /// target tokens (the prompt, then the spaced target, right-padded into one batch), with
    /// each pair's target ids; None for no pairs.
    fn target_log_probs(
        &self,
        pairs: &[(String, String)],
        hook: &mut dyn crate::hooks::Hook,
    ) -> Result<Option<(candle_core::Tensor, Vec<Vec<u32>>)>> {
        if pairs.is_empty() {
            return Ok(None);
        }
        let mut rows = Vec::new();
        let mut spans = Vec::new();
        for (p, t) in pairs {
            let prompt = self.encode_prompt(p)?;
            let target = self.tokenizer.encode_plain(&spaced(t))?;
            if target.is_empty() {
                return Err(LociError::input(format!(
                    "the target {t:?} tokenizes to nothing"
                )));
            }
            spans.push((prompt.len(), target.clone()));
            let mut row = prompt;
            row.extend(target);
            rows.push(row);
        }
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        if t > self.model.cfg.max_positions {
            return Err(LociError::input(
                "prompt and target exceed the model's context",
            ));
        }
        // Logits only where a target token is predicted: the head is a large share of a pass
        // (and [rows, t, vocab] floats of memory) when computed at every position.
        let (hidden, t) = self.padded_hidden(&rows, hook, None)?;
        let idx: Vec<u32> = spans
            .iter()
            .enumerate()
            .flat_map(|(i, (n, target))| {
                (n - 1..n - 1 + target.len()).map(move |p| (i * t + p) as u32)
            })
            .collect();
        let idx = candle_core::Tensor::new(idx.as_slice(), hidden.device())?;
        let at = hidden.index_select(&idx, 0)?;
        let logp =
            candle_nn::ops::log_softmax(&self.model.final_logits(&at)?, candle_core::D::Minus1)?;
        Ok(Some((logp, spans.into_iter().map(|(_, t)| t).collect())))
    }
}

pub(crate) fn mean(v: impl Iterator<Item = f32>) -> f32 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f32::NAN
    } else {
        s / n as f32
    }
}

/// 100 × the mean of a metric over the cases that have it (NaN: the case has no such prompt).
pub(crate) fn percent<M>(ms: &[M], f: impl Fn(&M) -> f32) -> f32 {
    100.0 * mean(ms.iter().map(f).filter(|x| !x.is_nan()))
}

pub(crate) fn hmean(xs: &[f32]) -> f32 {
    if xs.iter().any(|x| *x <= 0.0 || x.is_nan()) {
        return 0.0;
    }
    xs.len() as f32 / xs.iter().map(|x| 1.0 / x).sum::<f32>()
}

impl LoadedModel {
    /// Any benchmark's edit loop: scores the cases, applies the one edit `make` computes from
    /// their rewrites, scores each again and undoes the edit (the model ends bit-identical to
    /// how it started, also on error). Returns the scores before and after, and the edit's
    /// seconds per case.
    pub fn edit_and_rescore<C, S>(
        &mut self,
        cases: &[C],
        request: impl Fn(&C) -> &RewriteRequest,
        score: impl Fn(&LoadedModel, &C) -> Result<S>,
        make: impl FnOnce(&mut LoadedModel, &[RewriteRequest]) -> Result<crate::edit::Edit>,
    ) -> Result<(Vec<S>, Vec<S>, f64)> {
        let pre = cases
            .iter()
            .map(|c| score(self, c))
            .collect::<Result<Vec<_>>>()?;
        let started = crate::clock::now_seconds();
        let reqs: Vec<RewriteRequest> = cases.iter().map(|c| request(c).clone()).collect();
        let edit = make(self, &reqs)?;
        let applied = self.apply(&edit)?;
        let edit_seconds = (crate::clock::now_seconds() - started) / cases.len().max(1) as f64;
        let post = cases
            .iter()
            .map(|c| score(self, c))
            .collect::<Result<Vec<_>>>();
        self.undo_edit(applied)?;
        Ok((pre, post?, edit_seconds))
    }
}

/// How one case fared in a sequence of edits.
#[derive(Clone, Debug)]
pub struct InSequence<S> {
    /// Before any edit of the sequence.
    pub pre: Option<S>,
    /// Right after its own edit.
    pub post: Option<S>,
    /// After the last edit of the sequence.
    pub last: Option<S>,
    /// Its edit's seconds, shared over the cases it wrote.
    pub edit_seconds: f64,
    /// Why the case has no scores (it could not be scored, or its edit failed).
    pub error: Option<String>,
}

/// How a sequence of edits runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequenceOptions {
    /// Cases written by one edit.
    pub batch: usize,
    /// After every this many cases, every case edited so far is scored again: the sequence's
    /// retention curve (0: only after the last edit).
    pub checkpoint_every: usize,
}

/// The scores, part-way through a sequence, of every case edited so far.
#[derive(Clone, Debug)]
pub struct Checkpoint<S> {
    /// Cases the sequence had reached (edited, or failed).
    pub cases_done: usize,
    /// `(case index, scores)` of each case edited by then.
    pub scores: Vec<(usize, S)>,
}

/// What a sequence of edits gives: each case's scores, and the checkpoints on the way.
#[derive(Clone, Debug)]
pub struct Sequence<S> {
    /// One entry per case, in the cases' order.
    pub cases: Vec<InSequence<S>>,
    /// The checkpoints' scores, in the order they were taken (none when `checkpoint_every`
    /// is 0).
    pub checkpoints: Vec<Checkpoint<S>>,
}

impl LoadedModel {
    /// Sequential editing: `opts.batch` cases per edit, each edit computed on the model as the
    /// earlier ones left it and kept. Every case is scored before the first edit, right after
    /// its own and after the last (and every case edited so far at each checkpoint); then the
    /// whole sequence is undone (the model ends bit-identical to how it started, also on
    /// error). A case that cannot be scored or whose edit fails gets an `error` and the
    /// sequence goes on without it; a cancelled edit ends the sequence with
    /// [`LociError::Cancelled`] (undone). `progress` hears the cases done so far.
    pub fn edit_in_sequence<C, S>(
        &mut self,
        cases: &[C],
        opts: SequenceOptions,
        request: impl Fn(&C) -> &RewriteRequest,
        score: impl Fn(&LoadedModel, &C) -> Result<S>,
        mut make: impl FnMut(&mut LoadedModel, &[RewriteRequest]) -> Result<crate::edit::Edit>,
        progress: &mut dyn FnMut(usize, Option<&S>),
    ) -> Result<Sequence<S>> {
        let mut out: Vec<InSequence<S>> = cases
            .iter()
            .map(|c| {
                let pre = score(self, c);
                InSequence {
                    error: pre.as_ref().err().map(|e| e.to_string()),
                    pre: pre.ok(),
                    post: None,
                    last: None,
                    edit_seconds: 0.0,
                }
            })
            .collect();
        let mut applied = crate::edit::AppliedEdit::default();
        let mut checkpoints = vec![];
        let mut done = 0;
        let batch = opts.batch.max(1);
        for start in (0..cases.len()).step_by(batch) {
            let end = (start + batch).min(cases.len());
            let step = BatchStep {
                request: &request,
                score: &score,
                progress: &mut *progress,
                done: &mut done,
            };
            let made =
                self.sequence_batch(&cases[start..end], &mut out[start..end], &mut make, step);
            let made = match made {
                Ok(made) => made,
                Err(stop) => {
                    self.undo_edit(applied)?;
                    return Err(stop);
                }
            };
            if let Some(a) = made {
                applied = applied.then(a);
            }
            let every = opts.checkpoint_every;
            if every > 0 && done < cases.len() && done / every > start / every {
                let scores = cases
                    .iter()
                    .zip(&out)
                    .take(done)
                    .enumerate()
                    .filter(|(_, (_, r))| r.error.is_none())
                    .filter_map(|(i, (c, _))| score(self, c).ok().map(|s| (i, s)))
                    .collect();
                checkpoints.push(Checkpoint {
                    cases_done: done,
                    scores,
                });
            }
        }
        for (c, r) in cases.iter().zip(out.iter_mut()) {
            if r.error.is_none() {
                match score(self, c) {
                    Ok(s) => r.last = Some(s),
                    Err(e) => r.error = Some(e.to_string()),
                }
            }
        }
        self.undo_edit(applied)?;
        Ok(Sequence {
            cases: out,
            checkpoints,
        })
    }

    /// One batch of a sequence: the cases that could be scored are edited together and the
    /// edit kept (returned to be undone at the end); each is scored right after. A failed edit
    /// is each case's error; a cancelled one ends the sequence (the error).
    fn sequence_batch<C, S, R, F>(
        &mut self,
        chunk: &[C],
        results: &mut [InSequence<S>],
        make: &mut impl FnMut(&mut LoadedModel, &[RewriteRequest]) -> Result<crate::edit::Edit>,
        step: BatchStep<'_, R, F, S>,
    ) -> Result<Option<crate::edit::AppliedEdit>>
    where
        R: Fn(&C) -> &RewriteRequest,
        F: Fn(&LoadedModel, &C) -> Result<S>,
    {
        let (ok, failed): (Vec<_>, Vec<_>) = chunk
            .iter()
            .zip(results.iter_mut())
            .partition(|(_, r)| r.error.is_none());
        for _ in failed {
            *step.done += 1;
            (step.progress)(*step.done, None);
        }
        if ok.is_empty() {
            return Ok(None);
        }
        let started = crate::clock::now_seconds();
        let reqs: Vec<RewriteRequest> = ok.iter().map(|(c, _)| (step.request)(c).clone()).collect();
        let edited = make(self, &reqs).and_then(|e| self.apply(&e));
        if let Err(LociError::Cancelled) = edited {
            return Err(LociError::Cancelled);
        }
        let seconds = (crate::clock::now_seconds() - started) / ok.len() as f64;
        for (c, r) in ok {
            r.edit_seconds = seconds;
            match &edited {
                Ok(_) => match (step.score)(self, c) {
                    Ok(s) => r.post = Some(s),
                    Err(e) => r.error = Some(e.to_string()),
                },
                Err(e) => r.error = Some(e.to_string()),
            }
            *step.done += 1;
            (step.progress)(*step.done, r.post.as_ref());
        }
        Ok(edited.ok())
    }
}

/// What each batch of a sequence uses: how a case's request is read and scored, who hears the
/// progress, and the count of cases done.
struct BatchStep<'a, R, F, S> {
    request: &'a R,
    score: &'a F,
    progress: &'a mut dyn FnMut(usize, Option<&S>),
    done: &'a mut usize,
}

/// A benchmark's sequence of edits: each case's record (or why it has none), and the metrics
/// of the cases edited so far at each checkpoint.
#[derive(Clone, Debug)]
pub struct SequenceEval<R, M> {
    /// One per case, in the cases' order.
    pub records: Vec<SequenceRecord<R>>,
    /// `(cases done, metrics of each case edited and scored by then)` per checkpoint.
    pub checkpoints: Vec<(usize, Vec<M>)>,
}

impl<S> Sequence<S> {
    /// Records and checkpoint metrics from each case's scores: `record(case, pre, post, last,
    /// seconds)` and `metrics(case, pre, scores)`.
    pub(crate) fn evaluate<C, R, M>(
        self,
        cases: &[C],
        record: impl Fn(&C, S, S, S, f64) -> R,
        metrics: impl Fn(&C, &S, &S) -> M,
    ) -> SequenceEval<R, M> {
        let checkpoints = self
            .checkpoints
            .into_iter()
            .map(|cp| {
                let ms = cp
                    .scores
                    .iter()
                    .filter_map(|(i, s)| {
                        let pre = self.cases[*i].pre.as_ref()?;
                        Some(metrics(&cases[*i], pre, s))
                    })
                    .collect();
                (cp.cases_done, ms)
            })
            .collect();
        let records = cases
            .iter()
            .zip(self.cases)
            .map(|(case, o)| match (o.pre, o.post, o.last, o.error) {
                (Some(pre), Some(post), Some(last), None) => {
                    Ok(record(case, pre, post, last, o.edit_seconds))
                }
                (.., e) => Err(e.unwrap_or_else(|| "not scored".into())),
            })
            .collect();
        SequenceEval {
            records,
            checkpoints,
        }
    }
}

/// A case of a sequence: its record, or why its edit failed.
pub type SequenceRecord<R> = std::result::Result<R, String>;
