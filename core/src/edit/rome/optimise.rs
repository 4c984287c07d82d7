//! Adam on every request's δ at once: each request keeps its own loss, its own stop (the loss
//! is small, or the steps run out) and its own ball of radius `clamp_norm_factor ·
//! ‖target_init‖`. Adam works element by element, so one optimiser over the stacked δ of the
//! requests still optimising is the optimiser each would have alone (they all start together,
//! so they share its step count); a request that stops leaves the stack.
//!
//! The optimisation is a [`ValueRun`] stepped in three phases — forward, losses, advance — so
//! that it can be driven from outside: natively by one loop whose groups of rows run on
//! threads ([`LoadedModel::optimise_deltas`]), or by a page whose tab workers each hold the
//! same run and compute one group (a [`Share`]), exchanging each step's [`ValueParts`] and
//! [`ValueGrad`]s. Every process applies the same Adam step to the same sums, so they all hold
//! the same δ, and the result equals the native one with as many threads as shares.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::hparams::ValueSpec;
use super::step::{value_groups, GroupOut, ValueGroup, ValueStep};
use super::value::{Prefix, ValueOut, ValueRows};
use crate::error::{LociError, Result};
use crate::loader::LoadedModel;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// Which of a run's groups of rows this process computes: group `part` of `of` (the tab's
/// workers), or all of them (`Share::all`, the native loop on its threads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// This process's group.
    pub part: usize,
    /// How many groups the rows are split into (one per process).
    pub of: usize,
    /// Whether this process computes every group (the native loop).
    pub all: bool,
}

impl Share {
    /// Every group, one per native worker thread.
    pub fn all() -> Self {
        Self {
            part: 0,
            of: crate::threads::workers(),
            all: true,
        }
    }

    /// Group `part` of `of`, each process computing one.
    pub fn part(part: usize, of: usize) -> Result<Self> {
        if of == 0 || part >= of {
            return Err(LociError::input(format!("no share {part} of {of}")));
        }
        Ok(Self {
            part,
            of,
            all: false,
        })
    }
}

/// f32 values that travel as their bit patterns: exact, and a NaN or an infinity (a diverging
/// optimisation) survives formats that cannot write one (JSON between the page and its
/// workers).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Floats(pub Vec<f32>);

impl Serialize for Floats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let bits: Vec<u32> = self.0.iter().map(|x| x.to_bits()).collect();
        bits.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Floats {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let bits = Vec::<u32>::deserialize(d)?;
        Ok(Floats(bits.into_iter().map(f32::from_bits).collect()))
    }
}

/// One process's share of a step's forward pass: what every process needs to combine the
/// losses. Values come in group order.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ValueParts {
    /// The slot of each label in this process's groups.
    pub nll_slots: Vec<usize>,
    /// Each label's NLL.
    pub nll: Floats,
    /// The slot of each KL row in this process's groups.
    pub kl_slots: Vec<usize>,
    /// Each KL row's term.
    pub kl: Floats,
    /// At the first step: the slots of the requests whose first row this process holds.
    pub before_slots: Vec<usize>,
    /// Their site's value there before δ.
    pub before: Vec<Floats>,
}

/// One process's share of δ's gradient: each of its groups' gradient `[slots, d]` row-major, in
/// group order (kept apart so the sum's order, and so its rounding, is the same however the
/// groups are shared out).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ValueGrad(pub Vec<Floats>);

/// A request's optimisation state.
struct CaseState {
    delta: Tensor,
    m: Tensor,
    v: Tensor,
    /// The site's activation at the request's first row before δ, from the first step.
    target_init: Option<Tensor>,
    ti_norm2: f64,
    /// The KL row's log-probabilities at the first step, `[1, vocab]`, where this process
    /// holds that row.
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

/// v*'s optimisation of a batch of requests, stepped from outside (see the module's text).
pub struct ValueRun {
    spec: ValueSpec,
    rows: ValueRows,
    prefix: Prefix,
    share: Share,
    states: Vec<CaseState>,
    results: Vec<Option<Result<ValueOut>>>,
    /// The requests still optimising (batch indices); a request's slot is its place here.
    active: Vec<usize>,
    /// This process's groups of the active rows, and how many there are in all shares.
    groups: Vec<ValueGroup>,
    all_groups: usize,
    labels: Vec<usize>,
    step: usize,
    /// This step's δ and this process's forward passes, between the phases.
    delta: Option<Var>,
    outs: Vec<GroupOut>,
    losses: Option<StepLosses>,
    /// The slots that go on after this step.
    going: Vec<usize>,
}

impl ValueRun {
    /// A run over `rows` (their prefix computed), this process computing `share` of them.
    pub(super) fn new(
        lm: &LoadedModel,
        spec: &ValueSpec,
        rows: ValueRows,
        prefix: Prefix,
        share: Share,
    ) -> Result<Self> {
        if spec.steps == 0 {
            return Err(LociError::input("v* needs at least one optimisation step"));
        }
        let d = lm.model.cfg.d_model;
        let zeros = Tensor::zeros(d, candle_core::DType::F32, &lm.model.device)?;
        let states = (0..rows.cases())
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
        let active: Vec<usize> = (0..rows.cases()).collect();
        let mut run = Self {
            spec: spec.clone(),
            labels: rows.labels_per_case(),
            results: (0..rows.cases()).map(|_| None).collect(),
            states,
            active,
            groups: vec![],
            all_groups: 0,
            share,
            step: 0,
            delta: None,
            outs: vec![],
            losses: None,
            going: vec![],
            rows,
            prefix,
        };
        run.regroup(lm)?;
        Ok(run)
    }

    /// This process's groups of the active requests' rows (a share builds only its own).
    fn regroup(&mut self, lm: &LoadedModel) -> Result<()> {
        let only = (!self.share.all).then_some(self.share.part);
        let (r, p, active) = (&self.rows, &self.prefix, &self.active);
        (self.groups, self.all_groups) = value_groups(lm, r, p, active, self.share.of, only)?;
        Ok(())
    }

    /// Whether every request has stopped.
    pub fn done(&self) -> bool {
        self.active.is_empty()
    }

    /// The step about to run (from 0) and the most steps.
    pub fn progress(&self) -> (usize, usize) {
        (self.step, self.spec.steps)
    }

    /// Phase 1: this process's groups' forward passes with the current δ.
    pub fn forward(&mut self, lm: &LoadedModel) -> Result<ValueParts> {
        if self.delta.is_some() || self.done() {
            return Err(out_of_phase("forward"));
        }
        let stacked: Vec<Tensor> = self
            .active
            .iter()
            .map(|&c| self.states[c].delta.clone())
            .collect();
        let delta = Var::from_tensor(&Tensor::stack(&stacked, 0)?)?;
        let first = self.step == 0;
        let kl_init: Option<Vec<Option<Tensor>>> = (!first).then(|| {
            self.active
                .iter()
                .map(|&c| self.states[c].kl_init.clone())
                .collect()
        });
        let step = ValueStep {
            lm,
            site: self.spec.site,
            delta: delta.as_tensor(),
            kl_init: kl_init.as_deref(),
            kl_factor: self.spec.kl_factor,
            read_values: first,
        };
        let outs = crate::threads::map(&self.groups, |g| step.forward(g))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let mut parts = ValueParts::default();
        for (o, g) in outs.iter().zip(&self.groups) {
            parts.nll_slots.extend(&g.label_slots);
            parts.nll.0.extend(&o.nll_values);
            parts.kl_slots.extend(&g.kl_slots);
            parts.kl.0.extend(&o.kl_values);
            for (slot, x) in &o.values_before {
                parts.before_slots.push(*slot);
                parts.before.push(Floats(x.to_vec1::<f32>()?));
            }
            // This process's KL rows keep their first step's log-probabilities.
            if let Some(logp) = &o.kl_logp {
                for (i, &slot) in g.kl_slots.iter().enumerate() {
                    let s = &mut self.states[self.active[slot]];
                    if s.kl_init.is_none() {
                        s.kl_init = Some(logp.narrow(0, i, 1)?);
                    }
                }
            }
        }
        self.delta = Some(delta);
        self.outs = outs;
        Ok(parts)
    }

    /// Phase 2: every process's parts (in share order) combined into each active request's
    /// loss, which also decides who stops. Returns the losses (in slot order).
    pub fn losses(&mut self, all: &[ValueParts]) -> Result<Vec<f32>> {
        let delta = match (&self.delta, &self.losses) {
            (Some(d), None) => d.clone(),
            _ => return Err(out_of_phase("losses")),
        };
        self.check_parts(all)?;
        let dev = delta.device().clone();
        for p in all {
            for (slot, x) in p.before_slots.iter().zip(&p.before) {
                let x = Tensor::new(x.0.as_slice(), &dev)?;
                let s = &mut self.states[self.active[*slot]];
                s.ti_norm2 = x.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                s.target_init = Some(x);
            }
        }
        let step = step_losses(
            &self.spec,
            all,
            &delta,
            &self.active,
            &self.states,
            &self.labels,
        )?;
        let mut going = vec![];
        for (slot, &c) in self.active.iter().enumerate() {
            let loss = step.losses[slot];
            if !loss.is_finite() {
                self.results[c] = Some(Err(LociError::model(format!(
                    "the v* optimisation diverged (loss {loss}) at step {}",
                    self.step
                ))));
                continue;
            }
            self.states[c].losses.push(loss);
            let small = self.spec.direction.is_raise() && loss < 0.05;
            if small || self.step + 1 == self.spec.steps {
                self.results[c] = Some(finish(&self.states[c]));
            } else {
                going.push(slot);
            }
        }
        crate::progress::report("value", self.step + 1, self.spec.steps, &step.losses)?;
        let losses = step.losses.clone();
        self.losses = Some(step);
        self.going = going;
        if self.going.is_empty() {
            self.active.clear();
        }
        Ok(losses)
    }

    /// Refuses a step's parts that are not every share's: each active request's labels, its KL
    /// row, and at the first step its value before δ, each exactly once.
    fn check_parts(&self, all: &[ValueParts]) -> Result<()> {
        let n = self.active.len();
        let mut labels = vec![0usize; n];
        let mut kl = vec![0usize; n];
        let mut before = vec![0usize; n];
        let count = |slots: &[usize], values: usize, into: &mut [usize]| -> Result<()> {
            if slots.len() != values || slots.iter().any(|&s| s >= n) {
                return Err(LociError::input(
                    "a v* step's parts do not match its requests",
                ));
            }
            slots.iter().for_each(|&s| into[s] += 1);
            Ok(())
        };
        for p in all {
            count(&p.nll_slots, p.nll.0.len(), &mut labels)?;
            count(&p.kl_slots, p.kl.0.len(), &mut kl)?;
            count(&p.before_slots, p.before.len(), &mut before)?;
        }
        let first = usize::from(self.step == 0);
        let whole = self.active.iter().enumerate().all(|(slot, &c)| {
            labels[slot] == self.labels[c] && kl[slot] == 1 && before[slot] == first
        });
        if !whole {
            return Err(LociError::input(
                "a v* step needs every share's parts, each once",
            ));
        }
        Ok(())
    }

    /// Phase 2 (continued, while requests go on): this process's groups' share of δ's
    /// gradient.
    pub fn backward(&self) -> Result<ValueGrad> {
        let (Some(delta), Some(step), false) = (&self.delta, &self.losses, self.done()) else {
            return Err(out_of_phase("backward"));
        };
        let pairs: Vec<(&GroupOut, &ValueGroup)> = self.outs.iter().zip(&self.groups).collect();
        let parts = crate::threads::map(&pairs, |&(o, g)| group_gradient(o, g, delta, step))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        Ok(ValueGrad(
            parts
                .into_iter()
                .flatten()
                .map(|g| Ok(Floats(g.flatten_all()?.to_vec1()?)))
                .collect::<Result<_>>()?,
        ))
    }

    /// Phase 3: every group's gradient (the shares' in share order) plus the weight decay's,
    /// one Adam step, and the requests that stopped leave.
    pub fn advance(&mut self, lm: &LoadedModel, grads: &[ValueGrad]) -> Result<()> {
        let (Some(delta), Some(_), false) = (&self.delta, &self.losses, self.done()) else {
            return Err(out_of_phase("advance"));
        };
        let delta = delta.clone();
        let shape = delta.dims().to_vec();
        let size: usize = shape.iter().product();
        let each: Vec<&Floats> = grads.iter().flat_map(|g| &g.0).collect();
        if each.len() != self.all_groups || each.iter().any(|g| g.0.len() != size) {
            return Err(LociError::input(
                "a v* step needs every group's gradient, each once",
            ));
        }
        let mut total = weight_decay_gradient(&self.spec, &delta, &self.active, &self.states)?;
        for g in each {
            let g = Tensor::from_vec(g.0.clone(), shape.as_slice(), delta.device())?;
            total = (total + g)?;
        }
        self.adam_step(&delta, &total)?;
        (self.delta, self.losses) = (None, None);
        self.outs.clear();
        self.step += 1;
        if self.going.len() < self.active.len() {
            self.active = self.going.iter().map(|&s| self.active[s]).collect();
            self.regroup(lm)?;
        }
        Ok(())
    }

    /// Each request's result, once every one has stopped.
    pub(crate) fn finish(self) -> Result<Vec<Result<ValueOut>>> {
        if !self.done() {
            return Err(out_of_phase("finish"));
        }
        Ok(self
            .results
            .into_iter()
            .map(|r| r.expect("every request stops by the last step"))
            .collect())
    }

    /// Adam's step (candle's AdamW without weight decay, element by element) and the clamp,
    /// kept for the slots still optimising.
    fn adam_step(&mut self, delta: &Var, grad: &Tensor) -> Result<()> {
        let (spec, t) = (&self.spec, self.step + 1);
        let states = &mut self.states;
        let active = &self.active;
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
        for &slot in &self.going {
            let s = &mut states[active[slot]];
            (s.delta, s.m, s.v) = (next.get(slot)?, m.get(slot)?, v.get(slot)?);
        }
        Ok(())
    }
}

impl LoadedModel {
    /// Optimises every request's δ, this process computing every group (each on its own
    /// thread); one result per request of `r`.
    pub(super) fn optimise_deltas(
        &self,
        spec: &ValueSpec,
        r: ValueRows,
        prefix: Prefix,
    ) -> Result<Vec<Result<ValueOut>>> {
        let mut run = ValueRun::new(self, spec, r, prefix, Share::all())?;
        while !run.done() {
            let parts = run.forward(self)?;
            run.losses(std::slice::from_ref(&parts))?;
            if run.done() {
                break;
            }
            let grad = run.backward()?;
            run.advance(self, std::slice::from_ref(&grad))?;
        }
        run.finish()
    }
}

fn out_of_phase(what: &str) -> LociError {
    LociError::model(format!("v*'s {what} phase ran out of order"))
}

/// Each active request's loss this step: its mean NLL (raising) or p (lowering), its KL term,
/// and ‖δ‖'s weight decay (with a tiny floor: its gradient at δ = 0 is then 0, as in torch).
fn step_losses(
    spec: &ValueSpec,
    parts: &[ValueParts],
    delta: &Var,
    active: &[usize],
    states: &[CaseState],
    labels: &[usize],
) -> Result<StepLosses> {
    let n = active.len();
    let mut nll = vec![0f64; n];
    let mut kl = vec![0f64; n];
    for p in parts {
        for (&slot, &v) in p.nll_slots.iter().zip(&p.nll.0) {
            nll[slot] += v as f64;
        }
        for (&slot, &v) in p.kl_slots.iter().zip(&p.kl.0) {
            kl[slot] += v as f64;
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

/// ‖δ‖'s weight decay's gradient, `[slots, d]`.
fn weight_decay_gradient(
    spec: &ValueSpec,
    delta: &Var,
    active: &[usize],
    states: &[CaseState],
) -> Result<Tensor> {
    let coef: Vec<f32> = active
        .iter()
        .map(|&c| (spec.weight_decay / states[c].ti_norm2) as f32)
        .collect();
    let coef = Tensor::new(coef.as_slice(), delta.device())?;
    let wd = ((delta.as_tensor().sqr()?.sum(1)? + 1e-24)?.sqrt()? * coef)?.sum_all()?;
    Ok(wd
        .backward()?
        .get(delta.as_tensor())
        .cloned()
        .unwrap_or(delta.as_tensor().zeros_like()?))
}

/// One group's share of δ's gradient: its labels' weighted NLL and its KL terms, differentiated
/// (`None`: the group has neither).
fn group_gradient(
    o: &GroupOut,
    g: &ValueGroup,
    delta: &Var,
    step: &StepLosses,
) -> Result<Option<Tensor>> {
    let dev = delta.device();
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
