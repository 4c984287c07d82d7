//! Next-token prediction and generation, one prompt at a time or many in one pass (`batch`).

mod batch;

pub use batch::{DecodeBatch, GenerationStart, PassHook};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{LociError, Result};
use crate::hooks::NoHook;
use crate::loader::LoadedModel;
use crate::model::{KvCache, LogitsAt};
use crate::rng::SplitMix64;

/// One candidate next token and its probability.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TokenProb {
    /// Token id in the model's vocabulary.
    pub id: u32,
    /// The token decoded to text (e.g. `" Paris"`).
    pub token: String,
    /// Probability of this token as the next one, in [0, 1].
    pub prob: f32,
}

/// The most likely next tokens after a prompt, from [`LoadedModel::predict`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Prediction {
    /// Name of the model that made the prediction.
    pub model: String,
    /// The prompt as given.
    pub prompt: String,
    /// The prompt's tokens, each decoded to text.
    pub tokens: Vec<String>,
    /// The `k` most likely next tokens, most likely first.
    pub top: Vec<TokenProb>,
}

/// The `k` most likely `(id, prob)` of a probability vector, most likely first.
pub fn top_k(probs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..probs.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return vec![];
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        probs[b as usize].total_cmp(&probs[a as usize])
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]));
    idx.into_iter().map(|i| (i, probs[i as usize])).collect()
}

/// Draws a token among the `k` most likely, renormalised over them (one draw from `rng`).
pub(crate) fn sample_top_k(probs: &[f32], k: usize, rng: &mut SplitMix64) -> u32 {
    let cands = top_k(probs, k.max(1));
    let total: f32 = cands.iter().map(|c| c.1).sum();
    let mut r = rng.next_f64() as f32 * total;
    for (id, p) in &cands {
        if r < *p {
            return *id;
        }
        r -= p;
    }
    cands[cands.len() - 1].0
}

pub(crate) fn check_finite(v: &[f32]) -> Result<()> {
    if v.iter().any(|x| !x.is_finite()) {
        return Err(LociError::model(
            "the model produced NaN or infinite values (corrupt weights?)",
        ));
    }
    Ok(())
}

impl LoadedModel {
    /// Probabilities of the next token after `ids`.
    pub fn next_probs(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let t = self.model.ids_tensor(&[ids.to_vec()])?;
        let p = self.model.next_token_probs(&t, &mut NoHook)?;
        let v = p.squeeze(0)?.to_vec1::<f32>()?;
        check_finite(&v)?;
        Ok(v)
    }

    /// The `k` most likely next tokens after `prompt`.
    pub fn predict(&self, prompt: &str, k: usize) -> Result<Prediction> {
        let ids = self.encode_prompt(prompt)?;
        let probs = self.next_probs(&ids)?;
        self.prediction(prompt, &ids, &probs, k)
    }

    /// The prediction after `prompt` (token ids `ids`) whose next-token probabilities are
    /// `probs`: its `k` most likely tokens, decoded.
    pub fn prediction(
        &self,
        prompt: &str,
        ids: &[u32],
        probs: &[f32],
        k: usize,
    ) -> Result<Prediction> {
        let top = top_k(probs, k)
            .into_iter()
            .map(|(id, prob)| {
                Ok(TokenProb {
                    id,
                    token: self.tokenizer.decode(&[id])?,
                    prob,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Prediction {
            model: self.name.clone(),
            prompt: prompt.into(),
            tokens: self.tokenizer.token_strings(ids)?,
            top,
        })
    }
}

impl LoadedModel {
    /// Probability of the whole `target` string (all its tokens, a leading space added as ROME
    /// does) right after `prompt`: Π p(y_j | prompt, y_<j).
    pub fn target_prob(&self, prompt: &str, target: &str) -> Result<f32> {
        let pair = [(prompt.to_string(), target.to_string())];
        Ok(self.score_targets(&pair)?[0].prob)
    }
}

/// How [`LoadedModel::generate`] picks each new token.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Sampling {
    /// Always the most likely token (deterministic).
    Greedy,
    /// Sample among the `k` most likely tokens (ROME's generation tests use k = 5).
    TopK {
        /// How many of the most likely tokens to draw from (renormalised over them).
        k: usize,
        /// Seed of the [`SplitMix64`] generator: the same seed gives the same text.
        seed: u64,
    },
}

/// A prompt and the model's continuation of it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Generation {
    /// The prompt as given.
    pub prompt: String,
    /// The prompt followed by the continuation.
    pub text: String,
    /// Token ids of the continuation alone (the end-of-text token not included).
    pub new_ids: Vec<u32>,
}

impl LoadedModel {
    /// Continues `prompt` by up to `max_new` tokens, stopping at the end-of-text token.
    pub fn generate(&self, prompt: &str, max_new: usize, sampling: Sampling) -> Result<Generation> {
        self.generate_with(prompt, max_new, sampling, &mut NoHook)
    }

    /// `generate` with `prompt_hook` on the pass over the prompt (the continuation then sees
    /// its changes through the cached keys and values).
    pub fn generate_with(
        &self,
        prompt: &str,
        max_new: usize,
        sampling: Sampling,
        prompt_hook: &mut dyn crate::hooks::Hook,
    ) -> Result<Generation> {
        let ids = self.encode_prompt(prompt)?;
        let room = self.model.cfg.max_positions - ids.len();
        let max_new = max_new.min(room);
        let mut rng = match sampling {
            Sampling::TopK { seed, .. } => SplitMix64::new(seed),
            Sampling::Greedy => SplitMix64::new(0),
        };
        let mut cache = KvCache::default();
        let mut input = self.model.ids_tensor(std::slice::from_ref(&ids))?;
        let mut new_ids = Vec::with_capacity(max_new);
        for i in 0..max_new {
            let hook: &mut dyn crate::hooks::Hook = if i == 0 {
                &mut *prompt_hook
            } else {
                &mut NoHook
            };
            let logits = self
                .model
                .run(&input, hook, Some(&mut cache), LogitsAt::Last)?
                .ok_or_else(|| LociError::input("forward pass stopped early"))?;
            let probs = candle_nn::ops::softmax_last_dim(&logits)?
                .squeeze(0)?
                .to_vec1::<f32>()?;
            check_finite(&probs)?;
            let next = match sampling {
                Sampling::Greedy => top_k(&probs, 1)[0].0,
                Sampling::TopK { k, .. } => sample_top_k(&probs, k, &mut rng),
            };
            if Some(next) == self.tokenizer.eos {
                break;
            }
            new_ids.push(next);
            input = Tensor::new(&[[next]], &self.model.device)?;
        }
        let mut all = ids;
        all.extend(&new_ids);
        Ok(Generation {
            prompt: prompt.into(),
            text: self.tokenizer.decode(&all)?,
            new_ids,
        })
    }
}
