//! What a trace is asked and what it answers: the kinds of state restored, the request with its
//! defaults, the result grid, the header a UI lays out before any row, and the observer that
//! receives rows as they finish.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::effect::tracing_effect;
use super::noise::NoiseSpec;
use crate::error::{LociError, Result};
use crate::hooks::Site;

/// Which state of the clean run a trace restores into the corrupted one.
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
    /// Every kind: hidden, MLP, attention.
    pub const ALL: [TraceKind; 3] = [TraceKind::Hidden, TraceKind::Mlp, TraceKind::Attn];

    /// The kind's lowercase name (`hidden`, `mlp`, `attn`), as requests and files spell it.
    pub fn name(self) -> &'static str {
        match self {
            TraceKind::Hidden => "hidden",
            TraceKind::Mlp => "mlp",
            TraceKind::Attn => "attn",
        }
    }

    /// The hook site of this kind at layer `l`.
    pub(crate) fn site(self, l: usize) -> Site {
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

/// How a trace's cells were found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceMethod {
    /// Causal tracing: every cell restored and run (Meng et al.).
    #[default]
    Exact,
    /// Attribution patching: every cell's first-order estimate from one backward pass.
    Attribution,
    /// Knowledge neurons (Dai et al.): integrated gradients of p(answer) over the MLP neurons
    /// at the subject's last token and the prompt's last; each cell the probability its
    /// neurons carry.
    Neurons,
}

impl TraceMethod {
    /// Every method, in the order menus list them.
    pub const ALL: [TraceMethod; 3] = [
        TraceMethod::Exact,
        TraceMethod::Attribution,
        TraceMethod::Neurons,
    ];

    /// `exact`, `attribution` or `neurons`, as the command line and the API spell it.
    pub fn name(self) -> &'static str {
        match self {
            TraceMethod::Exact => "exact",
            TraceMethod::Attribution => "attribution",
            TraceMethod::Neurons => "neurons",
        }
    }

    fn is_exact(&self) -> bool {
        *self == TraceMethod::Exact
    }
}

impl std::str::FromStr for TraceMethod {
    type Err = LociError;
    fn from_str(s: &str) -> Result<Self> {
        TraceMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                LociError::input(format!(
                    "unknown trace method {s:?} (exact, attribution, neurons)"
                ))
            })
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

/// What to trace: the prompt, the subject to corrupt, and how (kinds, samples, window, noise,
/// seed). Everything but `prompt` and `subject` has a default when deserialised.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TraceRequest {
    /// The whole prompt, subject written out (not a `{}` template).
    pub prompt: String,
    /// The text whose token embeddings are corrupted; it must occur in the prompt.
    pub subject: String,
    /// The traced next token (a leading space is added unless present); default: the clean top-1.
    #[serde(default)]
    pub answer: Option<String>,
    /// The kinds traced, each once (default: all three).
    #[serde(default = "default_kinds")]
    pub kinds: Vec<TraceKind>,
    /// Corrupted runs (noise draws) averaged per cell, 1 to 64 (default 10); with knowledge
    /// neurons, the points of the integrated-gradient path (Dai et al. take 20).
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Layers restored together around each layer for the MLP and attention kinds (default 10).
    #[serde(default = "default_window")]
    pub window: usize,
    /// The corruption's strength (default: 3× the subject embeddings' standard deviation).
    #[serde(default)]
    pub noise: NoiseSpec,
    /// Seed of the noise (default 1): one seed, one corruption for every cell.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Explain p(the whole answer) = Π p(y_j | prompt, y_<j) instead of its first token's
    /// probability (needs `answer`).
    #[serde(default)]
    pub full_answer: bool,
}

impl TraceRequest {
    /// A request with every default: all kinds, 10 samples, a window of 10, noise 3x, seed 1.
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

/// The answer a trace explains.
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
    /// What this trace computed.
    pub token_layers: u64,
    /// What the reference algorithm (full batch of samples + 1 rows per cell) would have done.
    pub naive_token_layers: u64,
}

/// A finished trace: per kind, the answer's probability with each (token, layer) state
/// restored, and the tracing effects derived from it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TraceResult {
    /// The traced model's name.
    pub model: String,
    /// The traced prompt.
    pub prompt: String,
    /// The corrupted subject.
    pub subject: String,
    /// The prompt's tokens as text: the grid's rows.
    pub tokens: Vec<String>,
    /// The subject's tokens, `[first, end)`.
    pub subject_range: [usize; 2],
    /// The explained answer.
    pub answer: AnswerToken,
    /// p(answer) on the clean run.
    pub high: f32,
    /// p(answer) with the subject corrupted, averaged over the samples.
    pub low: f32,
    /// The noise scale used, in embedding units.
    pub noise: f64,
    /// Corrupted runs averaged per cell.
    pub samples: usize,
    /// Layers restored together for the MLP and attention kinds.
    pub window: usize,
    /// Per kind, `[tokens][layers]` probabilities of the answer with that state restored
    /// (attribution patching's estimates of them can leave [0, 1]).
    pub scores: BTreeMap<TraceKind, Vec<Vec<f32>>>,
    /// Per kind, Hase et al.'s per-layer effect: max over tokens of the fraction restored.
    pub tracing_effect: BTreeMap<TraceKind, Vec<f32>>,
    /// The same at the last subject token only.
    pub tracing_effect_subject_last: BTreeMap<TraceKind, Vec<f32>>,
    /// The computation done, and what the reference algorithm would have done.
    pub work: TraceWork,
    /// Wall-clock seconds the trace took.
    pub seconds: f64,
    /// Exact causal tracing, attribution patching's estimate of it, or knowledge neurons.
    #[serde(default, skip_serializing_if = "TraceMethod::is_exact")]
    pub method: TraceMethod,
    /// With knowledge neurons: the neurons whose attribution passes the coarse threshold (a
    /// fifth of the largest at their token), largest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub neurons: Vec<KnowledgeNeuron>,
}

/// One knowledge neuron: an MLP neuron whose integrated-gradient attribution to p(answer) at a
/// token passes the coarse threshold.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KnowledgeNeuron {
    /// The token (the grid's row) it was attributed at.
    pub token: usize,
    /// Its layer.
    pub layer: usize,
    /// Its index among the layer's `d_ff` neurons (the down-projection's input).
    pub neuron: usize,
    /// Its attribution: the part of p(answer) integrated gradients give it.
    pub attribution: f32,
}

/// What is known once the clean and corrupted runs are done, before any row: enough for a UI
/// to lay out the grid.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TraceHeader {
    /// The prompt's tokens as text: the grid's rows.
    pub tokens: Vec<String>,
    /// The subject's tokens, `[first, end)`.
    pub subject_range: [usize; 2],
    /// The explained answer.
    pub answer: AnswerToken,
    /// p(answer) on the clean run.
    pub high: f32,
    /// p(answer) with the subject corrupted, averaged over the samples.
    pub low: f32,
    /// The noise scale used, in embedding units.
    pub noise: f64,
    /// The model's layers: the grid's columns.
    pub n_layer: usize,
    /// The traced kinds, in the request's order.
    pub kinds: Vec<TraceKind>,
    /// Rows the trace will emit: kinds × prompt tokens.
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
            method: TraceMethod::Exact,
            neurons: vec![],
        }
    }

    /// Each cell's change of p(answer) from `low` for `kind`, token by token (what exact
    /// tracing and attribution patching are compared on).
    pub fn cell_effects(&self, kind: TraceKind) -> Vec<f64> {
        let low = self.low as f64;
        self.scores[&kind]
            .iter()
            .flatten()
            .map(|&p| p as f64 - low)
            .collect()
    }

    /// The header a trace with this result began with (for UIs fed a finished result).
    pub fn header(&self) -> TraceHeader {
        let n_layer = self
            .scores
            .values()
            .next()
            .and_then(|g| g.first())
            .map_or(0, Vec::len);
        TraceHeader {
            tokens: self.tokens.clone(),
            subject_range: self.subject_range,
            answer: self.answer.clone(),
            high: self.high,
            low: self.low,
            noise: self.noise,
            n_layer,
            kinds: self.scores.keys().copied().collect(),
            total_rows: self.scores.len() * self.tokens.len(),
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
    /// Called once, with the header, before any row.
    fn on_start(&mut self, _header: &TraceHeader) {}
    /// Called with each finished row: p(answer) per restored layer at `token`. Returning
    /// `false` cancels the trace.
    fn on_row(&mut self, _kind: TraceKind, _token: usize, _scores: &[f32]) -> bool {
        true
    }
}

/// An observer that only counts.
pub struct Quiet;
impl TraceObserver for Quiet {}
