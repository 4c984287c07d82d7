//! ROME's context templates: short texts sampled from the model itself that precede the
//! prompt, so the key and the value hold whatever comes before the subject.

use candle_core::Tensor;

use super::hparams::RomeHparams;
use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::model::{KvCache, LogitsAt};
use crate::rng::SplitMix64;

/// ROME's context templates: short samples from the model itself (top-5, seeded), each
/// followed by ". {}"; plus the bare "{}" first.
pub fn context_templates(lm: &LoadedModel, hp: &RomeHparams) -> Result<Vec<String>> {
    let m = &lm.model;
    let start = lm.tokenizer.eos.or(m.cfg.bos_token_id).unwrap_or(0);
    let mut out = vec!["{}".to_string()];
    let mut rng = SplitMix64::new(hp.seed);
    for &(new_tokens, count) in &hp.context_templates {
        if count == 0 || new_tokens == 0 {
            continue;
        }
        let mut rows: Vec<Vec<u32>> = vec![vec![]; count];
        let mut cache = KvCache::default();
        let mut input = m.ids_tensor(&vec![vec![start]; count])?;
        for _ in 0..new_tokens {
            let logits = m
                .run(
                    &input,
                    &mut crate::hooks::NoHook,
                    Some(&mut cache),
                    LogitsAt::Last,
                )?
                .ok_or_else(|| LociError::input("forward pass stopped early"))?;
            let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
            let next: Vec<u32> = probs
                .iter()
                .map(|p| crate::predict::sample_top_k(p, 5, &mut rng))
                .collect();
            for (row, id) in rows.iter_mut().zip(&next) {
                row.push(*id);
            }
            input = Tensor::from_vec(next, (count, 1), &m.device)?;
        }
        for row in rows {
            let text = lm.tokenizer.decode(&row)?;
            let text = text
                .replace("\n\n", " ")
                .replace('\n', " ")
                .replace("{", "")
                .replace("}", "");
            out.push(format!("{}. {{}}", text.trim()));
        }
    }
    Ok(out)
}
