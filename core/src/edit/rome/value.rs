//! The target value v* (ROME's, and MEMIT's z at a block's output): optimise a delta δ added at
//! the subject's last token so the model says the new target, staying close to its old view of
//! the subject (docs/rome.md, "The value v*").
//!
//! Many independent requests optimise together: their rows share one batch, each request with
//! its own δ, its own loss and its own stopping step (`optimise`). One request is a batch of one,
//! so a single edit and a batched sweep run the same code.
//!
//! Only positions from each row's subject-last token on depend on δ (the "suffix"); the earlier
//! ones are computed once, without gradients, and lend the suffix their keys and values.

use candle_core::Tensor;

use super::hparams::ValueSpec;
use super::key::{gather, texts};
use super::optimise::{Share, ValueRun};
use crate::error::{LociError, Result};
use crate::hooks::noise::subject_noise_each;
use crate::hooks::{Capture, Chain, Site};
use crate::loader::LoadedModel;
use crate::model::layers::LayerCache;
use crate::model::{KvCache, LogitsAt};
use crate::request::RewriteRequest;

/// The most memory one batch of v* optimisations takes for its rows' cached keys and values,
/// activations and gradients (estimated); more requests optimise in several batches.
const VALUE_BATCH_BYTES: usize = 4 << 30;

/// One v* to optimise: the request and its new target's tokens.
#[derive(Clone, Copy)]
pub(crate) struct ValueCase<'a> {
    pub(crate) req: &'a RewriteRequest,
    pub(crate) target: &'a [u32],
}

/// An optimised v*: the site's value plus δ, the loss of every step, and ‖δ‖.
pub(crate) struct ValueOut {
    pub(crate) value: Tensor,
    pub(crate) losses: Vec<f32>,
    pub(crate) delta_norm: f32,
}

/// One request's rows: each template with the prompt and the target but its last token, then
/// the KL row ("{subject} is a").
struct CaseRows {
    ids: Vec<Vec<u32>>,
    /// Each row's subject-last token: where its suffix starts.
    starts: Vec<usize>,
    /// The rewrite rows' subject tokens `[first, end)`, noised when the goal says so.
    spans: Vec<(usize, usize)>,
    /// `(row, position)` of every label, and the labels (the target's tokens).
    cells: Vec<(usize, usize)>,
    labels: Vec<u32>,
}

/// The rows of every request of a batch, one after the other.
pub(super) struct ValueRows {
    /// Token ids `[rows, t]`, right-padded.
    pub(super) ids: Tensor,
    /// Each row's subject-last token.
    pub(super) starts: Vec<usize>,
    /// Suffix positions per row (every row padded to one length).
    pub(super) suffix: usize,
    /// Each row's request (its index in the batch).
    pub(super) case_of_row: Vec<usize>,
    /// Each request's first row (where its value is read) and KL row (its last).
    pub(super) first_row: Vec<usize>,
    pub(super) kl_row: Vec<usize>,
    /// `(row, suffix position)` of every label, the labels and their requests.
    pub(super) cells: Vec<(usize, usize)>,
    pub(super) labels: Vec<u32>,
    pub(super) label_case: Vec<usize>,
    /// Each request's rewrite rows' subject spans, as `(row, first, end)`.
    noise_spans: Vec<Vec<(usize, usize, usize)>>,
}

impl ValueRows {
    pub(super) fn rows(&self) -> usize {
        self.starts.len()
    }

    pub(super) fn cases(&self) -> usize {
        self.first_row.len()
    }

    /// Each request's number of labels.
    pub(super) fn labels_per_case(&self) -> Vec<usize> {
        let mut n = vec![0; self.cases()];
        for &c in &self.label_case {
            n[c] += 1;
        }
        n
    }
}

/// The suffix's inputs, computed once without gradients.
pub(super) struct Prefix {
    /// The residual entering the edited layer at the suffix positions, `[rows, suffix, d]`.
    pub(super) resid_in: Tensor,
    /// Per layer from the edited one up: the keys and values of the positions before the suffix.
    pub(super) caches: Vec<LayerCache>,
    /// 1 at suffix position 0 (the subject-last token) of every row, `[rows, suffix, 1]`.
    pub(super) mask: Tensor,
}

impl LoadedModel {
    /// v* of many independent requests at once, as if each were optimised alone: one result
    /// per request (a request whose rows cannot be built, or whose optimisation diverges, fails
    /// alone). The outer error is the batch's: a site v* cannot be optimised at, a device error.
    pub(crate) fn compute_values(
        &self,
        cases: &[ValueCase],
        spec: &ValueSpec,
        templates: &[String],
    ) -> Result<Vec<Result<ValueOut>>> {
        let l = self.value_layer(spec)?;
        let mut results: Vec<Option<Result<ValueOut>>> = Vec::with_capacity(cases.len());
        let mut built = vec![];
        let mut batch_index = vec![];
        for (i, c) in cases.iter().enumerate() {
            match self.case_rows(c, templates) {
                Ok(r) => {
                    results.push(None);
                    built.push(r);
                    batch_index.push(i);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        // Requests optimise together as far as their rows' keys, values and activations fit
        // in the budget; more go in several batches.
        let m = &self.model;
        let per_token = m.n_layer() * m.cfg.d_model * 4 * 4;
        let costs: Vec<usize> = built
            .iter()
            .map(|r| r.ids.iter().map(Vec::len).sum::<usize>() * per_token)
            .collect();
        let mut built = built.into_iter();
        let mut index = batch_index.into_iter();
        for n in crate::threads::chunks_within(&costs, VALUE_BATCH_BYTES) {
            let rows = self.value_rows(built.by_ref().take(n).collect())?;
            let prefix = self.value_prefix(&rows, spec, l)?;
            let outs = self.optimise_deltas(spec, rows, prefix)?;
            for (i, out) in index.by_ref().take(n).zip(outs) {
                results[i] = Some(out);
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every request has its result"))
            .collect())
    }

    /// v* of one request as a run to step from outside, this process computing `share` of its
    /// rows (the tab's workers each hold one).
    pub(crate) fn value_run(
        &self,
        case: &ValueCase,
        spec: &ValueSpec,
        templates: &[String],
        share: Share,
    ) -> Result<ValueRun> {
        let l = self.value_layer(spec)?;
        let rows = self.value_rows(vec![self.case_rows(case, templates)?])?;
        let prefix = self.value_prefix(&rows, spec, l)?;
        ValueRun::new(self, spec, rows, prefix, share)
    }

    /// The layer of v*'s site (refused: a site v* cannot be optimised at).
    fn value_layer(&self, spec: &ValueSpec) -> Result<usize> {
        spec.site
            .layer()
            .filter(|&l| l < self.model.n_layer())
            .ok_or_else(|| LociError::input(format!("v* cannot be optimised at {:?}", spec.site)))
    }

    /// One request's rows and label cells.
    fn case_rows(&self, c: &ValueCase, templates: &[String]) -> Result<CaseRows> {
        let (req, target) = (c.req, c.target);
        if target.is_empty() {
            return Err(LociError::input("the target tokenizes to nothing"));
        }
        let tgt_prefix = self.tokenizer.decode(&target[..target.len() - 1])?;
        let mut row_templates: Vec<String> = templates
            .iter()
            .map(|t| format!("{}{tgt_prefix}", t.replacen("{}", &req.prompt, 1)))
            .collect();
        let n_rewrite = row_templates.len();
        row_templates.push("{} is a".to_string());
        let tx = texts(self, &row_templates, &req.subject)?;
        // Rows hold prompt + target[..m−1]: the last prompt token, at n − m, predicts target[0].
        let mt = target.len();
        let mut cells = Vec::new();
        let mut labels = Vec::new();
        for (i, row) in tx.ids.iter().take(n_rewrite).enumerate() {
            let n = row.len();
            if n < mt + 1 + tx.lookup[i] {
                return Err(LociError::input(
                    "the prompt must continue after the subject",
                ));
            }
            for (j, &tok) in target.iter().enumerate() {
                cells.push((i, n - mt + j));
                labels.push(tok);
            }
        }
        Ok(CaseRows {
            ids: tx.ids,
            starts: tx.lookup,
            spans: tx.spans[..n_rewrite].to_vec(),
            cells,
            labels,
        })
    }

    /// The requests' rows one after the other, padded to one length.
    fn value_rows(&self, cases: Vec<CaseRows>) -> Result<ValueRows> {
        let mut ids = vec![];
        let (mut starts, mut case_of_row, mut first_row, mut kl_row) =
            (vec![], vec![], vec![], vec![]);
        let (mut cells, mut labels, mut label_case, mut noise_spans) =
            (vec![], vec![], vec![], vec![]);
        for (c, r) in cases.into_iter().enumerate() {
            let r0 = ids.len();
            first_row.push(r0);
            kl_row.push(r0 + r.ids.len() - 1);
            noise_spans.push(
                r.spans
                    .iter()
                    .enumerate()
                    .map(|(i, &(a, b))| (r0 + i, a, b))
                    .collect(),
            );
            for (&(row, pos), &lab) in r.cells.iter().zip(&r.labels) {
                cells.push((r0 + row, pos - r.starts[row]));
                labels.push(lab);
                label_case.push(c);
            }
            case_of_row.extend(std::iter::repeat_n(c, r.ids.len()));
            starts.extend(r.starts);
            ids.extend(r.ids);
        }
        let suffix = ids
            .iter()
            .zip(&starts)
            .map(|(r, &s)| r.len() - s)
            .max()
            .unwrap_or(1);
        let t = starts.iter().map(|s| s + suffix).max().unwrap_or(suffix);
        Ok(ValueRows {
            ids: self.padded_ids(&ids, t)?,
            starts,
            suffix,
            case_of_row,
            first_row,
            kl_row,
            cells,
            labels,
            label_case,
            noise_spans,
        })
    }

    /// One pass without gradients: the residual entering layer `l` and every layer's keys and
    /// values. Noise on the subject changes this pass only: the positions after the subject-last
    /// token see it through the keys and values and the residual entering layer `l`. Each
    /// request draws its noise as it would alone.
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
        let mut noise =
            subject_noise_each(&r.noise_spans, spec.subject_noise, m.width_on_device())?;
        let mut hook = Chain(vec![&mut noise, &mut cap]);
        m.run(&r.ids, &mut hook, Some(&mut kv), LogitsAt::Last)?;
        let mut resid = cap.get(entry)?.clone();
        if l == 0 {
            resid = m.stream_in(resid, 0)?;
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
                        Some(x) if prefix > 0 => {
                            Some(x.narrow(2, 0, prefix)?.contiguous()?.detach())
                        }
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
}
