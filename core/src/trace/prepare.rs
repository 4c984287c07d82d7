//! The runs every cell of a trace shares: the clean run (its states to restore from), the
//! corrupted run (its residual stream, module outputs, keys and values), the answer and its
//! probability before and after the corruption; and reading an answer's probability out of
//! logits.

use std::collections::BTreeMap;

use candle_core::{IndexOp, Tensor};

use super::effect::tracing_effect;
use super::types::{AnswerToken, TraceHeader, TraceKind, TraceRequest, TraceResult, TraceWork};
use crate::error::{LociError, Result};
use crate::hooks::noise::embed_noise;
use crate::hooks::{Capture, Chain, Hook, Site};
use crate::loader::LoadedModel;
use crate::model::{KvCache, LogitsAt};
use crate::request::{spaced, subject_range};

/// Everything the cells of one trace share: the clean run and the corrupted run.
pub(super) struct Prepared {
    /// The clean run: the ids, the subject's span, the answer, `high` and the clean states.
    pub(super) base: Clean,
    pub(super) low: f32,
    pub(super) noise: Tensor,
    pub(super) scale: f64,
    /// Attention and MLP outputs of the corrupted run.
    pub(super) corrupt: Capture,
    /// Residual input of each layer in the corrupted run, `[samples, T, d]`; index `n_layer` is
    /// the last block's output.
    pub(super) resid_in: Vec<Tensor>,
    pub(super) kv: KvCache,
}

fn validate(lm: &LoadedModel, req: &TraceRequest) -> Result<()> {
    if req.samples == 0 {
        return Err(LociError::input("samples must be at least 1"));
    }
    if req.window == 0 {
        return Err(LociError::input("window must be at least 1"));
    }
    if req.kinds.is_empty() {
        return Err(LociError::input("no trace kind requested"));
    }
    if let Some(k) = req
        .kinds
        .iter()
        .enumerate()
        .find_map(|(i, k)| req.kinds[..i].contains(k).then_some(k))
    {
        return Err(LociError::input(format!(
            "trace kind {} requested twice",
            k.name()
        )));
    }
    if req.samples > 64 {
        return Err(LociError::input("at most 64 samples"));
    }
    if req.full_answer && req.answer.is_none() {
        return Err(LociError::input("a full-answer trace needs the answer"));
    }
    let _ = lm;
    Ok(())
}

/// The clean run of a trace and what it settles: the token ids (the prompt, then with
/// `full_answer` the answer but its last token), the subject's span, the answer and `high`.
pub(super) struct Clean {
    pub(super) ids: Vec<u32>,
    pub(super) prompt_len: usize,
    pub(super) range: (usize, usize),
    pub(super) answer: Vec<u32>,
    pub(super) high: f32,
    pub(super) states: Capture,
}

/// The checks and the clean run every trace method starts from.
pub(super) fn clean(lm: &LoadedModel, req: &TraceRequest) -> Result<Clean> {
    validate(lm, req)?;
    let m = &lm.model;
    let mut ids = lm.encode_prompt(&req.prompt)?;
    let prompt_len = ids.len();
    let range = subject_range(&lm.tokenizer, &ids, &req.subject)?;
    let answer_ids = answer_ids(lm, req)?;
    if req.full_answer {
        let a = answer_ids.as_ref().expect("validated");
        ids.extend(&a[..a.len() - 1]);
        if ids.len() > m.cfg.max_positions {
            return Err(LociError::input(
                "prompt and answer exceed the model's context",
            ));
        }
    }
    let answer: Vec<u32> = match (&answer_ids, req.full_answer) {
        (Some(a), true) => a.clone(),
        (Some(a), false) => vec![a[0]],
        (None, _) => vec![],
    };
    let (states, answer, high) = clean_run(lm, &ids, answer)?;
    Ok(Clean {
        ids,
        prompt_len,
        range,
        answer,
        high,
        states,
    })
}

/// The clean and corrupted runs of a trace: everything its cells share.
pub(super) fn prepare(
    lm: &LoadedModel,
    req: &TraceRequest,
    embedding_std: Option<f64>,
) -> Result<Prepared> {
    let (base, noise, scale) = clean_and_noise(lm, req, embedding_std)?;
    let corrupted = corrupted_run(lm, &base.ids, &noise, base.range, &base.answer)?;
    Ok(Prepared {
        base,
        low: corrupted.low,
        noise,
        scale,
        corrupt: corrupted.states,
        resid_in: corrupted.resid_in,
        kv: corrupted.kv,
    })
}

/// The clean run and the noise drawn for the subject, `[samples, span, d]`, with its scale: all
/// a trace needs before any corrupted pass.
pub(super) fn clean_and_noise(
    lm: &LoadedModel,
    req: &TraceRequest,
    embedding_std: Option<f64>,
) -> Result<(Clean, Tensor, f64)> {
    let m = &lm.model;
    let scale = req.noise.scale(embedding_std)?;
    let base = clean(lm, req)?;
    let (span, d) = (base.range.1 - base.range.0, m.cfg.d_model);
    let draw = req.noise.draw(scale, req.samples, span, d, req.seed);
    let noise = Tensor::from_vec(draw, (req.samples, span, d), &m.device)?;
    Ok((base, noise, scale))
}

/// The requested answer's tokens, with the leading space targets get (none: the clean top-1).
fn answer_ids(lm: &LoadedModel, req: &TraceRequest) -> Result<Option<Vec<u32>>> {
    let Some(a) = &req.answer else {
        return Ok(None);
    };
    let ids = lm.tokenizer.encode_plain(&spaced(a))?;
    if ids.is_empty() {
        return Err(LociError::input(format!(
            "the answer {a:?} tokenizes to nothing"
        )));
    }
    Ok(Some(ids))
}

/// The clean run: every layer's states, the answer (the top-1 when none was asked for) and its
/// probability `high`.
fn clean_run(lm: &LoadedModel, ids: &[u32], answer: Vec<u32>) -> Result<(Capture, Vec<u32>, f32)> {
    let m = &lm.model;
    let n = m.n_layer();
    let all_sites: Vec<Site> = (0..n)
        .flat_map(|l| [Site::Block(l), Site::Mlp(l), Site::Attn(l)])
        .collect();
    let mut clean = Capture::new(all_sites);
    let clean_ids = m.ids_tensor(&[ids.to_vec()])?;
    let reads = answer.len().max(1);
    let clean_logits = readout_logits(m, &clean_ids, &mut clean, None, reads)?;
    let first = clean_logits.i((0, reads - 1))?;
    crate::predict::check_finite(&first.to_vec1::<f32>()?)?;
    let answer = if answer.is_empty() {
        let probs = candle_nn::ops::softmax_last_dim(&first)?.to_vec1::<f32>()?;
        vec![crate::predict::top_k(&probs, 1)[0].0]
    } else {
        answer
    };
    let high = answer_prob(&clean_logits, &answer, 1)?[0];
    Ok((clean, answer, high))
}

/// What the corrupted run leaves for the cells.
struct Corrupted {
    low: f32,
    states: Capture,
    resid_in: Vec<Tensor>,
    kv: KvCache,
}

/// The corrupted run, one row per noise sample: the answer's probability `low`, every layer's
/// module outputs, residual inputs, keys and values.
fn corrupted_run(
    lm: &LoadedModel,
    ids: &[u32],
    noise: &Tensor,
    range: (usize, usize),
    answer: &[u32],
) -> Result<Corrupted> {
    let m = &lm.model;
    let n = m.n_layer();
    let rows: Vec<Vec<u32>> = vec![ids.to_vec(); noise.dim(0)?];
    let mut states =
        Capture::new((0..n).flat_map(|l| [Site::Block(l), Site::Mlp(l), Site::Attn(l)]));
    let mut kv = KvCache::default();
    let mut embed_cap = Capture::new([Site::Embed]);
    let low_logits = {
        let mut nh = embed_noise(noise, range, 0);
        let mut chain = Chain(vec![&mut nh, &mut embed_cap, &mut states]);
        let reads = answer.len().max(1);
        readout_logits(m, &m.ids_tensor(&rows)?, &mut chain, Some(&mut kv), reads)?
    };
    let low = answer_prob(&low_logits, answer, 1)?[0];
    let mut resid_in = Vec::with_capacity(n + 1);
    let emb = embed_cap.get(Site::Embed)?.clone();
    resid_in.push(m.stream_in(emb, 0)?);
    for l in 0..n {
        resid_in.push(states.get(Site::Block(l))?.clone());
    }
    Ok(Corrupted {
        low,
        states,
        resid_in,
        kv,
    })
}

/// f32 logits `[rows, reads, vocab]` at the last `reads` positions of `ids`.
pub(super) fn readout_logits(
    m: &crate::model::Model,
    ids: &Tensor,
    hook: &mut dyn Hook,
    kv: Option<&mut KvCache>,
    reads: usize,
) -> Result<Tensor> {
    let at = if reads == 1 {
        LogitsAt::Last
    } else {
        LogitsAt::All
    };
    let logits = m
        .run(ids, hook, kv, at)?
        .ok_or_else(|| LociError::input("forward pass stopped early"))?;
    Ok(if reads == 1 {
        logits.unsqueeze(1)?
    } else {
        let t = logits.dim(1)?;
        logits.narrow(1, t - reads, reads)?
    })
}

/// Mean over consecutive groups of rows of p(answer), from `[rows, reads, vocab]` logits whose
/// position j predicts `answer[j]`: the answer token's probability, or with several the whole
/// sequence's, Π_j p(answer[j]) (probabilities are averaged over a group, not log-probabilities).
pub(super) fn answer_prob(logits: &Tensor, answer: &[u32], groups: usize) -> Result<Vec<f32>> {
    let p = if let [id] = answer {
        candle_nn::ops::softmax_last_dim(&logits.squeeze(1)?)?.i((.., *id as usize))?
    } else {
        let logp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
        let rows = logp.dim(0)?;
        let idx = Tensor::new(answer, logp.device())?
            .reshape((1, answer.len(), 1))?
            .repeat((rows, 1, 1))?;
        logp.gather(&idx, 2)?.sum((1, 2))?.exp()?
    };
    let rows = p.dim(0)?;
    Ok(p.reshape((groups, rows / groups))?
        .mean(1)?
        .to_vec1::<f32>()?)
}

/// Layers `[lo, hi)` restored for a windowed cell at layer `l`
/// (docs/tracing.md#restoring-states-kinds-and-windows).
pub fn window_layers(l: usize, window: usize, n_layer: usize) -> (usize, usize) {
    (
        l.saturating_sub(window / 2),
        (l + window.div_ceil(2)).min(n_layer),
    )
}

/// What a UI needs before any row, from the clean and corrupted runs.
pub(super) fn header(lm: &LoadedModel, req: &TraceRequest, p: &Prepared) -> Result<TraceHeader> {
    header_of(lm, req, &p.base, p.low, p.scale)
}

/// The header of a trace whose clean run is `c`, with `low` and the noise's scale.
pub(super) fn header_of(
    lm: &LoadedModel,
    req: &TraceRequest,
    c: &Clean,
    low: f32,
    noise: f64,
) -> Result<TraceHeader> {
    Ok(TraceHeader {
        tokens: lm.tokenizer.token_strings(&c.ids[..c.prompt_len])?,
        subject_range: [c.range.0, c.range.1],
        answer: AnswerToken {
            id: c.answer[0],
            token: lm.tokenizer.decode(&c.answer)?,
            ids: if req.full_answer {
                c.answer.clone()
            } else {
                vec![]
            },
        },
        high: c.high,
        low,
        noise,
        n_layer: lm.model.n_layer(),
        kinds: req.kinds.clone(),
        total_rows: req.kinds.len() * c.prompt_len,
    })
}

/// The result laid out from the header, with every row's scores and their tracing effects.
pub(super) fn finish(
    lm: &LoadedModel,
    req: &TraceRequest,
    header: &TraceHeader,
    scores: BTreeMap<TraceKind, Vec<Vec<f32>>>,
    work: TraceWork,
    started: f64,
) -> TraceResult {
    let mut r = TraceResult::from_header(header, &lm.name, req);
    let last_subject = header.subject_range[1] - 1;
    let effects = |token: Option<usize>| -> BTreeMap<TraceKind, Vec<f32>> {
        scores
            .iter()
            .map(|(k, g)| (*k, tracing_effect(g, header.high, header.low, token)))
            .collect()
    };
    r.tracing_effect = effects(None);
    r.tracing_effect_subject_last = effects(Some(last_subject));
    r.scores = scores;
    r.work = work;
    r.seconds = crate::clock::now_seconds() - started;
    r
}
