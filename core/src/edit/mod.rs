//! Model editing: key statistics, ROME, the MEMIT family (MEMIT, EMMET, AlphaEdit),
//! constrained fine-tuning and GRACE's codebook.

pub mod delta;
mod file;
pub mod ft;
mod ft_train;
pub mod grace;
mod gram;
pub mod hooked;
pub mod linalg;
pub mod memit;
pub mod method;
pub mod overlay;
pub mod report;
pub mod rome;
pub mod rules;
pub mod saved;
pub mod snapshot;
pub mod stats;

pub use delta::{delta_norm, AppliedEdit, LayerDelta, WeightChange};
pub use ft::{FtEdit, FtHparams, FtLayer, FtObjective, FtStats};
pub use grace::{GraceEdit, GraceHparams, GraceStats};
pub use hooked::RowEdits;
pub use memit::{MemitEdit, MemitHparams, MemitLayer, MemitStats};
pub use method::EditMethod;
pub use rules::{NullSpace, Preserved, UpdateRule};
pub use saved::{Edit, MadeFor};
pub use snapshot::{LayerState, Snapshot};

pub use crate::request::{RewriteRequest, TargetStr};
pub use report::{
    EditReport, EditSide, Generations, MemitReport, Probes, PromptProbs, RequestReport,
};
pub use rome::{
    Floats, KeyMode, RomeEdit, RomeHparams, RomeRun, Share, ValueGrad, ValueParts, ValueRun,
};
pub use stats::{KeyStats, StatsAccumulator, StatsProvenance, TokenBudget};

use serde::{Deserialize, Serialize};

/// Which way an edit pushes the target's probability: up (the usual edit) or down (Hase et
/// al.'s fact erasure, which minimises p(target) itself and never stops early).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Raise p(target): the usual edit.
    #[default]
    Raise,
    /// Lower p(target): fact erasure.
    Lower,
}

impl Direction {
    /// Whether the edit raises the target's probability.
    pub fn is_raise(&self) -> bool {
        *self == Direction::Raise
    }
}

/// What an edit aims at besides its target (Hase et al.'s editing problems): which way it
/// pushes the target's probability, and the σ of Gaussian noise on the subject's embeddings
/// while it is computed (fact forcing: the edit must hold when the subject is unreadable).
/// Flattened into each method's hyper-parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EditGoal {
    /// Which way the target's probability is pushed (default: up).
    #[serde(default)]
    pub direction: Direction,
    /// σ of the noise on the subject's embeddings while the edit is computed (fact forcing);
    /// `None`: no noise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_noise: Option<f64>,
}

impl EditGoal {
    /// The subject noise with the method's seed.
    pub(crate) fn noise(&self, seed: u64) -> Option<crate::hooks::noise::SubjectNoise> {
        self.subject_noise
            .map(|sigma| crate::hooks::noise::SubjectNoise { sigma, seed })
    }
}
