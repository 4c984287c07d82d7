//! Causal tracing (Meng et al. 2022): corrupt the subject, restore one state from the clean run,
//! and measure how much of the answer's probability comes back — for every token and layer.
//!
//! The fast path gives the same grid as the reference algorithm while doing far less work: the
//! clean run happens once (no clean row in restore batches); a restoration at (token t, layer l)
//! reuses the corrupted run's states below its first changed layer and its keys and values before
//! t, so only positions t.. of the layers above are recomputed; the cells of one token (and, with
//! one worker, of every requested kind) are batched together, joining the batch at their first
//! changed layer; logits are computed at the last position only; tokens before the subject are
//! never recomputed (they equal `low`).
//!
//! With `full_answer` (Hase et al.'s variant, docs/tracing.md#whole-answer-tracing) the explained
//! quantity is the probability of the whole answer, teacher-forced after the prompt; only the
//! prompt's tokens are restored, and logits are computed at the answer's positions only.
//!
//! One job per file: `types` (requests, results, the header, observers), `noise` (the noise's
//! strength), `prepare` (the clean and corrupted runs every cell shares), `fast` (one token's
//! cells in one batched pass), `naive` (the reference algorithm), `attribution` (attribution
//! patching's estimate of every cell from one backward pass), `neurons` (knowledge neurons'
//! integrated gradients), `effect` (grids to per-layer effects); here, planning a trace and
//! streaming its rows over worker threads.

mod attribution;
pub mod effect;
mod fast;
mod naive;
mod neurons;
pub mod noise;
mod prepare;
pub mod types;

use std::collections::BTreeMap;

use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
pub use effect::{tracing_effect, AggregateCurves};
use fast::trace_token;
pub use neurons::NEURON_THRESHOLD;
pub use noise::{embedding_std, NoiseSpec};
pub use prepare::window_layers;
use prepare::{finish, header, prepare, Prepared};
pub use types::{
    AnswerToken, KnowledgeNeuron, Quiet, TraceHeader, TraceKind, TraceMethod, TraceObserver,
    TraceRequest, TraceResult, TraceWork,
};

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
    /// What the clean and corrupted runs found: tokens, subject span, answer, `high` and `low`.
    pub header: TraceHeader,
}

impl TracePlan {
    /// Every row of the trace, `(kind, token)`, kind by kind.
    pub fn rows(&self) -> Vec<(TraceKind, usize)> {
        let big_t = self.p.base.prompt_len;
        self.req
            .kinds
            .iter()
            .flat_map(|&k| (0..big_t).map(move |t| (k, t)))
            .collect()
    }
}

impl LoadedModel {
    /// Does a trace's clean and corrupted runs and lays out its header, leaving the rows to
    /// [`LoadedModel::trace_row`]. `embedding_std` is needed for relative noise.
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
        if token >= plan.p.base.prompt_len || !plan.req.kinds.contains(&kind) {
            return Err(LociError::input(format!(
                "the trace has no {} row at token {token}",
                kind.name()
            )));
        }
        let mut work = 0.0;
        Ok(trace_token(self, &plan.p, &[kind], token, plan.req.window, &mut work)?.remove(0))
    }

    /// The trace of `req` by `method`: exact causal tracing (its rows over `workers` threads),
    /// attribution patching's estimate or knowledge neurons. `obs` hears the header, then the
    /// rows (returning `false` cancels).
    pub fn trace_by(
        &self,
        method: TraceMethod,
        req: &TraceRequest,
        embedding_std: Option<f64>,
        obs: &mut dyn TraceObserver,
        workers: usize,
    ) -> Result<TraceResult> {
        match method {
            TraceMethod::Exact => self.trace(req, embedding_std, obs, workers),
            TraceMethod::Attribution => self.trace_attribution(req, embedding_std, obs),
            TraceMethod::Neurons => self.trace_neurons(req, obs),
        }
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
        let (n, big_t) = (self.model.n_layer(), p.base.prompt_len);
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
                token_layers: ((req.samples + 1) * p.base.ids.len() * n) as u64
                    + work.round() as u64,
                naive_token_layers: naive::naive_work(req, big_t, n),
            },
            started,
        ))
    }
}
