//! Model editing: key statistics and ROME.

mod file;
pub mod linalg;
pub mod report;
pub mod rome;
pub mod stats;

pub use report::{EditReport, EditSide, Generations, Probes, PromptProbs};
pub use rome::{AppliedEdit, KeyMode, RewriteRequest, RomeEdit, RomeHparams, TargetStr};
pub use stats::{KeyStats, StatsAccumulator, StatsProvenance};
