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
