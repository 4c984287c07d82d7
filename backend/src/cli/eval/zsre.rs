//! zsRE in `loci eval`: token accuracy per question, and its summary table.

use loci_core::edit::RewriteRequest;
use loci_core::eval::zsre::{
    summarize_zsre, zsre_metrics, zsre_sequence_records, ZsreCase, ZsreCaseRecord, ZsreMetrics,
    ZsreScores, ZsreSummary, ZsreTarget,
};
use loci_core::eval::{Sequence, SequenceEval};
use loci_core::LoadedModel;

use super::benchmark::{Benchmark, Make};

/// zsRE's questions, each edit writing the answer `target` names.
pub(super) struct Zsre {
    pub(super) target: ZsreTarget,
}

impl Benchmark for Zsre {
    type Case = ZsreCase;
    type Record = ZsreCaseRecord;
    type Metrics = ZsreMetrics;
    type Summary = ZsreSummary;
    type Scores = ZsreScores;
    const RECORD: &'static str = "a zsRE record";

    fn settings(&self) -> String {
        match self.target {
            ZsreTarget::Answer => ", writing answers[0]".into(),
            ZsreTarget::Alt => ", writing alt".into(),
        }
    }

    fn case_id(c: &ZsreCase) -> u64 {
        c.case_id
    }
    fn record_id(r: &ZsreCaseRecord) -> u64 {
        r.case_id
    }
    fn metrics(r: &ZsreCaseRecord) -> (&ZsreMetrics, Option<&ZsreMetrics>) {
        (&r.metrics, r.last_metrics.as_ref())
    }
    fn summarize(ms: &[ZsreMetrics]) -> ZsreSummary {
        summarize_zsre(ms)
    }
    fn describe(m: &ZsreMetrics) -> String {
        format!(
            "efficacy {:.0} paraphrase {:.0} specificity {:.0}",
            m.efficacy * 100.0,
            m.paraphrase * 100.0,
            m.specificity * 100.0
        )
    }
    fn print(title: &str, post: &ZsreSummary, last: Option<&ZsreSummary>) {
        print_zsre(title, post, last)
    }
    fn undone(
        &self,
        lm: &mut LoadedModel,
        cases: &[ZsreCase],
        make: &mut Make,
    ) -> loci_core::Result<Vec<ZsreCaseRecord>> {
        lm.eval_zsre_with(cases, make)
    }
    fn headline(s: &ZsreSummary) -> Vec<(&'static str, f32)> {
        vec![
            ("efficacy", s.efficacy),
            ("paraphrase", s.paraphrase),
            ("specificity", s.specificity),
            ("locality", s.locality),
        ]
    }
    fn request(c: &ZsreCase) -> &RewriteRequest {
        &c.requested_rewrite
    }
    fn score(&self, lm: &LoadedModel, c: &ZsreCase) -> loci_core::Result<ZsreScores> {
        lm.score_zsre(c)
    }
    fn case_metrics(&self, _: &ZsreCase, pre: &ZsreScores, now: &ZsreScores) -> ZsreMetrics {
        zsre_metrics(pre, now)
    }
    fn records(
        &self,
        cases: &[ZsreCase],
        seq: Sequence<ZsreScores>,
    ) -> SequenceEval<ZsreCaseRecord, ZsreMetrics> {
        zsre_sequence_records(cases, seq)
    }
}

type ZsreField = fn(&ZsreSummary) -> f32;

/// The summary table: each metric before and after the edits.
fn print_zsre(title: &str, s: &ZsreSummary, last: Option<&ZsreSummary>) {
    println!("{title}");
    let (head, rule) = match last {
        Some(_) => ("before | after its edit | after all edits", "---|---|---|"),
        None => ("before | after", "---|---|"),
    };
    println!("| metric (token accuracy ×100) | {head} |\n|---|{rule}");
    let after_all = |f: ZsreField| last.map_or(String::new(), |l| format!(" {:.1} |", f(l)));
    let fields: [(&str, f32, ZsreField); 3] = [
        ("Efficacy (new answer)", s.efficacy_pre, |s| s.efficacy),
        ("Paraphrase (new answer)", s.paraphrase_pre, |s| {
            s.paraphrase
        }),
        ("Specificity (NQ answer)", s.specificity_pre, |s| {
            s.specificity
        }),
    ];
    for (name, pre, post) in fields {
        println!("| {name} | {pre:.1} | {:.1} |{}", post(s), after_all(post));
    }
    println!(
        "| Locality (NQ top-1 unchanged) | | {:.1} |{}",
        s.locality,
        after_all(|s| s.locality)
    );
}
