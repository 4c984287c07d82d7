//! Hase et al.'s five editing problems (docs/study.md#the-five-editing-problems): what an edit
//! pushes toward, which way, and whether the subject is noised while editing and scoring.

use serde::{Deserialize, Serialize};

use crate::edit::Direction;
use crate::error::{LociError, Result};
use crate::eval::CounterFactCase;
pub use crate::hooks::noise::SubjectNoise;
use crate::loader::LoadedModel;
use crate::predict::Sampling;
use crate::request::{RewriteRequest, TargetStr};

/// Which of Hase et al.'s editing problems a case is posed as (serialised in snake_case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EditProblem {
    /// CounterFact's task: make the model say the new, false object.
    ErrorInjection,
    /// Make the model say, on the clean prompt, what it says when the subject is noised.
    TracingReversal,
    /// Lower the probability of the true object.
    FactErasure,
    /// Raise the probability of the true object.
    FactAmplification,
    /// Make the model say the true object even when the subject is noised.
    FactForcing,
}

impl EditProblem {
    /// Every problem, in the paper's order.
    pub const ALL: [EditProblem; 5] = [
        EditProblem::ErrorInjection,
        EditProblem::TracingReversal,
        EditProblem::FactErasure,
        EditProblem::FactAmplification,
        EditProblem::FactForcing,
    ];

    /// The snake_case name, as serialised and as `FromStr` accepts it (`-` also allowed).
    pub fn name(self) -> &'static str {
        match self {
            EditProblem::ErrorInjection => "error_injection",
            EditProblem::TracingReversal => "tracing_reversal",
            EditProblem::FactErasure => "fact_erasure",
            EditProblem::FactAmplification => "fact_amplification",
            EditProblem::FactForcing => "fact_forcing",
        }
    }

    /// Which way the edit pushes the target's probability: down for fact erasure, else up.
    pub fn direction(self) -> Direction {
        match self {
            EditProblem::FactErasure => Direction::Lower,
            _ => Direction::Raise,
        }
    }

    /// The subject is corrupted while the edit is computed and while it is scored.
    pub fn noised(self) -> bool {
        self == EditProblem::FactForcing
    }

    /// What the edit aims at, with subject noise `sigma` when the problem is noised.
    pub fn goal(self, sigma: f64) -> crate::edit::EditGoal {
        crate::edit::EditGoal {
            direction: self.direction(),
            subject_noise: self.noised().then_some(sigma),
        }
    }
}

impl std::str::FromStr for EditProblem {
    type Err = LociError;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().replace('-', "_");
        EditProblem::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                LociError::input(format!(
                    "unknown editing problem {s:?} (error_injection, tracing_reversal, \
                     fact_erasure, fact_amplification, fact_forcing)"
                ))
            })
    }
}

/// One case posed as one problem: the rewrite request whose `target_new` is the problem's target.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProblemCase {
    /// The problem the case is posed as.
    pub problem: EditProblem,
    /// The case's rewrite with `target_new` replaced by the problem's target.
    pub request: RewriteRequest,
}

impl ProblemCase {
    /// The string the edit moves the probability of.
    pub fn target(&self) -> &str {
        &self.request.target_new.str
    }
}

/// Tokens generated for tracing reversal: the reference budget of 12 tokens, prompt included
/// (at least one new token).
const REVERSAL_TOTAL_TOKENS: usize = 12;

impl LoadedModel {
    /// What the model continues `prompt` with (greedily) when the subject's embeddings are
    /// noised — the target of tracing reversal, without the prompt (the reference keeps the
    /// prompt in it, which looks unintended: docs/study.md#the-five-editing-problems).
    pub fn noised_continuation(
        &self,
        req: &RewriteRequest,
        noise: SubjectNoise,
        max_new: usize,
    ) -> Result<String> {
        let span = crate::request::subject_span(self, &req.prompt, &req.subject)?;
        let mut hook = crate::hooks::noise::subject_noise(
            &[(0, span.0, span.1)],
            Some(noise),
            self.model.width_on_device(),
        )?;
        let g = self.generate_with(&req.filled(), max_new, Sampling::Greedy, &mut hook)?;
        self.tokenizer.decode(&g.new_ids)
    }

    /// `case` posed as `problem`.
    pub fn problem_case(
        &self,
        case: &CounterFactCase,
        problem: EditProblem,
        noise: SubjectNoise,
    ) -> Result<ProblemCase> {
        let rw = &case.requested_rewrite;
        let truth = || {
            rw.target_true.clone().ok_or_else(|| {
                LociError::input(format!("case {} has no true target", case.case_id))
            })
        };
        let target = match problem {
            EditProblem::ErrorInjection => rw.target_new.clone(),
            EditProblem::TracingReversal => {
                let prompt_len = self.encode_prompt(&rw.filled())?.len();
                let max_new = REVERSAL_TOTAL_TOKENS.saturating_sub(prompt_len).max(1);
                let text = self.noised_continuation(rw, noise, max_new)?;
                if text.trim().is_empty() {
                    return Err(LociError::input(format!(
                        "case {}: the noised model continues with nothing",
                        case.case_id
                    )));
                }
                // Kept as generated (with its leading space), so its tokens are the model's.
                TargetStr::new(text)
            }
            _ => truth()?,
        };
        let mut request = rw.clone();
        request.target_new = target;
        Ok(ProblemCase { problem, request })
    }
}
