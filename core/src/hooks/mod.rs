//! The one hook mechanism: named sites in the forward pass where a run can read, replace or stop.
//!
//! Tracing adds noise at `Embed` and restores `Block`/`Mlp`/`Attn` states; editing reads `MlpKey`
//! (ROME's k) and adds a delta at `Mlp` (ROME's v); statistics read `MlpKey` and stop there.
//! Every site carries a `[batch, tokens, width]` tensor.

pub mod noise;

use std::collections::HashMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{LociError, Result};

/// A named point of the forward pass where hooks see, and may replace, the activation
/// (`[batch, tokens, width]`); layer sites carry their layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "site", content = "layer", rename_all = "snake_case")]
pub enum Site {
    /// Token embeddings (before positions are added): where tracing injects noise.
    Embed,
    /// Output of layer `l`'s attention module (after the output projection).
    Attn(usize),
    /// Input of layer `l`'s MLP down-projection: ROME's key, `d_ff` wide.
    MlpKey(usize),
    /// Output of layer `l`'s MLP (the down-projection's output, bias included): ROME's value.
    Mlp(usize),
    /// Residual stream after layer `l`: the "hidden" state of causal tracing.
    Block(usize),
}

impl Site {
    /// The site's layer; `None` for `Embed`.
    pub fn layer(self) -> Option<usize> {
        match self {
            Site::Embed => None,
            Site::Attn(l) | Site::MlpKey(l) | Site::Mlp(l) | Site::Block(l) => Some(l),
        }
    }

    /// Where the site comes in a forward pass: sites compare as the pass reaches them.
    pub fn order(self) -> (usize, u8) {
        let within = match self {
            Site::Embed => 0,
            Site::Attn(_) => 1,
            Site::MlpKey(_) => 2,
            Site::Mlp(_) => 3,
            Site::Block(_) => 4,
        };
        (self.layer().map_or(0, |l| l + 1), within)
    }
}

/// Something that watches or changes a forward pass.
pub trait Hook {
    /// Cheap filter, asked before `at`; sites it declines are skipped without a call.
    fn wants(&self, _site: Site) -> bool {
        true
    }
    /// Sees the activation at `site`; returning a tensor replaces it (same shape).
    fn at(&mut self, site: Site, x: &Tensor) -> Result<Option<Tensor>>;
    /// The pass ends right after this site (no logits are computed).
    fn stop_after(&self) -> Option<Site> {
        None
    }
}

/// A plain forward pass.
pub struct NoHook;

impl Hook for NoHook {
    fn wants(&self, _: Site) -> bool {
        false
    }
    fn at(&mut self, _: Site, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// Any closure is a hook.
pub struct FnHook<F>(pub F);

impl<F: FnMut(Site, &Tensor) -> Result<Option<Tensor>>> Hook for FnHook<F> {
    fn at(&mut self, site: Site, x: &Tensor) -> Result<Option<Tensor>> {
        (self.0)(site, x)
    }
}

/// Records the activations at chosen sites, optionally ending the pass after the last one.
#[derive(Default)]
pub struct Capture {
    /// The sites recorded.
    pub sites: Vec<Site>,
    /// Where the pass ends, if before the logits (see [`Capture::stopping_after`]).
    pub stop_after: Option<Site>,
    /// The recorded activations by site, `[batch, tokens, width]` each, filled as the pass runs.
    pub captured: HashMap<Site, Tensor>,
}

impl Capture {
    /// Records the activations at `sites`; the pass runs to the end.
    pub fn new(sites: impl IntoIterator<Item = Site>) -> Self {
        Self {
            sites: sites.into_iter().collect(),
            ..Default::default()
        }
    }
    /// Stops the pass after `site` (e.g. the deepest layer whose statistics are wanted).
    pub fn stopping_after(mut self, site: Site) -> Self {
        self.stop_after = Some(site);
        self
    }
    /// The activation recorded at `site`; an error when the pass did not reach it or it was not
    /// asked for.
    pub fn get(&self, site: Site) -> Result<&Tensor> {
        self.captured
            .get(&site)
            .ok_or_else(|| LociError::input(format!("site {site:?} was not captured")))
    }
}

impl Hook for Capture {
    fn wants(&self, site: Site) -> bool {
        self.sites.contains(&site)
    }
    fn at(&mut self, site: Site, x: &Tensor) -> Result<Option<Tensor>> {
        self.captured.insert(site, x.clone());
        Ok(None)
    }
    fn stop_after(&self) -> Option<Site> {
        self.stop_after
    }
}

/// Chains hooks: each sees the output of the one before.
pub struct Chain<'a>(pub Vec<&'a mut dyn Hook>);

impl Hook for Chain<'_> {
    fn wants(&self, site: Site) -> bool {
        self.0.iter().any(|h| h.wants(site))
    }
    fn at(&mut self, site: Site, x: &Tensor) -> Result<Option<Tensor>> {
        let mut cur: Option<Tensor> = None;
        for h in self.0.iter_mut() {
            if !h.wants(site) {
                continue;
            }
            if let Some(y) = h.at(site, cur.as_ref().unwrap_or(x))? {
                cur = Some(y);
            }
        }
        Ok(cur)
    }
    fn stop_after(&self) -> Option<Site> {
        // The earliest requested stop wins.
        self.0
            .iter()
            .filter_map(|h| h.stop_after())
            .min_by_key(|s| s.order())
    }
}

/// Replaces the first position of every row at one site with that row's vector: how a pass
/// that starts at a token sets one activation there (knowledge neurons' points of the path,
/// GRACE's trained value).
pub struct SetFirst {
    /// The site whose activation is set.
    pub site: Site,
    /// `[rows, width]`: row `i`'s vector for its first position (autograd flows through it).
    pub rows: Tensor,
}

impl Hook for SetFirst {
    fn wants(&self, site: Site) -> bool {
        site == self.site
    }

    fn at(&mut self, _site: Site, x: &Tensor) -> Result<Option<Tensor>> {
        let first = self.rows.to_dtype(x.dtype())?.unsqueeze(1)?;
        let len = x.dim(1)?;
        Ok(Some(if len == 1 {
            first
        } else {
            Tensor::cat(&[&first, &x.narrow(1, 1, len - 1)?], 1)?
        }))
    }
}

/// Replaces rows `(batch, position)` at one site with given vectors, or adds them as deltas.
pub struct Patch {
    /// The site whose activation is patched.
    pub site: Site,
    /// `(batch row, token position, vector [width])`.
    pub cells: Vec<(usize, usize, Tensor)>,
    /// Adds the vectors to the activation's rows (`true`) instead of replacing them.
    pub add: bool,
}

impl Patch {
    /// A patch that changes nothing.
    pub fn empty(site: Site) -> Self {
        Self {
            site,
            cells: vec![],
            add: true,
        }
    }
}

impl Hook for Patch {
    fn wants(&self, site: Site) -> bool {
        site == self.site && !self.cells.is_empty()
    }
    fn at(&mut self, _site: Site, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(patch_rows(x, &self.cells, self.add)?))
    }
}

/// Writes (or adds) vectors at `(batch, position)` cells of a `[b, t, d]` tensor.
pub fn patch_rows(x: &Tensor, cells: &[(usize, usize, Tensor)], add: bool) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let mut y = x.clone();
    for (bi, ti, v) in cells {
        if *bi >= b || *ti >= t {
            return Err(LociError::input(format!(
                "patch cell ({bi}, {ti}) outside a [{b}, {t}, {d}] activation"
            )));
        }
        let v = v.to_dtype(x.dtype())?.reshape((1, 1, d))?;
        let v = if add {
            (y.narrow(0, *bi, 1)?.narrow(1, *ti, 1)? + v)?
        } else {
            v
        };
        y = y.slice_assign(&[*bi..*bi + 1, *ti..*ti + 1, 0..d], &v)?;
    }
    Ok(y)
}
