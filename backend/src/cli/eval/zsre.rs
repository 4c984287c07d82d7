//! zsRE in `loci eval`: token accuracy per question, and its summary table.

use loci_core::eval::zsre::{
    summarize_zsre, ZsreCase, ZsreCaseRecord, ZsreMetrics, ZsreSummary, ZsreTarget,
};
use loci_core::eval::{SequenceEval, SequenceOptions};
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
    fn in_sequence(
        &self,
        lm: &mut LoadedModel,
        cases: &[ZsreCase],
        opts: SequenceOptions,
        make: &mut Make,
        progress: &mut dyn FnMut(usize),
    ) -> loci_core::Result<SequenceEval<ZsreCaseRecord, ZsreMetrics>> {
        lm.eval_zsre_sequence(cases, opts, make, &mut |done, _| progress(done))
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
