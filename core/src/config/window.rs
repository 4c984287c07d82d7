//! Sliding-window attention: which layers of a config attend through a window, and how wide, as
//! transformers applies it per family.

use serde_json::Value;

use super::get_usize;
use crate::error::{LociError, Result};

/// Sliding-window attention as transformers applies it: the window and which layers use it
/// (empty: all). Mistral windows every layer (4096 positions when the config names none, none
/// when it says `null`), Phi-3 every layer when it names one; Qwen2 only with
/// `use_sliding_window`, in the layers `layer_types` lists or else from `max_window_layers` (28)
/// on; LLaMA never.
pub(super) fn sliding_of(
    v: &Value,
    model_type: &str,
    n_layer: usize,
) -> Result<(Option<usize>, Vec<bool>)> {
    let window = |default: Option<usize>| match v.get("sliding_window") {
        None => Ok(default),
        Some(Value::Null) => Ok(None),
        Some(w) => w
            .as_u64()
            .map(|w| Some(w as usize))
            .ok_or_else(|| LociError::model(format!("sliding_window {w} is not a count"))),
    };
    match model_type {
        "mistral" => Ok((window(Some(4096))?, vec![])),
        "phi3" => Ok((window(None)?, vec![])),
        "qwen2" if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) => {
            let Some(w) = window(Some(4096))? else {
                return Ok((None, vec![]));
            };
            let layers = match v.get("layer_types").and_then(Value::as_array) {
                Some(types) => types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        other => Err(LociError::Unsupported(format!("layer type {other:?}"))),
                    })
                    .collect::<Result<Vec<_>>>()?,
                None => {
                    let from = get_usize(v, &["max_window_layers"]).unwrap_or(28);
                    (0..n_layer).map(|l| l >= from).collect()
                }
            };
            if layers.len() != n_layer {
                return Err(LociError::model(format!(
                    "layer_types lists {} layers, the model has {n_layer}",
                    layers.len()
                )));
            }
            Ok(match layers.iter().filter(|&&s| s).count() {
                0 => (None, vec![]),
                // Every layer windowed is written as no list, however the config said it.
                n if n == n_layer => (Some(w), vec![]),
                _ => (Some(w), layers),
            })
        }
        _ => Ok((None, vec![])),
    }
}

/// Gemma-2's windows: 4096 positions (or its `sliding_window`) in the layers `layer_types`
/// names, else in every other layer from the first.
pub(super) fn gemma2_windows(v: &Value, n_layer: usize) -> Result<(Option<usize>, Vec<bool>)> {
    let window = match v.get("sliding_window") {
        None => Some(4096),
        Some(w) => w.as_u64().map(|w| w as usize),
    };
    let layers: Vec<bool> = match v.get("layer_types").and_then(Value::as_array) {
        Some(types) => types
            .iter()
            .map(|t| t.as_str() == Some("sliding_attention"))
            .collect(),
        None => (0..n_layer).map(|l| l % 2 == 0).collect(),
    };
    if layers.len() != n_layer {
        return Err(LociError::model(format!(
            "layer_types lists {} layers, the model has {n_layer}",
            layers.len()
        )));
    }
    Ok(match window {
        Some(w) if layers.contains(&true) => (Some(w), layers),
        _ => (None, vec![]),
    })
}
