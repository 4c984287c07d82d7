//! An edit of any method, as files hold them and `--apply-edit`, uploads and the server's edit
//! stack take them.

use super::delta::{delta_norm, AppliedEdit, LayerDelta};
use super::ft::FtEdit;
use super::memit::MemitEdit;
use super::rome::RomeEdit;
use crate::error::Result;
use crate::loader::LoadedModel;
use crate::request::RewriteRequest;

/// A computed edit of any method: what can be saved, loaded, applied and listed.
#[derive(Clone, Debug)]
pub enum Edit {
    /// A rank-one ROME edit of one fact at one layer.
    Rome(RomeEdit),
    /// A MEMIT edit of several facts spread over several layers.
    Memit(MemitEdit),
    /// A (constrained) fine-tuning edit: dense changes to one or more layers.
    Ft(FtEdit),
}

impl Edit {
    /// Reads a saved edit of any method (the file's metadata says which).
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        if super::file::has_key(data, super::memit::FILE_KEY) {
            Ok(Edit::Memit(MemitEdit::from_bytes(data)?))
        } else if super::file::has_key(data, super::ft::FILE_KEY) {
            Ok(Edit::Ft(FtEdit::from_bytes(data)?))
        } else {
            Ok(Edit::Rome(RomeEdit::from_bytes(data)?))
        }
    }

    /// The edit as its method's safetensors file, which [`Edit::from_bytes`] reads back.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        match self {
            Edit::Rome(e) => e.to_bytes(),
            Edit::Memit(e) => e.to_bytes(),
            Edit::Ft(e) => e.to_bytes(),
        }
    }

    /// The per-layer weight changes, borrowing the edit's vectors.
    pub fn deltas(&self) -> Vec<LayerDelta<'_>> {
        match self {
            Edit::Rome(e) => vec![e.delta()],
            Edit::Memit(e) => e.deltas(),
            Edit::Ft(e) => e.deltas(),
        }
    }

    /// The facts the edit rewrites: one for ROME and fine-tuning, every request for MEMIT.
    pub fn requests(&self) -> Vec<&RewriteRequest> {
        match self {
            Edit::Rome(e) => vec![&e.request],
            Edit::Memit(e) => e.requests.iter().collect(),
            Edit::Ft(e) => vec![&e.request],
        }
    }

    /// The method that made the edit.
    pub fn method(&self) -> super::EditMethod {
        match self {
            Edit::Rome(_) => super::EditMethod::Rome,
            Edit::Memit(_) => super::EditMethod::Memit,
            Edit::Ft(_) => super::EditMethod::Ft,
        }
    }

    /// The changed layers, in the order their deltas are applied.
    pub fn layers(&self) -> Vec<usize> {
        self.deltas().iter().map(|d| d.layer).collect()
    }

    /// ‖ΔW‖ per changed layer.
    pub fn delta_norms(&self) -> Vec<f32> {
        self.deltas().iter().map(delta_norm).collect()
    }
}

impl LoadedModel {
    /// Applies an edit of any method; keep the result to undo it exactly.
    pub fn apply(&mut self, e: &Edit) -> Result<AppliedEdit> {
        self.apply_deltas(&e.deltas())
    }
}
