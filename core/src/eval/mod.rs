//! Scoring a model around its edits: the benchmarks (CounterFact in `counterfact`, zsRE in
//! `zsre`), teacher-forced target scores and predictions, and the loops that edit, score and
//! undo — one edit at a time, or a sequence of kept edits.

pub mod counterfact;
pub mod health;
pub mod sequence;
pub mod zsre;

pub use counterfact::*;
pub use health::{sequence_points, Health, HealthProbe, LayerHealth, SequencePoint};
pub use sequence::*;

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
