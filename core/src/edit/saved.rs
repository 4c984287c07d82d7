//! An edit of any method, as files hold them and `--apply-edit`, uploads and the server's edit
//! stack take them.

use super::delta::{delta_norm, AppliedEdit, LayerDelta};
use super::ft::FtEdit;
use super::grace::GraceEdit;
use super::memit::MemitEdit;
use super::rome::RomeEdit;
use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::request::RewriteRequest;

/// The metadata key naming the model an edit file was made for.
const MADE_FOR: &str = "loci_model";

/// The model an edit was computed on, as its file records it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct MadeFor {
    /// The model's name (for messages).
    pub name: String,
    /// Its [`ModelInfo::fingerprint`](crate::loader::ModelInfo::fingerprint): what applying
    /// the file compares.
    pub fingerprint: String,
}

/// A computed edit of any method: what can be saved, loaded, applied and listed.
#[derive(Clone, Debug)]
pub enum Edit {
    /// A rank-one ROME edit of one fact at one layer.
    Rome(RomeEdit),
    /// A MEMIT-family edit (MEMIT, EMMET, AlphaEdit) of several facts over several layers.
    Memit(MemitEdit),
    /// A (constrained) fine-tuning edit: dense changes to one or more layers.
    Ft(FtEdit),
    /// A GRACE edit: codebook entries at one layer, the weights untouched.
    Grace(GraceEdit),
}

impl Edit {
    /// Reads a saved edit of any method (the file's metadata says which).
    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        if super::file::has_key(data, super::memit::FILE_KEY) {
            Ok(Edit::Memit(MemitEdit::from_bytes(data)?))
        } else if super::file::has_key(data, super::ft::FILE_KEY) {
            Ok(Edit::Ft(FtEdit::from_bytes(data)?))
        } else if super::file::has_key(data, super::grace::FILE_KEY) {
            Ok(Edit::Grace(GraceEdit::from_bytes(data)?))
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
            Edit::Grace(e) => e.to_bytes(),
        }
    }

    /// The edit's file, marked with the model `lm` it was made for: [`LoadedModel::apply_file`]
    /// refuses it on another model, even one of the same shape.
    pub fn to_file(&self, lm: &LoadedModel) -> Result<Vec<u8>> {
        let made_for = MadeFor {
            name: lm.name.clone(),
            fingerprint: lm.info.fingerprint.clone(),
        };
        super::file::with_metadata(&self.to_bytes()?, MADE_FOR, &made_for)
    }

    /// The model an edit file says it was made for (None for files that do not say).
    pub fn made_for(data: &[u8]) -> Result<Option<MadeFor>> {
        super::file::metadata(data, MADE_FOR)
    }

    /// The per-layer weight changes, borrowing the edit's vectors (none for GRACE).
    pub fn deltas(&self) -> Vec<LayerDelta<'_>> {
        match self {
            Edit::Rome(e) => vec![e.delta()],
            Edit::Memit(e) => e.deltas(),
            Edit::Ft(e) => e.deltas(),
            Edit::Grace(_) => vec![],
        }
    }

    /// The facts the edit rewrites: one for ROME and fine-tuning, every request for MEMIT.
    pub fn requests(&self) -> Vec<&RewriteRequest> {
        match self {
            Edit::Rome(e) => vec![&e.request],
            Edit::Memit(e) => e.requests.iter().collect(),
            Edit::Ft(e) => vec![&e.request],
            Edit::Grace(e) => vec![&e.request],
        }
    }

    /// The method that made the edit.
    pub fn method(&self) -> super::EditMethod {
        match self {
            Edit::Rome(_) => super::EditMethod::Rome,
            Edit::Memit(e) => e.hparams.method(),
            Edit::Ft(_) => super::EditMethod::Ft,
            Edit::Grace(_) => super::EditMethod::Grace,
        }
    }

    /// The changed layers, in the order their deltas are applied (GRACE's codebook layer).
    pub fn layers(&self) -> Vec<usize> {
        match self {
            Edit::Grace(e) => vec![e.hparams.layer],
            _ => self.deltas().iter().map(|d| d.layer).collect(),
        }
    }

    /// ‖ΔW‖ per changed layer (0 for GRACE, which changes no weight).
    pub fn delta_norms(&self) -> Vec<f32> {
        match self {
            Edit::Grace(_) => vec![0.0],
            _ => self.deltas().iter().map(delta_norm).collect(),
        }
    }
}

impl LoadedModel {
    /// Applies an edit of any method; keep the result to undo it exactly.
    pub fn apply(&mut self, e: &Edit) -> Result<AppliedEdit> {
        match e {
            Edit::Grace(g) => self.apply_grace(g),
            _ => self.apply_deltas(&e.deltas()),
        }
    }

    /// Reads an edit file and applies it. A file made for another model is refused (its
    /// fingerprint differs), as is one that does not fit; either way nothing changes.
    pub fn apply_file(&mut self, data: &[u8]) -> Result<(Edit, AppliedEdit)> {
        if let Some(m) = Edit::made_for(data)? {
            if m.fingerprint != self.info.fingerprint {
                return Err(LociError::input(format!(
                    "this edit was made for model {} ({}), not {} ({})",
                    m.name, m.fingerprint, self.name, self.info.fingerprint
                )));
            }
        }
        let e = Edit::from_bytes(data)?;
        let applied = self.apply(&e)?;
        Ok((e, applied))
    }
}
