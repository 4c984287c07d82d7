//! The reference algorithm of causal tracing, kept to check the fast path against: every cell
//! is one full forward pass of a clean row and the corrupted samples, with the chosen states
//! overwritten by the clean row's.

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::prepare::{answer_prob, finish, header, prepare, readout_logits, window_layers};
use super::types::{TraceKind, TraceRequest, TraceResult, TraceWork};
use crate::error::Result;
use crate::hooks::noise::embed_noise;
use crate::hooks::{Chain, FnHook, Site};
use crate::loader::LoadedModel;

impl LoadedModel {
    /// Runs a causal trace the reference way (no batching, no reuse): slow, for checking.
    pub fn trace_naive(
        &self,
        req: &TraceRequest,
        embedding_std: Option<f64>,
    ) -> Result<TraceResult> {
        let started = crate::clock::now_seconds();
        let p = prepare(self, req, embedding_std)?;
        let m = &self.model;
        let (n, big_t) = (m.n_layer(), p.base.prompt_len);
        let rows = m.ids_tensor(&vec![p.base.ids.clone(); req.samples + 1])?;
        let mut scores = BTreeMap::new();
        for &kind in &req.kinds {
            let mut grid = vec![vec![0f32; n]; big_t];
            for (t, row) in grid.iter_mut().enumerate() {
                for (l, cell) in row.iter_mut().enumerate() {
                    let sites: Vec<Site> = match kind {
                        TraceKind::Hidden => vec![Site::Block(l)],
                        _ => {
                            let (lo, hi) = window_layers(l, req.window, n);
                            (lo..hi).map(|j| kind.site(j)).collect()
                        }
                    };
                    let mut restore = FnHook(|s: Site, x: &Tensor| -> Result<Option<Tensor>> {
                        if !sites.contains(&s) {
                            return Ok(None);
                        }
                        let clean = x.narrow(0, 0, 1)?.narrow(1, t, 1)?;
                        let cells: Vec<_> = (1..=req.samples)
                            .map(|r| (r, t, clean.squeeze(0).unwrap().squeeze(0).unwrap()))
                            .collect();
                        Ok(Some(crate::hooks::patch_rows(x, &cells, false)?))
                    });
                    let mut nh = embed_noise(&p.noise, p.base.range, 1);
                    let mut chain = Chain(vec![&mut nh, &mut restore]);
                    let logits = readout_logits(m, &rows, &mut chain, None, p.base.answer.len())?;
                    *cell = answer_prob(&logits.narrow(0, 1, req.samples)?, &p.base.answer, 1)?[0];
                }
            }
            scores.insert(kind, grid);
        }
        let work = naive_work(req, big_t, n);
        Ok(finish(
            self,
            req,
            &header(self, req, &p)?,
            scores,
            TraceWork {
                token_layers: work,
                naive_token_layers: work,
            },
            started,
        ))
    }
}

/// The token-layers the reference algorithm computes.
pub(super) fn naive_work(req: &TraceRequest, big_t: usize, n: usize) -> u64 {
    (req.kinds.len() * big_t * n * (req.samples + 1) * big_t * n) as u64
}
