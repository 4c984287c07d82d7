//! Noise on a subject's embeddings, as hooks: the corruption of causal tracing (the same draw
//! for every sample row of a trace) and of Hase et al.'s fact forcing and tracing reversal
//! (one seeded draw per edit). Tracing and editing both use these.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{FnHook, Hook, Patch, Site};
use crate::error::Result;
use crate::rng::SplitMix64;

/// Gaussian noise on a subject's embeddings: its scale and seed.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct SubjectNoise {
    /// Standard deviation of the Gaussian noise, in embedding units.
    pub sigma: f64,
    /// Seed of the generator the noise is drawn from.
    pub seed: u64,
}

/// Noise added to the token embeddings of `spans` (`(row, first, end)`: positions
/// `[first, end)` of a batch row), drawn in order from a generator seeded with the noise's seed
/// — the corruption of Hase et al.'s fact forcing and tracing reversal, as a hook; without
/// noise, a hook that changes nothing.
pub fn subject_noise(
    spans: &[(usize, usize, usize)],
    noise: Option<SubjectNoise>,
    (d, device): (usize, &candle_core::Device),
) -> Result<Patch> {
    let Some(SubjectNoise { sigma, seed }) = noise else {
        return Ok(Patch::empty(Site::Embed));
    };
    let mut rng = SplitMix64::new(seed);
    let mut cells = Vec::new();
    for &(row, first, end) in spans {
        for pos in first..end {
            let v: Vec<f32> = (0..d)
                .map(|_| (sigma * rng.next_gaussian()) as f32)
                .collect();
            cells.push((row, pos, Tensor::from_vec(v, d, device)?));
        }
    }
    Ok(Patch {
        site: Site::Embed,
        cells,
        add: true,
    })
}

/// [`subject_noise`] of several independent requests sharing a batch, in one patch: each
/// request's spans (`(row, first, end)`, rows of the batch) get the draw they would get alone.
pub fn subject_noise_each(
    requests: &[Vec<(usize, usize, usize)>],
    noise: Option<SubjectNoise>,
    width: (usize, &candle_core::Device),
) -> Result<Patch> {
    let mut all = Patch::empty(Site::Embed);
    all.add = true;
    for spans in requests {
        all.cells.extend(subject_noise(spans, noise, width)?.cells);
    }
    Ok(all)
}

/// Adds `noise` (`[samples, end − first, d]`) to the embeddings of tokens `range` in batch rows
/// `first_row..` (one noise sample per row): tracing's corrupted runs.
pub fn embed_noise(noise: &Tensor, range: (usize, usize), first_row: usize) -> impl Hook + '_ {
    FnHook(move |site: Site, x: &Tensor| {
        if site != Site::Embed {
            return Ok(None);
        }
        let (b, t, _) = x.dims3()?;
        let (s, e) = range;
        let rows = noise.dim(0)?;
        debug_assert_eq!(first_row + rows, b);
        let target = x.narrow(0, first_row, rows)?.narrow(1, s, e - s)?;
        let noised = (target + noise.to_dtype(x.dtype())?)?;
        let mut parts = Vec::new();
        if first_row > 0 {
            parts.push(x.narrow(0, 0, first_row)?);
        }
        let row_block = Tensor::cat(
            &[
                x.narrow(0, first_row, rows)?.narrow(1, 0, s)?,
                noised,
                x.narrow(0, first_row, rows)?.narrow(1, e, t - e)?,
            ],
            1,
        )?;
        parts.push(row_block);
        Ok(Some(Tensor::cat(&parts, 0)?))
    })
}
