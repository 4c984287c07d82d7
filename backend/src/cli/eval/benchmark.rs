//! What `loci eval` needs of a benchmark (CounterFact, zsRE): how its cases are scored around
//! an edit, and how its records are summarised and printed.

use loci_core::edit::{Edit, RewriteRequest};
use loci_core::eval::{Sequence, SequenceEval};
use loci_core::LoadedModel;

/// Makes the edit of the requests on the model (the method, with its progress reports).
pub(super) type Make<'a> =
    dyn FnMut(&mut LoadedModel, &[RewriteRequest]) -> loci_core::Result<Edit> + 'a;

/// A benchmark's side of `eval`: how its cases are scored around an edit, and how its records
/// are summarised.
pub(super) trait Benchmark {
    type Case: Clone;
    type Record: serde::Serialize + serde::de::DeserializeOwned;
    type Metrics: Clone;
    type Summary: serde::Serialize + Clone;
    /// A case's scores on the model as it is.
    type Scores: Clone + serde::Serialize + serde::de::DeserializeOwned;
    /// What a record is, for messages.
    const RECORD: &'static str;
    /// Settings of the benchmark itself that a record depends on (for `run`).
    fn settings(&self) -> String {
        String::new()
    }
    fn case_id(c: &Self::Case) -> u64;
    fn record_id(r: &Self::Record) -> u64;
    /// A record's metrics after its own edit and, in a sequence, after the last.
    fn metrics(r: &Self::Record) -> (&Self::Metrics, Option<&Self::Metrics>);
    fn summarize(ms: &[Self::Metrics]) -> Self::Summary;
    /// The progress bar's message after a case.
    fn describe(m: &Self::Metrics) -> String;
    fn print(title: &str, post: &Self::Summary, last: Option<&Self::Summary>);
    /// The summary's main numbers (×100), for the retention curve.
    fn headline(s: &Self::Summary) -> Vec<(&'static str, f32)>;
    /// One edit of `cases`, scored before and after, then undone.
    fn undone(
        &self,
        lm: &mut LoadedModel,
        cases: &[Self::Case],
        make: &mut Make,
    ) -> loci_core::Result<Vec<Self::Record>>;
    /// A case's rewrite.
    fn request(c: &Self::Case) -> &RewriteRequest;
    /// A case's scores on the model as it is.
    fn score(&self, lm: &LoadedModel, c: &Self::Case) -> loci_core::Result<Self::Scores>;
    /// A case's metrics from its scores before any edit and now.
    fn case_metrics(&self, c: &Self::Case, pre: &Self::Scores, now: &Self::Scores)
        -> Self::Metrics;
    /// The records of a finished sequence, and its checkpoints' metrics.
    fn records(
        &self,
        cases: &[Self::Case],
        seq: Sequence<Self::Scores>,
    ) -> SequenceEval<Self::Record, Self::Metrics>;
}
