//! ROME (Meng et al. 2022): a rank-one update of one MLP down-projection that makes the model
//! map a subject's key k* to a new value v* (spec §4).

use candle_core::{DType, IndexOp, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use super::delta::{AppliedEdit, LayerDelta, WeightChange};
use super::stats::KeyStats;
use crate::error::{LociError, Result};
use crate::hooks::{Capture, Chain, FnHook, Site};
use crate::loader::LoadedModel;
use crate::model::layers::LayerCache;
use crate::model::{KvCache, LogitsAt};
use crate::rng::SplitMix64;
use crate::trace::noise::{subject_noise, SubjectNoise};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TargetStr {
    pub str: String,
    /// CounterFact's Wikidata id of the target (keys the attribute snippets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl TargetStr {
    pub fn new(s: impl Into<String>) -> Self {
        Self {
            str: s.into(),
            id: None,
        }
    }
}

/// CounterFact's `requested_rewrite`: `prompt` holds `{}` where the subject goes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RewriteRequest {
    pub prompt: String,
    pub subject: String,
    pub target_new: TargetStr,
    #[serde(default)]
    pub target_true: Option<TargetStr>,
    /// CounterFact's Wikidata relation (P-id), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation_id: Option<String>,
}

impl RewriteRequest {
    /// The prompt with the subject filled in.
    pub fn filled(&self) -> String {
        self.prompt.replacen("{}", &self.subject, 1)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.prompt.matches("{}").count() != 1 {
            return Err(LociError::input(format!(
                "the prompt {:?} must contain {{}} exactly once, where the subject goes",
                self.prompt
            )));
        }
        if self.subject.trim().is_empty() {
            return Err(LociError::input("the subject is empty"));
        }
        if self.target_new.str.trim().is_empty() {
            return Err(LociError::input("the new target is empty"));
        }
        Ok(())
    }
}

/// Targets are scored with a leading space, as ROME does.
pub fn spaced(target: &str) -> String {
    if target.starts_with(' ') {
        target.to_string()
    } else {
        format!(" {target}")
    }
}

/// Which key the closed-form update divides by (spec §4.6).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyMode {
    /// The paper's code: the bare prompt's key in the denominator (can blow up).
    Original,
    /// r-ROME: the template-averaged k* everywhere.
    #[default]
    Rrome,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RomeHparams {
    pub layer: usize,
    pub v_num_grad_steps: usize,
    pub v_lr: f64,
    pub v_weight_decay: f64,
    pub clamp_norm_factor: f64,
    pub kl_factor: f64,
    pub mom2_adjustment: bool,
    /// `(new tokens, count)` per group of context templates; ROME: 4×10 and 9×10.
    pub context_templates: Vec<(usize, usize)>,
    pub key_mode: KeyMode,
    pub seed: u64,
    /// Fact erasure lowers the target; fact forcing noises the subject while k* is read and v*
    /// optimised.
    #[serde(flatten)]
    pub goal: super::EditGoal,
}

/// Per-model defaults shipped with Loci (`core/hparams/rome/*.json`).
const HPARAM_FILES: [&str; 6] = [
    include_str!("../../hparams/rome/gpt2.json"),
    include_str!("../../hparams/rome/gpt2-medium.json"),
    include_str!("../../hparams/rome/gpt2-large.json"),
    include_str!("../../hparams/rome/gpt2-xl.json"),
    include_str!("../../hparams/rome/gpt-j-6b.json"),
    include_str!("../../hparams/rome/smollm2-135m.json"),
];

/// A shipped hyper-parameter file: the model shape it is for, then the method's settings.
#[derive(Deserialize)]
struct HparamFile<H> {
    family: crate::config::Family,
    n_layer: usize,
    d_model: usize,
    #[serde(flatten)]
    hparams: H,
}

/// The settings among `files` made for a model of this shape.
pub(crate) fn shipped_for<H: serde::de::DeserializeOwned>(
    files: &[&str],
    cfg: &crate::config::ModelConfig,
) -> Option<H> {
    files.iter().find_map(|text| {
        let f: HparamFile<H> = serde_json::from_str(text).expect("shipped hparams parse");
        (f.family == cfg.family && f.n_layer == cfg.n_layer && f.d_model == cfg.d_model)
            .then_some(f.hparams)
    })
}

impl RomeHparams {
    /// The shipped hyper-parameters for a model of this shape, if Loci has them.
    pub fn for_model(cfg: &crate::config::ModelConfig) -> Option<Self> {
        shipped_for(&HPARAM_FILES, cfg)
    }

    /// The official values (GPT-2 XL / GPT-J) at `layer`.
    pub fn at_layer(layer: usize) -> Self {
        Self {
            layer,
            v_num_grad_steps: 20,
            v_lr: 0.5,
            v_weight_decay: 0.5,
            clamp_norm_factor: 4.0,
            kl_factor: 0.0625,
            mom2_adjustment: true,
            context_templates: vec![(4, 10), (9, 10)],
            key_mode: KeyMode::Rrome,
            seed: 1,
            goal: super::EditGoal::default(),
        }
    }
}

/// What v*'s optimisation needs to know: where δ goes and how it is optimised.
#[derive(Clone, Debug)]
pub(crate) struct ValueSpec {
    /// ROME: the MLP output of its layer; MEMIT: the block output of its last layer.
    pub site: Site,
    pub steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub clamp_norm_factor: f64,
    pub kl_factor: f64,
    pub direction: super::Direction,
    /// The noise on the rewrite rows' subject embeddings.
    pub subject_noise: Option<SubjectNoise>,
}

impl RomeHparams {
    pub(crate) fn value_spec(&self) -> ValueSpec {
        ValueSpec {
            site: Site::Mlp(self.layer),
            steps: self.v_num_grad_steps,
            lr: self.v_lr,
            weight_decay: self.v_weight_decay,
            clamp_norm_factor: self.clamp_norm_factor,
            kl_factor: self.kl_factor,
            direction: self.goal.direction,
            subject_noise: self.goal.noise(self.seed),
        }
    }
}

/// An edit is a value: `W ← W + right · leftᵀ` on one layer's down-projection.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RomeEdit {
    pub layer: usize,
    /// u, `d_ff` wide (the key direction).
    pub left: Vec<f32>,
    /// `d_model` wide.
    pub right: Vec<f32>,
    pub request: RewriteRequest,
    pub hparams: RomeHparams,
    pub stats: RomeStats,
}

/// What the optimisation did, for reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RomeStats {
    pub losses: Vec<f32>,
    pub delta_norm: f32,
    pub division_factor: f32,
    pub templates: Vec<String>,
    /// v*, the value the edited layer now gives the key.
    pub target_value: Vec<f32>,
    /// Seconds per phase: templates, key (k* and u), value (v*), update.
    pub seconds: std::collections::BTreeMap<String, f64>,
}

/// The metadata stored beside an edit's vectors.
#[derive(Serialize, Deserialize)]
struct EditMeta {
    layer: usize,
    request: RewriteRequest,
    hparams: RomeHparams,
    stats: RomeStats,
}

impl RomeEdit {
    /// The rank-one change to the layer's weights.
    pub fn delta(&self) -> LayerDelta<'_> {
        LayerDelta {
            layer: self.layer,
            weight: WeightChange::LowRank {
                rank: 1,
                right: &self.right,
                left: &self.left,
            },
            bias: None,
        }
    }

    /// A small safetensors file: the two vectors, the request and settings in the metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let meta = EditMeta {
            layer: self.layer,
            request: self.request.clone(),
            hparams: self.hparams.clone(),
            stats: self.stats.clone(),
        };
        super::file::write(
            "loci_rome_edit",
            &meta,
            &[
                ("left".into(), vec![self.left.len()], &self.left),
                ("right".into(), vec![self.right.len()], &self.right),
            ],
        )
    }

    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let bad = |e: String| LociError::input(format!("not a Loci edit file: {e}"));
        let (meta, file): (EditMeta, _) =
            super::file::read(data, "loci_rome_edit", "no edit metadata", bad)?;
        let vec = |name: &str| -> Result<Vec<f32>> {
            match file.f32(name)? {
                (v, shape) if shape.len() == 1 => Ok(v),
                _ => Err(file.bad(format!("{name} is not an f32 vector"))),
            }
        };
        let (left, right) = (vec("left")?, vec("right")?);
        if left.iter().chain(&right).any(|x| !x.is_finite()) {
            return Err(file.bad("NaN or infinite values".into()));
        }
        Ok(Self {
            layer: meta.layer,
            left,
            right,
            request: meta.request,
            hparams: meta.hparams,
            stats: meta.stats,
        })
    }
}

/// The rows of v*'s batch that one thread runs: a contiguous slice of every per-row tensor.
struct ValueGroup {
    first_row: bool,
    resid_in: Tensor,
    caches: Vec<LayerCache>,
    mask: Tensor,
    labels: Tensor,
    n_labels: usize,
    /// Label cells (row within the group, suffix position), then the KL cell when `kl`.
    cells: Vec<(usize, usize)>,
    kl: bool,
}

/// What one group's forward pass gives: its part of the loss (a graph to differentiate) and
/// the read-outs the optimisation keeps from the first step.
struct GroupOut {
    /// The group's share of the mean NLL (a graph).
    nll: Tensor,
    nll_value: f32,
    /// The KL term, scaled, when the group holds the KL row (a graph).
    kl: Option<Tensor>,
    kl_value: f32,
    /// The optimised site's activation at row 0's subject-last token, before δ.
    value_at_row0: Option<Tensor>,
    kl_logp: Option<Tensor>,
}

/// The state one v* step shares with every group.
struct ValueStep<'a> {
    lm: &'a LoadedModel,
    site: Site,
    delta: &'a Tensor,
    n_labels_total: usize,
    kl_init: Option<&'a Tensor>,
    kl_factor: f64,
}

impl ValueStep<'_> {
    /// The group's rows from the site's layer up with δ added at the site at each row's
    /// subject-last token: Σ NLL / (all labels) + the KL term when the group holds the KL row.
    fn forward(&self, g: &ValueGroup) -> Result<GroupOut> {
        let m = &self.lm.model;
        let (site, d) = (self.site, m.cfg.d_model);
        let l = site.layer().expect("v* sites are in a layer");
        let mut value_at_row0: Option<Tensor> = None;
        let mut hook = FnHook(|s: Site, x: &Tensor| -> Result<Option<Tensor>> {
            if s != site {
                return Ok(None);
            }
            if g.first_row && value_at_row0.is_none() {
                value_at_row0 = Some(x.i((0, 0))?.to_dtype(DType::F32)?.detach());
            }
            let add = g
                .mask
                .broadcast_mul(&self.delta.to_dtype(x.dtype())?.reshape((1, 1, d))?)?;
            Ok(Some((x + add)?))
        });
        let mut x = g.resid_in.clone();
        for (j, cache) in (l..m.n_layer()).zip(&g.caches) {
            let mut cache = cache.clone();
            x = m.blocks[j]
                .forward(j, &x, 0, Some(&mut cache), &mut hook)?
                .ok_or_else(|| LociError::input("forward pass stopped early"))?;
        }
        let logp =
            candle_nn::ops::log_softmax(&m.final_logits(&gather(&x, &g.cells)?)?, D::Minus1)?;
        let nll = (logp
            .narrow(0, 0, g.n_labels)?
            .gather(&g.labels, 1)?
            .neg()?
            .sum_all()?
            / self.n_labels_total as f64)?;
        let mut kl_logp = None;
        let mut kl = None;
        if g.kl {
            let cur = logp.narrow(0, g.n_labels, 1)?;
            let init = self.kl_init.cloned().unwrap_or_else(|| cur.detach());
            kl = Some(((cur.exp()? * (&cur - &init)?)?.sum_all()? * self.kl_factor)?);
            kl_logp = Some(cur.detach());
        }
        Ok(GroupOut {
            nll_value: nll.to_scalar::<f32>()?,
            nll,
            kl_value: match &kl {
                Some(k) => k.to_scalar::<f32>()?,
                None => 0.0,
            },
            kl,
            value_at_row0,
            kl_logp,
        })
    }
}

/// Row groups for v*: one per worker thread, with at least two rows each (so the group that
/// holds the KL row, the last, also holds a rewrite row and its labels).
fn value_groups(rows: usize) -> usize {
    crate::threads::workers().clamp(1, (rows / 2).max(1))
}

/// Index of the subject's last token in `template` (holding `{}` for the subject), by tokenizing
/// the prefix, the subject and the suffix separately (spec §4.2).
pub fn subject_last_index(lm: &LoadedModel, template: &str, subject: &str) -> Result<usize> {
    Ok(subject_span(lm, template, subject)?.1 - 1)
}

/// The subject's tokens `[first, end)` in `template`, located as `subject_last_index` does.
pub fn subject_span(lm: &LoadedModel, template: &str, subject: &str) -> Result<(usize, usize)> {
    let (prefix, _) = template
        .split_once("{}")
        .ok_or_else(|| LociError::input(format!("template {template:?} has no {{}}")))?;
    let (prefix, word) = if prefix.is_empty() {
        (String::new(), subject.to_string())
    } else {
        let p = prefix.strip_suffix(' ').ok_or_else(|| {
            LociError::input(format!(
                "the text before the subject must end in a space: {prefix:?}"
            ))
        })?;
        (p.to_string(), format!(" {}", subject.trim()))
    };
    let n_special = lm.tokenizer.encode("")?.len();
    let p = if prefix.is_empty() {
        0
    } else {
        lm.tokenizer.encode_plain(&prefix)?.len()
    };
    let w = lm.tokenizer.encode_plain(&word)?.len();
    if w == 0 {
        return Err(LociError::input("the subject tokenizes to nothing"));
    }
    Ok((n_special + p, n_special + p + w))
}

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

/// Right-pads token rows to one length, at least `min_len` (causal attention never looks right,
/// so real positions are unaffected).
fn pad_rows(lm: &LoadedModel, rows: &[Vec<u32>], min_len: usize) -> Result<Tensor> {
    let pad = lm.tokenizer.eos.unwrap_or(0);
    let t = rows.iter().map(Vec::len).max().unwrap_or(0).max(min_len);
    let padded: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.resize(t, pad);
            r
        })
        .collect();
    lm.model.ids_tensor(&padded)
}

/// Rows `(batch, position)` of a `[b, t, w]` activation, as `[n, w]`.
fn gather(x: &Tensor, cells: &[(usize, usize)]) -> Result<Tensor> {
    let (_, t, w) = x.dims3()?;
    let idx: Vec<u32> = cells.iter().map(|&(b, p)| (b * t + p) as u32).collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    Ok(x.reshape(((), w))?.index_select(&idx, 0)?)
}

/// `(row, first, end)` of each row's span.
fn rows_spans(spans: &[(usize, usize)]) -> Vec<(usize, usize, usize)> {
    spans
        .iter()
        .enumerate()
        .map(|(i, &(a, b))| (i, a, b))
        .collect()
}

struct Texts {
    ids: Vec<Vec<u32>>,
    /// Each row's subject-last token.
    lookup: Vec<usize>,
    /// Each row's subject tokens `[first, end)`.
    spans: Vec<(usize, usize)>,
}

fn texts(lm: &LoadedModel, templates: &[String], subject: &str) -> Result<Texts> {
    let mut ids = Vec::new();
    let mut lookup = Vec::new();
    let mut spans = Vec::new();
    for t in templates {
        let span = subject_span(lm, t, subject)?;
        let row = lm.tokenizer.encode(&t.replacen("{}", subject, 1))?;
        if span.1 > row.len() {
            return Err(LociError::input(format!(
                "cannot place the subject in {t:?}"
            )));
        }
        ids.push(row);
        lookup.push(span.1 - 1);
        spans.push(span);
    }
    Ok(Texts { ids, lookup, spans })
}

impl LoadedModel {
    /// The MLP key (down-projection input) of `layer` at the subject's last token, averaged over
    /// `templates` (each holding `{}` for the request prompt).
    pub fn subject_key(
        &self,
        req: &RewriteRequest,
        layer: usize,
        templates: &[String],
    ) -> Result<Tensor> {
        Ok(self
            .subject_states(req, &[Site::MlpKey(layer)], templates)?
            .remove(0))
    }

    /// The activations at `sites` at the subject's last token, each averaged over `templates`
    /// (holding `{}` for the request prompt), in f32; one pass that stops after the last site.
    pub fn subject_states(
        &self,
        req: &RewriteRequest,
        sites: &[Site],
        templates: &[String],
    ) -> Result<Vec<Tensor>> {
        self.subject_states_noised(req, sites, templates, None)
    }

    /// `subject_states` with the subject's embeddings noised in every row: what the
    /// layers see of a corrupted subject (fact forcing edits keys as the noised model reads them).
    pub fn subject_states_noised(
        &self,
        req: &RewriteRequest,
        sites: &[Site],
        templates: &[String],
        noise: Option<SubjectNoise>,
    ) -> Result<Vec<Tensor>> {
        let filled: Vec<String> = templates
            .iter()
            .map(|t| t.replacen("{}", &req.prompt, 1))
            .collect();
        let tx = texts(self, &filled, &req.subject)?;
        let last = *sites
            .iter()
            .max_by_key(|s| s.order())
            .ok_or_else(|| LociError::input("no site to read"))?;
        let mut cap = Capture::new(sites.iter().copied()).stopping_after(last);
        let mut noise = subject_noise(&rows_spans(&tx.spans), noise, &self.model)?;
        self.model.run(
            &pad_rows(self, &tx.ids, 0)?,
            &mut Chain(vec![&mut noise, &mut cap]),
            None,
            LogitsAt::Last,
        )?;
        let cells: Vec<(usize, usize)> = tx.lookup.iter().copied().enumerate().collect();
        sites
            .iter()
            .map(|&s| Ok(gather(cap.get(s)?, &cells)?.to_dtype(DType::F32)?.mean(0)?))
            .collect()
    }

    /// Computes a ROME edit (does not apply it). `stats` is needed with `mom2_adjustment`.
    pub fn rome(
        &self,
        req: &RewriteRequest,
        hp: &RomeHparams,
        stats: Option<&KeyStats>,
    ) -> Result<RomeEdit> {
        req.validate()?;
        let m = &self.model;
        let l = hp.layer;
        if l >= m.n_layer() {
            return Err(LociError::input(format!(
                "layer {l} out of range (the model has {} layers)",
                m.n_layer()
            )));
        }
        let target_ids = self.tokenizer.encode_plain(&spaced(&req.target_new.str))?;
        if target_ids.is_empty() {
            return Err(LociError::input(format!(
                "the target {:?} tokenizes to nothing",
                req.target_new.str
            )));
        }
        let mut seconds = std::collections::BTreeMap::new();
        let mut clock = crate::clock::now_seconds();
        let mut lap = |name: &str| {
            let now = crate::clock::now_seconds();
            seconds.insert(name.to_string(), now - clock);
            clock = now;
        };
        // Fail on bad statistics before any expensive work.
        let factor = match (hp.mom2_adjustment, stats) {
            (true, None) => {
                return Err(LociError::input(format!("no key statistics for layer {l}")))
            }
            (true, Some(s)) => {
                s.check_fits(self, l)?;
                Some(s.factor(&m.device)?)
            }
            (false, _) => None,
        };
        lap("covariance_factor");
        let templates = context_templates(self, hp)?;
        lap("templates");

        // k* and u.
        let noise = hp.value_spec().subject_noise;
        let key_of = |templates: &[String]| -> Result<Tensor> {
            Ok(self
                .subject_states_noised(req, &[Site::MlpKey(l)], templates, noise)?
                .remove(0))
        };
        let k_star = key_of(&templates)?;
        let k_vec: Vec<f64> = k_star.to_vec1::<f32>()?.iter().map(|&x| x as f64).collect();
        let u = match &factor {
            Some(f) => f.solve(&k_vec)?,
            None => k_vec.clone(),
        };
        let norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm.is_nan() || norm <= 0.0 || !norm.is_finite() {
            return Err(LociError::model("the subject key is zero or not finite"));
        }
        let u: Vec<f32> = u.iter().map(|x| (x / norm) as f32).collect();

        lap("key");
        // v*.
        let (v_star, losses, delta_norm) =
            self.compute_v(req, &hp.value_spec(), &templates, &target_ids)?;
        lap("value");

        // The closed form: W' k = v* for the chosen key.
        let down = m.down_proj(l)?;
        let key = match hp.key_mode {
            KeyMode::Rrome => k_star.clone(),
            KeyMode::Original => key_of(&["{}".to_string()])?,
        };
        let current = down
            .forward(&key.to_dtype(m.dtype)?.reshape((1, 1, m.cfg.d_ff))?)?
            .flatten_all()?
            .to_dtype(DType::F32)?;
        let key_v = key.to_vec1::<f32>()?;
        let division: f32 = key_v.iter().zip(&u).map(|(a, b)| a * b).sum();
        if division.abs() < 1e-12 || !division.is_finite() {
            return Err(LociError::model(format!(
                "the key is orthogonal to the update direction (k·u = {division:e})"
            )));
        }
        let target_value = v_star.to_vec1::<f32>()?;
        lap("update");
        let right: Vec<f32> = (v_star - current)?
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x / division)
            .collect();
        if right.iter().any(|x| !x.is_finite()) {
            return Err(LociError::model("the edit is not finite"));
        }
        Ok(RomeEdit {
            layer: l,
            left: u,
            right,
            request: req.clone(),
            hparams: hp.clone(),
            stats: RomeStats {
                losses,
                delta_norm,
                division_factor: division,
                templates,
                target_value,
                seconds,
            },
        })
    }

    /// The target value v* (spec §4.5; MEMIT's z, §5.3, at a block's output): optimise a delta
    /// added at `spec.site` at the subject's last token so the model says the new target,
    /// staying close to its old view of the subject. Returns (value + δ, losses, ‖δ‖).
    pub(crate) fn compute_v(
        &self,
        req: &RewriteRequest,
        spec: &ValueSpec,
        templates: &[String],
        target: &[u32],
    ) -> Result<(Tensor, Vec<f32>, f32)> {
        let m = &self.model;
        let l = spec
            .site
            .layer()
            .filter(|&l| l < m.n_layer())
            .ok_or_else(|| {
                LociError::input(format!("v* cannot be optimised at {:?}", spec.site))
            })?;
        let d = m.cfg.d_model;
        let tgt_prefix = self.tokenizer.decode(&target[..target.len() - 1])?;
        let mut row_templates: Vec<String> = templates
            .iter()
            .map(|t| format!("{}{tgt_prefix}", t.replacen("{}", &req.prompt, 1)))
            .collect();
        let n_rewrite = row_templates.len();
        row_templates.push("{} is a".to_string());
        let tx = texts(self, &row_templates, &req.subject)?;
        let rows = tx.ids.len();
        let mt = target.len();
        // Only positions from each row's subject-last token on depend on the delta (the
        // "suffix"); the earlier ones are computed once, without gradients, and lend the suffix
        // their keys and values. Every row's suffix is padded to one length.
        let starts = tx.lookup.clone();
        let suffix = tx
            .ids
            .iter()
            .zip(&starts)
            .map(|(r, &s)| r.len() - s)
            .max()
            .unwrap_or(1);
        let t = starts.iter().map(|s| s + suffix).max().unwrap_or(suffix);
        let ids = pad_rows(self, &tx.ids, t)?;
        // Rows hold prompt + target[..m−1]: the last prompt token, at n − m, predicts target[0].
        let mut cells = Vec::new();
        let mut labels = Vec::new();
        for (i, row) in tx.ids.iter().take(n_rewrite).enumerate() {
            let n = row.len();
            if n < mt + 1 + starts[i] {
                return Err(LociError::input(
                    "the prompt must continue after the subject",
                ));
            }
            for (j, &tok) in target.iter().enumerate() {
                cells.push((i, n - mt + j - starts[i]));
                labels.push(tok);
            }
        }
        let kl_cell = (rows - 1, 0);

        // One pass without gradients: the residual entering layer l and every layer's keys and
        // values.
        let entry = if l == 0 {
            Site::Embed
        } else {
            Site::Block(l - 1)
        };
        let mut cap = Capture::new([entry]);
        let mut kv = KvCache::default();
        // Noise on the subject changes this pass only: the positions after the subject-last
        // token see it through the keys and values and the residual entering layer l.
        let mut noise = subject_noise(&rows_spans(&tx.spans[..n_rewrite]), spec.subject_noise, m)?;
        m.run(
            &ids,
            &mut Chain(vec![&mut noise, &mut cap]),
            Some(&mut kv),
            LogitsAt::Last,
        )?;
        let mut resid = cap.get(entry)?.clone();
        if let (0, Some(wpe)) = (l, &m.wpe) {
            resid = resid.broadcast_add(&wpe.narrow(0, 0, t)?)?;
        }
        let suffix_cells: Vec<(usize, usize)> = (0..rows)
            .flat_map(|i| (0..suffix).map(move |s| (i, s)))
            .map(|(i, s)| (i, starts[i] + s))
            .collect();
        let resid_in = gather(&resid, &suffix_cells)?
            .reshape((rows, suffix, d))?
            .detach();
        let prefix = starts.iter().copied().max().unwrap_or(0);
        let mut key_mask = vec![0f32; rows * (prefix + suffix)];
        for (i, &s) in starts.iter().enumerate() {
            for p in s..prefix {
                key_mask[i * (prefix + suffix) + p] = f32::NEG_INFINITY;
            }
        }
        let key_mask = Tensor::from_vec(key_mask, (rows, 1, 1, prefix + suffix), &m.device)?;
        let caches: Vec<LayerCache> = (l..m.n_layer())
            .map(|j| -> Result<LayerCache> {
                let c = &kv.layers[j];
                let cut = |x: &Option<Tensor>| -> Result<Option<Tensor>> {
                    Ok(match x {
                        Some(x) if prefix > 0 => Some(x.narrow(2, 0, prefix)?.detach()),
                        _ => None,
                    })
                };
                Ok(LayerCache {
                    k: cut(&c.k)?,
                    v: cut(&c.v)?,
                    row_starts: Some(starts.clone()),
                    key_mask: Some(key_mask.clone()),
                })
            })
            .collect::<Result<_>>()?;
        // The delta goes in at every row's subject-last token: suffix position 0.
        let mut mask = vec![0f32; rows * suffix];
        for i in 0..rows {
            mask[i * suffix] = 1.0;
        }
        let mask = Tensor::from_vec(mask, (rows, suffix, 1), &m.device)?.to_dtype(m.dtype)?;
        // Rows are independent until the loss: contiguous groups of rows run forward and backward
        // on their own threads (threaded kernels barely use two cores on matrices this small:
        // 1.4x faster here), and their gradients add up. The KL row is the last, in the last group.
        let n_groups = value_groups(rows);
        let per = rows.div_ceil(n_groups);
        let mut groups = Vec::new();
        for g in 0..n_groups {
            let (r0, rn) = (g * per, per.min(rows - (g * per).min(rows)));
            if rn == 0 {
                continue;
            }
            let mut g_cells = Vec::new();
            let mut g_labels = Vec::new();
            for (&(i, p), &lab) in cells.iter().zip(&labels) {
                if (r0..r0 + rn).contains(&i) {
                    g_cells.push((i - r0, p));
                    g_labels.push(lab);
                }
            }
            let kl = (r0..r0 + rn).contains(&kl_cell.0);
            if kl {
                g_cells.push((kl_cell.0 - r0, kl_cell.1));
            }
            let caches = caches
                .iter()
                .map(|c| -> Result<LayerCache> {
                    let rows_of = |x: &Option<Tensor>| -> Result<Option<Tensor>> {
                        Ok(match x {
                            Some(x) => Some(x.narrow(0, r0, rn)?),
                            None => None,
                        })
                    };
                    Ok(LayerCache {
                        k: rows_of(&c.k)?,
                        v: rows_of(&c.v)?,
                        row_starts: Some(starts[r0..r0 + rn].to_vec()),
                        key_mask: rows_of(&c.key_mask)?,
                    })
                })
                .collect::<Result<_>>()?;
            groups.push(ValueGroup {
                first_row: r0 == 0,
                resid_in: resid_in.narrow(0, r0, rn)?,
                caches,
                mask: mask.narrow(0, r0, rn)?,
                labels: Tensor::new(g_labels.as_slice(), &m.device)?.unsqueeze(1)?,
                n_labels: g_labels.len(),
                cells: g_cells,
                kl,
            });
        }
        let n_lab = labels.len();

        let delta = Var::zeros(d, DType::F32, &m.device)?;
        let mut opt = AdamW::new(
            vec![delta.clone()],
            ParamsAdamW {
                lr: spec.lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
        )?;
        let mut target_init: Option<Tensor> = None;
        let mut kl_init: Option<Tensor> = None;
        // ‖target_init‖², read back once (each read waits for the device).
        let mut ti_norm2: Option<f64> = None;
        let mut losses = Vec::new();
        for it in 0..spec.steps {
            let step = ValueStep {
                lm: self,
                site: spec.site,
                delta: delta.as_tensor(),
                n_labels_total: n_lab,
                kl_init: kl_init.as_ref(),
                kl_factor: spec.kl_factor,
            };
            let outs = crate::threads::map(&groups, |g| step.forward(g))
                .into_iter()
                .collect::<Result<Vec<_>>>()?;
            let nll: f32 = outs.iter().map(|o| o.nll_value).sum();
            // Raising: the NLL itself; lowering: p = exp(−NLL), whose gradient is the NLL's
            // times −p (a constant of this step), so each group's graph only gets a factor.
            let (mut lv, nll_factor) = if spec.direction.is_raise() {
                (nll, 1.0)
            } else {
                let p = (-nll).exp();
                (p, -(p as f64))
            };
            for o in &outs {
                lv += o.kl_value;
                if let Some(x) = &o.value_at_row0 {
                    target_init.get_or_insert_with(|| x.clone());
                }
                if let Some(k) = &o.kl_logp {
                    kl_init.get_or_insert_with(|| k.clone());
                }
            }
            let ti_norm2 = match ti_norm2 {
                Some(n) => n,
                None => {
                    let ti = target_init.as_ref().expect("the first group holds row 0");
                    *ti_norm2.insert(ti.sqr()?.sum_all()?.to_scalar::<f32>()? as f64)
                }
            };
            // ‖δ‖ with a tiny floor: its gradient at δ = 0 is then 0 (as in torch), not 0/0.
            let wd = ((delta.as_tensor().sqr()?.sum_all()? + 1e-24)?.sqrt()?
                * (spec.weight_decay / ti_norm2))?;
            lv += wd.to_scalar::<f32>()?;
            if !lv.is_finite() {
                return Err(LociError::model(format!(
                    "the v* optimisation diverged (loss {lv}) at step {it}"
                )));
            }
            losses.push(lv);
            if (spec.direction.is_raise() && lv < 0.05) || it + 1 == spec.steps {
                break;
            }
            let parts = crate::threads::map(&outs, |o| -> Result<Option<Tensor>> {
                let mut loss = (&o.nll * nll_factor)?;
                if let Some(kl) = &o.kl {
                    loss = (loss + kl)?;
                }
                Ok(loss.backward()?.get(delta.as_tensor()).cloned())
            })
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
            let mut grads = wd.backward()?;
            let mut total = grads
                .get(delta.as_tensor())
                .cloned()
                .unwrap_or(delta.as_tensor().zeros_like()?);
            for g in parts.into_iter().flatten() {
                total = (total + g)?;
            }
            grads.insert(delta.as_tensor(), total);
            opt.step(&grads)?;
            // Project back into the ball of radius clamp · ‖target_init‖.
            let max = spec.clamp_norm_factor * ti_norm2.sqrt();
            let n = delta
                .as_tensor()
                .sqr()?
                .sum_all()?
                .sqrt()?
                .to_scalar::<f32>()? as f64;
            if n > max {
                delta.set(&(delta.as_tensor() * (max / n))?)?;
            }
        }
        let delta_t = delta.as_tensor().detach();
        let delta_norm = delta_t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let v_star = (target_init.expect("at least one pass") + delta_t)?;
        Ok((v_star, losses, delta_norm))
    }

    /// Applies an edit; keep the returned value to undo it exactly.
    pub fn apply_edit(&mut self, e: &RomeEdit) -> Result<AppliedEdit> {
        self.apply_deltas(&[e.delta()])
    }
}
