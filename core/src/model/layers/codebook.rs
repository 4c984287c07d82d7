//! GRACE's codebook (Hartvigsen et al. 2023) on a linear map: keys (inputs seen), values
//! (outputs to give) and radii. An input whose nearest key lies within that key's radius gets
//! the key's value as the map's output; any other input passes through the map as it is. The
//! weights never change; removing entries undoes an edit.
//!
//! Entries are shared (`Arc`) between a codebook and the versions before it, and the lookup's
//! tensors are built on first use: a stack of undo records holds pointers, not copies, however
//! long a sequence of edits grows.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor, D};

use crate::error::{LociError, Result};

/// One entry: a key, its value, its radius and the label (target tokens) of the edit that made
/// it (GRACE splits radii between entries of different labels).
#[derive(Clone, Debug, PartialEq)]
pub struct CodebookEntry {
    /// The map's input it answers, `in` wide.
    pub key: Vec<f32>,
    /// The output it gives, `out` wide.
    pub value: Vec<f32>,
    /// Inputs within this Euclidean distance of the key get the value.
    pub radius: f32,
    /// The target tokens of the edit that made it.
    pub label: Vec<u32>,
}

/// The entries as tensors: `[n, in]` keys, `[n, out]` values, `[n]` radii (f32).
#[derive(Debug)]
struct Lookup {
    keys: Tensor,
    values: Tensor,
    radii: Tensor,
}

/// A map's codebook: its entries, in the order they were added.
#[derive(Clone, Debug)]
pub struct Codebook {
    entries: Vec<Arc<CodebookEntry>>,
    device: Device,
    lookup: Arc<OnceLock<Lookup>>,
}

impl Codebook {
    /// A codebook of `entries` (at least one, of equal widths, finite) on `device`.
    pub fn new(entries: Vec<Arc<CodebookEntry>>, device: &Device) -> Result<Self> {
        let first = entries
            .first()
            .ok_or_else(|| LociError::input("a codebook needs an entry"))?;
        let (d_in, d_out) = (first.key.len(), first.value.len());
        if entries
            .iter()
            .any(|e| e.key.len() != d_in || e.value.len() != d_out)
        {
            return Err(LociError::input("codebook entries of different widths"));
        }
        Ok(Self {
            entries,
            device: device.clone(),
            lookup: Arc::default(),
        })
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> &[Arc<CodebookEntry>] {
        &self.entries
    }

    /// The same entries without the lookup's tensors (rebuilt if it is used again): what an
    /// undo record keeps.
    pub fn detached(&self) -> Self {
        Self {
            entries: self.entries.clone(),
            device: self.device.clone(),
            lookup: Arc::default(),
        }
    }

    fn lookup(&self) -> Result<&Lookup> {
        if let Some(l) = self.lookup.get() {
            return Ok(l);
        }
        let n = self.entries.len();
        let flat = |f: fn(&CodebookEntry) -> &[f32]| -> Vec<f32> {
            self.entries
                .iter()
                .flat_map(|e| f(e).iter().copied())
                .collect()
        };
        let keys = flat(|e| &e.key);
        let values = flat(|e| &e.value);
        let (d_in, d_out) = (keys.len() / n, values.len() / n);
        let radii: Vec<f32> = self.entries.iter().map(|e| e.radius).collect();
        let built = Lookup {
            keys: Tensor::from_vec(keys, (n, d_in), &self.device)?,
            values: Tensor::from_vec(values, (n, d_out), &self.device)?,
            radii: Tensor::from_vec(radii, n, &self.device)?,
        };
        // Another thread may have built it meanwhile: the same values either way.
        let _ = self.lookup.set(built);
        Ok(self.lookup.get().expect("just set"))
    }

    /// The nearest entry to each input row (`[rows, in]`) and its distance.
    pub fn nearest(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let l = self.lookup()?;
        let x = x.to_dtype(DType::F32)?;
        // ‖x − k‖² = ‖x‖² − 2 x·k + ‖k‖², and ‖x‖² is the same for every entry: the rest
        // picks the entry. The distance to it is then computed directly, so an input equal to
        // a key is at distance 0, not at rounding's.
        let (rows, n) = (x.elem_count() / x.dim(D::Minus1)?, self.entries.len());
        crate::flops::matmul(rows, n, x.dim(D::Minus1)?);
        let cross = x.matmul(&l.keys.t()?)?;
        let d2 = cross
            .affine(-2.0, 0.0)?
            .broadcast_add(&l.keys.sqr()?.sum(1)?.unsqueeze(0)?)?;
        let idx = d2.argmin(D::Minus1)?;
        let nearest = l.keys.index_select(&idx, 0)?;
        let dist = (x - nearest)?.sqr()?.sum(D::Minus1)?.sqrt()?;
        Ok((idx, dist))
    }

    /// `y` (`[rows, out]`, the map's outputs for inputs `x`, `[rows, in]`) with every row whose
    /// input lies within its nearest key's radius replaced by that key's value.
    pub fn replace(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let l = self.lookup()?;
        let (idx, dist) = self.nearest(x)?;
        let hit = dist.le(&l.radii.index_select(&idx, 0)?)?;
        let out = y.dim(D::Minus1)?;
        let hit = hit.unsqueeze(1)?.broadcast_as((hit.dim(0)?, out))?;
        let values = l.values.index_select(&idx, 0)?.to_dtype(y.dtype())?;
        Ok(hit.where_cond(&values, y)?)
    }

    /// The bits of every entry (keys, values, radii, labels), for digests and checks that a
    /// codebook is exactly as it was.
    pub fn bits(&self) -> Vec<u32> {
        let mut out = vec![self.entries.len() as u32];
        for e in &self.entries {
            let floats = e.key.iter().chain(&e.value).chain([&e.radius]);
            out.extend(floats.map(|x| x.to_bits()));
            out.extend(&e.label);
        }
        out
    }
}
