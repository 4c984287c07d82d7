//! The target value v* (ROME's, and MEMIT's z at a block's output): optimise a delta δ added at
//! the subject's last token so the model says the new target, staying close to its old view of
//! the subject (docs/rome.md, "The value v*").
//!
//! Only positions from each row's subject-last token on depend on δ (the "suffix"); the earlier
//! ones are computed once, without gradients, and lend the suffix their keys and values. Rows
//! are independent until the loss: contiguous groups of rows run forward and backward on their
//! own threads, and their gradients add up.

use candle_core::{DType, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

use super::hparams::ValueSpec;
use super::key::{gather, pad_rows, rows_spans, texts, Texts};
use super::step::{value_groups, GroupOut, ValueGroup, ValueStep};
use crate::error::{LociError, Result};
use crate::hooks::noise::subject_noise;
use crate::hooks::{Capture, Chain, Site};
use crate::loader::LoadedModel;
use crate::model::layers::LayerCache;
use crate::model::{KvCache, LogitsAt};
use crate::request::RewriteRequest;

/// The batch v* is optimised on: the rewrite rows (each template, the prompt, the target but its
/// last token), then the KL row ("{subject} is a").
struct ValueRows {
    tx: Texts,
    n_rewrite: usize,
    /// Each row's subject-last token: where its suffix starts.
    starts: Vec<usize>,
    /// Suffix positions per row (every row padded to one length).
    suffix: usize,
    /// Token ids `[rows, t]`, right-padded.
    ids: Tensor,
    /// `(row, suffix position)` of every label, and the labels (the target's tokens).
    cells: Vec<(usize, usize)>,
    labels: Vec<u32>,
}

impl ValueRows {
    fn rows(&self) -> usize {
        self.tx.ids.len()
    }
}

/// The suffix's inputs, computed once without gradients.
struct Prefix {
    /// The residual entering the edited layer at the suffix positions, `[rows, suffix, d]`.
    resid_in: Tensor,
    /// Per layer from the edited one up: the keys and values of the positions before the suffix.
    caches: Vec<LayerCache>,
    /// 1 at suffix position 0 (the subject-last token) of every row, `[rows, suffix, 1]`.
    mask: Tensor,
}

impl LoadedModel {
    /// v* for `req` at `spec.site`: returns (value + δ, losses, ‖δ‖).
    pub(crate) fn compute_v(
        &self,
        req: &RewriteRequest,
        spec: &ValueSpec,
        templates: &[String],
        target: &[u32],
    ) -> Result<(Tensor, Vec<f32>, f32)> {
        let l = spec
            .site
            .layer()
            .filter(|&l| l < self.model.n_layer())
            .ok_or_else(|| {
                LociError::input(format!("v* cannot be optimised at {:?}", spec.site))
            })?;
        let rows = self.value_rows(req, templates, target)?;
        let prefix = self.value_prefix(&rows, spec, l)?;
        let groups = self.value_group_split(&rows, &prefix)?;
        self.optimise_delta(spec, &groups, rows.labels.len())
    }

    /// The rows, their suffixes and their label cells.
    fn value_rows(
        &self,
        req: &RewriteRequest,
        templates: &[String],
        target: &[u32],
    ) -> Result<ValueRows> {
        let tgt_prefix = self.tokenizer.decode(&target[..target.len() - 1])?;
        let mut row_templates: Vec<String> = templates
            .iter()
            .map(|t| format!("{}{tgt_prefix}", t.replacen("{}", &req.prompt, 1)))
            .collect();
        let n_rewrite = row_templates.len();
        row_templates.push("{} is a".to_string());
        let tx = texts(self, &row_templates, &req.subject)?;
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
        let mt = target.len();
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
        Ok(ValueRows {
            tx,
            n_rewrite,
            starts,
            suffix,
            ids,
            cells,
            labels,
        })
    }

    /// One pass without gradients: the residual entering layer `l` and every layer's keys and
    /// values. Noise on the subject changes this pass only: the positions after the subject-last
    /// token see it through the keys and values and the residual entering layer `l`.
    fn value_prefix(&self, r: &ValueRows, spec: &ValueSpec, l: usize) -> Result<Prefix> {
        let m = &self.model;
        let (rows, suffix, d) = (r.rows(), r.suffix, m.cfg.d_model);
        let entry = if l == 0 {
            Site::Embed
        } else {
            Site::Block(l - 1)
        };
        let mut cap = Capture::new([entry]);
        let mut kv = KvCache::default();
        let spans = rows_spans(&r.tx.spans[..r.n_rewrite]);
        let mut noise = subject_noise(&spans, spec.subject_noise, m.width_on_device())?;
        let mut hook = Chain(vec![&mut noise, &mut cap]);
        m.run(&r.ids, &mut hook, Some(&mut kv), LogitsAt::Last)?;
        let mut resid = cap.get(entry)?.clone();
        if let (0, Some(wpe)) = (l, &m.wpe) {
            resid = resid.broadcast_add(&wpe.narrow(0, 0, r.ids.dim(1)?)?)?;
        }
        let suffix_cells: Vec<(usize, usize)> = (0..rows)
            .flat_map(|i| (0..suffix).map(move |s| (i, s)))
            .map(|(i, s)| (i, r.starts[i] + s))
            .collect();
        let resid_in = gather(&resid, &suffix_cells)?
            .reshape((rows, suffix, d))?
            .detach();
        let caches = self.prefix_caches(r, &kv, l)?;
        // The delta goes in at every row's subject-last token: suffix position 0.
        let mut mask = vec![0f32; rows * suffix];
        for i in 0..rows {
            mask[i * suffix] = 1.0;
        }
        let mask = Tensor::from_vec(mask, (rows, suffix, 1), &m.device)?.to_dtype(m.dtype)?;
        Ok(Prefix {
            resid_in,
            caches,
            mask,
        })
    }

    /// Per layer from `l` up, the keys and values before the longest prefix, each row's own
    /// start positions, and a mask hiding the padding between a shorter row's prefix and its
    /// suffix.
    fn prefix_caches(&self, r: &ValueRows, kv: &KvCache, l: usize) -> Result<Vec<LayerCache>> {
        let (rows, suffix) = (r.rows(), r.suffix);
        let prefix = r.starts.iter().copied().max().unwrap_or(0);
        let mut key_mask = vec![0f32; rows * (prefix + suffix)];
        for (i, &s) in r.starts.iter().enumerate() {
            for p in s..prefix {
                key_mask[i * (prefix + suffix) + p] = f32::NEG_INFINITY;
            }
        }
        let key_mask =
            Tensor::from_vec(key_mask, (rows, 1, 1, prefix + suffix), &self.model.device)?;
        (l..self.model.n_layer())
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
                    row_starts: Some(r.starts.clone()),
                    key_mask: Some(key_mask.clone()),
                })
            })
            .collect()
    }

    /// Splits the rows into contiguous groups, one per worker thread (threaded kernels barely
    /// use two cores on matrices this small). The KL row is the last, in the last group.
    fn value_group_split(&self, r: &ValueRows, p: &Prefix) -> Result<Vec<ValueGroup>> {
        let rows = r.rows();
        let kl_row = rows - 1;
        let n_groups = value_groups(rows);
        let per = rows.div_ceil(n_groups);
        let mut groups = Vec::new();
        for g in 0..n_groups {
            let (r0, rn) = (g * per, per.min(rows - (g * per).min(rows)));
            if rn == 0 {
                continue;
            }
            let mine = r0..r0 + rn;
            let mut cells = Vec::new();
            let mut labels = Vec::new();
            for (&(i, pos), &lab) in r.cells.iter().zip(&r.labels) {
                if mine.contains(&i) {
                    cells.push((i - r0, pos));
                    labels.push(lab);
                }
            }
            let kl = mine.contains(&kl_row);
            if kl {
                cells.push((kl_row - r0, 0));
            }
            groups.push(ValueGroup {
                first_row: r0 == 0,
                resid_in: p.resid_in.narrow(0, r0, rn)?,
                caches: group_caches(&p.caches, r0, rn, &r.starts)?,
                mask: p.mask.narrow(0, r0, rn)?,
                labels: Tensor::new(labels.as_slice(), &self.model.device)?.unsqueeze(1)?,
                n_labels: labels.len(),
                cells,
                kl,
            });
        }
        Ok(groups)
    }
}

/// Rows `r0..r0 + rn` of every layer's prefix cache.
fn group_caches(
    caches: &[LayerCache],
    r0: usize,
    rn: usize,
    starts: &[usize],
) -> Result<Vec<LayerCache>> {
    let rows_of = |x: &Option<Tensor>| -> Result<Option<Tensor>> {
        Ok(match x {
            Some(x) => Some(x.narrow(0, r0, rn)?),
            None => None,
        })
    };
    caches
        .iter()
        .map(|c| {
            Ok(LayerCache {
                k: rows_of(&c.k)?,
                v: rows_of(&c.v)?,
                row_starts: Some(starts[r0..r0 + rn].to_vec()),
                key_mask: rows_of(&c.key_mask)?,
            })
        })
        .collect()
}

/// What the optimisation keeps between steps.
#[derive(Default)]
struct Progress {
    /// The site's activation at row 0's subject-last token before δ, from the first step.
    target_init: Option<Tensor>,
    /// The KL row's log-probabilities at the first step.
    kl_init: Option<Tensor>,
    /// ‖target_init‖², read back once (each read waits for the device).
    ti_norm2: Option<f64>,
    losses: Vec<f32>,
}

impl Progress {
    /// Keeps the first step's read-outs and returns ‖target_init‖².
    fn observe(&mut self, outs: &[GroupOut]) -> Result<f64> {
        for o in outs {
            if let Some(x) = &o.value_at_row0 {
                self.target_init.get_or_insert_with(|| x.clone());
            }
            if let Some(k) = &o.kl_logp {
                self.kl_init.get_or_insert_with(|| k.clone());
            }
        }
        if let Some(n) = self.ti_norm2 {
            return Ok(n);
        }
        let ti = self
            .target_init
            .as_ref()
            .expect("the first group holds row 0");
        Ok(*self
            .ti_norm2
            .insert(ti.sqr()?.sum_all()?.to_scalar::<f32>()? as f64))
    }
}

impl LoadedModel {
    /// Adam on δ over the groups until the loss is small or the steps run out, δ kept in the ball
    /// of radius `clamp_norm_factor · ‖target_init‖`.
    fn optimise_delta(
        &self,
        spec: &ValueSpec,
        groups: &[ValueGroup],
        n_labels: usize,
    ) -> Result<(Tensor, Vec<f32>, f32)> {
        let delta = Var::zeros(self.model.cfg.d_model, DType::F32, &self.model.device)?;
        let params = ParamsAdamW {
            lr: spec.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(vec![delta.clone()], params)?;
        let mut pr = Progress::default();
        for it in 0..spec.steps {
            let step = ValueStep {
                lm: self,
                site: spec.site,
                delta: delta.as_tensor(),
                n_labels_total: n_labels,
                kl_init: pr.kl_init.as_ref(),
                kl_factor: spec.kl_factor,
            };
            let outs = crate::threads::map(groups, |g| step.forward(g))
                .into_iter()
                .collect::<Result<Vec<_>>>()?;
            let ti_norm2 = pr.observe(&outs)?;
            let (loss, nll_factor, wd) = step_loss(spec, &outs, &delta, ti_norm2)?;
            if !loss.is_finite() {
                return Err(LociError::model(format!(
                    "the v* optimisation diverged (loss {loss}) at step {it}"
                )));
            }
            pr.losses.push(loss);
            if (spec.direction.is_raise() && loss < 0.05) || it + 1 == spec.steps {
                break;
            }
            let mut grads = wd.backward()?;
            let total = gradient(&outs, &delta, nll_factor, &grads)?;
            grads.insert(delta.as_tensor(), total);
            opt.step(&grads)?;
            clamp(&delta, spec.clamp_norm_factor * ti_norm2.sqrt())?;
        }
        let delta_t = delta.as_tensor().detach();
        let delta_norm = delta_t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let v_star = (pr.target_init.expect("at least one pass") + delta_t)?;
        Ok((v_star, pr.losses, delta_norm))
    }
}

/// The step's loss value, the factor on each group's NLL graph, and the weight-decay graph.
/// Raising: the NLL itself; lowering: p = exp(−NLL), whose gradient is the NLL's times −p (a
/// constant of this step), so each group's graph only gets a factor.
fn step_loss(
    spec: &ValueSpec,
    outs: &[GroupOut],
    delta: &Var,
    ti_norm2: f64,
) -> Result<(f32, f64, Tensor)> {
    let nll: f32 = outs.iter().map(|o| o.nll_value).sum();
    let (mut loss, nll_factor) = if spec.direction.is_raise() {
        (nll, 1.0)
    } else {
        let p = (-nll).exp();
        (p, -(p as f64))
    };
    loss += outs.iter().map(|o| o.kl_value).sum::<f32>();
    // ‖δ‖ with a tiny floor: its gradient at δ = 0 is then 0 (as in torch), not 0/0.
    let wd =
        ((delta.as_tensor().sqr()?.sum_all()? + 1e-24)?.sqrt()? * (spec.weight_decay / ti_norm2))?;
    loss += wd.to_scalar::<f32>()?;
    Ok((loss, nll_factor, wd))
}

/// δ's gradient: the weight decay's plus every group's (each differentiated on its own thread).
fn gradient(
    outs: &[GroupOut],
    delta: &Var,
    nll_factor: f64,
    wd_grads: &candle_core::backprop::GradStore,
) -> Result<Tensor> {
    let parts = crate::threads::map(outs, |o| -> Result<Option<Tensor>> {
        let mut loss = (&o.nll * nll_factor)?;
        if let Some(kl) = &o.kl {
            loss = (loss + kl)?;
        }
        Ok(loss.backward()?.get(delta.as_tensor()).cloned())
    })
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let mut total = wd_grads
        .get(delta.as_tensor())
        .cloned()
        .unwrap_or(delta.as_tensor().zeros_like()?);
    for g in parts.into_iter().flatten() {
        total = (total + g)?;
    }
    Ok(total)
}

/// Projects δ back into the ball of radius `max`.
fn clamp(delta: &Var, max: f64) -> Result<()> {
    let n = delta
        .as_tensor()
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f32>()? as f64;
    if n > max {
        delta.set(&(delta.as_tensor() * (max / n))?)?;
    }
    Ok(())
}
