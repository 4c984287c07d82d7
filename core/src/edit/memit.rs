//! MEMIT (Meng et al. 2023): many facts at once, the change spread over several layers
//! (docs/memit.md).
//!
//! Each request gets a target z for the residual stream after the last edited layer (ROME's v*
//! optimisation, at the block output); then, layer by layer from the lowest, the remaining gap
//! `z − h` is split evenly over the layers left and written into that layer's down-projection
//! with the least-squares update `ΔW = R Kᵀ (λC + K Kᵀ)⁻¹` that keeps other keys' outputs.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::delta::{AppliedEdit, LayerDelta, WeightChange};
use super::linalg;
use super::rome::{ValueCase, ValueOut, ValueSpec};
use super::rules::{LayerSolver, NullSpace, Preserved, UpdateRule};
use super::stats::KeyStats;
use crate::clock::Laps;
use crate::error::{LociError, Result};
use crate::hooks::Site;
use crate::loader::LoadedModel;
use crate::predict::Sampling;
use crate::request::{target_ids, RewriteRequest};

/// MEMIT's settings (docs/memit.md#hyper-parameters).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MemitHparams {
    /// The edited layers R, ascending; z is optimised after the last.
    pub layers: Vec<usize>,
    /// Steps of each target z's optimisation.
    pub v_num_grad_steps: usize,
    /// Adam's learning rate for z.
    pub v_lr: f64,
    /// Weight of ‖δ‖ / ‖z₀‖² in z's loss.
    pub v_weight_decay: f64,
    /// δ is kept within this factor of ‖z₀‖.
    pub clamp_norm_factor: f64,
    /// Weight of the KL term that keeps "{subject} is a" as it was.
    pub kl_factor: f64,
    /// λ: how strongly the keys of the statistics corpus keep their outputs.
    pub mom2_update_weight: f64,
    /// Context templates are continuations of these words (MEMIT: one each).
    pub context_seeds: Vec<String>,
    /// Length of each continuation in tokens, the seed word included (MEMIT: 10).
    pub context_length: usize,
    /// Seeds the context templates' sampling and the subject noise.
    pub seed: u64,
    /// Fact erasure lowers the targets; fact forcing noises the subjects while each z is
    /// optimised and the keys are read.
    #[serde(flatten)]
    pub goal: super::EditGoal,
    /// How each layer's update is solved: MEMIT's least squares (the default), EMMET's
    /// equality constraints or AlphaEdit's null-space projection.
    #[serde(default)]
    pub update: UpdateRule,
}

/// Per-model defaults shipped with Loci (`core/hparams/memit/*.json`).
const HPARAM_FILES: [&str; 3] = [
    include_str!("../../hparams/memit/gpt2-xl.json"),
    include_str!("../../hparams/memit/gpt-j-6b.json"),
    include_str!("../../hparams/memit/smollm2-135m.json"),
];

/// EMMET's per-model defaults (`core/hparams/emmet/*.json`).
const EMMET_FILES: [&str; 3] = [
    include_str!("../../hparams/emmet/gpt2-xl.json"),
    include_str!("../../hparams/emmet/gpt-j-6b.json"),
    include_str!("../../hparams/emmet/smollm2-135m.json"),
];

/// AlphaEdit's paper settings: eigenvalues of C below 2e-2 are the null space; ridge L2 = 10.
pub const ALPHAEDIT_RULE: UpdateRule = UpdateRule::NullSpace {
    null_space: NullSpace::Below(2e-2),
    l2: 10.0,
};

/// EMMET's paper setting: the batch's ridge is 0.1 λ.
pub const EMMET_RULE: UpdateRule = UpdateRule::Equality { emmet_lambda: 0.1 };

impl MemitHparams {
    /// The shipped hyper-parameters for a model of this shape, if Loci has them.
    pub fn for_model(cfg: &crate::config::ModelConfig) -> Option<Self> {
        super::method::shipped_for(&HPARAM_FILES, cfg)
    }

    /// The defaults for this model: its shipped settings (at `layers` when given), else the
    /// paper's values at `layers`; without either, an error asking for layers.
    pub fn defaults(cfg: &crate::config::ModelConfig, layers: &[usize]) -> Result<Self> {
        super::method::layered_defaults(
            Self::for_model(cfg),
            layers,
            cfg.n_layer,
            "MEMIT",
            Self::at_layers,
            |hp, l| hp.layers = l,
        )
    }

    /// The defaults of a MEMIT-family `method` for this model, at `layers` when given.
    /// AlphaEdit is MEMIT's settings (its authors ship MEMIT's per model) with the null-space
    /// rule. EMMET's are shipped per model (one layer); elsewhere they are its authors' GPT-J
    /// values (λ = 1) at `layers`, which must then be given. ROME, FT and GRACE are refused.
    pub fn for_method(
        method: super::EditMethod,
        cfg: &crate::config::ModelConfig,
        layers: &[usize],
    ) -> Result<Self> {
        use super::EditMethod as M;
        match method {
            M::Memit => Self::defaults(cfg, layers),
            M::Alphaedit => Ok(Self {
                update: ALPHAEDIT_RULE,
                ..Self::defaults(cfg, layers)?
            }),
            M::Emmet => {
                let shipped = super::method::shipped_for::<Self>(&EMMET_FILES, cfg);
                super::method::layered_defaults(
                    shipped,
                    layers,
                    cfg.n_layer,
                    "EMMET",
                    |l| Self {
                        mom2_update_weight: 1.0,
                        update: EMMET_RULE,
                        ..Self::at_layers(l)
                    },
                    |hp, l| hp.layers = l,
                )
            }
            M::Rome | M::Ft | M::Grace => Err(LociError::input(format!(
                "{method} is not a MEMIT-family method"
            ))),
        }
    }

    /// The method these settings make: MEMIT, EMMET or AlphaEdit, by the update rule.
    pub fn method(&self) -> super::EditMethod {
        self.update.method()
    }

    /// GPT-J's official values at other layers.
    pub fn at_layers(layers: Vec<usize>) -> Self {
        Self {
            layers,
            v_num_grad_steps: 25,
            v_lr: 0.5,
            v_weight_decay: 0.5,
            clamp_norm_factor: 0.75,
            kl_factor: 0.0625,
            mom2_update_weight: 15000.0,
            context_seeds: ["The", "Therefore", "Because", "I", "You"]
                .map(String::from)
                .to_vec(),
            context_length: 10,
            seed: 1,
            goal: super::EditGoal::default(),
            update: UpdateRule::LeastSquares,
        }
    }

    fn z_spec(&self) -> Result<ValueSpec> {
        let z_layer = *self.layers.last().ok_or_else(|| {
            LociError::input(format!(
                "{} needs at least one layer",
                self.method().label()
            ))
        })?;
        Ok(ValueSpec {
            site: Site::Block(z_layer),
            steps: self.v_num_grad_steps,
            lr: self.v_lr,
            weight_decay: self.v_weight_decay,
            clamp_norm_factor: self.clamp_norm_factor,
            kl_factor: self.kl_factor,
            direction: self.goal.direction,
            subject_noise: self.goal.noise(self.seed),
        })
    }
}

/// One layer's share of a MEMIT-family edit: `ΔW = Σᵢ rightᵢ leftᵢᵀ`, one term per request.
#[derive(Clone, Debug, PartialEq)]
pub struct MemitLayer {
    /// The edited layer.
    pub layer: usize,
    /// `[requests, d_ff]`: the update rule's left vectors (MEMIT: `(λC + K Kᵀ)⁻¹ kᵢ`).
    pub left: Vec<f32>,
    /// `[requests, d_model]`: this layer's share of `zᵢ − hᵢ`.
    pub right: Vec<f32>,
    /// `[requests, d_ff]`: the requests' keys as the edited model reads them, which later
    /// AlphaEdit edits keep (AlphaEdit's `K_p`); empty for the other rules.
    pub keys: Vec<f32>,
}

/// What the computation did, for reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MemitStats {
    /// Per request, the z optimisation's losses.
    pub z_losses: Vec<Vec<f32>>,
    /// Per request, the target z for the residual after the last layer.
    pub z: Vec<Vec<f32>>,
    /// Per request, ‖z − h‖ before any layer was changed.
    pub z_gap: Vec<f32>,
    /// The context templates the keys and targets averaged over.
    pub templates: Vec<String>,
    /// Seconds per phase: templates, targets (z), spread (keys, solves, updates).
    pub seconds: BTreeMap<String, f64>,
}

/// A MEMIT edit: a low-rank update of each of its layers, undone exactly.
#[derive(Clone, Debug, PartialEq)]
pub struct MemitEdit {
    /// Each layer's update.
    pub layers: Vec<MemitLayer>,
    /// The facts it writes.
    pub requests: Vec<RewriteRequest>,
    /// The settings it was computed with.
    pub hparams: MemitHparams,
    /// What the computation did.
    pub stats: MemitStats,
}

#[derive(Serialize, Deserialize)]
struct EditMeta {
    layers: Vec<usize>,
    requests: Vec<RewriteRequest>,
    hparams: MemitHparams,
    stats: MemitStats,
}

pub(crate) const FILE_KEY: &str = "loci_memit_edit";

impl MemitEdit {
    /// The changes to apply, one per layer.
    pub fn deltas(&self) -> Vec<LayerDelta<'_>> {
        self.layers
            .iter()
            .map(|l| LayerDelta {
                layer: l.layer,
                weight: WeightChange::LowRank {
                    rank: self.requests.len(),
                    right: &l.right,
                    left: &l.left,
                },
                bias: None,
            })
            .collect()
    }

    /// A safetensors file: two `[requests, width]` matrices per layer, the rest in the metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let n = self.requests.len();
        let meta = EditMeta {
            layers: self.layers.iter().map(|l| l.layer).collect(),
            requests: self.requests.clone(),
            hparams: self.hparams.clone(),
            stats: self.stats.clone(),
        };
        let tensors: Vec<(String, Vec<usize>, &[f32])> = self
            .layers
            .iter()
            .flat_map(|l| {
                let keys = (!l.keys.is_empty()).then(|| {
                    (
                        format!("keys.{}", l.layer),
                        vec![n, l.keys.len() / n],
                        &l.keys[..],
                    )
                });
                [
                    (
                        format!("left.{}", l.layer),
                        vec![n, l.left.len() / n],
                        &l.left[..],
                    ),
                    (
                        format!("right.{}", l.layer),
                        vec![n, l.right.len() / n],
                        &l.right[..],
                    ),
                ]
                .into_iter()
                .chain(keys)
            })
            .collect();
        super::file::write(FILE_KEY, &meta, &tensors)
    }

    /// Reads a file written by `to_bytes`, refusing anything else or non-finite values.
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let bad = |e: String| LociError::input(format!("not a Loci MEMIT edit file: {e}"));
        let (meta, file): (EditMeta, _) =
            super::file::read(data, FILE_KEY, "no MEMIT metadata", bad)?;
        let n = meta.requests.len();
        if n == 0 || meta.layers.is_empty() {
            return Err(file.bad("no requests or no layers".into()));
        }
        let mut layers = vec![];
        for &layer in &meta.layers {
            let matrix = |name: String| -> Result<Vec<f32>> {
                match file.f32(&name)? {
                    (v, shape) if shape.len() == 2 && shape[0] == n => Ok(v),
                    _ => Err(file.bad(format!("{name} is not a [{n}, width] f32 matrix"))),
                }
            };
            let left = matrix(format!("left.{layer}"))?;
            let right = matrix(format!("right.{layer}"))?;
            let keys = match meta.hparams.update {
                UpdateRule::NullSpace { .. } => matrix(format!("keys.{layer}"))?,
                _ => vec![],
            };
            if keys.len() != left.len() && !keys.is_empty() {
                return Err(file.bad(format!("keys.{layer} is not as wide as left.{layer}")));
            }
            if left
                .iter()
                .chain(&right)
                .chain(&keys)
                .any(|x| !x.is_finite())
            {
                return Err(file.bad("NaN or infinite values".into()));
            }
            layers.push(MemitLayer {
                layer,
                left,
                right,
                keys,
            });
        }
        Ok(Self {
            layers,
            requests: meta.requests,
            hparams: meta.hparams,
            stats: meta.stats,
        })
    }
}

/// MEMIT's context templates: "{}" and a short continuation of each seed word followed by
/// ". {}" (top-5 sampling, seeded; braces become spaces).
pub fn memit_context_templates(lm: &LoadedModel, hp: &MemitHparams) -> Result<Vec<String>> {
    let mut out = vec!["{}".to_string()];
    for (i, word) in hp.context_seeds.iter().enumerate() {
        let prompt_len = lm.encode_prompt(word)?.len();
        let new = hp.context_length.saturating_sub(prompt_len);
        let seed = hp.seed.wrapping_add(i as u64);
        let g = lm.generate(word, new, Sampling::TopK { k: 5, seed })?;
        let text = g
            .text
            .replace("\n\n", " ")
            .replace('\n', " ")
            .replace(['{', '}'], " ");
        out.push(format!("{}. {{}}", text.trim()));
    }
    Ok(out)
}

/// `(λC + K Kᵀ)⁻¹ K` for keys `K` (rows of `keys`, each `d_ff`) from C's Cholesky factor, by the
/// push-through identity `(λC + KKᵀ)⁻¹K = C⁻¹K (λI + KᵀC⁻¹K)⁻¹`: one many-vector solve with the
/// cached factor and an n × n system, instead of factoring a fresh d_ff² matrix per layer and
/// batch.
pub fn spread_keys(
    factor: &linalg::CholeskyFactor,
    keys: &[Vec<f64>],
    lambda: f64,
) -> Result<Vec<Vec<f64>>> {
    let n = keys.len();
    let p = factor.solve_many(keys)?;
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut m = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            // Symmetric in exact arithmetic; averaging keeps it so in floating point.
            let v = 0.5 * (dot(&keys[i], &p[j]) + dot(&keys[j], &p[i]));
            m[i * n + j] = v + if i == j { lambda } else { 0.0 };
        }
    }
    let l = linalg::cholesky(&m, n)?;
    // Column j of M⁻¹, then a_j = Σᵢ pᵢ (M⁻¹)ᵢⱼ.
    (0..n)
        .map(|j| {
            let mut e = vec![0f64; n];
            e[j] = 1.0;
            let col = linalg::cholesky_solve(&l, n, &e);
            let mut a = vec![0f64; p[0].len()];
            for (pi, c) in p.iter().zip(&col) {
                for (ak, pk) in a.iter_mut().zip(pi) {
                    *ak += c * pk;
                }
            }
            Ok(a)
        })
        .collect()
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

impl MemitHparams {
    /// Refuses settings and inputs MEMIT cannot use; returns z's optimisation settings.
    fn check(
        &self,
        reqs: &[RewriteRequest],
        stats: &[KeyStats],
        model: &crate::model::Model,
    ) -> Result<ValueSpec> {
        let name = self.method().label();
        let n_layer = model.n_layer();
        // The spread writes residual gaps as down-projection outputs: a norm between them
        // (Gemma-2's) would rescale each layer's share.
        if let Some(l) = self
            .layers
            .iter()
            .find(|&&l| model.blocks.get(l).is_some_and(|b| b.post_mlp.is_some()))
        {
            return Err(LociError::input(format!(
                "{name} spreads residual changes over MLP outputs, which layer {l} norms before \
                 they join the residual (Gemma-2): use ROME or fine-tuning"
            )));
        }
        if reqs.is_empty() {
            return Err(LociError::input(format!(
                "{name} needs at least one request"
            )));
        }
        if self.layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(LociError::input(format!(
                "{name}'s layers must be ascending and distinct"
            )));
        }
        self.update.check()?;
        let spec = self.z_spec()?;
        super::method::check_layers(&self.layers, n_layer)?;
        if self.mom2_update_weight.is_nan() || self.mom2_update_weight <= 0.0 {
            return Err(LociError::input("mom2_update_weight must be positive"));
        }
        if stats.len() != self.layers.len() {
            return Err(LociError::input(format!(
                "{} layers but key statistics for {}",
                self.layers.len(),
                stats.len()
            )));
        }
        Ok(spec)
    }
}

/// One f64 vector per request.
type Vectors = Vec<Vec<f64>>;

/// What the spread over the layers works from: the requests, their targets z, the templates
/// their keys average over, and how z's site and the subject noise were set.
struct Spread<'a> {
    reqs: &'a [RewriteRequest],
    zs: &'a [Vec<f64>],
    templates: &'a [String],
    spec: &'a ValueSpec,
}

/// What every edit of a batch is computed with: z's settings, each layer's solver, the
/// context templates.
type Plan<'p, 's> = (&'p ValueSpec, &'p [LayerSolver<'s>], &'p [String]);

/// Whether an AlphaEdit edit records its facts' keys for later edits to keep (not for the
/// independent one-fact edits of `memit_batch`).
#[derive(Clone, Copy)]
struct RecordKeys(bool);

impl LoadedModel {
    /// Computes a MEMIT-family edit of all `reqs` at once (does not apply it); `stats[i]` are
    /// the key statistics of `hp.layers[i]`. `progress` hears each phase. The weights are
    /// changed while it runs (each layer's update shapes the next layer's keys) and restored
    /// after, also on error.
    pub fn memit(
        &mut self,
        reqs: &[RewriteRequest],
        hp: &MemitHparams,
        stats: &[KeyStats],
        progress: &mut dyn FnMut(&str),
    ) -> Result<MemitEdit> {
        self.memit_preserving(reqs, hp, stats, &Preserved::default(), progress)
    }

    /// `memit` after earlier edits whose keys AlphaEdit keeps (`preserved`, e.g.
    /// `Preserved::of(the edits applied so far)`); the other rules ignore them.
    pub fn memit_preserving(
        &mut self,
        reqs: &[RewriteRequest],
        hp: &MemitHparams,
        stats: &[KeyStats],
        preserved: &Preserved,
        progress: &mut dyn FnMut(&str),
    ) -> Result<MemitEdit> {
        let spec = hp.check(reqs, stats, &self.model)?;
        let targets = self.memit_targets(reqs)?;
        let mut laps = Laps::start();
        let solvers = self.memit_solvers(hp, stats, reqs.len(), preserved)?;
        laps.lap("covariance_factor");
        let templates = memit_context_templates(self, hp)?;
        laps.lap("templates");
        // Every request's z optimises in one batch, each with its own δ and stop.
        progress(&format!("targets z of {} requests", reqs.len()));
        let cases: Vec<ValueCase> = reqs
            .iter()
            .zip(&targets)
            .map(|(req, t)| ValueCase { req, target: t })
            .collect();
        let zs = self
            .compute_values(&cases, &spec, &templates)?
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        laps.lap("targets");
        let plan = (&spec, &solvers[..], &templates[..]);
        let record = RecordKeys(true);
        self.memit_from_targets(reqs, zs, hp, (plan, record), laps, progress)
    }

    /// Independent one-request MEMIT edits of many requests, each the edit `memit` makes of it
    /// alone (within float rounding), their targets z optimised together: one batched pass per
    /// step. One result per request, in order (a request MEMIT refuses fails alone); the outer
    /// error is the batch's (layers, statistics).
    pub fn memit_batch(
        &mut self,
        reqs: &[RewriteRequest],
        hp: &MemitHparams,
        stats: &[KeyStats],
    ) -> Result<Vec<Result<MemitEdit>>> {
        let spec = hp.check(reqs, stats, &self.model)?;
        let mut laps = Laps::start();
        let solvers = self.memit_solvers(hp, stats, 1, &Preserved::default())?;
        laps.lap("covariance_factor");
        let templates = memit_context_templates(self, hp)?;
        laps.lap("templates");
        let targets: Vec<Result<Vec<u32>>> = reqs
            .iter()
            .map(|r| Ok(self.memit_targets(std::slice::from_ref(r))?.remove(0)))
            .collect();
        let cases: Vec<ValueCase> = reqs
            .iter()
            .zip(&targets)
            .filter_map(|(req, t)| {
                Some(ValueCase {
                    req,
                    target: t.as_ref().ok()?,
                })
            })
            .collect();
        let mut zs = self.compute_values(&cases, &spec, &templates)?.into_iter();
        laps.lap("targets");
        let plan = (&spec, &solvers[..], &templates[..]);
        let mut out = vec![];
        for (req, target) in reqs.iter().zip(targets) {
            out.push(match target {
                Err(e) => Err(e),
                Ok(_) => zs.next().expect("a z per target").and_then(|z| {
                    let one = std::slice::from_ref(req);
                    // Independent edits, never kept in a sequence: no keys to record.
                    let how = (plan, RecordKeys(false));
                    self.memit_from_targets(one, vec![z], hp, how, laps.clone(), &mut |_| {})
                }),
            });
        }
        Ok(out)
    }

    /// The solvers of `hp.layers` for batches of `n` facts, each layer's statistics checked
    /// against the model.
    fn memit_solvers<'s>(
        &self,
        hp: &MemitHparams,
        stats: &'s [KeyStats],
        n: usize,
        preserved: &Preserved,
    ) -> Result<Vec<LayerSolver<'s>>> {
        let mut solvers = vec![];
        for (s, &l) in stats.iter().zip(&hp.layers) {
            s.check_fits(self, l)?;
            let at = (l, n);
            let solver =
                hp.update
                    .solver(s, hp.mom2_update_weight, at, preserved, &self.model.device)?;
            solvers.push(solver);
        }
        Ok(solvers)
    }

    /// The edit from the requests' optimised targets: the spread over the layers.
    fn memit_from_targets(
        &mut self,
        reqs: &[RewriteRequest],
        zs: Vec<ValueOut>,
        hp: &MemitHparams,
        ((spec, solvers, templates), record): (Plan, RecordKeys),
        mut laps: Laps,
        progress: &mut dyn FnMut(&str),
    ) -> Result<MemitEdit> {
        let z_losses = zs.iter().map(|z| z.losses.clone()).collect();
        let zs = zs
            .iter()
            .map(|z| to_f64(&z.value))
            .collect::<Result<Vec<_>>>()?;
        let plan = Spread {
            reqs,
            zs: &zs,
            templates,
            spec,
        };
        let mut changed = AppliedEdit { originals: vec![] };
        let result = self
            .memit_spread(hp, &plan, solvers, &mut changed, progress)
            .and_then(|(mut layers, gaps)| {
                if record.0 && matches!(hp.update, UpdateRule::NullSpace { .. }) {
                    self.record_edited_keys(&mut layers, &plan)?;
                }
                Ok((layers, gaps))
            });
        self.undo_edit(changed)?;
        let (layers, z_gap) = result?;
        laps.lap("spread");
        Ok(MemitEdit {
            stats: MemitStats {
                z: zs
                    .iter()
                    .map(|z| z.iter().map(|&x| x as f32).collect())
                    .collect(),
                z_losses,
                z_gap,
                templates: templates.to_vec(),
                seconds: laps.seconds,
            },
            layers,
            requests: reqs.to_vec(),
            hparams: hp.clone(),
        })
    }

    /// Each request's new target, tokenized (refused when it tokenizes to nothing).
    fn memit_targets(&self, reqs: &[RewriteRequest]) -> Result<Vec<Vec<u32>>> {
        reqs.iter()
            .map(|r| {
                r.validate()?;
                target_ids(self, r)
            })
            .collect()
    }

    /// Layer by layer from the lowest: the remaining gap `z − h` split evenly over the layers
    /// left, written with the least-squares update and applied (recorded in `changed`), so the
    /// next layer's keys see it. Returns the layers' updates and each request's first gap.
    fn memit_spread(
        &mut self,
        hp: &MemitHparams,
        plan: &Spread,
        solvers: &[LayerSolver],
        changed: &mut AppliedEdit,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(Vec<MemitLayer>, Vec<f32>)> {
        let mut z_gap = vec![];
        let mut layers = vec![];
        for (i, (&l, solver)) in hp.layers.iter().zip(solvers).enumerate() {
            progress(&format!("layer {l} ({}/{})", i + 1, hp.layers.len()));
            let share = (hp.layers.len() - i) as f64;
            let (keys, gaps) = self.memit_keys_gaps(l, plan)?;
            if i == 0 {
                z_gap = gaps
                    .iter()
                    .map(|g| g.iter().map(|x| x * x).sum::<f64>().sqrt() as f32)
                    .collect();
            }
            let residuals: Vec<Vec<f64>> = gaps
                .iter()
                .map(|g| g.iter().map(|x| x / share).collect())
                .collect();
            let left = solver.lefts(&keys, l)?;
            let flat =
                |v: &[Vec<f64>]| -> Vec<f32> { v.iter().flatten().map(|&x| x as f32).collect() };
            let layer = MemitLayer {
                layer: l,
                left: flat(&left),
                right: flat(&residuals),
                keys: vec![],
            };
            if layer
                .left
                .iter()
                .chain(&layer.right)
                .any(|x| !x.is_finite())
            {
                return Err(LociError::model(format!(
                    "the update of layer {l} is not finite"
                )));
            }
            let w = self.add_layer_delta(&LayerDelta {
                layer: l,
                weight: WeightChange::LowRank {
                    rank: plan.reqs.len(),
                    right: &layer.right,
                    left: &layer.left,
                },
                bias: None,
            })?;
            changed.originals.push((l, w));
            layers.push(layer);
        }
        Ok((layers, z_gap))
    }

    /// Records each layer's keys of the requests as the edited model (every layer's update
    /// applied) reads them: what later AlphaEdit edits keep.
    fn record_edited_keys(&self, layers: &mut [MemitLayer], plan: &Spread) -> Result<()> {
        for layer in layers {
            let (keys, _) = self.memit_keys_gaps(layer.layer, plan)?;
            layer.keys = keys.iter().flatten().map(|&x| x as f32).collect();
        }
        Ok(())
    }

    /// Per request at layer `l`: the key (half the bare prompt's, half the contexts' mean) and
    /// the gap `z − h` between the target and the current output at z's site.
    fn memit_keys_gaps(&self, l: usize, plan: &Spread) -> Result<(Vectors, Vectors)> {
        let (templates, noise) = (plan.templates, plan.spec.subject_noise);
        let mut keys = vec![];
        let mut gaps = vec![];
        for (r, z) in plan.reqs.iter().zip(plan.zs) {
            let sites = [Site::MlpKey(l), plan.spec.site];
            let bare = self.subject_states_noised(r, &sites, &templates[..1], noise)?;
            let key = if templates.len() > 1 {
                let ctx = self
                    .subject_states_noised(r, &[Site::MlpKey(l)], &templates[1..], noise)?
                    .remove(0);
                ((&bare[0] + ctx)? * 0.5)?
            } else {
                bare[0].clone()
            };
            keys.push(to_f64(&key)?);
            let h = to_f64(&bare[1])?;
            gaps.push(z.iter().zip(&h).map(|(z, h)| z - h).collect());
        }
        Ok((keys, gaps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn spread_keys_solves_the_regularised_system() {
        // A random SPD C and three keys: (λC + KKᵀ) A = K must hold for the returned A.
        let (d, n, lambda) = (12, 3, 7.5);
        let mut rng = crate::rng::SplitMix64::new(3);
        let mut g = || rng.next_f64() * 2.0 - 1.0;
        let b: Vec<f64> = (0..d * d).map(|_| g()).collect();
        let mut c = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] = (0..d).map(|k| b[i * d + k] * b[j * d + k]).sum::<f64>()
                    + if i == j { 0.5 } else { 0.0 };
            }
        }
        let keys: Vec<Vec<f64>> = (0..n)
            .map(|_| (0..d).map(|_| g() * 3.0).collect())
            .collect();
        let ct = Tensor::from_vec(c.clone(), (d, d), &Device::Cpu).unwrap();
        let f = linalg::CholeskyFactor::new(&ct).unwrap();
        let a = spread_keys(&f, &keys, lambda).unwrap();
        for j in 0..n {
            for row in 0..d {
                let lhs: f64 = (0..d)
                    .map(|k| {
                        let kk: f64 = keys.iter().map(|key| key[row] * key[k]).sum();
                        (lambda * c[row * d + k] + kk) * a[j][k]
                    })
                    .sum();
                assert!(
                    (lhs - keys[j][row]).abs() < 1e-9 * (1.0 + keys[j][row].abs()),
                    "row {row} of key {j}: {lhs} vs {}",
                    keys[j][row]
                );
            }
        }
    }
}
