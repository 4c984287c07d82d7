//! The model's general health part-way through a long sequence of edits: what the edits cost
//! beyond the facts they write. Sequential editing has been seen to collapse a model — its
//! perplexity soars, facts it knew are lost — together with the edited MLP matrices' norms
//! exploding; these three numbers, taken at each checkpoint, show whether and when that happens.
//!
//! - **Perplexity** on held-out texts: `exp` of the mean next-token NLL over all their tokens
//!   (token-weighted, as language-model perplexity is usually reported).
//! - **Known facts**: the share of facts (ROME's known_1000 prompts) whose answer's first token
//!   is the model's top-1 next token.
//! - **Weights**: each edited down-projection's Frobenius norm and its ratio to the norm before
//!   the first edit; GRACE changes no weight, and its codebook's size is reported instead.

use serde::{Deserialize, Serialize};

use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::request::spaced;

/// One edited layer's weights.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerHealth {
    /// The block whose MLP down-projection this is.
    pub layer: usize,
    /// `‖W‖_F` now.
    pub norm: f32,
    /// `‖W‖_F / ‖W₀‖_F`, `W₀` the weight before the sequence's first edit (both at most
    /// `f32::MAX`, so that a point always reads back).
    pub growth: f32,
    /// GRACE's codebook entries at the layer (0: none).
    pub codebook_entries: usize,
}

/// The model's health at one point of a sequence.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Health {
    /// Perplexity of the held-out texts (none: no texts were given).
    pub perplexity: Option<f32>,
    /// Known facts answered top-1, ×100 (none: no facts were given).
    pub known_top1: Option<f32>,
    /// Each edited layer.
    pub layers: Vec<LayerHealth>,
    /// What could not be measured and why (a collapsed model's NaN or infinite outputs): the
    /// sequence goes on, and its number is left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
}

impl Health {
    /// The largest norm growth over the layers (1 without layers).
    pub fn max_growth(&self) -> f32 {
        self.layers.iter().map(|l| l.growth).fold(1.0, f32::max)
    }
}

/// One point of a long sequential run, as its results file holds it (a line with `"kind":
/// "checkpoint"`): what its chart draws.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SequencePoint {
    /// The method (`rome`, `memit`, …).
    pub method: String,
    /// Cases the sequence had reached (0: the unedited model).
    pub cases_done: usize,
    /// The benchmark's main scores (×100) of the cases edited so far, by name (none at 0).
    pub headline: Vec<(String, f32)>,
    /// The model's health then.
    pub health: Health,
    /// Seconds the method's sequence had run (over every session of a continued run).
    pub seconds: f64,
}

/// What health is measured on: held-out texts (token ids, each at least two tokens) and known
/// facts (prompt ids, and the answer's first token).
#[derive(Clone, Debug, Default)]
pub struct HealthProbe {
    texts: Vec<Vec<u32>>,
    facts: Vec<(Vec<u32>, u32)>,
}

/// Facts scored per pass (their next-token probabilities are `vocab` floats each).
const FACTS_PER_PASS: usize = 64;

impl HealthProbe {
    /// `texts` cut to their first `max_tokens` tokens (texts of fewer than two are skipped)
    /// and `(prompt, answer)` facts, tokenized for `lm`; a fact whose prompt is empty or too
    /// long, or whose answer is blank or tokenizes to nothing, is an error.
    pub fn new(
        lm: &LoadedModel,
        texts: &[String],
        max_tokens: usize,
        facts: &[(String, String)],
    ) -> Result<Self> {
        let len = max_tokens.min(lm.model.cfg.max_positions);
        let mut ids = vec![];
        for t in texts {
            let mut row = lm.tokenizer.encode(t)?;
            row.truncate(len);
            if row.len() >= 2 {
                ids.push(row);
            }
        }
        let facts = facts
            .iter()
            .map(|(prompt, answer)| {
                if answer.trim().is_empty() {
                    return Err(LociError::input(format!(
                        "the known fact {prompt:?} has an empty answer"
                    )));
                }
                let answer_ids = lm.tokenizer.encode_plain(&spaced(answer))?;
                let first = *answer_ids.first().ok_or_else(|| {
                    LociError::input(format!("the answer {answer:?} tokenizes to nothing"))
                })?;
                Ok((lm.encode_prompt(prompt)?, first))
            })
            .collect::<Result<_>>()?;
        Ok(Self { texts: ids, facts })
    }

    /// The held-out texts and the facts, for messages.
    pub fn sizes(&self) -> (usize, usize) {
        (self.texts.len(), self.facts.len())
    }
}

impl LoadedModel {
    /// The model's health now: perplexity and known facts on `probe`, and the norms of
    /// `layers`' down-projections against `start` (their norms before the sequence, in order).
    /// A number the model's outputs make non-finite is left out, the reason in `failed`.
    pub fn health(&self, probe: &HealthProbe, layers: &[usize], start: &[f32]) -> Result<Health> {
        let norms = self.down_norms(layers)?;
        let layers = layers
            .iter()
            .zip(norms)
            .zip(start)
            .map(|((&layer, norm), &s)| {
                let down = self.model.down_proj(layer)?;
                let growth = if norm == s { 1.0 } else { norm / s };
                Ok(LayerHealth {
                    layer,
                    norm,
                    growth: finite_or_max(growth),
                    codebook_entries: down.codebook.as_ref().map_or(0, |c| c.entries().len()),
                })
            })
            .collect::<Result<_>>()?;
        let mut failed = vec![];
        let perplexity = match probe.texts.is_empty() {
            true => None,
            false => match self.corpus_perplexity(&probe.texts) {
                Err(LociError::Model(why)) => {
                    failed.push(format!("perplexity: {why}"));
                    None
                }
                other => Some(other?),
            },
        };
        Ok(Health {
            perplexity,
            known_top1: (!probe.facts.is_empty())
                .then(|| self.facts_top1(&probe.facts))
                .transpose()?,
            layers,
            failed,
        })
    }

    /// `‖W‖_F` of each layer's down-projection.
    pub fn down_norms(&self, layers: &[usize]) -> Result<Vec<f32>> {
        layers
            .iter()
            .map(|&l| {
                let w = self
                    .model
                    .down_proj(l)?
                    .weight
                    .to_dtype(candle_core::DType::F64)?;
                let norm = w.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
                Ok(finite_or_max(norm as f32))
            })
            .collect()
    }

    /// `exp` of the mean next-token NLL over every token of `texts` (one pass per text).
    fn corpus_perplexity(&self, texts: &[Vec<u32>]) -> Result<f32> {
        let (mut total, mut count) = (0f64, 0usize);
        for ids in texts {
            let logits = self
                .model
                .logits(&self.model.ids_tensor(std::slice::from_ref(ids))?)?;
            let logp = candle_nn::ops::log_softmax(&logits.squeeze(0)?, candle_core::D::Minus1)?;
            let next = candle_core::Tensor::new(&ids[1..], logp.device())?.unsqueeze(1)?;
            let n = ids.len() - 1;
            let picked = logp.narrow(0, 0, n)?.gather(&next, 1)?;
            total -= picked
                .to_dtype(candle_core::DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            count += n;
        }
        let ppl = (total / count as f64).exp();
        if !ppl.is_finite() {
            return Err(LociError::model(
                "the model produced NaN or infinite values",
            ));
        }
        Ok(ppl as f32)
    }

    /// The share (×100) of facts whose answer token is the top-1 prediction (a row of NaN
    /// probabilities answers none).
    fn facts_top1(&self, facts: &[(Vec<u32>, u32)]) -> Result<f32> {
        let mut right = 0;
        for chunk in facts.chunks(FACTS_PER_PASS) {
            let rows: Vec<Vec<u32>> = chunk.iter().map(|f| f.0.clone()).collect();
            let probs = self.next_probs_by_length(&rows, &mut |_| {
                Ok(Box::new(crate::hooks::NoHook) as Box<dyn crate::hooks::Hook>)
            })?;
            for (p, (_, answer)) in probs.iter().zip(chunk) {
                let finite = p.iter().all(|x| x.is_finite());
                right += usize::from(finite && top1(p) == *answer);
            }
        }
        Ok(100.0 * right as f32 / facts.len() as f32)
    }
}

/// `x`, or `f32::MAX` for an infinite `x`: a point with it still reads back from JSON.
fn finite_or_max(x: f32) -> f32 {
    if x.is_infinite() {
        f32::MAX
    } else {
        x
    }
}

/// The index of the largest probability.
fn top1(p: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in p.iter().enumerate() {
        if x > p[best] {
            best = i;
        }
    }
    best as u32
}

/// The points of a sequential run's results file (`loci eval --sequential --out`: JSON lines,
/// the checkpoints' `"kind": "checkpoint"`, the others skipped); a line that is not JSON, or a
/// file without a point, is an error naming the line.
pub fn sequence_points(jsonl: &str) -> Result<Vec<SequencePoint>> {
    let mut points = vec![];
    for (i, line) in jsonl.lines().enumerate().filter(|l| !l.1.trim().is_empty()) {
        let bad = |e: serde_json::Error| LociError::Json {
            what: format!("line {} of the results file", i + 1),
            source: e,
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(bad)?;
        if v["kind"] == "checkpoint" {
            points.push(serde_json::from_value(v).map_err(bad)?);
        }
    }
    if points.is_empty() {
        return Err(LociError::input(
            "no checkpoints in the file: it is not the results of `loci eval --sequential --out`",
        ));
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_results_file_gives_its_checkpoints_and_a_wrong_one_says_why() {
        let point = r#"{"kind":"checkpoint","method":"rome","cases_done":2,"headline":[["efficacy score",100.0]],"health":{"perplexity":20.0,"known_top1":40.0,"layers":[{"layer":6,"norm":30.0,"growth":1.1,"codebook_entries":0}]},"seconds":3.0,"label":"ROME at layer 6","summary":{}}"#;
        let text = format!("{point}\n{{\"kind\":\"case\",\"case_id\":1}}\n\n{point}\n");
        let points = sequence_points(&text).unwrap();
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].cases_done, 2);
        assert_eq!(points[0].health.max_growth(), 1.1);
        let err = sequence_points("{\"kind\":\"case\"}\n").unwrap_err();
        assert!(err.to_string().contains("no checkpoints"), "{err}");
        let err = sequence_points(&format!("{point}\nnot json\n")).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
