//! "Does localization inform editing?" (Hase et al. 2023): edit at every layer, compare each
//! edit's success with the tracing effect at its layer, and fit the regressions that show
//! whether tracing predicts success beyond the layer itself.

pub mod analysis;
pub mod problem;
pub mod regress;
pub mod score;
pub mod shard;
pub mod sweep;

pub use analysis::{analyze, analyze_window, Condition, LayerMeans, Metric, StudyAnalysis};
pub use problem::{EditProblem, ProblemCase, SubjectNoise};
pub use score::{hase_scores, HaseScores, NoisedScoring, ProblemProbs, Scored};
pub use shard::Shard;
pub use sweep::{
    default_layers, CaseLine, CaseResult, CaseTrace, EditLine, Quietly, StudyConfig, StudyLine,
    StudyMethod, StudyObserver,
};
