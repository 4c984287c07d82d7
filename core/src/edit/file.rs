//! Loci's small files (an edit's two vectors, a layer's key statistics): safetensors holding f32
//! tensors, with one JSON document under a key of the header's metadata, and the SHA-256 of the
//! tensors' bytes under `loci_digest`: a file cut short or changed on disk is refused on read,
//! never taken for a valid one. (Files written before the digest existed have none and are read
//! as they are.)

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{LociError, Result};

/// The metadata key holding the digest of a file's tensor bytes.
const DIGEST: &str = "loci_digest";

/// The file's bytes: `meta` as JSON under `key`, then the tensors `(name, shape, values)`.
pub fn write(
    key: &str,
    meta: &impl Serialize,
    tensors: &[(String, Vec<usize>, &[f32])],
) -> Result<Vec<u8>> {
    write_with_blobs(key, meta, tensors, &[])
}

/// [`write`], with byte strings too (`(name, bytes)`, stored as U8 tensors: covered by the
/// digest, and free of the header's size limit).
pub fn write_with_blobs(
    key: &str,
    meta: &impl Serialize,
    tensors: &[(String, Vec<usize>, &[f32])],
    blobs: &[(String, &[u8])],
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
    let mut views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            Ok((
                name.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), b).map_err(failed)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    for (name, b) in blobs {
        views.push((
            name.as_str(),
            TensorView::new(Dtype::U8, vec![b.len()], b).map_err(failed)?,
        ));
    }
    let plain = safetensors::serialize(views, Some(meta)).map_err(failed)?;
    // The digest goes in the header, which the digested bytes do not include.
    let digest = tensor_digest(&plain)?;
    with_metadata(&plain, DIGEST, &digest)
}

/// The hex SHA-256 of a safetensors file's bytes after its header.
fn tensor_digest(data: &[u8]) -> Result<String> {
    use sha2::Digest;
    let cut = || LociError::model("the file is cut short");
    let n = u64::from_le_bytes(data.get(..8).ok_or_else(cut)?.try_into().expect("8 bytes"));
    let start = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&s| s <= data.len())
        .ok_or_else(cut)?;
    let d = sha2::Sha256::digest(&data[start..]);
    Ok(d.iter().map(|b| format!("{b:02x}")).collect())
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
    let recorded = header.metadata().as_ref().and_then(|m| m.get(DIGEST));
    if let Some(recorded) = recorded {
        let found = tensor_digest(data).map_err(|e| bad(e.to_string()))?;
        if serde_json::from_str::<String>(recorded).ok().as_deref() != Some(found.as_str()) {
            return Err(bad(
                "its tensors do not match its digest (a corrupt or partly written file)".into(),
            ));
        }
    }
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

    /// The bytes of U8 tensor `name` (written by [`write_with_blobs`]).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self
            .st
            .tensor(name)
            .map_err(|e| (self.bad)(e.to_string()))?;
        if t.dtype() != Dtype::U8 {
            return Err((self.bad)(format!("{name} is {:?}, not U8", t.dtype())));
        }
        Ok(t.data())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(m: String) -> LociError {
        LociError::model(m)
    }

    #[test]
    fn a_file_whose_tensors_changed_is_refused_and_a_whole_one_read() {
        let values = [1.0f32, 2.0, 3.0];
        let data = write("k", &7u32, &[("t".into(), vec![3], &values[..])]).unwrap();
        let (m, r) = read::<u32, _>(&data, "k", "none", bad).unwrap();
        assert_eq!((m, r.f32("t").unwrap().0), (7, values.to_vec()));
        // Any flipped bit of the tensors, and a file cut short, fail.
        let body = data.len() - 12;
        for i in body..data.len() {
            let mut flipped = data.clone();
            flipped[i] ^= 0x10;
            let err = read::<u32, _>(&flipped, "k", "none", bad).err().unwrap();
            assert!(err.to_string().contains("digest"), "{err}");
        }
        for n in 0..data.len() {
            assert!(
                read::<u32, _>(&data[..n], "k", "none", bad).is_err(),
                "cut at {n}"
            );
        }
        // Metadata added later keeps the digest valid.
        let more = with_metadata(&data, "extra", &"x").unwrap();
        assert!(read::<u32, _>(&more, "k", "none", bad).is_ok());
    }
}
