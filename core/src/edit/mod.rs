//! Model editing: key statistics, ROME, MEMIT and constrained fine-tuning.

pub mod delta;
mod file;
pub mod ft;
pub mod linalg;
pub mod memit;
pub mod report;
pub mod rome;
pub mod saved;
pub mod stats;

pub use delta::{delta_norm, AppliedEdit, LayerDelta, WeightChange};
pub use ft::{FtEdit, FtHparams, FtLayer, FtObjective, FtStats};
pub use memit::{MemitEdit, MemitHparams, MemitLayer, MemitStats};
pub use saved::Edit;

pub use report::{
    EditReport, EditSide, Generations, MemitReport, Probes, PromptProbs, RequestReport,
};
pub use rome::{KeyMode, RewriteRequest, RomeEdit, RomeHparams, TargetStr};
pub use stats::{KeyStats, StatsAccumulator, StatsProvenance};

use serde::{Deserialize, Serialize};

/// Which way an edit pushes the target's probability: up (the usual edit) or down (Hase et
/// al.'s fact erasure, which minimises p(target) itself and never stops early).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    Raise,
    Lower,
}

impl Direction {
    pub fn is_raise(&self) -> bool {
        *self == Direction::Raise
    }
}
