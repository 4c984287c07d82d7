//! Constrained fine-tuning of many independent requests at once. The weights are never
//! written: each request trains its own differences ΔW, Δb of the chosen down-projections,
//! which a hook adds to the outputs of that request's rows (`ΔW k + Δb` for the key `k` the
//! layer reads), so one forward and backward pass trains every request. Each keeps its own
//! loss, its own stop (the loss is small, or the steps run out) and its own L∞ ball |Δ| ≤ ε;
//! Adam works element by element and every request starts at step 0, so one Adam over the
//! stacked differences of the requests still training is each request's own Adam. A single
//! `finetune` is a batch of one.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var, D};

use super::ft::{FtEdit, FtHparams, FtLayer, FtObjective, FtStats};
use crate::error::{LociError, Result};
use crate::hooks::noise::subject_noise_each;
use crate::hooks::{Chain, Hook, Site};
use crate::loader::LoadedModel;
use crate::model::LogitsAt;
use crate::request::{target_ids, RewriteRequest};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// The most memory the trained differences of one batch take, with their gradients and Adam
/// moments; more requests train in several batches.
const FT_BATCH_BYTES: usize = 8 << 30;

/// One request's training row (repeated once per noise draw): its tokens, the positions the
/// loss reads, the labels there, and the subject's tokens.
struct FtRow {
    ids: Vec<u32>,
    positions: Vec<usize>,
    target: Vec<u32>,
    subject: (usize, usize),
}

/// A layer's trainable differences for the requests still training: `[slots, d_model, d_ff]`
/// and `[slots, d_model]`, with their Adam moments.
struct LayerParams {
    w: Var,
    b: Option<Var>,
    moments: Vec<(Tensor, Tensor)>,
}

/// Adds each request's differences to its rows' down-projection outputs.
struct FtHook<'a> {
    layers: &'a BTreeMap<usize, LayerParams>,
    /// Rows per request (each request's rows are contiguous).
    rows_per: usize,
    keys: BTreeMap<usize, Tensor>,
}

impl Hook for FtHook<'_> {
    fn wants(&self, site: Site) -> bool {
        matches!(site, Site::MlpKey(l) | Site::Mlp(l) if self.layers.contains_key(&l))
    }

    fn at(&mut self, site: Site, x: &Tensor) -> Result<Option<Tensor>> {
        match site {
            Site::MlpKey(l) => {
                self.keys.insert(l, x.to_dtype(DType::F32)?);
                Ok(None)
            }
            Site::Mlp(l) => {
                let p = &self.layers[&l];
                let k = self
                    .keys
                    .remove(&l)
                    .ok_or_else(|| LociError::model("a trained MLP's key was not read"))?;
                let (rows, t, d_ff) = k.dims3()?;
                let slots = rows / self.rows_per;
                // [slots, rows_per·t, d_ff] × [slots, d_ff, d_model]
                let k = k.reshape((slots, self.rows_per * t, d_ff))?;
                let mut add = k.matmul(&p.w.as_tensor().transpose(1, 2)?)?;
                // Forward, and the trained weights' gradient in the backward pass.
                for _ in 0..2 {
                    crate::flops::matmul(rows * t, p.w.dim(1)?, d_ff);
                }
                if let Some(b) = &p.b {
                    add = add.broadcast_add(&b.as_tensor().unsqueeze(1)?)?;
                }
                let add = add.reshape((rows, t, ()))?.to_dtype(x.dtype())?;
                Ok(Some((x + add)?))
            }
            _ => Ok(None),
        }
    }
}

impl LoadedModel {
    /// Fine-tunes the chosen down-projections towards each request's new target, the requests
    /// independent of each other and trained together: one result per request, each the edit
    /// `finetune` makes of it alone (within float rounding). The model is not changed. The outer
    /// error is the batch's (settings, device).
    pub fn finetune_batch(
        &mut self,
        reqs: &[RewriteRequest],
        hp: &FtHparams,
    ) -> Result<Vec<Result<FtEdit>>> {
        hp.validate(self.model.n_layer())?;
        if let Some(l) = hp
            .layers
            .iter()
            .find(|&&l| self.model.down_proj(l).is_ok_and(|d| d.codebook.is_some()))
        {
            return Err(LociError::input(format!(
                "layer {l} carries a GRACE codebook, which overrides the outputs fine-tuning \
                 would train: fine-tune other layers, or undo the GRACE edits first"
            )));
        }
        let started = crate::clock::now_seconds();
        let mut results: Vec<Option<Result<FtEdit>>> = vec![];
        let mut rows = vec![];
        let mut index = vec![];
        for (i, r) in reqs.iter().enumerate() {
            match r.validate().and_then(|_| self.ft_row(r, hp)) {
                Ok(row) => {
                    results.push(None);
                    rows.push(row);
                    index.push(i);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        // Requests train together as far as their differences, gradients and Adam moments fit
        // in the budget (a GPT-J layer's are 1 GiB per request).
        let per_request: usize = hp
            .layers
            .iter()
            .map(|&l| Ok(self.model.down_proj(l)?.weight.elem_count() * 4 * 4))
            .sum::<Result<usize>>()?;
        let chunk = (FT_BATCH_BYTES / per_request.max(1)).max(1);
        let mut trained = vec![];
        for part in rows.chunks(chunk) {
            trained.extend(self.ft_train(hp, part)?);
        }
        if !trained.is_empty() {
            let seconds = crate::clock::now_seconds() - started;
            for (i, t) in index.into_iter().zip(trained) {
                results[i] = Some(t.map(|(layers, losses)| {
                    let max_abs_change = layers
                        .iter()
                        .flat_map(|l: &FtLayer| l.weight.iter().chain(l.bias.iter().flatten()))
                        .fold(0f32, |m, x| m.max(x.abs()));
                    FtEdit {
                        d_model: self.model.cfg.d_model,
                        layers,
                        request: reqs[i].clone(),
                        hparams: hp.clone(),
                        stats: FtStats {
                            losses,
                            max_abs_change,
                            seconds,
                        },
                    }
                }));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every request has its result"))
            .collect())
    }

    /// A request's training row: teacher forcing feeds the target but its last token; the
    /// last-token objective reads the prompt's last position only.
    fn ft_row(&self, req: &RewriteRequest, hp: &FtHparams) -> Result<FtRow> {
        let target = target_ids(self, req)?;
        let prompt = self.encode_prompt(&req.filled())?;
        let (ids, positions) = match hp.objective {
            FtObjective::LastToken => (prompt.clone(), vec![prompt.len() - 1; target.len()]),
            FtObjective::Sequence => {
                let mut ids = prompt.clone();
                ids.extend(&target[..target.len() - 1]);
                let first = prompt.len() - 1;
                (ids, (first..first + target.len()).collect())
            }
        };
        let max = self.model.cfg.max_positions;
        if ids.len() > max {
            return Err(LociError::input(format!(
                "the prompt and target have {} tokens, more than the model's context of {max}",
                ids.len()
            )));
        }
        let subject = match hp.goal.subject_noise {
            Some(_) => crate::request::subject_span(self, &req.prompt, &req.subject)?,
            None => (0, 0),
        };
        Ok(FtRow {
            ids,
            positions,
            target,
            subject,
        })
    }

    /// Adam on every request's differences until each stops; per request, its layers' changes
    /// and its losses (or why it failed).
    #[allow(clippy::type_complexity)]
    fn ft_train(
        &self,
        hp: &FtHparams,
        rows: &[FtRow],
    ) -> Result<Vec<Result<(Vec<FtLayer>, Vec<f32>)>>> {
        let mut params = self.ft_params(hp, rows.len())?;
        let mut active: Vec<usize> = (0..rows.len()).collect();
        let mut losses: Vec<Vec<f32>> = vec![vec![]; rows.len()];
        let mut out: Vec<Option<Result<(Vec<FtLayer>, Vec<f32>)>>> =
            (0..rows.len()).map(|_| None).collect();
        for step in 0..hp.steps {
            let (loss, values) = self.ft_loss(hp, rows, &active, &params, step)?;
            let mut going = vec![];
            for (slot, &c) in active.iter().enumerate() {
                let value = values[slot];
                if !value.is_finite() {
                    out[c] = Some(Err(LociError::model(format!(
                        "fine-tuning diverged (loss {value})"
                    ))));
                    continue;
                }
                losses[c].push(value);
                // A small loss stops before the step; otherwise every loss is followed by its
                // step, the last one included (as ROME's and Hase et al.'s fine-tuning do).
                if hp.goal.direction.is_raise() && value < 1e-2 {
                    out[c] = Some(
                        self.ft_changes(&params, slot)
                            .map(|l| (l, losses[c].clone())),
                    );
                } else {
                    going.push(slot);
                }
            }
            crate::progress::report("fine-tuning", step + 1, hp.steps, &values)?;
            if going.is_empty() {
                break;
            }
            let grads = loss.backward()?;
            adam_step(hp, step + 1, &mut params, &grads)?;
            if step + 1 == hp.steps {
                for &slot in &going {
                    let c = active[slot];
                    out[c] = Some(
                        self.ft_changes(&params, slot)
                            .map(|l| (l, losses[c].clone())),
                    );
                }
                break;
            }
            if going.len() < active.len() {
                keep_slots(&mut params, &going)?;
                active = going.iter().map(|&s| active[s]).collect();
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every request stops by the last step"))
            .collect())
    }

    /// Zero differences of every trained layer for `n` requests.
    fn ft_params(&self, hp: &FtHparams, n: usize) -> Result<BTreeMap<usize, LayerParams>> {
        let dev = &self.model.device;
        let mut out = BTreeMap::new();
        for &l in &hp.layers {
            let d = self.model.down_proj(l)?;
            let (d_model, d_ff) = d.weight.dims2()?;
            let w = Var::zeros((n, d_model, d_ff), DType::F32, dev)?;
            let b = match d.bias {
                Some(_) => Some(Var::zeros((n, d_model), DType::F32, dev)?),
                None => None,
            };
            let moments = std::iter::once(w.as_tensor())
                .chain(b.as_ref().map(|b| b.as_tensor()))
                .map(|t| Ok((t.zeros_like()?, t.zeros_like()?)))
                .collect::<Result<Vec<_>>>()?;
            out.insert(l, LayerParams { w, b, moments });
        }
        Ok(out)
    }

    /// One step's summed loss (a graph) and each active request's loss: per row the objective's
    /// NLL, averaged over the request's rows; erasure minimises p = exp(−NLL) instead. The
    /// subject gets fresh noise every step, each request the draw it gets alone.
    fn ft_loss(
        &self,
        hp: &FtHparams,
        rows: &[FtRow],
        active: &[usize],
        params: &BTreeMap<usize, LayerParams>,
        step: usize,
    ) -> Result<(Tensor, Vec<f32>)> {
        let m = &self.model;
        let per = match hp.goal.subject_noise {
            Some(_) => hp.noise_samples,
            None => 1,
        };
        let t = active.iter().map(|&c| rows[c].ids.len()).max().unwrap_or(1);
        let pad = self.tokenizer.eos.unwrap_or(0);
        let mut ids = vec![];
        let mut spans = vec![];
        let mut cells = vec![];
        let mut labels = vec![];
        // Each cell's row, and the weight of its NLL in the row's.
        let mut cell_row = vec![];
        for (slot, &c) in active.iter().enumerate() {
            let r = &rows[c];
            let first = slot * per;
            spans.push(
                (first..first + per)
                    .map(|i| (i, r.subject.0, r.subject.1))
                    .collect(),
            );
            for row in first..first + per {
                let mut padded = r.ids.clone();
                padded.resize(t, pad);
                ids.push(padded);
                for (&p, &lab) in r.positions.iter().zip(&r.target) {
                    cells.push(row * t + p);
                    labels.push(lab);
                    cell_row.push(row);
                }
            }
        }
        let mut noise =
            subject_noise_each(&spans, hp.goal.noise(step as u64 + 1), m.width_on_device())?;
        let n_rows = ids.len();
        let mut hook = FtHook {
            layers: params,
            rows_per: per,
            keys: BTreeMap::new(),
        };
        let logits = m
            .run(
                &m.ids_tensor(&ids)?,
                &mut Chain(vec![&mut noise, &mut hook]),
                None,
                LogitsAt::All,
            )?
            .ok_or_else(|| LociError::input("forward pass stopped early"))?;
        let dev = &m.device;
        let idx = Tensor::new(
            cells
                .iter()
                .map(|&x| x as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            dev,
        )?;
        let picked = logits.reshape((n_rows * t, ()))?.index_select(&idx, 0)?;
        let logp = candle_nn::ops::log_softmax(&picked.to_dtype(DType::F32)?, D::Minus1)?;
        let nll_cells = logp
            .gather(&Tensor::new(labels.as_slice(), dev)?.unsqueeze(1)?, 1)?
            .neg()?;
        // Row r's NLL: its cells' mean (last token) or sum (sequence), summed row by row so a
        // row's non-finite value stays in its own request.
        let weights: Vec<f32> = cell_row
            .iter()
            .map(|&r| match hp.objective {
                FtObjective::LastToken => 1.0 / rows[active[r / per]].target.len() as f32,
                FtObjective::Sequence => 1.0,
            })
            .collect();
        let weighted = (nll_cells.squeeze(1)? * Tensor::new(weights.as_slice(), dev)?)?;
        let cell_rows: Vec<u32> = cell_row.iter().map(|&r| r as u32).collect();
        let nll_rows = Tensor::zeros(n_rows, DType::F32, dev)?.index_add(
            &Tensor::new(cell_rows.as_slice(), dev)?,
            &weighted,
            0,
        )?;
        let per_row = if hp.goal.direction.is_raise() {
            nll_rows
        } else {
            nll_rows.neg()?.exp()?
        };
        // A request's loss: the mean over its rows.
        let per_case = (per_row.reshape((active.len(), per))?.sum(1)? / per as f64)?;
        let values = per_case.to_vec1::<f32>()?;
        Ok((per_case.sum_all()?, values))
    }

    /// Slot `slot`'s changes, layer by layer.
    fn ft_changes(
        &self,
        params: &BTreeMap<usize, LayerParams>,
        slot: usize,
    ) -> Result<Vec<FtLayer>> {
        params
            .iter()
            .map(|(&layer, p)| {
                Ok(FtLayer {
                    layer,
                    weight: p.w.as_tensor().get(slot)?.flatten_all()?.to_vec1::<f32>()?,
                    bias: p
                        .b
                        .as_ref()
                        .map(|b| b.as_tensor().get(slot)?.to_vec1::<f32>())
                        .transpose()?,
                })
            })
            .collect()
    }
}

/// Adam's step (candle's AdamW without weight decay) on every difference, then the clamp into
/// the L∞ ball.
fn adam_step(
    hp: &FtHparams,
    t: usize,
    params: &mut BTreeMap<usize, LayerParams>,
    grads: &candle_core::backprop::GradStore,
) -> Result<()> {
    let scale_m = 1.0 / (1.0 - BETA1.powi(t as i32));
    let scale_v = 1.0 / (1.0 - BETA2.powi(t as i32));
    for p in params.values_mut() {
        let vars: Vec<Var> = std::iter::once(p.w.clone()).chain(p.b.clone()).collect();
        for (var, (m, v)) in vars.iter().zip(p.moments.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            *m = ((&*m * BETA1)? + (g * (1.0 - BETA1))?)?;
            *v = ((&*v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let step = ((&*m * scale_m)? / ((&*v * scale_v)?.sqrt()? + EPS)?)?;
            let mut next = (var.as_tensor() - (step * hp.lr)?)?;
            if let Some(eps) = hp.norm_constraint {
                next = next.clamp(-eps, eps)?;
            }
            var.set(&next)?;
        }
    }
    Ok(())
}

/// Keeps only the slots `going` (in order) of every difference and its moments.
fn keep_slots(params: &mut BTreeMap<usize, LayerParams>, going: &[usize]) -> Result<()> {
    let dev = params
        .values()
        .next()
        .map(|p| p.w.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let idx = Tensor::new(
        going
            .iter()
            .map(|&s| s as u32)
            .collect::<Vec<_>>()
            .as_slice(),
        &dev,
    )?;
    for p in params.values_mut() {
        let pick = |t: &Tensor| -> Result<Tensor> { Ok(t.index_select(&idx, 0)?) };
        p.w = Var::from_tensor(&pick(p.w.as_tensor())?)?;
        if let Some(b) = &p.b {
            p.b = Some(Var::from_tensor(&pick(b.as_tensor())?)?);
        }
        for (m, v) in p.moments.iter_mut() {
            (*m, *v) = (pick(m)?, pick(v)?);
        }
    }
    Ok(())
}
