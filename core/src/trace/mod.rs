//! Causal tracing (Meng et al. 2022): corrupt the subject, restore one state from the clean run,
//! and measure how much of the answer's probability comes back — for every token and layer.
//!
//! The fast path gives the same grid as the reference algorithm while doing far less work:
//! the clean run happens once (no clean row in restore batches); a restoration at (token t,
//! layer l) reuses the corrupted run's states below its first changed layer and its keys and
//! values before t, so only positions t.. of the layers above are recomputed; the cells of one
//! token (and, with one worker, of every requested kind) are batched together, joining the batch
//! at their first changed layer; logits are computed at the last position only; tokens before the subject are
//! never recomputed (they equal `low`).
//!
//! With `full_answer` (Hase et al.'s variant, spec §8.2) the explained quantity is the
//! probability of the whole answer, teacher-forced after the prompt; only the prompt's tokens
//! are restored, and logits are computed at the answer's positions only.

pub mod effect;
pub mod noise;
pub mod subject;

use std::collections::BTreeMap;

use candle_core::{IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{LociError, Result};
use crate::hooks::{Capture, Chain, FnHook, Hook, Site};
use crate::loader::LoadedModel;
use crate::model::layers::LayerCache;
use crate::model::{KvCache, LogitsAt};
pub use effect::{tracing_effect, AggregateCurves};
pub use noise::{embedding_std, NoiseSpec};
pub use subject::subject_range;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceKind {
    /// The residual stream after a block, at one layer.
    Hidden,
    /// The MLP output, over a window of layers centred on the layer.
    Mlp,
    /// The attention output, over a window of layers.
    Attn,
}

impl TraceKind {
    pub const ALL: [TraceKind; 3] = [TraceKind::Hidden, TraceKind::Mlp, TraceKind::Attn];

    pub fn name(self) -> &'static str {
        match self {
            TraceKind::Hidden => "hidden",
            TraceKind::Mlp => "mlp",
            TraceKind::Attn => "attn",
        }
    }

    fn site(self, l: usize) -> Site {
        match self {
            TraceKind::Hidden => Site::Block(l),
            TraceKind::Mlp => Site::Mlp(l),
            TraceKind::Attn => Site::Attn(l),
        }
    }
}

impl std::str::FromStr for TraceKind {
    type Err = LociError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "hidden" => Ok(TraceKind::Hidden),
            "mlp" => Ok(TraceKind::Mlp),
            "attn" => Ok(TraceKind::Attn),
            _ => Err(LociError::input(format!(
                "unknown trace kind {s:?} (hidden, mlp, attn)"
            ))),
        }
    }
}

fn default_kinds() -> Vec<TraceKind> {
    TraceKind::ALL.to_vec()
}
fn default_samples() -> usize {
    10
}
fn default_window() -> usize {
    10
}
fn default_seed() -> u64 {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TraceRequest {
    pub prompt: String,
    pub subject: String,
    /// The traced next token (a leading space is added unless present); default: the clean top-1.
    #[serde(default)]
    pub answer: Option<String>,
    #[serde(default = "default_kinds")]
    pub kinds: Vec<TraceKind>,
    #[serde(default = "default_samples")]
    pub samples: usize,
    #[serde(default = "default_window")]
    pub window: usize,
    #[serde(default)]
    pub noise: NoiseSpec,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Explain p(the whole answer) = Π p(y_j | prompt, y_<j) instead of its first token's
    /// probability (needs `answer`).
    #[serde(default)]
    pub full_answer: bool,
}

impl TraceRequest {
    pub fn new(prompt: impl Into<String>, subject: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            subject: subject.into(),
            answer: None,
            kinds: default_kinds(),
            samples: default_samples(),
            window: default_window(),
            noise: NoiseSpec::default(),
            seed: default_seed(),
            full_answer: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AnswerToken {
    /// The (first) answer token.
    pub id: u32,
    /// Its text; with `full_answer`, the whole answer's.
    pub token: String,
    /// With `full_answer`, every token of the answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<u32>,
}

/// How much computation a trace did, in token-layers (one token through one block, per row).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TraceWork {
    pub token_layers: u64,
    /// What the reference algorithm (full batch of samples + 1 rows per cell) would have done.
    pub naive_token_layers: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TraceResult {
    pub model: String,
    pub prompt: String,
    pub subject: String,
    pub tokens: Vec<String>,
    pub subject_range: [usize; 2],
    pub answer: AnswerToken,
    pub high: f32,
    pub low: f32,
    pub noise: f64,
    pub samples: usize,
    pub window: usize,
    /// Per kind, `[tokens][layers]` probabilities of the answer with that state restored.
    pub scores: BTreeMap<TraceKind, Vec<Vec<f32>>>,
    /// Per kind, Hase et al.'s per-layer effect: max over tokens of the fraction restored.
    pub tracing_effect: BTreeMap<TraceKind, Vec<f32>>,
    /// The same at the last subject token only.
    pub tracing_effect_subject_last: BTreeMap<TraceKind, Vec<f32>>,
    pub work: TraceWork,
    pub seconds: f64,
}

/// What is known once the clean and corrupted runs are done, before any row: enough for a UI
/// to lay out the grid.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TraceHeader {
    pub tokens: Vec<String>,
    pub subject_range: [usize; 2],
    pub answer: AnswerToken,
    pub high: f32,
    pub low: f32,
    pub noise: f64,
    pub n_layer: usize,
    pub kinds: Vec<TraceKind>,
    pub total_rows: usize,
}

impl TraceResult {
    /// A result laid out from a header, every cell at `low`: what a UI draws before rows arrive.
    pub fn from_header(h: &TraceHeader, model: &str, req: &TraceRequest) -> Self {
        let grid = vec![vec![h.low; h.n_layer]; h.tokens.len()];
        let per_kind = |v: Vec<f32>| h.kinds.iter().map(|k| (*k, v.clone())).collect();
        TraceResult {
            model: model.to_string(),
            prompt: req.prompt.clone(),
            subject: req.subject.clone(),
            tokens: h.tokens.clone(),
            subject_range: h.subject_range,
            answer: h.answer.clone(),
            high: h.high,
            low: h.low,
            noise: h.noise,
            samples: req.samples,
            window: req.window,
            scores: h.kinds.iter().map(|k| (*k, grid.clone())).collect(),
            tracing_effect: per_kind(vec![0.0; h.n_layer]),
            tracing_effect_subject_last: per_kind(vec![0.0; h.n_layer]),
            work: TraceWork::default(),
            seconds: 0.0,
        }
    }

    /// Puts a finished row in place and refreshes that kind's tracing effects.
    pub fn set_row(&mut self, kind: TraceKind, token: usize, scores: Vec<f32>) {
        let Some(grid) = self.scores.get_mut(&kind) else {
            return;
        };
        if token >= grid.len() {
            return;
        }
        grid[token] = scores;
        let grid = &self.scores[&kind];
        self.tracing_effect
            .insert(kind, tracing_effect(grid, self.high, self.low, None));
        let last = self.subject_range[1].saturating_sub(1);
        self.tracing_effect_subject_last
            .insert(kind, tracing_effect(grid, self.high, self.low, Some(last)));
    }
}

/// Receives rows of a trace as they finish; returning `false` cancels the trace.
pub trait TraceObserver {
    fn on_start(&mut self, _header: &TraceHeader) {}
    fn on_row(&mut self, _kind: TraceKind, _token: usize, _scores: &[f32]) -> bool {
        true
    }
}

/// An observer that only counts.
pub struct Quiet;
impl TraceObserver for Quiet {}

/// Everything the cells of one trace share: the clean states and the corrupted run.
struct Prepared {
    /// The prompt, then (with `full_answer`) all answer tokens but the last.
    ids: Vec<u32>,
    prompt_len: usize,
    range: (usize, usize),
    /// The explained tokens: read out at the last `answer.len()` positions.
    answer: Vec<u32>,
    high: f32,
    low: f32,
    noise: Tensor,
    scale: f64,
    clean: Capture,
    /// Attention and MLP outputs of the corrupted run.
    corrupt: Capture,
    /// Residual input of each layer in the corrupted run, `[samples, T, d]`; index `n_layer` is
    /// the last block's output.
    resid_in: Vec<Tensor>,
    kv: KvCache,
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

/// Adds `noise` (`[samples, e-b, d]`) to the subject embeddings of rows `first_row..`.
fn noise_hook(noise: &Tensor, range: (usize, usize), first_row: usize) -> impl Hook + '_ {
    FnHook(move |site: Site, x: &Tensor| {
        if site != Site::Embed {
            return Ok(None);
        }
        let (b, t, _) = x.dims3()?;
        let (s, e) = range;
        let rows = noise.dim(0)?;
        debug_assert_eq!(first_row + rows, b);
        let target = x.narrow(0, first_row, rows)?.narrow(1, s, e - s)?;
        let noised = (target + noise.to_dtype(x.dtype())?)?;
        let mut parts = Vec::new();
        if first_row > 0 {
            parts.push(x.narrow(0, 0, first_row)?);
        }
        let row_block = Tensor::cat(
            &[
                x.narrow(0, first_row, rows)?.narrow(1, 0, s)?,
                noised,
                x.narrow(0, first_row, rows)?.narrow(1, e, t - e)?,
            ],
            1,
        )?;
        parts.push(row_block);
        Ok(Some(Tensor::cat(&parts, 0)?))
    })
}

fn prepare(lm: &LoadedModel, req: &TraceRequest, embedding_std: Option<f64>) -> Result<Prepared> {
    validate(lm, req)?;
    let m = &lm.model;
    let mut ids = lm.encode_prompt(&req.prompt)?;
    let prompt_len = ids.len();
    let range = subject_range(&lm.tokenizer, &ids, &req.subject)?;
    let (n, d) = (m.n_layer(), m.cfg.d_model);
    let scale = req.noise.scale(embedding_std)?;
    let answer_ids = match &req.answer {
        None => None,
        Some(a) => {
            let ids = lm.tokenizer.encode_plain(&crate::edit::rome::spaced(a))?;
            if ids.is_empty() {
                return Err(LociError::input(format!(
                    "the answer {a:?} tokenizes to nothing"
                )));
            }
            Some(ids)
        }
    };
    if req.full_answer {
        let a = answer_ids.as_ref().expect("validated");
        ids.extend(&a[..a.len() - 1]);
        if ids.len() > m.cfg.max_positions {
            return Err(LociError::input(
                "prompt and answer exceed the model's context",
            ));
        }
    }

    let all_sites: Vec<Site> = (0..n)
        .flat_map(|l| [Site::Block(l), Site::Mlp(l), Site::Attn(l)])
        .collect();
    let mut clean = Capture::new(all_sites);
    let clean_ids = m.ids_tensor(std::slice::from_ref(&ids))?;
    let answer: Vec<u32> = match (&answer_ids, req.full_answer) {
        (Some(a), true) => a.clone(),
        (Some(a), false) => vec![a[0]],
        (None, _) => vec![],
    };
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

    let noise = Tensor::from_vec(
        req.noise
            .draw(scale, req.samples, range.1 - range.0, d, req.seed),
        (req.samples, range.1 - range.0, d),
        &m.device,
    )?;
    let rows: Vec<Vec<u32>> = vec![ids.clone(); req.samples];
    let mut corrupt =
        Capture::new((0..n).flat_map(|l| [Site::Block(l), Site::Mlp(l), Site::Attn(l)]));
    let mut kv = KvCache::default();
    let mut embed_cap = Capture::new([Site::Embed]);
    let low_logits = {
        let mut nh = noise_hook(&noise, range, 0);
        let mut chain = Chain(vec![&mut nh, &mut embed_cap, &mut corrupt]);
        readout_logits(m, &m.ids_tensor(&rows)?, &mut chain, Some(&mut kv), reads)?
    };
    let low = answer_prob(&low_logits, &answer, 1)?[0];
    let mut resid_in = Vec::with_capacity(n + 1);
    let emb = embed_cap.get(Site::Embed)?.clone();
    resid_in.push(match &m.wpe {
        Some(wpe) => emb.broadcast_add(&wpe.narrow(0, 0, ids.len())?)?,
        None => emb,
    });
    for l in 0..n {
        resid_in.push(corrupt.get(Site::Block(l))?.clone());
    }
    Ok(Prepared {
        ids,
        prompt_len,
        range,
        answer,
        high,
        low,
        noise,
        scale,
        clean,
        corrupt,
        resid_in,
        kv,
    })
}

/// f32 logits `[rows, reads, vocab]` at the last `reads` positions of `ids`.
fn readout_logits(
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
fn answer_prob(logits: &Tensor, answer: &[u32], groups: usize) -> Result<Vec<f32>> {
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

/// Layers `[lo, hi)` restored for a windowed cell at layer `l` (spec §3.5).
pub fn window_layers(l: usize, window: usize, n_layer: usize) -> (usize, usize) {
    (
        l.saturating_sub(window / 2),
        (l + window.div_ceil(2)).min(n_layer),
    )
}

/// The share of a block's FLOPs that computing only keys and values costs.
fn kv_only_share(cfg: &crate::config::ModelConfig) -> f64 {
    let w = cfg.block_weights();
    w.kv as f64 / w.total() as f64
}

/// One restoration, as the batched pass sees it: its kind, the layer whose input it first
/// changes, that input (positions t..), and the layers whose module output at t it still
/// overwrites.
struct Cell {
    kind: TraceKind,
    layer: usize,
    start: usize,
    restore: (usize, usize),
}

/// Scores of all layers' cells at token `t` for each of `kinds` (in that order), batched in one
/// pass (the fast path): the kinds' cells share every layer's matrix products. Adds the
/// computation done, in token-layers, to `work`.
fn trace_token(
    lm: &LoadedModel,
    p: &Prepared,
    kinds: &[TraceKind],
    t: usize,
    window: usize,
    work: &mut f64,
) -> Result<Vec<Vec<f32>>> {
    let m = &lm.model;
    let (n, big_t) = (m.n_layer(), p.ids.len());
    // Positions read out: the last `reads` (t < prompt_len keeps them inside the suffix).
    let reads = p.answer.len();
    if t < p.range.0 {
        // Before the subject the corrupted run equals the clean one: nothing to restore.
        return Ok(vec![vec![p.low; n]; kinds.len()]);
    }
    let samples = p.noise.dim(0)?;
    let suffix = big_t - t;
    let d = m.cfg.d_model;
    // A restored module output at layer lo changes nothing at later positions of layer lo (they
    // read that layer's inputs), so windowed cells enter at lo + 1 with only position t changed.
    let mut cells: Vec<Cell> = kinds
        .iter()
        .flat_map(|&kind| (0..n).map(move |l| (kind, l)))
        .map(|(kind, l)| match kind {
            TraceKind::Hidden => Cell {
                kind,
                layer: l,
                start: l + 1,
                restore: (0, 0),
            },
            _ => {
                let (lo, hi) = window_layers(l, window, n);
                Cell {
                    kind,
                    layer: l,
                    start: lo + 1,
                    restore: (lo + 1, hi),
                }
            }
        })
        .collect();
    cells.sort_by_key(|c| c.start);

    let at_t = |x: &Tensor| x.narrow(1, t, 1);
    let clean_at = |site: Site| -> Result<Tensor> {
        Ok(at_t(p.clean.get(site)?)?
            .broadcast_as((samples, 1, d))?
            .contiguous()?)
    };
    // The residual entering layer `c.start` at positions t..: corrupted, except at t.
    let entry = |c: &Cell| -> Result<Tensor> {
        let changed = match c.kind {
            TraceKind::Hidden => clean_at(Site::Block(c.layer))?,
            kind => {
                let lo = c.start - 1;
                let block = &m.blocks[lo];
                let x = at_t(&p.resid_in[lo])?;
                let (a, mo) = if kind == TraceKind::Mlp {
                    (
                        at_t(p.corrupt.get(Site::Attn(lo))?)?,
                        clean_at(Site::Mlp(lo))?,
                    )
                } else {
                    let a = clean_at(Site::Attn(lo))?;
                    let mo = block.mlp_output(&x, &a)?;
                    (a, mo)
                };
                block.combine(&x, &a, &mo)?
            }
        };
        if suffix == 1 {
            return Ok(changed);
        }
        let rest = p.resid_in[c.start].narrow(1, t + 1, suffix - 1)?;
        Ok(Tensor::cat(&[changed, rest], 1)?)
    };

    let kv_only = kv_only_share(&m.cfg);
    let mut order: Vec<usize> = Vec::with_capacity(cells.len());
    let mut x: Option<Tensor> = None;
    let mut next = 0;
    for j in 0..n {
        let mut joining = Vec::new();
        while next < cells.len() && cells[next].start == j {
            joining.push(entry(&cells[next])?);
            order.push(next);
            next += 1;
        }
        if !joining.is_empty() {
            let mut parts: Vec<Tensor> = x.take().into_iter().collect();
            parts.extend(joining);
            x = Some(Tensor::cat(&parts, 0)?);
        }
        let Some(cur) = x.take() else { continue };
        let rows = cur.dim(0)?;
        let groups = rows / samples;
        let mut cache = LayerCache::default();
        if t > 0 {
            let prefix = |c: &Option<Tensor>| -> Result<Option<Tensor>> {
                let c = c
                    .as_ref()
                    .ok_or_else(|| LociError::input("missing corrupted cache"))?;
                let c = c.narrow(2, 0, t)?;
                Ok(Some(if groups > 1 {
                    c.repeat((groups, 1, 1, 1))?
                } else {
                    c
                }))
            };
            cache.k = prefix(&p.kv.layers[j].k)?;
            cache.v = prefix(&p.kv.layers[j].v)?;
        }
        let block = &m.blocks[j];
        if j == n - 1 && suffix > reads {
            // The last layer matters only at the read-out positions; the others just lend them
            // their keys and values (a restoration at t before them changes neither).
            let head = cur.narrow(1, 0, suffix - reads)?;
            let (k, v) = block.attn.keys_values(&block.ln1.forward(&head)?, t)?;
            let join = |prev: Option<Tensor>, new: Tensor| -> Result<Option<Tensor>> {
                Ok(Some(match prev {
                    Some(p) => Tensor::cat(&[p, new], 2)?,
                    None => new,
                }))
            };
            cache.k = join(cache.k.take(), k)?;
            cache.v = join(cache.v.take(), v)?;
            *work += rows as f64 * (reads as f64 + (suffix - reads) as f64 * kv_only);
            let last = cur.narrow(1, suffix - reads, reads)?;
            let out = block
                .forward(
                    j,
                    &last,
                    big_t - reads,
                    Some(&mut cache),
                    &mut crate::hooks::NoHook,
                )?
                .ok_or_else(|| LociError::input("forward pass stopped early"))?;
            x = Some(out);
            break;
        }
        // Rows of windowed cells that cover layer j get the clean module output (of their kind)
        // at position t.
        let restores: Vec<(Site, Vec<bool>, Tensor)> = [TraceKind::Attn, TraceKind::Mlp]
            .into_iter()
            .filter(|k| kinds.contains(k))
            .map(|kind| -> Result<Option<(Site, Vec<bool>, Tensor)>> {
                let rows: Vec<bool> = order
                    .iter()
                    .map(|&ci| {
                        let c = &cells[ci];
                        c.kind == kind && (c.restore.0..c.restore.1).contains(&j)
                    })
                    .collect();
                if !rows.iter().any(|r| *r) {
                    return Ok(None);
                }
                let site = kind.site(j);
                Ok(Some((site, rows, at_t(p.clean.get(site)?)?)))
            })
            .filter_map(Result::transpose)
            .collect::<Result<_>>()?;
        let mut hook = FnHook(|s: Site, a: &Tensor| -> Result<Option<Tensor>> {
            let Some((_, restoring, clean)) = restores.iter().find(|(site, ..)| *site == s) else {
                return Ok(None);
            };
            let mask: Vec<u8> = restoring
                .iter()
                .flat_map(|&r| std::iter::repeat_n(r as u8, samples))
                .collect();
            let mask = Tensor::from_vec(mask, (rows, 1, 1), a.device())?.broadcast_as((
                rows,
                1,
                a.dim(2)?,
            ))?;
            let first = a.narrow(1, 0, 1)?;
            let clean = clean.to_dtype(a.dtype())?.broadcast_as(first.shape())?;
            let first = mask.where_cond(&clean, &first)?;
            Ok(Some(if suffix > 1 {
                Tensor::cat(&[first, a.narrow(1, 1, suffix - 1)?], 1)?
            } else {
                first
            }))
        });
        *work += (rows * suffix) as f64;
        let out = block
            .forward(j, &cur, t, Some(&mut cache), &mut hook)?
            .ok_or_else(|| LociError::input("forward pass stopped early"))?;
        x = Some(out);
    }
    // Read-out positions of every cell; cells entering after the last layer change them directly.
    let last_of = |y: &Tensor| -> Result<Tensor> { Ok(y.narrow(1, y.dim(1)? - reads, reads)?) };
    let mut finals: Vec<Tensor> = x.iter().map(last_of).collect::<Result<_>>()?;
    while next < cells.len() {
        finals.push(last_of(&entry(&cells[next])?)?);
        order.push(next);
        next += 1;
    }
    let last = Tensor::cat(&finals, 0)?;
    let probs = answer_prob(&m.final_logits(&last)?, &p.answer, order.len())?;
    let mut scores = vec![vec![0f32; n]; kinds.len()];
    for (slot, &ci) in order.iter().enumerate() {
        let c = &cells[ci];
        let k = kinds
            .iter()
            .position(|&k| k == c.kind)
            .expect("a requested kind");
        scores[k][c.layer] = probs[slot];
    }
    Ok(scores)
}

/// Computes trace rows unit by unit — a unit is some kinds at one token, computed in one pass —
/// handing each row to `emit` as it finishes (in the calling thread); `emit` returning `false`
/// cancels. Returns the token-layers computed.
fn run_items(
    lm: &LoadedModel,
    p: &Prepared,
    window: usize,
    units: &[(&[TraceKind], usize)],
    workers: usize,
    emit: &mut dyn FnMut(TraceKind, usize, Vec<f32>) -> bool,
) -> Result<f64> {
    let mut work = 0.0;
    let mut emit_all = |kinds: &[TraceKind], t: usize, rows: Vec<Vec<f32>>| -> Result<()> {
        for (&kind, row) in kinds.iter().zip(rows) {
            if !emit(kind, t, row) {
                return Err(LociError::Cancelled);
            }
        }
        Ok(())
    };
    if workers <= 1 || cfg!(target_arch = "wasm32") || units.len() < 2 {
        for &(kinds, t) in units {
            let rows = trace_token(lm, p, kinds, t, window, &mut work)?;
            emit_all(kinds, t, rows)?;
        }
        return Ok(work);
    }
    // Longest rows (earliest tokens) first, pulled from a shared counter: a balanced split.
    let mut order = units.to_vec();
    order.sort_by_key(|u| u.1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    type Done<'k> = (&'k [TraceKind], usize, Vec<Vec<f32>>, f64);
    let (tx, rx) = std::sync::mpsc::channel::<Result<Done>>();
    std::thread::scope(|scope| {
        for _ in 0..workers.min(units.len()) {
            let tx = tx.clone();
            let (next, stop, order) = (&next, &stop, &order);
            scope.spawn(move || {
                use std::sync::atomic::Ordering::Relaxed;
                while !stop.load(Relaxed) {
                    let i = next.fetch_add(1, Relaxed);
                    let Some(&(kinds, t)) = order.get(i) else {
                        break;
                    };
                    let mut w = 0.0;
                    let res = trace_token(lm, p, kinds, t, window, &mut w);
                    let failed = res.is_err();
                    if tx.send(res.map(|rows| (kinds, t, rows, w))).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut outcome = Ok(());
        for msg in rx {
            match msg {
                Ok((kinds, t, rows, w)) => {
                    work += w;
                    if outcome.is_ok() {
                        outcome = emit_all(kinds, t, rows);
                    }
                }
                Err(e) => {
                    if outcome.is_ok() {
                        outcome = Err(e);
                    }
                }
            }
            if outcome.is_err() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        outcome
    })?;
    Ok(work)
}

/// A trace ready for its rows: the clean and corrupted runs done. Rows can be computed in any
/// order, anywhere the same model and request are (the web app spreads them over workers, each
/// with its own plan: the runs are deterministic given the seed).
pub struct TracePlan {
    p: Prepared,
    req: TraceRequest,
    pub header: TraceHeader,
}

impl TracePlan {
    /// Every row of the trace, `(kind, token)`, kind by kind.
    pub fn rows(&self) -> Vec<(TraceKind, usize)> {
        let big_t = self.p.prompt_len;
        self.req
            .kinds
            .iter()
            .flat_map(|&k| (0..big_t).map(move |t| (k, t)))
            .collect()
    }
}

impl LoadedModel {
    pub fn trace_plan(&self, req: &TraceRequest, embedding_std: Option<f64>) -> Result<TracePlan> {
        let p = prepare(self, req, embedding_std)?;
        let header = header(self, req, &p)?;
        Ok(TracePlan {
            p,
            req: req.clone(),
            header,
        })
    }

    /// One row of a planned trace: the answer's probability per restored layer at `token`.
    pub fn trace_row(&self, plan: &TracePlan, kind: TraceKind, token: usize) -> Result<Vec<f32>> {
        if token >= plan.p.prompt_len || !plan.req.kinds.contains(&kind) {
            return Err(LociError::input(format!(
                "the trace has no {} row at token {token}",
                kind.name()
            )));
        }
        let mut work = 0.0;
        Ok(trace_token(self, &plan.p, &[kind], token, plan.req.window, &mut work)?.remove(0))
    }

    /// Runs a causal trace (the fast path). `embedding_std` is needed for relative noise.
    /// `workers` > 1 spreads the token rows over that many threads (native only): each thread
    /// runs its own single-threaded kernels, which uses the cores better than threading inside
    /// every matrix product.
    pub fn trace(
        &self,
        req: &TraceRequest,
        embedding_std: Option<f64>,
        obs: &mut dyn TraceObserver,
        workers: usize,
    ) -> Result<TraceResult> {
        let started = crate::clock::now_seconds();
        let plan = self.trace_plan(req, embedding_std)?;
        obs.on_start(&plan.header);
        let TracePlan { p, req, header } = plan;
        let req = &req;
        let (n, big_t) = (self.model.n_layer(), p.prompt_len);
        let mut grids: BTreeMap<TraceKind, Vec<Vec<f32>>> = req
            .kinds
            .iter()
            .map(|k| (*k, vec![vec![]; big_t]))
            .collect();
        // One worker (a GPU's case) takes every kind of a token in one pass: bigger batches,
        // fewer passes. Several share out single rows: an even split, steady progress, and a
        // cancellation that waits for one row only.
        let units: Vec<(&[TraceKind], usize)> = if workers <= 1 {
            (0..big_t).map(|t| (&req.kinds[..], t)).collect()
        } else {
            req.kinds
                .iter()
                .flat_map(|k| (0..big_t).map(move |t| (std::slice::from_ref(k), t)))
                .collect()
        };
        let work = run_items(
            self,
            &p,
            req.window,
            &units,
            workers,
            &mut |kind, t, row| {
                let keep = obs.on_row(kind, t, &row);
                grids.get_mut(&kind).unwrap()[t] = row;
                keep
            },
        )?;
        Ok(finish(
            self,
            req,
            &header,
            grids,
            TraceWork {
                // The clean run and the corrupted run, then the cells.
                token_layers: ((req.samples + 1) * p.ids.len() * n) as u64 + work.round() as u64,
                naive_token_layers: naive_work(req, big_t, n),
            },
            started,
        ))
    }

    pub fn trace_naive(
        &self,
        req: &TraceRequest,
        embedding_std: Option<f64>,
    ) -> Result<TraceResult> {
        let started = crate::clock::now_seconds();
        let p = prepare(self, req, embedding_std)?;
        let m = &self.model;
        let (n, big_t) = (m.n_layer(), p.prompt_len);
        let rows = m.ids_tensor(&vec![p.ids.clone(); req.samples + 1])?;
        let mut scores = BTreeMap::new();
        for &kind in &req.kinds {
            let mut grid = vec![vec![0f32; n]; big_t];
            for (t, row) in grid.iter_mut().enumerate() {
                for (l, cell) in row.iter_mut().enumerate() {
                    let sites: Vec<Site> = match kind {
                        TraceKind::Hidden => vec![Site::Block(l)],
                        _ => {
                            let (lo, hi) = window_layers(l, req.window, n);
                            (lo..hi).map(|j| kind.site(j)).collect()
                        }
                    };
                    let mut restore = FnHook(|s: Site, x: &Tensor| -> Result<Option<Tensor>> {
                        if !sites.contains(&s) {
                            return Ok(None);
                        }
                        let clean = x.narrow(0, 0, 1)?.narrow(1, t, 1)?;
                        let cells: Vec<_> = (1..=req.samples)
                            .map(|r| (r, t, clean.squeeze(0).unwrap().squeeze(0).unwrap()))
                            .collect();
                        Ok(Some(crate::hooks::patch_rows(x, &cells, false)?))
                    });
                    let mut nh = noise_hook(&p.noise, p.range, 1);
                    let mut chain = Chain(vec![&mut nh, &mut restore]);
                    let logits = readout_logits(m, &rows, &mut chain, None, p.answer.len())?;
                    *cell = answer_prob(&logits.narrow(0, 1, req.samples)?, &p.answer, 1)?[0];
                }
            }
            scores.insert(kind, grid);
        }
        let work = naive_work(req, big_t, n);
        Ok(finish(
            self,
            req,
            &header(self, req, &p)?,
            scores,
            TraceWork {
                token_layers: work,
                naive_token_layers: work,
            },
            started,
        ))
    }
}

fn naive_work(req: &TraceRequest, big_t: usize, n: usize) -> u64 {
    (req.kinds.len() * big_t * n * (req.samples + 1) * big_t * n) as u64
}

/// What a UI needs before any row, from the clean and corrupted runs.
fn header(lm: &LoadedModel, req: &TraceRequest, p: &Prepared) -> Result<TraceHeader> {
    Ok(TraceHeader {
        tokens: lm.tokenizer.token_strings(&p.ids[..p.prompt_len])?,
        subject_range: [p.range.0, p.range.1],
        answer: AnswerToken {
            id: p.answer[0],
            token: lm.tokenizer.decode(&p.answer)?,
            ids: if req.full_answer {
                p.answer.clone()
            } else {
                vec![]
            },
        },
        high: p.high,
        low: p.low,
        noise: p.scale,
        n_layer: lm.model.n_layer(),
        kinds: req.kinds.clone(),
        total_rows: req.kinds.len() * p.prompt_len,
    })
}

/// The result laid out from the header, with every row's scores and their tracing effects.
fn finish(
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
