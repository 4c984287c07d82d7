//! A clean pass split at token `t`: what a pass over positions `t..` from any layer needs —
//! each layer's residual input there, and the keys and values of the positions before. Methods
//! that change one activation at `t` (knowledge neurons' integrated gradients, GRACE's value)
//! run many such passes and recompute nothing before `t` or below the changed layer.

use candle_core::Tensor;

use super::layers::LayerCache;
use super::{KvCache, LogitsAt, Model};
use crate::error::{LociError, Result};
use crate::hooks::{Capture, Hook, NoHook, Site};

/// The clean pass of a token sequence, split at token `t`.
pub struct SplitRun {
    /// The first position of the passes run from the split.
    pub t: usize,
    /// Each layer's residual input at positions `t..`, `[1, len − t, d]`.
    pub resid_in: Vec<Tensor>,
    /// The sites asked for, at positions `t..`.
    pub captured: Capture,
    /// Keys and values of the positions before `t`, per layer.
    pub kv: KvCache,
}

impl Model {
    /// The clean pass of `ids` split at token `t`, with `sites` captured at positions `t..`.
    pub fn split_at(&self, ids: &[u32], t: usize, sites: &[Site]) -> Result<SplitRun> {
        let n = self.n_layer();
        if t >= ids.len() {
            return Err(LociError::input(format!(
                "a split at token {t} of {} tokens",
                ids.len()
            )));
        }
        let mut kv = KvCache::default();
        if t > 0 {
            let prefix = self.ids_tensor(&[ids[..t].to_vec()])?;
            self.run(&prefix, &mut NoHook, Some(&mut kv), LogitsAt::Last)?;
        }
        kv.layers.resize_with(n, LayerCache::default);
        let blocks = (0..n.saturating_sub(1)).map(Site::Block);
        let mut cap =
            Capture::new(blocks.chain(sites.iter().copied())).stopping_after(Site::Block(n - 1));
        let rest = self.ids_tensor(&[ids[t..].to_vec()])?;
        self.run(&rest, &mut cap, Some(&mut kv.clone()), LogitsAt::Last)?;
        let positions: Vec<usize> = (t..ids.len()).collect();
        let embedded = self.embed_rows(&ids[t..], &positions)?.transpose(0, 1)?;
        let mut resid_in = vec![embedded.contiguous()?];
        for l in 0..n - 1 {
            resid_in.push(cap.get(Site::Block(l))?.clone());
        }
        Ok(SplitRun {
            t,
            resid_in,
            captured: cap,
            kv,
        })
    }

    /// `rows` copies of the split's positions run through layers `l..` (every site of them
    /// offered to `hook`): the last block's output, `[rows, len − t, d]`.
    pub fn run_from_split(
        &self,
        split: &SplitRun,
        l: usize,
        rows: usize,
        hook: &mut dyn Hook,
    ) -> Result<Tensor> {
        let x = split.resid_in[l].repeat((rows, 1, 1))?;
        let repeat = |t: &Option<Tensor>| t.as_ref().map(|t| t.repeat((rows, 1, 1, 1))).transpose();
        let mut caches = split.kv.layers[l..]
            .iter()
            .map(|c| {
                Ok(LayerCache {
                    k: repeat(&c.k)?,
                    v: repeat(&c.v)?,
                    row_starts: None,
                    key_mask: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.run_layers(x, l..self.n_layer(), split.t, Some(&mut caches), hook)?
            .ok_or_else(|| LociError::input("a pass from the split stopped early"))
    }
}
