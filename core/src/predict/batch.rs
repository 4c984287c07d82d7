//! Many prompts in one forward pass, each as if alone: what a server does with the predictions
//! and generations of different visitors that arrive together.
//!
//! - **Predictions**: the rows are right-padded to the longest and run as one batch. Attention
//!   is causal, so a row's real tokens never see the padding after them; each row's
//!   probabilities are read at its own last token. Rows of very different lengths go in
//!   separate passes of similar lengths, so padding stays a small share of the work.
//! - **Generations** (continuous batching): a [`DecodeBatch`] holds every generation under way in
//!   one key/value cache. Newcomers are prefilled together (right-padded) and join between
//!   decode steps; each step feeds one token per row at that row's own position, a key mask
//!   hiding the cache slots that are not the row's (its padding, and slots from before it
//!   joined); a row that ends leaves at once, and slots no row still reads are dropped.
//!
//! The hook of each pass sees the batch's rows in order, so per-row interventions (each
//! visitor's own edits, as `edit::RowEdits`) ride along.

use candle_core::Tensor;

use super::{check_finite, sample_top_k, top_k, Generation, Sampling};
use crate::error::{LociError, Result};
use crate::hooks::{Capture, Chain, Hook, Site};
use crate::loader::LoadedModel;
use crate::model::{KvCache, LogitsAt};
use crate::rng::SplitMix64;

impl LoadedModel {
    /// Next-token probabilities after each row of token ids (rows of any lengths), in one pass:
    /// the same as [`LoadedModel::next_probs`] row by row, up to float rounding. `hook` sees the
    /// right-padded batch, row `i` being `rows[i]`. Rows are not checked for non-finite values
    /// here, so that one bad row (one visitor's broken edit) fails only itself: use each row
    /// through [`LoadedModel::prediction`], which checks it.
    pub fn next_probs_rows(&self, rows: &[Vec<u32>], hook: &mut dyn Hook) -> Result<Vec<Vec<f32>>> {
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let last = self.last_hidden(rows, hook, None)?;
        let probs = candle_nn::ops::softmax_last_dim(&self.model.final_logits(&last)?)?;
        Ok(probs.to_vec2::<f32>()?)
    }

    /// Next-token probabilities after each row of token ids, in passes of rows of similar
    /// lengths: a row padded to its pass's longest costs as much as the longest, so the rows are
    /// sorted by length and a pass ends where its padding would pass a fifth of its tokens.
    /// `hook_for(pass)` gives the hook of the pass over rows `pass` (indices into `rows`, in the
    /// pass's row order).
    pub fn next_probs_by_length(
        &self,
        rows: &[Vec<u32>],
        hook_for: &mut PassHook<'_>,
    ) -> Result<Vec<Vec<f32>>> {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].len());
        let mut probs = vec![vec![]; rows.len()];
        for pass in similar_lengths(&order, |i| rows[i].len()) {
            let mine: Vec<Vec<u32>> = pass.iter().map(|&i| rows[i].clone()).collect();
            let mut hook = hook_for(pass)?;
            for (&i, p) in pass.iter().zip(self.next_probs_rows(&mine, hook.as_mut())?) {
                probs[i] = p;
            }
        }
        Ok(probs)
    }

    /// Token rows right-padded (with the end-of-text token, else 0) to one length, at least
    /// `min_len`, as ids `[rows, t]`: causal attention never looks right, so the real positions
    /// are unaffected.
    pub fn padded_ids(&self, rows: &[Vec<u32>], min_len: usize) -> Result<Tensor> {
        let pad = self.tokenizer.eos.unwrap_or(0);
        let t = rows.iter().map(Vec::len).max().unwrap_or(0).max(min_len);
        let padded: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.resize(t, pad);
                r
            })
            .collect();
        self.model.ids_tensor(&padded)
    }

    /// The last block's output at every position of `rows`, right-padded into one pass (`hook`
    /// sees it, row `i` being `rows[i]`): `[rows × t, d]`, row `i`'s position `p` at `i·t + p`,
    /// and `t`. The head is left out (it is a large share of a pass when computed at every
    /// position); `cache` (when given) receives every position's keys and values.
    pub fn padded_hidden(
        &self,
        rows: &[Vec<u32>],
        hook: &mut dyn Hook,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, usize)> {
        if rows.iter().any(Vec::is_empty) {
            return Err(LociError::input("empty input"));
        }
        let ids = self.padded_ids(rows, 0)?;
        let t = ids.dim(1)?;
        let end = Site::Block(self.model.n_layer() - 1);
        let mut cap = Capture::new([end]).stopping_after(end);
        self.model
            .run(&ids, &mut Chain(vec![hook, &mut cap]), cache, LogitsAt::All)?;
        let hidden = cap.get(end)?;
        Ok((hidden.reshape((rows.len() * t, self.model.cfg.d_model))?, t))
    }

    /// The last block's output at each row's last token (`[rows, d]`), the rows right-padded
    /// into one pass; `cache` (when given) receives every position's keys and values.
    fn last_hidden(
        &self,
        rows: &[Vec<u32>],
        hook: &mut dyn Hook,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (hidden, t) = self.padded_hidden(rows, hook, cache)?;
        let at: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (i * t + r.len() - 1) as u32)
            .collect();
        Ok(hidden.index_select(&Tensor::new(at.as_slice(), hidden.device())?, 0)?)
    }
}

/// What gives each pass of [`LoadedModel::next_probs_by_length`] its hook, from the pass's rows.
pub type PassHook<'a> = dyn FnMut(&[usize]) -> Result<Box<dyn Hook>> + 'a;

/// Cuts `order` (sorted by `len`, shortest first) into passes whose padding to their longest
/// row stays within a fifth of their tokens.
fn similar_lengths(order: &[usize], len: impl Fn(usize) -> usize) -> Vec<&[usize]> {
    let mut passes = vec![];
    let (mut start, mut tokens) = (0, 0);
    for (k, &i) in order.iter().enumerate() {
        let padded = len(i) * (k + 1 - start);
        if k > start && 5 * padded > 6 * (tokens + len(i)) {
            passes.push(&order[start..k]);
            (start, tokens) = (k, 0);
        }
        tokens += len(i);
    }
    if start < order.len() {
        passes.push(&order[start..]);
    }
    passes
}

/// A generation to start in a [`DecodeBatch`]: `tag` names it to the caller.
pub struct GenerationStart<T> {
    /// The caller's name for this generation (e.g. whom to answer).
    pub tag: T,
    /// The prompt as given.
    pub prompt: String,
    /// The prompt's token ids.
    pub ids: Vec<u32>,
    /// At most this many new tokens (fewer when the context ends first).
    pub max_new: usize,
    /// How each new token is picked.
    pub sampling: Sampling,
}

/// One generation under way.
struct Row<T> {
    tag: T,
    prompt: String,
    /// The tokens fed so far: the prompt, then the continuation.
    fed: Vec<u32>,
    /// How many of `fed` are the prompt's.
    prompt_len: usize,
    new_ids: Vec<u32>,
    max_new: usize,
    sampling: Sampling,
    rng: SplitMix64,
    /// The token picked last, to be fed at the next step.
    pending: u32,
    /// Which cache slots hold this row's tokens.
    slots: Vec<bool>,
}

/// Generations decoded together, one token per row per step (see the module's notes).
pub struct DecodeBatch<T> {
    rows: Vec<Row<T>>,
    cache: KvCache,
    done: Vec<(T, Result<Generation>)>,
}

impl<T> Default for DecodeBatch<T> {
    fn default() -> Self {
        Self {
            rows: vec![],
            cache: KvCache::default(),
            done: vec![],
        }
    }
}

/// What becomes of a row after a token is picked.
enum Next {
    Continue,
    Finished,
}

impl<T> DecodeBatch<T> {
    /// Generations under way.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no generation is under way.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The tags of the generations under way, in the order of the rows of the next step.
    pub fn tags(&self) -> impl Iterator<Item = &T> {
        self.rows.iter().map(|r| &r.tag)
    }

    /// The generations that ended since the last call, with their results.
    pub fn take_finished(&mut self) -> Vec<(T, Result<Generation>)> {
        std::mem::take(&mut self.done)
    }

    /// Prefills `starts` in one padded pass (`hook` sees its rows in the order of `starts`),
    /// picks each one's first token and adds those that go on to the batch. A failed pass
    /// fails all of `starts` and leaves the batch as it was.
    pub fn admit(
        &mut self,
        lm: &LoadedModel,
        starts: Vec<GenerationStart<T>>,
        hook: &mut dyn Hook,
    ) -> Result<()> {
        // Every start is in the pass (the hook's rows are `starts`' rows); one with no room for
        // a new token ends right after it, with none.
        let ctx = lm.model.cfg.max_positions;
        let run = starts;
        if run.is_empty() {
            return Ok(());
        }
        let ids: Vec<Vec<u32>> = run.iter().map(|s| s.ids.clone()).collect();
        let mut cache = KvCache::default();
        let last = lm.last_hidden(&ids, hook, Some(&mut cache))?;
        let probs = candle_nn::ops::softmax_last_dim(&lm.model.final_logits(&last)?)?;
        let width = cache.len();
        let mut rows: Vec<Row<T>> = run
            .into_iter()
            .map(|s| Row {
                max_new: s.max_new.min(ctx.saturating_sub(s.ids.len())),
                rng: SplitMix64::new(match s.sampling {
                    Sampling::TopK { seed, .. } => seed,
                    Sampling::Greedy => 0,
                }),
                slots: (0..width).map(|i| i < s.ids.len()).collect(),
                tag: s.tag,
                prompt: s.prompt,
                prompt_len: s.ids.len(),
                fed: s.ids,
                new_ids: vec![],
                sampling: s.sampling,
                pending: 0,
            })
            .collect();
        let outcomes = picks(&mut rows, &probs.to_vec2::<f32>()?, lm);
        let (kept, keep) = self.settle(rows, outcomes, lm);
        let cache = select_rows(cache, &keep)?;
        self.join(kept, cache)
    }

    /// One new token for every row (`hook` sees the rows in [`DecodeBatch::tags`] order); rows
    /// that end leave the batch. A failed pass leaves the batch as it was.
    pub fn step(&mut self, lm: &LoadedModel, hook: &mut dyn Hook) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let m = &lm.model;
        let ids: Vec<u32> = self.rows.iter().map(|r| r.pending).collect();
        let pos: Vec<usize> = self.rows.iter().map(|r| r.fed.len()).collect();
        let x = m.embed_rows(&ids, &pos)?;
        let width = self.cache.len();
        let mut mask = Vec::with_capacity(self.rows.len() * (width + 1));
        for r in &self.rows {
            mask.extend(
                r.slots
                    .iter()
                    .map(|&s| if s { 0.0 } else { f32::NEG_INFINITY }),
            );
            mask.push(0.0);
        }
        let mask = Tensor::from_vec(mask, (self.rows.len(), 1, 1, width + 1), &m.device)?;
        let mut cache = self.cache.clone();
        for c in &mut cache.layers {
            c.row_starts = Some(pos.clone());
            c.key_mask = Some(mask.clone());
        }
        let h = m
            .run_layers(x, 0..m.n_layer(), width, Some(&mut cache.layers), hook)?
            .ok_or_else(|| LociError::input("a decode step stopped early"))?;
        let probs = candle_nn::ops::softmax_last_dim(&m.final_logits(&h)?.squeeze(1)?)?;
        let probs = probs.to_vec2::<f32>()?;
        let mut rows = std::mem::take(&mut self.rows);
        for r in &mut rows {
            r.fed.push(r.pending);
            r.slots.push(true);
        }
        let outcomes = picks(&mut rows, &probs, lm);
        let (kept, keep) = self.settle(rows, outcomes, lm);
        self.rows = kept;
        self.cache = compact(select_rows(cache, &keep)?, &mut self.rows)?;
        Ok(())
    }

    /// Ends every generation under way without a result, giving back their tags (e.g. to
    /// answer them after a failed step).
    pub fn clear(&mut self) -> Vec<T> {
        self.cache = KvCache::default();
        std::mem::take(&mut self.rows)
            .into_iter()
            .map(|r| r.tag)
            .collect()
    }

    /// Keeps only the rows whose tags pass `keep` (e.g. drops generations whose clients left);
    /// the others end without a result.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) -> Result<()> {
        let kept: Vec<usize> = (0..self.rows.len())
            .filter(|&i| keep(&self.rows[i].tag))
            .collect();
        if kept.len() == self.rows.len() {
            return Ok(());
        }
        let cache = select_rows(std::mem::take(&mut self.cache), &kept)?;
        let mut i = 0;
        self.rows.retain(|_| {
            i += 1;
            kept.contains(&(i - 1))
        });
        self.cache = compact(cache, &mut self.rows)?;
        Ok(())
    }

    /// Sorts rows after a pick: the finished ones to `done`; the others, and their indices.
    fn settle(
        &mut self,
        rows: Vec<Row<T>>,
        outcomes: Vec<Result<Next>>,
        lm: &LoadedModel,
    ) -> (Vec<Row<T>>, Vec<usize>) {
        let (mut kept, mut keep) = (vec![], vec![]);
        for (i, (r, o)) in rows.into_iter().zip(outcomes).enumerate() {
            match o {
                Ok(Next::Continue) => {
                    kept.push(r);
                    keep.push(i);
                }
                Ok(Next::Finished) => {
                    let g = r.generation(lm);
                    self.done.push((r.tag, g));
                }
                Err(e) => self.done.push((r.tag, Err(e))),
            }
        }
        (kept, keep)
    }

    /// Adds `rows`, whose keys and values are `cache`, to the batch: both caches padded with
    /// hidden slots to the wider of the two.
    fn join(&mut self, mut rows: Vec<Row<T>>, cache: KvCache) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        if self.rows.is_empty() {
            self.rows = rows;
            self.cache = cache;
            return Ok(());
        }
        let width = self.cache.len().max(cache.len());
        for r in self.rows.iter_mut().chain(rows.iter_mut()) {
            r.slots.resize(width, false);
        }
        let mut layers = Vec::with_capacity(cache.layers.len());
        for (a, b) in self.cache.layers.iter().zip(&cache.layers) {
            let cat = |x: &Option<Tensor>, y: &Option<Tensor>| -> Result<Option<Tensor>> {
                match (x, y) {
                    (Some(x), Some(y)) => Ok(Some(Tensor::cat(
                        &[&widen(x, width)?, &widen(y, width)?],
                        0,
                    )?)),
                    _ => Err(LociError::model("a decode batch's cache lost a layer")),
                }
            };
            layers.push(crate::model::layers::LayerCache {
                k: cat(&a.k, &b.k)?,
                v: cat(&a.v, &b.v)?,
                ..Default::default()
            });
        }
        self.rows.extend(rows);
        self.cache = KvCache { layers };
        Ok(())
    }
}

/// Each row's pick from its probabilities.
fn picks<T>(rows: &mut [Row<T>], probs: &[Vec<f32>], lm: &LoadedModel) -> Vec<Result<Next>> {
    rows.iter_mut()
        .zip(probs)
        .map(|(r, p)| r.pick(p, lm))
        .collect()
}

/// The cache of rows `keep` only.
fn select_rows(cache: KvCache, keep: &[usize]) -> Result<KvCache> {
    let n = cache
        .layers
        .first()
        .and_then(|c| c.k.as_ref())
        .map_or(0, |k| k.dims()[0]);
    if keep.len() == n {
        return Ok(cache);
    }
    if keep.is_empty() {
        return Ok(KvCache::default());
    }
    let idx: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
    index_cache(cache, &idx, 0)
}

/// The cache without the slots no row reads (rows that left, padding no one shares).
fn compact<T>(cache: KvCache, rows: &mut [Row<T>]) -> Result<KvCache> {
    let width = rows.first().map_or(0, |r| r.slots.len());
    let used: Vec<u32> = (0..width)
        .filter(|&s| rows.iter().any(|r| r.slots[s]))
        .map(|s| s as u32)
        .collect();
    if rows.is_empty() || used.len() == width {
        return Ok(cache);
    }
    for r in rows.iter_mut() {
        r.slots = used.iter().map(|&s| r.slots[s as usize]).collect();
    }
    index_cache(cache, &used, 2)
}

/// Every layer's keys and values at indices `idx` of dimension `dim` (0: rows, 2: slots).
fn index_cache(cache: KvCache, idx: &[u32], dim: usize) -> Result<KvCache> {
    let Some(device) = cache
        .layers
        .first()
        .and_then(|c| c.k.as_ref())
        .map(|k| k.device().clone())
    else {
        return Ok(cache);
    };
    let idx = Tensor::new(idx, &device)?;
    let pick = |x: Option<Tensor>| -> Result<Option<Tensor>> {
        x.map(|x| Ok(x.contiguous()?.index_select(&idx, dim)?))
            .transpose()
    };
    let layers = cache
        .layers
        .into_iter()
        .map(|c| {
            Ok(crate::model::layers::LayerCache {
                k: pick(c.k)?,
                v: pick(c.v)?,
                ..Default::default()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(KvCache { layers })
}

/// `x` (`[b, heads, slots, d]`) with zero slots appended up to `width`.
fn widen(x: &Tensor, width: usize) -> Result<Tensor> {
    let (b, h, s, d) = x.dims4()?;
    if s >= width {
        return Ok(x.clone());
    }
    let zeros = Tensor::zeros((b, h, width - s, d), x.dtype(), x.device())?;
    Ok(Tensor::cat(&[x, &zeros], 2)?)
}

impl<T> Row<T> {
    /// Picks the next token from `probs` as `generate` does; `Finished` at the end-of-text
    /// token or the length bound (at once for a row with no room for a token).
    fn pick(&mut self, probs: &[f32], lm: &LoadedModel) -> Result<Next> {
        if self.max_new == 0 {
            return Ok(Next::Finished);
        }
        check_finite(probs)?;
        let next = match self.sampling {
            Sampling::Greedy => top_k(probs, 1)[0].0,
            Sampling::TopK { k, .. } => sample_top_k(probs, k, &mut self.rng),
        };
        if Some(next) == lm.tokenizer.eos {
            return Ok(Next::Finished);
        }
        self.new_ids.push(next);
        self.pending = next;
        Ok(if self.new_ids.len() >= self.max_new {
            Next::Finished
        } else {
            Next::Continue
        })
    }

    /// The finished generation: the prompt and its continuation.
    fn generation(&self, lm: &LoadedModel) -> Result<Generation> {
        let mut all = self.fed[..self.prompt_len].to_vec();
        all.extend(&self.new_ids);
        Ok(Generation {
            prompt: self.prompt.clone(),
            text: lm.tokenizer.decode(&all)?,
            new_ids: self.new_ids.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::similar_lengths;

    #[test]
    fn passes_keep_padding_within_a_fifth_and_every_row() {
        let lens = [4, 4, 5, 5, 9, 10, 10, 20];
        let order: Vec<usize> = (0..lens.len()).collect();
        let passes = similar_lengths(&order, |i| lens[i]);
        let flat: Vec<usize> = passes.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(flat, order);
        for p in &passes {
            let tokens: usize = p.iter().map(|&i| lens[i]).sum();
            let padded = lens[*p.last().unwrap()] * p.len();
            assert!(5 * padded <= 6 * tokens, "{p:?}");
        }
        assert_eq!(passes.len(), 3, "{passes:?}");
    }
}
