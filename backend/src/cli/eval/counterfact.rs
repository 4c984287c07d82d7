//! CounterFact in `loci eval`: ROME's and Hase's metrics per case, and their summary table.

use loci_core::edit::RewriteRequest;
use loci_core::eval::{
    metrics_of, sequence_records, summarize, CaseMetrics, CaseRecord, CaseScores, Consistency,
    CounterFactCase, Sequence, SequenceEval, Summary,
};
use loci_core::LoadedModel;

use super::benchmark::{Benchmark, Make};

/// CounterFact's cases, with or without the generation test and its consistency score.
pub(super) struct CounterFact {
    pub(super) generate: bool,
    pub(super) consistency: Option<Consistency>,
}

impl Benchmark for CounterFact {
    type Case = CounterFactCase;
    type Record = CaseRecord;
    type Metrics = CaseMetrics;
    type Summary = Summary;
    type Scores = CaseScores;
    const RECORD: &'static str = "a CounterFact record";

    fn case_id(c: &CounterFactCase) -> u64 {
        c.case_id
    }
    fn record_id(r: &CaseRecord) -> u64 {
        r.case_id
    }
    fn metrics(r: &CaseRecord) -> (&CaseMetrics, Option<&CaseMetrics>) {
        (&r.metrics, r.last_metrics.as_ref())
    }
    fn summarize(ms: &[CaseMetrics]) -> Summary {
        summarize(ms)
    }
    fn describe(m: &CaseMetrics) -> String {
        format!(
            "ES {:.0} PS {:.0} NS {:.0}",
            m.efficacy_score * 100.0,
            m.paraphrase_score * 100.0,
            m.neighborhood_score * 100.0
        )
    }
    fn print(title: &str, post: &Summary, last: Option<&Summary>) {
        match last {
            None => print_counterfact(title, &[("value", post)]),
            Some(last) => print_counterfact(
                title,
                &[("after its edit", post), ("after all edits", last)],
            ),
        }
    }
    fn undone(
        &self,
        lm: &mut LoadedModel,
        cases: &[CounterFactCase],
        make: &mut Make,
    ) -> loci_core::Result<Vec<CaseRecord>> {
        lm.eval_cases_with(cases, self.generate, self.consistency.as_ref(), make)
    }
    fn headline(s: &Summary) -> Vec<(&'static str, f32)> {
        vec![
            ("efficacy score", s.efficacy_score),
            ("paraphrase score", s.paraphrase_score),
            ("neighborhood score", s.neighborhood_score),
        ]
    }
    fn request(c: &CounterFactCase) -> &RewriteRequest {
        &c.requested_rewrite
    }
    fn score(&self, lm: &LoadedModel, c: &CounterFactCase) -> loci_core::Result<CaseScores> {
        lm.score_case(c, self.generate)
    }
    fn case_metrics(&self, c: &CounterFactCase, pre: &CaseScores, now: &CaseScores) -> CaseMetrics {
        metrics_of(c, pre, now, self.consistency.as_ref())
    }
    fn records(
        &self,
        cases: &[CounterFactCase],
        seq: Sequence<CaseScores>,
    ) -> SequenceEval<CaseRecord, CaseMetrics> {
        sequence_records(cases, seq, self.consistency.as_ref())
    }
}

type CfField = fn(&loci_core::eval::Summary) -> f32;

/// The summary table: one row per metric, one column per summary.
fn print_counterfact(title: &str, columns: &[(&str, &loci_core::eval::Summary)]) {
    println!("{title}");
    let heads: Vec<&str> = columns.iter().map(|c| c.0).collect();
    println!(
        "| metric | {} |\n|---|{}",
        heads.join(" | "),
        "---|".repeat(columns.len())
    );
    let row = |name: &str, f: &dyn Fn(&loci_core::eval::Summary) -> String| {
        let cells: Vec<String> = columns.iter().map(|c| f(c.1)).collect();
        println!("| {name} | {} |", cells.join(" | "));
    };
    let fields: [(&str, CfField); 11] = [
        ("Score S (hmean ES, PS, NS)", |s| s.score),
        ("Efficacy score ES", |s| s.efficacy_score),
        ("Efficacy magnitude EM", |s| s.efficacy_magnitude),
        ("Paraphrase score PS", |s| s.paraphrase_score),
        ("Paraphrase magnitude PM", |s| s.paraphrase_magnitude),
        ("Neighborhood score NS", |s| s.neighborhood_score),
        ("Neighborhood magnitude NM", |s| s.neighborhood_magnitude),
        ("Hase rewrite score", |s| s.hase_rewrite),
        ("Hase paraphrase score", |s| s.hase_paraphrase),
        ("Hase neighborhood score", |s| s.hase_neighborhood),
        ("Hase target score (per-case hmean)", |s| {
            s.hase_target_score
        }),
    ];
    for (name, v) in fields {
        row(name, &|s| format!("{:.1}", v(s)));
    }
    let pair = |a: Option<f32>, b: Option<f32>, digits: usize| match (a, b) {
        (Some(a), Some(b)) => format!("{a:.digits$} → {b:.digits$}"),
        _ => "—".into(),
    };
    if columns.iter().any(|c| c.1.fluency_post.is_some()) {
        row("Fluency (n-gram entropy ×100) pre → post", &|s| {
            pair(s.fluency_pre, s.fluency_post, 0)
        });
    }
    if columns.iter().any(|c| c.1.consistency_post.is_some()) {
        row("Consistency (TF-IDF ×100) pre → post", &|s| {
            pair(s.consistency_pre, s.consistency_post, 1)
        });
    }
}
