//! Rotary position embeddings (GPT-J's interleaved pairs, LLaMA's halves), in f32.

use candle_core::{DType, Device, Tensor, D};

use super::super::fused;
use crate::config::RopeScaling;
use crate::error::{LociError, Result};

/// Rotary position embedding on the first `dim` dimensions of each head, in f32 (as GPT-J's
/// reference computes it: its f32 tables promote half-precision keys and queries).
#[derive(Clone, Debug)]
pub struct Rotary {
    /// How many leading dimensions of a head the tables turn: `dim`, or the whole head when
    /// pairs are interleaved — pairs past `dim` turn by angle 0 (cos 1, sin 0: exactly the
    /// identity), which spares GPT-J a split and a concatenation of q and k in every layer.
    span: usize,
    /// GPT-J rotates adjacent pairs (2i, 2i+1); LLaMA rotates halves (i, i + dim/2).
    pub interleaved: bool,
    /// cos and sin of every position's angles, `[positions, span/2]` f32 on the model's device:
    /// made once (shared by all layers) so a pass uploads nothing.
    cos: Tensor,
    sin: Tensor,
    /// The same tables times the attention's score scale `q_scale` (1/√head_dim), for queries:
    /// rotating and scaling them is then one kernel.
    cos_q: Tensor,
    sin_q: Tensor,
    q_scale: f64,
    /// Per-row tables gathered before (cos, sin, cos_q, sin_q), by row positions and length: a
    /// v* optimisation asks for the same ones in every layer of every step. Shared by all layers.
    gathered: std::sync::Arc<std::sync::Mutex<Vec<Gathered>>>,
}

/// `((each row's first position, positions per row), [cos, sin, cos_q, sin_q])`.
type Gathered = ((Vec<usize>, usize), [Tensor; 4]);

/// Where a batch sits in the sequence: all rows from one position, or each row from its own.
#[derive(Clone, Copy, Debug)]
pub enum Positions<'a> {
    /// Every row starts at this position.
    From(usize),
    /// Row `i` starts at position `rows[i]`.
    PerRow(&'a [usize]),
}

impl Rotary {
    /// Tables turning the first `dim` of each head's `head_dim` dimensions, with base `theta`
    /// and a long-context `scaling` if any, for `positions` positions on `device`;
    /// `interleaved`: GPT-J's pairs, else LLaMA's halves.
    pub fn new(
        dim: usize,
        head_dim: usize,
        interleaved: bool,
        (theta, scaling): (f64, Option<&RopeScaling>),
        positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let span = if interleaved { head_dim } else { dim };
        let (inv, scale) = frequencies(dim, theta, scaling);
        let inv: Vec<f32> = inv
            .into_iter()
            .chain(std::iter::repeat_n(0.0, (span - dim) / 2))
            .collect();
        let angles: Vec<f32> = (0..positions)
            .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
            .collect();
        // The attention factor scales the turning pairs only: past `dim`, GPT-J's pairs stay put.
        let pair_scale: Vec<f32> = (0..span / 2)
            .map(|j| if j < dim / 2 { scale } else { 1.0 })
            .collect();
        let table = |f: fn(f32) -> f32| -> Result<Tensor> {
            let v: Vec<f32> = angles
                .iter()
                .zip(pair_scale.iter().cycle())
                .map(|(&a, s)| f(a) * s)
                .collect();
            Ok(Tensor::from_vec(v, (positions, span / 2), device)?)
        };
        let (cos, sin) = (table(f32::cos)?, table(f32::sin)?);
        let q_scale = 1.0 / (head_dim as f64).sqrt();
        Ok(Self {
            span,
            interleaved,
            cos_q: (&cos * q_scale)?,
            sin_q: (&sin * q_scale)?,
            cos,
            sin,
            q_scale,
            gathered: Default::default(),
        })
    }

    /// The same tables with queries scaled by `s` rather than 1/√head_dim (Gemma-2's
    /// `query_pre_attn_scalar`).
    pub fn with_query_scale(mut self, s: f64) -> Result<Self> {
        self.cos_q = (&self.cos * s)?;
        self.sin_q = (&self.sin * s)?;
        self.q_scale = s;
        Ok(self)
    }

    /// Gatherings kept; the oldest goes first.
    const KEEP: usize = 8;

    /// `(cos, sin)` `[t, span/2]` of positions `p..p+t`, or `[b, t, span/2]` per row; `scaled`:
    /// the queries' tables.
    fn tables(&self, pos: Positions, t: usize, scaled: bool) -> Result<(Tensor, Tensor)> {
        let positions = self.cos.dim(0)?;
        let beyond = |p: usize| {
            LociError::input(format!(
                "position {} is beyond the model's {positions} rotary positions",
                p + t
            ))
        };
        let pick = |all: &[Tensor; 4]| {
            let i = if scaled { 2 } else { 0 };
            (all[i].clone(), all[i + 1].clone())
        };
        match pos {
            Positions::From(p) => {
                if p + t > positions {
                    return Err(beyond(p));
                }
                let (cos, sin) = if scaled {
                    (&self.cos_q, &self.sin_q)
                } else {
                    (&self.cos, &self.sin)
                };
                Ok((cos.narrow(0, p, t)?, sin.narrow(0, p, t)?))
            }
            Positions::PerRow(rows) => {
                let mut kept = self.gathered.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((_, all)) = kept.iter().find(|((r, n), _)| *n == t && r == rows) {
                    return Ok(pick(all));
                }
                let mut idx = Vec::with_capacity(rows.len() * t);
                for &p in rows {
                    if p + t > positions {
                        return Err(beyond(p));
                    }
                    idx.extend((p..p + t).map(|q| q as u32));
                }
                let idx = Tensor::from_vec(idx, rows.len() * t, self.cos.device())?;
                let half = self.span / 2;
                let gather = |tab: &Tensor| -> Result<Tensor> {
                    Ok(tab.index_select(&idx, 0)?.reshape((rows.len(), t, half))?)
                };
                let all = [
                    gather(&self.cos)?,
                    gather(&self.sin)?,
                    gather(&self.cos_q)?,
                    gather(&self.sin_q)?,
                ];
                let out = pick(&all);
                if kept.len() >= Self::KEEP {
                    kept.remove(0);
                }
                kept.push(((rows.to_vec(), t), all));
                Ok(out)
            }
        }
    }

    /// Turns `x` (`[b, heads, t, head_dim]`, f32) by the tables' angles.
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hd = x.dim(3)?;
        let rot = |y: &Tensor| -> Result<Tensor> {
            let y = y.contiguous()?;
            if y.track_op() {
                // candle's fused kernels have no backward pass: fused.rs gives them one.
                return if fused::supported(&y) {
                    Ok(fused::rope(&y, cos, sin, self.interleaved)?)
                } else {
                    rope_composed(&y, cos, sin, self.interleaved)
                };
            }
            Ok(if self.interleaved {
                candle_nn::rotary_emb::rope_i(&y, cos, sin)?
            } else {
                candle_nn::rotary_emb::rope(&y, cos, sin)?
            })
        };
        if self.span == hd {
            rot(x)
        } else {
            let head = rot(&x.narrow(D::Minus1, 0, self.span)?)?;
            let tail = x.narrow(D::Minus1, self.span, hd - self.span)?;
            Ok(Tensor::cat(&[head, tail], D::Minus1)?)
        }
    }

    /// Keys `[b, heads, t, head_dim]` at positions `pos`, rotated in f32.
    pub fn apply(&self, k: &Tensor, pos: Positions) -> Result<Tensor> {
        let (cos, sin) = self.tables(pos, k.dim(2)?, false)?;
        self.rotate(&k.to_dtype(DType::F32)?, &cos, &sin)
    }

    /// Queries and keys (f32) at positions `pos`, rotated; the queries also scaled by
    /// 1/√head_dim, which the scores then need no more.
    pub fn apply_qk(&self, q: &Tensor, k: &Tensor, pos: Positions) -> Result<(Tensor, Tensor)> {
        let t = q.dim(2)?;
        let (cos, sin) = self.tables(pos, t, false)?;
        let k = self.rotate(k, &cos, &sin)?;
        // Scaled tables where they cover the whole head; else one product.
        let q = if self.span == q.dim(3)? {
            let (cq, sq) = self.tables(pos, t, true)?;
            self.rotate(q, &cq, &sq)?
        } else {
            (self.rotate(q, &cos, &sin)? * self.q_scale)?
        };
        Ok((q, k))
    }
}

/// The inverse frequencies of the `dim / 2` rotary pairs with base `theta`, and the factor that
/// scales cos and sin (YaRN's attention factor; else 1): in f32, by transformers' formulas.
pub fn frequencies(dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> (Vec<f32>, f32) {
    // theta^(2i/dim) per pair, each pair's wavelength in positions over 2π.
    let period: Vec<f32> = (0..dim / 2)
        .map(|i| (theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect();
    let plain = || period.iter().map(|p| 1.0 / p).collect::<Vec<f32>>();
    match scaling {
        None | Some(RopeScaling::Dynamic { .. }) => (plain(), 1.0),
        Some(RopeScaling::Linear { factor }) => {
            (plain().iter().map(|f| f / *factor as f32).collect(), 1.0)
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_positions,
        }) => {
            let (factor, low, high) = (*factor as f32, *low as f32, *high as f32);
            let old = *original_max_positions as f32;
            let inv = plain().into_iter().map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < old / high {
                    f
                } else if wavelen > old / low {
                    f / factor
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            });
            (inv.collect(), 1.0)
        }
        Some(RopeScaling::Yarn {
            factor,
            original_max_positions,
            beta_fast,
            beta_slow,
            attention_factor,
            truncate,
        }) => {
            let d = dim as f64;
            // The dimension that turns `rotations` times over the original context.
            let at = |rotations: f64| {
                let turns =
                    *original_max_positions as f64 / (rotations * 2.0 * std::f64::consts::PI);
                d * turns.ln() / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (at(*beta_fast), at(*beta_slow));
            if *truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
            if low == high {
                high += 0.001;
            }
            let inv = period.iter().enumerate().map(|(i, p)| {
                let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                let fast = 1.0 - ramp;
                (1.0 / (*factor as f32 * p)) * (1.0 - fast) + (1.0 / p) * fast
            });
            (inv.collect(), *attention_factor as f32)
        }
    }
}

/// Rotary embedding from differentiable operations; `cos`/`sin` are `[t, d/2]` or `[b, t, d/2]`.
pub(crate) fn rope_composed(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let half = d / 2;
    let (cos, sin) = match cos.rank() {
        2 => (cos.reshape((1, 1, t, half))?, sin.reshape((1, 1, t, half))?),
        _ => (cos.unsqueeze(1)?, sin.unsqueeze(1)?),
    };
    let (x1, x2) = if interleaved {
        let pairs = x.reshape((b, h, t, half, 2))?;
        (
            pairs.narrow(4, 0, 1)?.squeeze(4)?,
            pairs.narrow(4, 1, 1)?.squeeze(4)?,
        )
    } else {
        (x.narrow(3, 0, half)?, x.narrow(3, half, half)?)
    };
    let o1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let o2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Ok(if interleaved {
        Tensor::stack(&[o1, o2], 4)?.reshape((b, h, t, d))?
    } else {
        Tensor::cat(&[o1, o2], 3)?
    })
}
