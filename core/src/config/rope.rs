//! Rotary position scaling for long contexts, as transformers' `rope_type`s define it, and where
//! each family's config keeps its rotary parameters.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{get_f64, get_usize};
use crate::error::{LociError, Result};

/// A rotary scaling for contexts longer than the model was trained on, as transformers' `rope_type`s
/// define it; the frequencies themselves are computed beside the rotary tables.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (positions interpolated).
    Linear {
        /// The context's stretch.
        factor: f64,
    },
    /// Dynamic NTK scaling: a larger base once a sequence passes `max_position_embeddings`,
    /// which is the longest Loci runs, so the frequencies stay as trained (kept to be saved).
    Dynamic {
        /// The context's stretch past the trained length.
        factor: f64,
    },
    /// Llama 3's: wavelengths longer than `original / low_freq_factor` divided by `factor`, shorter
    /// than `original / high_freq_factor` kept, and a smooth blend between.
    Llama3 {
        /// The stretch of the low frequencies.
        factor: f64,
        /// Bounds the low-frequency band.
        low_freq_factor: f64,
        /// Bounds the high-frequency band.
        high_freq_factor: f64,
        /// The context the model was pre-trained on.
        original_max_positions: usize,
    },
    /// YaRN: frequencies ramp from extrapolated (fast) to interpolated (slow) between the
    /// dimensions that turn `beta_fast` and `beta_slow` times over the original context; cos and
    /// sin scaled by `attention_factor`.
    Yarn {
        /// The context's stretch.
        factor: f64,
        /// The context the model was pre-trained on.
        original_max_positions: usize,
        /// Rotations that mark the extrapolated end of the ramp.
        beta_fast: f64,
        /// Rotations that mark the interpolated end of the ramp.
        beta_slow: f64,
        /// Scales cos and sin (so attention scores by its square).
        attention_factor: f64,
        /// Whether the ramp's ends are rounded to whole dimensions.
        truncate: bool,
    },
}

/// A config's rotary parameters: transformers 5 writes them in `rope_parameters`, 4 in
/// `rope_scaling` beside a top-level base (which wins, as in transformers, when both are there).
pub(super) struct Rope {
    pub theta: f64,
    /// The share of each head that turns, where the family reads one.
    pub partial: Option<f64>,
    pub scaling: Option<RopeScaling>,
}

/// Where a family keeps its rotary base and turning share outside `rope_parameters`: LLaMA,
/// Mistral and Qwen2 turn whole heads whatever a config says.
pub(super) struct RopeKeys {
    pub theta: &'static str,
    pub partial: Option<&'static str>,
}

pub(super) const LLAMA_ROPE: RopeKeys = RopeKeys {
    theta: "rope_theta",
    partial: None,
};

impl Rope {
    pub(super) fn of(v: &Value, keys: RopeKeys, max_positions: usize) -> Result<Self> {
        let object = |k: &str| v.get(k).filter(|p| p.is_object());
        let params = object("rope_scaling").or_else(|| object("rope_parameters"));
        let get = |k: &str| params.and_then(|p| p.get(k));
        if params.is_some_and(|p| p.as_object().unwrap().values().any(Value::is_object)) {
            return Err(LociError::Unsupported(
                "rotary parameters per layer type".into(),
            ));
        }
        let f = |k: &str| get(k).and_then(Value::as_f64);
        let kind = get("rope_type")
            .or_else(|| get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let need_f = |k: &str| {
            f(k).ok_or_else(|| LociError::model(format!("rope type {kind:?} needs {k:?}")))
        };
        let original = get_usize(v, &["original_max_position_embeddings"])
            .or_else(|| {
                get("original_max_position_embeddings")
                    .and_then(Value::as_u64)
                    .map(|x| x as usize)
            })
            .unwrap_or(max_positions);
        let scaling = match kind {
            "default" => None,
            "dynamic" => Some(RopeScaling::Dynamic {
                factor: need_f("factor")?,
            }),
            "linear" => Some(RopeScaling::Linear {
                factor: need_f("factor")?,
            }),
            "llama3" => Some(RopeScaling::Llama3 {
                factor: need_f("factor")?,
                low_freq_factor: need_f("low_freq_factor")?,
                high_freq_factor: need_f("high_freq_factor")?,
                original_max_positions: original,
            }),
            "yarn" => {
                let factor = f("factor").unwrap_or(max_positions as f64 / original as f64);
                let mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention_factor =
                    match (f("attention_factor"), f("mscale"), f("mscale_all_dim")) {
                        (Some(a), _, _) => a,
                        (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                            mscale(factor, m) / mscale(factor, all)
                        }
                        _ => mscale(factor, 1.0),
                    };
                let nonzero = |k: &str, d: f64| f(k).filter(|x| *x != 0.0).unwrap_or(d);
                Some(RopeScaling::Yarn {
                    factor,
                    original_max_positions: original,
                    beta_fast: nonzero("beta_fast", 32.0),
                    beta_slow: nonzero("beta_slow", 1.0),
                    attention_factor,
                    truncate: get("truncate").and_then(Value::as_bool).unwrap_or(true),
                })
            }
            other => {
                return Err(LociError::Unsupported(format!(
                    "rope type {other:?} (supported: default, linear, dynamic, llama3, yarn)"
                )))
            }
        };
        let in_parameters = |k: &str| {
            object("rope_parameters")
                .and_then(|p| p.get(k))
                .and_then(Value::as_f64)
        };
        Ok(Rope {
            theta: get_f64(v, &[keys.theta])
                .or_else(|| in_parameters("rope_theta"))
                .unwrap_or(10000.0),
            partial: keys
                .partial
                .and_then(|k| get_f64(v, &[k]).or_else(|| in_parameters("partial_rotary_factor"))),
            scaling,
        })
    }
}
