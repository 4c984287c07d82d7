//! Model editing: key statistics, ROME and MEMIT.

pub mod delta;
mod file;
pub mod linalg;
pub mod memit;
pub mod report;
pub mod rome;
pub mod stats;

pub use delta::{AppliedEdit, LayerDelta};
pub use memit::{Edit, MemitEdit, MemitHparams, MemitLayer, MemitStats};

pub use report::{
    EditReport, EditSide, Generations, MemitReport, Probes, PromptProbs, RequestReport,
};
pub use rome::{KeyMode, RewriteRequest, RomeEdit, RomeHparams, TargetStr};
pub use stats::{KeyStats, StatsAccumulator, StatsProvenance};
