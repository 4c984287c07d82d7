//! ROME (Meng et al. 2022): a rank-one update of one MLP down-projection that makes the model
//! map a subject's key k* to a new value v* (docs/rome.md).
//!
//! An edit runs in four steps, one module each: the context templates (`templates`), the key k*
//! and its direction u = C⁻¹k* (`key`, with the key statistics C), the value v* (`value`, one
//! optimisation step in `step`), and the closed-form rank-one update (here; the edit as a value
//! and its file in `update`).

mod hparams;
mod key;
mod optimise;
mod step;
mod templates;
mod update;
mod value;

pub(crate) use hparams::ValueSpec;
pub use hparams::{KeyMode, RomeHparams};
pub use optimise::{Floats, Share, ValueGrad, ValueParts, ValueRun};
pub use templates::context_templates;
pub use update::{RomeEdit, RomeStats};
pub(crate) use value::{ValueCase, ValueOut};

use candle_core::{DType, Tensor};

use super::delta::AppliedEdit;
use super::linalg::CholeskyFactor;
use super::stats::KeyStats;
use crate::clock::Laps;
use crate::error::{LociError, Result};
use crate::hooks::Site;
use crate::loader::LoadedModel;
use crate::request::{target_ids, RewriteRequest};

/// A request's edit up to its value: its target's tokens, its key k* and its direction u.
struct Keyed {
    target: Vec<u32>,
    k_star: Tensor,
    u: Vec<f32>,
}

/// A ROME edit of one request whose v* optimisation is stepped from outside ([`ValueRun`]):
/// processes that each hold the same model make the same run, each computing its share of v*'s
/// rows and exchanging each step's parts and gradients; any of them then finishes the edit
/// (the tab's workers split an edit this way). [`LoadedModel::rome`] is the same edit made in
/// one process.
pub struct RomeRun {
    req: RewriteRequest,
    hp: RomeHparams,
    templates: Vec<String>,
    keyed: Keyed,
    value: ValueRun,
    laps: Laps,
    started: f64,
}

impl RomeRun {
    /// The request being edited.
    pub fn request(&self) -> &RewriteRequest {
        &self.req
    }

    /// When the run began ([`crate::clock::now_seconds`]).
    pub fn started(&self) -> f64 {
        self.started
    }

    /// The v* optimisation to step.
    pub fn value(&mut self) -> &mut ValueRun {
        &mut self.value
    }

    /// The edit, once v* has stopped (does not apply it).
    pub fn finish(mut self, lm: &LoadedModel) -> Result<RomeEdit> {
        self.laps.lap("value");
        let v = self.value.finish()?.remove(0)?;
        lm.rome_finish(
            &self.req,
            &self.hp,
            &self.templates,
            self.keyed,
            v,
            self.laps,
        )
    }
}

impl LoadedModel {
    /// Computes a ROME edit (does not apply it). `stats` is needed with `mom2_adjustment`.
    pub fn rome(
        &self,
        req: &RewriteRequest,
        hp: &RomeHparams,
        stats: Option<&KeyStats>,
    ) -> Result<RomeEdit> {
        req.validate()?;
        self.rome_batch(std::slice::from_ref(req), hp, stats)?
            .remove(0)
    }

    /// ROME edits of many independent requests at `hp`'s layer, each the edit `rome` makes of
    /// it alone (within float rounding), their v* optimised together: one batched pass per
    /// step, each request with its own δ and its own stop. One result per request, in order (a
    /// request ROME refuses fails alone); the outer error is the batch's (layer, statistics).
    pub fn rome_batch(
        &self,
        reqs: &[RewriteRequest],
        hp: &RomeHparams,
        stats: Option<&KeyStats>,
    ) -> Result<Vec<Result<RomeEdit>>> {
        self.check_layer(hp.layer)?;
        let mut laps = Laps::start();
        // Fail on bad statistics before any expensive work.
        let factor = self.covariance_factor(hp, stats)?;
        laps.lap("covariance_factor");
        let templates = context_templates(self, hp)?;
        laps.lap("templates");
        let keyed: Vec<Result<Keyed>> = reqs
            .iter()
            .map(|r| self.rome_keyed(r, hp, &templates, factor))
            .collect();
        laps.lap("key");
        let cases: Vec<(usize, ValueCase)> = keyed
            .iter()
            .enumerate()
            .filter_map(|(i, k)| {
                let k = k.as_ref().ok()?;
                Some((
                    i,
                    ValueCase {
                        req: &reqs[i],
                        target: &k.target,
                    },
                ))
            })
            .collect();
        let only: Vec<ValueCase> = cases.iter().map(|&(_, c)| c).collect();
        let mut values = self
            .compute_values(&only, &hp.value_spec(), &templates)?
            .into_iter();
        laps.lap("value");
        let mut out = vec![];
        for (req, k) in reqs.iter().zip(keyed) {
            out.push(k.and_then(|k| {
                let v = values.next().expect("a value per keyed request")?;
                self.rome_finish(req, hp, &templates, k, v, laps.clone())
            }));
        }
        Ok(out)
    }

    /// ROME's edit of `req` up to its v* optimisation, this process computing `share` of v*'s
    /// rows: what [`rome`](Self::rome) does before optimising, with the same checks.
    pub fn rome_run(
        &self,
        req: &RewriteRequest,
        hp: &RomeHparams,
        stats: Option<&KeyStats>,
        share: Share,
    ) -> Result<RomeRun> {
        req.validate()?;
        self.check_layer(hp.layer)?;
        let started = crate::clock::now_seconds();
        let mut laps = Laps::start();
        let factor = self.covariance_factor(hp, stats)?;
        laps.lap("covariance_factor");
        let templates = context_templates(self, hp)?;
        laps.lap("templates");
        let keyed = self.rome_keyed(req, hp, &templates, factor)?;
        laps.lap("key");
        let case = ValueCase {
            req,
            target: &keyed.target,
        };
        let value = self.value_run(&case, &hp.value_spec(), &templates, share)?;
        Ok(RomeRun {
            req: req.clone(),
            hp: hp.clone(),
            templates,
            keyed,
            value,
            laps,
            started,
        })
    }

    fn check_layer(&self, l: usize) -> Result<()> {
        if l >= self.model.n_layer() {
            return Err(LociError::input(format!(
                "layer {l} out of range (the model has {} layers)",
                self.model.n_layer()
            )));
        }
        Ok(())
    }

    /// A request's target tokens, key k* and direction u (refused: an invalid request, a target
    /// that tokenizes to nothing).
    fn rome_keyed(
        &self,
        req: &RewriteRequest,
        hp: &RomeHparams,
        templates: &[String],
        factor: Option<&CholeskyFactor>,
    ) -> Result<Keyed> {
        req.validate()?;
        let target = target_ids(self, req)?;
        let k_star = self.rome_key(req, hp, templates)?;
        let u = update_direction(&k_star, factor)?;
        Ok(Keyed { target, k_star, u })
    }

    /// The edit from a request's key and optimised value: the rank-one update.
    fn rome_finish(
        &self,
        req: &RewriteRequest,
        hp: &RomeHparams,
        templates: &[String],
        k: Keyed,
        v: ValueOut,
        mut laps: Laps,
    ) -> Result<RomeEdit> {
        let key = match hp.key_mode {
            KeyMode::Rrome => k.k_star,
            KeyMode::Original => self.rome_key(req, hp, &["{}".to_string()])?,
        };
        let target_value = v.value.to_vec1::<f32>()?;
        let (right, division) = self.rank_one(hp.layer, &key, &k.u, v.value, &mut laps)?;
        Ok(RomeEdit {
            layer: hp.layer,
            left: k.u,
            right,
            request: req.clone(),
            hparams: hp.clone(),
            stats: RomeStats {
                losses: v.losses,
                delta_norm: v.delta_norm,
                division_factor: division,
                templates: templates.to_vec(),
                target_value,
                seconds: laps.seconds,
            },
        })
    }

    /// The key statistics' Cholesky factor when the update uses them, checked against the model.
    fn covariance_factor<'s>(
        &self,
        hp: &RomeHparams,
        stats: Option<&'s KeyStats>,
    ) -> Result<Option<&'s CholeskyFactor>> {
        let l = hp.layer;
        match (hp.mom2_adjustment, stats) {
            (true, None) => Err(LociError::input(format!("no key statistics for layer {l}"))),
            (true, Some(s)) => {
                s.check_fits(self, l)?;
                Ok(Some(s.factor(&self.model.device)?))
            }
            (false, _) => Ok(None),
        }
    }

    /// The MLP key at the subject's last token averaged over `templates` (noised as the edit's
    /// goal asks).
    fn rome_key(
        &self,
        req: &RewriteRequest,
        hp: &RomeHparams,
        templates: &[String],
    ) -> Result<Tensor> {
        let noise = hp.goal.noise(hp.seed);
        Ok(self
            .subject_states_noised(req, &[Site::MlpKey(hp.layer)], templates, noise)?
            .remove(0))
    }

    /// The closed form: W' k = v* for the chosen key, `W' = W + right · uᵀ` with
    /// `right = (v* − W k) / (k · u)`. Returns `right` and `k · u`.
    fn rank_one(
        &self,
        l: usize,
        key: &Tensor,
        u: &[f32],
        v_star: Tensor,
        laps: &mut Laps,
    ) -> Result<(Vec<f32>, f32)> {
        let m = &self.model;
        let current = m
            .down_proj(l)?
            .forward(&key.to_dtype(m.dtype)?.reshape((1, 1, m.cfg.d_ff))?)?
            .flatten_all()?
            .to_dtype(DType::F32)?;
        let key_v = key.to_vec1::<f32>()?;
        let division: f32 = key_v.iter().zip(u).map(|(a, b)| a * b).sum();
        if division.abs() < 1e-12 || !division.is_finite() {
            return Err(LociError::model(format!(
                "the key is orthogonal to the update direction (k·u = {division:e})"
            )));
        }
        laps.lap("update");
        let right: Vec<f32> = (v_star - current)?
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x / division)
            .collect();
        if right.iter().any(|x| !x.is_finite()) {
            return Err(LociError::model("the edit is not finite"));
        }
        Ok((right, division))
    }

    /// Applies an edit; keep the returned value to undo it exactly.
    pub fn apply_edit(&mut self, e: &RomeEdit) -> Result<AppliedEdit> {
        self.apply_deltas(&[e.delta()])
    }
}

/// u: the key's direction under the statistics, `C⁻¹ k*` (or k* itself without them), unit norm.
fn update_direction(k_star: &Tensor, factor: Option<&CholeskyFactor>) -> Result<Vec<f32>> {
    let k_vec: Vec<f64> = k_star.to_vec1::<f32>()?.iter().map(|&x| x as f64).collect();
    let u = match factor {
        Some(f) => f.solve(&k_vec)?,
        None => k_vec,
    };
    let norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm.is_nan() || norm <= 0.0 || !norm.is_finite() {
        return Err(LociError::model("the subject key is zero or not finite"));
    }
    Ok(u.iter().map(|x| (x / norm) as f32).collect())
}
