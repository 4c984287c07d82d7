//! Hase et al.'s per-case scores (docs/study.md#scores): full-sequence probabilities of the
//! problem's target on the first prompt of each kind, normalised by what the edit could have
//! changed, and the essence drift (perplexity on texts the unedited model wrote about the subject).

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::problem::SubjectNoise;
use crate::edit::{Direction, Edit, RowEdits};
use crate::error::{LociError, Result};
use crate::eval::CounterFactCase;
use crate::hooks::noise::subject_noise_each;
use crate::hooks::Chain;
use crate::loader::LoadedModel;
use crate::model::LogitsAt;
use crate::predict::Sampling;

/// p(target) after a case's first rewrite, paraphrase and neighbourhood prompts.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ProblemProbs {
    /// p(whole target) after the rewrite prompt (mean over noise draws when noised).
    pub rewrite: f32,
    /// The same after the first paraphrase; `None` without one, or when noised scoring cannot
    /// find the subject in it.
    pub paraphrase: Option<f32>,
    /// The same after the first neighbourhood prompt (never noised); `None` without one.
    pub neighborhood: Option<f32>,
}

/// How fact forcing corrupts the prompts it scores: `samples` noise draws per prompt, whose
/// probabilities are averaged.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct NoisedScoring {
    /// The σ and seed of the Gaussian noise added to the subject's token embeddings.
    pub noise: SubjectNoise,
    /// Noise draws per prompt (at least 1 is used).
    pub samples: usize,
}

/// The rows `problem_probs` scores for one case: `(prompt, target)` pairs, the subject's span in
/// the rows that are noised, how many rows (noise draws) each prompt has, and which prompts.
struct ScoredRows {
    pairs: Vec<(String, String)>,
    spans: Vec<(usize, usize, usize)>,
    groups: Vec<usize>,
    paraphrase: bool,
    neighborhood: bool,
}

/// The most memory one scoring pass takes for its logits and its edits' dense changes
/// (estimated); more cases are scored in several passes.
const SCORE_BATCH_BYTES: usize = 1 << 30;

/// The bytes of an edit's dense changes (fine-tuning's), which its hook holds.
fn dense_bytes(edit: Option<&Edit>) -> usize {
    edit.map_or(0, |e| {
        e.deltas()
            .iter()
            .map(|d| match d.weight {
                crate::edit::WeightChange::Dense(w) => w.len() * 4,
                crate::edit::WeightChange::LowRank { .. } => 0,
            })
            .sum()
    })
}

/// A case to score, the target scored, and the edit its rows see (hooked), if any.
pub type Scored<'a> = (&'a CounterFactCase, &'a str, Option<&'a Edit>);

impl LoadedModel {
    /// The probabilities Hase et al. score, as the model is now. With `noised`, prompts that
    /// contain the subject are scored with it corrupted (its span found in each prompt, not
    /// copied from the first); a paraphrase that does not spell the subject as the request does
    /// cannot be corrupted and is not scored. Neighbourhood prompts are about other subjects and
    /// stay clean.
    pub fn problem_probs(
        &self,
        case: &CounterFactCase,
        target: &str,
        noised: Option<NoisedScoring>,
    ) -> Result<ProblemProbs> {
        Ok(self
            .problem_probs_batch(&[(case, target, None)], noised)?
            .remove(0))
    }

    /// [`problem_probs`](Self::problem_probs) of several cases in one batch, each case's rows
    /// seeing its own edit when it has one, as a hook ([`RowEdits`]). Each case draws its noise
    /// as it would alone.
    pub fn problem_probs_batch(
        &self,
        items: &[Scored],
        noised: Option<NoisedScoring>,
    ) -> Result<Vec<ProblemProbs>> {
        let rows = items
            .iter()
            .map(|&(case, target, _)| self.scored_rows(case, target, noised))
            .collect::<Result<Vec<_>>>()?;
        let costs: Vec<usize> = items
            .iter()
            .zip(&rows)
            .map(|(&(_, _, e), r)| r.pairs.len() * self.score_row_bytes(64) + dense_bytes(e))
            .collect();
        let mut out = vec![];
        let mut at = 0;
        for n in crate::threads::chunks_within(&costs, SCORE_BATCH_BYTES) {
            let part = items[at..at + n].iter().zip(&rows[at..at + n]);
            out.extend(self.score_batch(part, noised)?);
            at += n;
        }
        Ok(out)
    }

    /// The logits' bytes of one scored row of `len` tokens.
    fn score_row_bytes(&self, len: usize) -> usize {
        len * self.model.cfg.vocab_size * 4
    }

    /// One pass over the rows of `items`.
    fn score_batch<'a>(
        &self,
        items: impl Iterator<Item = (&'a Scored<'a>, &'a ScoredRows)>,
        noised: Option<NoisedScoring>,
    ) -> Result<Vec<ProblemProbs>> {
        let mut pairs = vec![];
        let mut spans = vec![];
        let mut row_edit = vec![];
        let mut edits = vec![];
        let mut per_case = vec![];
        for (&(_, _, edit), rows) in items {
            let at = pairs.len();
            spans.push(rows.spans.iter().map(|&(r, a, b)| (at + r, a, b)).collect());
            let e = edit.map(|e| {
                edits.push(e);
                edits.len() - 1
            });
            row_edit.extend(std::iter::repeat_n(e, rows.pairs.len()));
            pairs.extend(rows.pairs.iter().cloned());
            per_case.push(rows);
        }
        let width = self.model.width_on_device();
        let mut noise = subject_noise_each(&spans, noised.map(|n| n.noise), width)?;
        let mut hooked = RowEdits::new(
            &edits,
            &row_edit,
            (self.model.cfg.d_model, &self.model.device),
        )?;
        let scores = self.score_targets_with(&pairs, &mut Chain(vec![&mut noise, &mut hooked]))?;
        let mut at = 0;
        let mut out = vec![];
        for rows in per_case {
            let mut probs = rows.groups.iter().map(|&g| {
                let p = scores[at..at + g].iter().map(|s| s.prob).sum::<f32>() / g as f32;
                at += g;
                p
            });
            let rewrite = probs.next().expect("the rewrite prompt is scored");
            out.push(ProblemProbs {
                rewrite,
                paraphrase: rows.paraphrase.then(|| probs.next()).flatten(),
                neighborhood: rows.neighborhood.then(|| probs.next()).flatten(),
            });
        }
        Ok(out)
    }

    /// One case's scored rows.
    fn scored_rows(
        &self,
        case: &CounterFactCase,
        target: &str,
        noised: Option<NoisedScoring>,
    ) -> Result<ScoredRows> {
        let rw = &case.requested_rewrite;
        let mut prompts = vec![(rw.filled(), true)];
        let para = case
            .paraphrase_prompts
            .first()
            .filter(|p| noised.is_none() || p.contains(rw.subject.trim()));
        let neigh = case.neighborhood_prompts.first();
        prompts.extend(para.map(|p| (p.clone(), true)));
        prompts.extend(neigh.map(|p| (p.clone(), false)));
        let mut pairs = vec![];
        let mut spans = vec![];
        let mut groups = vec![];
        for (prompt, has_subject) in &prompts {
            let span = match noised {
                Some(_) if *has_subject => {
                    let ids = self.encode_prompt(prompt)?;
                    Some(crate::request::subject_range(
                        &self.tokenizer,
                        &ids,
                        &rw.subject,
                    )?)
                }
                _ => None,
            };
            let copies = match (span, noised) {
                (Some(_), Some(n)) => n.samples.max(1),
                _ => 1,
            };
            for _ in 0..copies {
                if let Some((a, b)) = span {
                    spans.push((pairs.len(), a, b));
                }
                pairs.push((prompt.clone(), target.to_string()));
            }
            groups.push(copies);
        }
        Ok(ScoredRows {
            pairs,
            spans,
            groups,
            paraphrase: para.is_some(),
            neighborhood: neigh.is_some(),
        })
    }

    /// Texts the model writes about `subject` ("{subject} is a", top-5 sampling, `max_len`
    /// tokens in all), the reference for essence drift.
    pub fn essence_texts(
        &self,
        subject: &str,
        n: usize,
        max_len: usize,
        seed: u64,
    ) -> Result<Vec<String>> {
        let prompt = format!("{subject} is a");
        let room = max_len
            .saturating_sub(self.encode_prompt(&prompt)?.len())
            .max(1);
        (0..n)
            .map(|i| {
                let sampling = Sampling::TopK {
                    k: 5,
                    seed: seed.wrapping_add(i as u64),
                };
                Ok(self.generate(&prompt, room, sampling)?.text)
            })
            .collect()
    }

    /// The mean over `texts` of each one's perplexity (its first `max_len` tokens).
    pub fn perplexity(&self, texts: &[String], max_len: usize) -> Result<f32> {
        Ok(self.perplexity_batch(&[(texts, None)], max_len)?.remove(0))
    }

    /// [`perplexity`](Self::perplexity) of several sets of texts in one batch, each set's rows
    /// seeing its own edit when it has one (hooked, as in
    /// [`problem_probs_batch`](Self::problem_probs_batch)).
    pub fn perplexity_batch(
        &self,
        sets: &[(&[String], Option<&Edit>)],
        max_len: usize,
    ) -> Result<Vec<f32>> {
        let costs: Vec<usize> = sets
            .iter()
            .map(|&(texts, e)| texts.len() * self.score_row_bytes(max_len) + dense_bytes(e))
            .collect();
        let mut out = vec![];
        let mut at = 0;
        for n in crate::threads::chunks_within(&costs, SCORE_BATCH_BYTES) {
            out.extend(self.perplexity_pass(&sets[at..at + n], max_len)?);
            at += n;
        }
        Ok(out)
    }

    /// One pass over the texts of `sets`.
    fn perplexity_pass(
        &self,
        sets: &[(&[String], Option<&Edit>)],
        max_len: usize,
    ) -> Result<Vec<f32>> {
        let mut rows: Vec<Vec<u32>> = vec![];
        let mut row_edit = vec![];
        let mut edits = vec![];
        for &(texts, edit) in sets {
            if texts.is_empty() {
                return Err(LociError::input("no texts to score"));
            }
            let e = edit.map(|e| {
                edits.push(e);
                edits.len() - 1
            });
            for t in texts {
                let mut ids = self.tokenizer.encode(t)?;
                ids.truncate(max_len.min(self.model.cfg.max_positions).max(2));
                if ids.len() < 2 {
                    return Err(LociError::input(format!("{t:?} is too short to score")));
                }
                rows.push(ids);
                row_edit.push(e);
            }
        }
        let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
        let t = *lens.iter().max().expect("texts");
        let pad = self.tokenizer.eos.unwrap_or(0);
        let mut next = vec![];
        for r in rows.iter_mut() {
            next.extend(r[1..].iter().copied());
            next.extend(std::iter::repeat_n(pad, t - r.len()));
            next.push(pad);
            r.resize(t, pad);
        }
        let mut hooked = RowEdits::new(
            &edits,
            &row_edit,
            (self.model.cfg.d_model, &self.model.device),
        )?;
        let logits = self
            .model
            .run(
                &self.model.ids_tensor(&rows)?,
                &mut hooked,
                None,
                LogitsAt::All,
            )?
            .ok_or_else(|| LociError::input("forward pass stopped early"))?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let next = Tensor::from_vec(next, (rows.len(), t, 1), logp.device())?;
        let picked = logp.gather(&next, 2)?.squeeze(2)?.to_vec2::<f32>()?;
        let mut out = vec![];
        let mut row = picked.iter().zip(&lens);
        for &(texts, _) in sets {
            let mut total = 0.0;
            for (r, &n) in row.by_ref().take(texts.len()) {
                let nll = -r[..n - 1].iter().map(|&x| x as f64).sum::<f64>() / (n - 1) as f64;
                if !nll.is_finite() {
                    return Err(LociError::model(
                        "the model produced NaN or infinite values",
                    ));
                }
                total += nll.exp();
            }
            out.push((total / texts.len() as f64) as f32);
        }
        Ok(out)
    }
}

/// Hase et al.'s normalised scores of one edit, each in [0, 1] (1: the best possible).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HaseScores {
    /// How much of the possible change toward the goal the edit made on the rewrite prompt:
    /// (p_post − p_pre)/(1 − p_pre) when raising, (p_pre − p_post)/p_pre when lowering.
    pub rewrite: f32,
    /// The same change score on the first paraphrase prompt, when it was scored before and after.
    pub paraphrase: Option<f32>,
    /// 1 − |Δp| / (the largest change possible) on the neighbour prompt.
    pub neighborhood: Option<f32>,
    /// The per-case harmonic mean of the three (the paper's).
    pub target_score: f32,
    /// Their arithmetic mean (the R analysis').
    pub target_score_mean: f32,
}

/// The share of the possible change toward `direction`, floored as the reference does.
pub fn change_score(pre: f32, post: f32, direction: Direction) -> f32 {
    let (pre, post) = (pre as f64, post as f64);
    let s = match direction {
        Direction::Raise if pre >= 1.0 => {
            if post >= pre {
                1.0
            } else {
                0.0
            }
        }
        Direction::Raise => (1.0 - (1.0 - post) / (1.0 - pre)).max(2e-8),
        Direction::Lower if pre <= 0.0 => 0.0,
        Direction::Lower => ((pre - post) / pre).max(0.0),
    };
    s as f32
}

/// How little the neighbour's probability moved, relative to the most it could move.
pub fn neighborhood_score(pre: f32, post: f32) -> f32 {
    let (pre, post) = (pre as f64, post as f64);
    (1.0 - (post - pre).abs() / ((pre - 0.5).abs() + 0.5)) as f32
}

/// The normalised scores of one edit from p(target) before and after it, pushing `direction`;
/// the means cover the parts that were scored (0 harmonic mean if any part is ≤ 0).
pub fn hase_scores(pre: &ProblemProbs, post: &ProblemProbs, direction: Direction) -> HaseScores {
    let rewrite = change_score(pre.rewrite, post.rewrite, direction);
    let paraphrase = pre
        .paraphrase
        .zip(post.paraphrase)
        .map(|(a, b)| change_score(a, b, direction));
    let neighborhood = pre
        .neighborhood
        .zip(post.neighborhood)
        .map(|(a, b)| neighborhood_score(a, b));
    let parts: Vec<f32> = std::iter::once(rewrite)
        .chain(paraphrase)
        .chain(neighborhood)
        .collect();
    let target_score = if parts.iter().any(|x| *x <= 0.0) {
        0.0
    } else {
        parts.len() as f32 / parts.iter().map(|x| 1.0 / x).sum::<f32>()
    };
    HaseScores {
        rewrite,
        paraphrase,
        neighborhood,
        target_score,
        target_score_mean: parts.iter().sum::<f32>() / parts.len() as f32,
    }
}

/// Essence drift normalised as the R analysis does: 1 − clip(ppl_post − ppl_pre, 0, 5)/5.
pub fn essence_score(ppl_pre: f32, ppl_post: f32) -> f32 {
    1.0 - (ppl_post - ppl_pre).clamp(0.0, 5.0) / 5.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_scores_follow_the_reference_formulas() {
        // Raising from 0.2 to 0.6 makes half of the possible change.
        assert!((change_score(0.2, 0.6, Direction::Raise) - 0.5).abs() < 1e-6);
        // Moving the wrong way is floored at 2e-8, not negative.
        assert!((change_score(0.5, 0.1, Direction::Raise) - 2e-8).abs() < 1e-12);
        // Erasing 0.8 → 0.2 removes three quarters.
        assert!((change_score(0.8, 0.2, Direction::Lower) - 0.75).abs() < 1e-6);
        assert_eq!(change_score(0.2, 0.3, Direction::Lower), 0.0);
        // A neighbour at 0.5 can move by 0.5 at most; at 0.9 by 0.9.
        assert!((neighborhood_score(0.5, 0.75) - 0.5).abs() < 1e-6);
        assert!((neighborhood_score(0.9, 0.0) - 0.0).abs() < 1e-6);
        assert_eq!(neighborhood_score(0.3, 0.3), 1.0);
        let pre = ProblemProbs {
            rewrite: 0.2,
            paraphrase: Some(0.2),
            neighborhood: Some(0.5),
        };
        let post = ProblemProbs {
            rewrite: 0.6,
            paraphrase: Some(0.6),
            neighborhood: Some(0.75),
        };
        let s = hase_scores(&pre, &post, Direction::Raise);
        assert!((s.target_score - 0.5).abs() < 1e-6);
        assert!((s.target_score_mean - 0.5).abs() < 1e-6);
        let post = ProblemProbs {
            neighborhood: Some(0.5),
            ..post
        };
        let s = hase_scores(&pre, &post, Direction::Raise);
        // hmean(0.5, 0.5, 1) = 3 / (2 + 2 + 1) = 0.6; mean 2/3.
        assert!((s.target_score - 0.6).abs() < 1e-6);
        assert!((s.target_score_mean - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(essence_score(10.0, 8.0), 1.0);
        assert!((essence_score(10.0, 12.5) - 0.5).abs() < 1e-6);
        assert_eq!(essence_score(10.0, 30.0), 0.0);
    }
}
