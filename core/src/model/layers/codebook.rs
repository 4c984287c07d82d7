//! GRACE's codebook (Hartvigsen et al. 2023) on a linear map: keys (inputs seen), values
//! (outputs to give) and radii. An input whose nearest key lies within that key's radius gets
//! the key's value as the map's output; any other input passes through the map as it is. The
//! weights never change; removing entries undoes an edit.

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

/// A map's codebook: its entries, and the same as tensors for the lookup.
#[derive(Clone, Debug)]
pub struct Codebook {
    /// The entries, in the order they were added.
    pub entries: Vec<CodebookEntry>,
    keys: Tensor,
    values: Tensor,
    radii: Tensor,
}

impl Codebook {
    /// A codebook of `entries` (at least one, of equal widths) on `device`.
    pub fn new(entries: Vec<CodebookEntry>, device: &Device) -> Result<Self> {
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
        let n = entries.len();
        let flat = |f: fn(&CodebookEntry) -> &[f32]| -> Vec<f32> {
            entries.iter().flat_map(|e| f(e).iter().copied()).collect()
        };
        let keys = Tensor::from_vec(flat(|e| &e.key), (n, d_in), device)?;
        let values = Tensor::from_vec(flat(|e| &e.value), (n, d_out), device)?;
        let radii: Vec<f32> = entries.iter().map(|e| e.radius).collect();
        let radii = Tensor::from_vec(radii, n, device)?;
        Ok(Self {
            entries,
            keys,
            values,
            radii,
        })
    }

    /// The nearest entry to each input row (`[rows, in]`) and its distance.
    pub fn nearest(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = x.to_dtype(DType::F32)?;
        // ‖x − k‖² = ‖x‖² − 2 x·k + ‖k‖², and ‖x‖² is the same for every entry: the rest
        // picks the entry. The distance to it is then computed directly, so an input equal to
        // a key is at distance 0, not at rounding's.
        let (rows, n) = (x.elem_count() / x.dim(D::Minus1)?, self.entries.len());
        crate::flops::matmul(rows, n, x.dim(D::Minus1)?);
        let cross = x.matmul(&self.keys.t()?)?;
        let d2 = (cross
            .affine(-2.0, 0.0)?
            .broadcast_add(&self.keys.sqr()?.sum(1)?.unsqueeze(0)?))?;
        let idx = d2.argmin(D::Minus1)?;
        let nearest = self.keys.index_select(&idx, 0)?;
        let dist = (x - nearest)?.sqr()?.sum(D::Minus1)?.sqrt()?;
        Ok((idx, dist))
    }

    /// `y` (`[rows, out]`, the map's outputs for inputs `x`, `[rows, in]`) with every row whose
    /// input lies within its nearest key's radius replaced by that key's value.
    pub fn replace(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let (idx, dist) = self.nearest(x)?;
        let hit = dist.le(&self.radii.index_select(&idx, 0)?)?;
        let out = y.dim(D::Minus1)?;
        let hit = hit.unsqueeze(1)?.broadcast_as((hit.dim(0)?, out))?;
        let values = self.values.index_select(&idx, 0)?.to_dtype(y.dtype())?;
        Ok(hit.where_cond(&values, y)?)
    }
}
