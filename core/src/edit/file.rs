//! Loci's small files (an edit's two vectors, a layer's key statistics): safetensors holding f32
//! tensors, with one JSON document under a key of the header's metadata.

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{LociError, Result};

/// The file's bytes: `meta` as JSON under `key`, then the tensors `(name, shape, values)`.
pub fn write(
    key: &str,
    meta: &impl Serialize,
    tensors: &[(String, Vec<usize>, &[f32])],
) -> Result<Vec<u8>> {
    let meta = std::collections::HashMap::from([(
        key.to_string(),
        serde_json::to_string(meta).expect("metadata serialises"),
    )]);
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let failed = |e: safetensors::SafeTensorError| LociError::model(format!("writing {key}: {e}"));
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            Ok((
                name.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), b).map_err(failed)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(meta)).map_err(failed)
}

/// A file read back: its metadata and tensors, every failure worded by `bad`.
pub struct Read<'a, B> {
    st: SafeTensors<'a>,
    bad: B,
}

/// Parses `data`, returning the JSON under `key` (`missing` when there is none) and the tensors.
pub fn read<'a, M: DeserializeOwned, B: Fn(String) -> LociError>(
    data: &'a [u8],
    key: &str,
    missing: &str,
    bad: B,
) -> Result<(M, Read<'a, B>)> {
    let (_, header) = SafeTensors::read_metadata(data).map_err(|e| bad(e.to_string()))?;
    let meta = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(key))
        .ok_or_else(|| bad(missing.to_string()))?;
    let meta = serde_json::from_str(meta).map_err(|e| bad(e.to_string()))?;
    let st = SafeTensors::deserialize(data).map_err(|e| bad(e.to_string()))?;
    Ok((meta, Read { st, bad }))
}

impl<B: Fn(String) -> LociError> Read<'_, B> {
    /// The values of f32 tensor `name`, and its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = self
            .st
            .tensor(name)
            .map_err(|e| (self.bad)(e.to_string()))?;
        if t.dtype() != Dtype::F32 {
            return Err((self.bad)(format!("{name} is {:?}, not F32", t.dtype())));
        }
        let values = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((values, t.shape().to_vec()))
    }

    /// The error for anything else wrong in the file.
    pub fn bad(&self, what: String) -> LociError {
        (self.bad)(what)
    }
}

/// `data` (a safetensors file) with `value` as JSON under `key` in its metadata too.
pub fn with_metadata(data: &[u8], key: &str, value: &impl Serialize) -> Result<Vec<u8>> {
    let failed =
        |e: safetensors::SafeTensorError| LociError::model(format!("rewriting a file: {e}"));
    let (_, header) = SafeTensors::read_metadata(data).map_err(failed)?;
    let mut meta = header.metadata().clone().unwrap_or_default();
    meta.insert(
        key.to_string(),
        serde_json::to_string(value).expect("metadata serialises"),
    );
    let st = SafeTensors::deserialize(data).map_err(failed)?;
    let views: Vec<(String, TensorView)> = st.tensors();
    safetensors::serialize(views, Some(meta)).map_err(failed)
}

/// The JSON under `key` in `data`'s metadata, if it has one (a file that is not safetensors
/// has none).
pub fn metadata<M: DeserializeOwned>(data: &[u8], key: &str) -> Result<Option<M>> {
    let Ok((_, header)) = SafeTensors::read_metadata(data) else {
        return Ok(None);
    };
    match header.metadata().as_ref().and_then(|m| m.get(key)) {
        Some(text) => serde_json::from_str(text)
            .map(Some)
            .map_err(|e| LociError::model(format!("bad {key} metadata: {e}"))),
        None => Ok(None),
    }
}

/// Whether `data` is a safetensors file with `key` in its metadata.
pub fn has_key(data: &[u8], key: &str) -> bool {
    SafeTensors::read_metadata(data)
        .ok()
        .and_then(|(_, h)| h.metadata().as_ref().map(|m| m.contains_key(key)))
        .unwrap_or(false)
}
