//! Adam on every request's δ at once: each request keeps its own loss, its own stop (the loss
//! is small, or the steps run out) and its own ball of radius `clamp_norm_factor ·
//! ‖target_init‖`. Adam works element by element, so one optimiser over the stacked δ of the
//! requests still optimising is the optimiser each would have alone (they all start together,
//! so they share its step count); a request that stops leaves the stack.

use candle_core::{Tensor, Var};

use super::hparams::ValueSpec;
use super::step::{value_groups, GroupOut, ValueGroup, ValueStep};
use super::value::{Prefix, ValueOut, ValueRows};
use crate::error::{LociError, Result};
use crate::loader::LoadedModel;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// A request's optimisation state.
struct CaseState {
    delta: Tensor,
    m: Tensor,
    v: Tensor,
    /// The site's activation at the request's first row before δ, from the first step.
    target_init: Option<Tensor>,
    ti_norm2: f64,
    /// The KL row's log-probabilities at the first step, `[1, vocab]`.
    kl_init: Option<Tensor>,
    losses: Vec<f32>,
}

/// One step's per-request losses and the factors of their NLL graphs.
struct StepLosses {
    losses: Vec<f32>,
    /// Per slot: raising, 1 / labels; lowering p = exp(−NLL), whose gradient is the NLL's times
    /// −p (a constant of this step), so the graph only gets a factor.
    nll_weight: Vec<f64>,
}

impl LoadedModel {
    /// Optimises every request's δ; one result per request of `r`.
    pub(super) fn optimise_deltas(
        &self,
        spec: &ValueSpec,
        r: &ValueRows,
        prefix: &Prefix,
    ) -> Result<Vec<Result<ValueOut>>> {
        if spec.steps == 0 {
            return Err(LociError::input("v* needs at least one optimisation step"));
        }
        let d = self.model.cfg.d_model;
        let zeros = Tensor::zeros(d, candle_core::DType::F32, &self.model.device)?;
        let mut states: Vec<CaseState> = (0..r.cases())
            .map(|_| CaseState {
                delta: zeros.clone(),
                m: zeros.clone(),
                v: zeros.clone(),
                target_init: None,
                ti_norm2: 0.0,
                kl_init: None,
                losses: vec![],
            })
            .collect();
        let mut results: Vec<Option<Result<ValueOut>>> = (0..r.cases()).map(|_| None).collect();
        let mut active: Vec<usize> = (0..r.cases()).collect();
        let mut groups = value_groups(self, r, prefix, &active)?;
        let labels = r.labels_per_case();
        for it in 0..spec.steps {
            let stacked: Vec<Tensor> = active.iter().map(|&c| states[c].delta.clone()).collect();
            let delta = Var::from_tensor(&Tensor::stack(&stacked, 0)?)?;
            let outs = self.value_step(spec, &groups, &delta, &active, &states, it == 0)?;
            observe(&outs, &groups, &active, &mut states)?;
            let step = step_losses(spec, &outs, &groups, &delta, &active, &states, &labels)?;
            let mut going = vec![];
            for (slot, &c) in active.iter().enumerate() {
                let loss = step.losses[slot];
                if !loss.is_finite() {
                    results[c] = Some(Err(LociError::model(format!(
                        "the v* optimisation diverged (loss {loss}) at step {it}"
                    ))));
                    continue;
                }
                states[c].losses.push(loss);
                if (spec.direction.is_raise() && loss < 0.05) || it + 1 == spec.steps {
                    results[c] = Some(finish(&states[c]));
                } else {
                    going.push(slot);
                }
            }
            crate::progress::report("value", it + 1, spec.steps, &step.losses)?;
            if going.is_empty() {
                break;
            }
            let grad = gradient(spec, &outs, &groups, &delta, &step, &active, &states)?;
            self.adam_step(spec, it + 1, &delta, &grad, &going, &active, &mut states)?;
            if going.len() < active.len() {
                active = going.iter().map(|&s| active[s]).collect();
                groups = value_groups(self, r, prefix, &active)?;
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every request stops by the last step"))
            .collect())
    }

    /// One forward pass of every group (each on its own thread).
    fn value_step(
        &self,
        spec: &ValueSpec,
        groups: &[ValueGroup],
        delta: &Var,
        active: &[usize],
        states: &[CaseState],
        first: bool,
    ) -> Result<Vec<GroupOut>> {
        let kl_init: Option<Vec<Tensor>> = (!first).then(|| {
            active
                .iter()
                .map(|&c| states[c].kl_init.clone().expect("read at the first step"))
                .collect()
        });
        let step = ValueStep {
            lm: self,
            site: spec.site,
            delta: delta.as_tensor(),
            kl_init: kl_init.as_deref(),
            kl_factor: spec.kl_factor,
            read_values: first,
        };
        crate::threads::map(groups, |g| step.forward(g))
            .into_iter()
            .collect()
    }

    /// Adam's step (candle's AdamW without weight decay, element by element) and the clamp,
    /// kept for the slots still optimising.
    #[allow(clippy::too_many_arguments)]
    fn adam_step(
        &self,
        spec: &ValueSpec,
        t: usize,
        delta: &Var,
        grad: &Tensor,
        going: &[usize],
        active: &[usize],
        states: &mut [CaseState],
    ) -> Result<()> {
        let stack = |f: &dyn Fn(&CaseState) -> &Tensor| -> Result<Tensor> {
            let rows: Vec<Tensor> = active.iter().map(|&c| f(&states[c]).clone()).collect();
            Ok(Tensor::stack(&rows, 0)?)
        };
        let (m, v) = (stack(&|s| &s.m)?, stack(&|s| &s.v)?);
        let scale_m = 1.0 / (1.0 - BETA1.powi(t as i32));
        let scale_v = 1.0 / (1.0 - BETA2.powi(t as i32));
        let m = ((m * BETA1)? + (grad * (1.0 - BETA1))?)?;
        let v = ((v * BETA2)? + (grad.sqr()? * (1.0 - BETA2))?)?;
        let step = ((&m * scale_m)? / ((&v * scale_v)?.sqrt()? + EPS)?)?;
        let next = (delta.as_tensor() - (step * spec.lr)?)?;
        // Each row back into its ball.
        let norms = next.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
        let scale: Vec<f32> = active
            .iter()
            .zip(&norms)
            .map(|(&c, &n)| {
                let max = spec.clamp_norm_factor * states[c].ti_norm2.sqrt();
                if n as f64 > max {
                    (max / n as f64) as f32
                } else {
                    1.0
                }
            })
            .collect();
        let scale = Tensor::new(scale.as_slice(), next.device())?.unsqueeze(1)?;
        let next = next.broadcast_mul(&scale)?;
        for &slot in going {
            let s = &mut states[active[slot]];
            (s.delta, s.m, s.v) = (next.get(slot)?, m.get(slot)?, v.get(slot)?);
        }
        Ok(())
    }
}

/// Keeps the first step's read-outs: each request's value before δ and its ‖·‖², and its KL
/// row's log-probabilities (the KL's reference from then on).
fn observe(
    outs: &[GroupOut],
    groups: &[ValueGroup],
    active: &[usize],
    states: &mut [CaseState],
) -> Result<()> {
    for o in outs {
        for (slot, x) in &o.values_before {
            let s = &mut states[active[*slot]];
            s.ti_norm2 = x.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            s.target_init = Some(x.clone());
        }
    }
    for (o, g) in outs.iter().zip(groups) {
        if let Some(logp) = &o.kl_logp {
            for (i, &slot) in g.kl_slots.iter().enumerate() {
                let s = &mut states[active[slot]];
                if s.kl_init.is_none() {
                    s.kl_init = Some(logp.narrow(0, i, 1)?);
                }
            }
        }
    }
    Ok(())
}

/// Each active request's loss this step: its mean NLL (raising) or p (lowering), its KL term,
/// and ‖δ‖'s weight decay (with a tiny floor: its gradient at δ = 0 is then 0, as in torch).
fn step_losses(
    spec: &ValueSpec,
    outs: &[GroupOut],
    groups: &[ValueGroup],
    delta: &Var,
    active: &[usize],
    states: &[CaseState],
    labels: &[usize],
) -> Result<StepLosses> {
    let n = active.len();
    let mut nll = vec![0f64; n];
    let mut kl = vec![0f64; n];
    for (o, g) in outs.iter().zip(groups) {
        for (v, &slot) in o.nll_values.iter().zip(&g.label_slots) {
            nll[slot] += *v as f64;
        }
        for (v, &slot) in o.kl_values.iter().zip(&g.kl_slots) {
            kl[slot] += *v as f64;
        }
    }
    let norms = (delta.as_tensor().sqr()?.sum(1)? + 1e-24)?
        .sqrt()?
        .to_vec1::<f32>()?;
    let mut losses = vec![];
    let mut nll_weight = vec![];
    for (slot, &c) in active.iter().enumerate() {
        let mean = nll[slot] / labels[c] as f64;
        let (loss, weight) = if spec.direction.is_raise() {
            (mean, 1.0 / labels[c] as f64)
        } else {
            let p = (-mean).exp();
            (p, -p / labels[c] as f64)
        };
        let wd = norms[slot] as f64 * spec.weight_decay / states[c].ti_norm2;
        losses.push((loss + kl[slot] + wd) as f32);
        nll_weight.push(weight);
    }
    Ok(StepLosses { losses, nll_weight })
}

/// δ's gradient, `[slots, d]`: the weight decay's plus every group's (each differentiated on
/// its own thread).
fn gradient(
    spec: &ValueSpec,
    outs: &[GroupOut],
    groups: &[ValueGroup],
    delta: &Var,
    step: &StepLosses,
    active: &[usize],
    states: &[CaseState],
) -> Result<Tensor> {
    let dev = delta.device();
    let coef: Vec<f32> = active
        .iter()
        .map(|&c| (spec.weight_decay / states[c].ti_norm2) as f32)
        .collect();
    let coef = Tensor::new(coef.as_slice(), dev)?;
    let wd = ((delta.as_tensor().sqr()?.sum(1)? + 1e-24)?.sqrt()? * coef)?.sum_all()?;
    let pairs: Vec<(&GroupOut, &ValueGroup)> = outs.iter().zip(groups).collect();
    let parts = crate::threads::map(&pairs, |&(o, g)| -> Result<Option<Tensor>> {
        let mut loss: Option<Tensor> = None;
        if let Some(nll) = &o.nll {
            let w: Vec<f32> = g
                .label_slots
                .iter()
                .map(|&s| step.nll_weight[s] as f32)
                .collect();
            let w = Tensor::new(w.as_slice(), dev)?;
            loss = Some((nll * w)?.sum_all()?);
        }
        if let Some(kl) = &o.kl {
            let kl = kl.sum_all()?;
            loss = Some(match loss {
                Some(l) => (l + kl)?,
                None => kl,
            });
        }
        Ok(match loss {
            Some(l) => l.backward()?.get(delta.as_tensor()).cloned(),
            None => None,
        })
    })
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let mut total = wd
        .backward()?
        .get(delta.as_tensor())
        .cloned()
        .unwrap_or(delta.as_tensor().zeros_like()?);
    for g in parts.into_iter().flatten() {
        total = (total + g)?;
    }
    Ok(total)
}

/// The request's v* and its record, once it stops.
fn finish(s: &CaseState) -> Result<ValueOut> {
    let ti = s
        .target_init
        .clone()
        .ok_or_else(|| LociError::model("v*'s first step read no value"))?;
    let delta_norm = s.delta.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(ValueOut {
        value: (ti + &s.delta)?,
        losses: s.losses.clone(),
        delta_norm,
    })
}
