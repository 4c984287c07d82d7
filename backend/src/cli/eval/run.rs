//! `loci eval` on one benchmark, each edit undone: the cases not yet in `--out` edited under a
//! progress bar, then the summary printed. (A sequence of kept edits is `sequence`'s.)

use anyhow::{bail, Result};
use indicatif::ProgressBar;
use loci_core::edit::{Edit, EditMethod, RewriteRequest};
use loci_core::eval::SequenceRecord;
use loci_core::{LoadedModel, LociError};

use super::benchmark::Benchmark;
use super::method::Method;
use super::records::{not_done, previous, Records};
use super::EvalArgs;
use crate::cli::print_json;

/// Evaluates the cases not yet in `--out` (`--batch` per edit, each undone) under a progress
/// bar, appending each record as it is made, then prints the summary of every record in
/// `--out`.
pub(super) fn run<B: Benchmark>(
    bench: &B,
    lm: &mut LoadedModel,
    cases: &[B::Case],
    a: &EvalArgs,
    method: &Method,
) -> Result<()> {
    let batch = batch_note(a, method);
    let run_label = format!(
        "{}: {}{batch}{}",
        lm.name,
        method.describe(),
        bench.settings()
    );
    let before: Vec<B::Record> = previous(a, B::RECORD, &run_label)?;
    let cases = not_done(cases, &before, B::case_id, B::record_id);
    let pb = progress_bar(cases.len());
    let mut sink = Records::new(a.out.as_deref(), before, run_label)?;
    edit_cases(bench, lm, &cases, a, method, &pb, &mut sink)?;
    pb.finish_and_clear();
    let post: Vec<B::Metrics> = sink.kept.iter().map(|r| B::metrics(r).0.clone()).collect();
    let post = B::summarize(&post);
    if a.summary {
        return print_json(&post);
    }
    let title = format!(
        "{} on {} cases of {}{batch}",
        method.describe(),
        sink.kept.len(),
        a.dataset.display()
    );
    B::print(&title, &post, None);
    Ok(())
}

/// MEMIT's cases per edit, for labels and titles (empty for the methods that edit one).
fn batch_note(a: &EvalArgs, method: &Method) -> String {
    match method {
        Method::Memit(..) => format!(", {} per edit", a.batch),
        Method::Rome(..) | Method::Ft(..) | Method::Grace(..) => String::new(),
    }
}

/// The progress bar over `len` cases.
fn progress_bar(len: usize) -> ProgressBar {
    crate::workspace::bar(
        len as u64,
        "cases {bar:40} {pos}/{len} [{elapsed_precise} < {eta}] {msg}",
    )
}

/// Edits `cases`, `--batch` per edit, each undone, handing each case's record to `sink`.
fn edit_cases<B: Benchmark>(
    bench: &B,
    lm: &mut LoadedModel,
    cases: &[B::Case],
    a: &EvalArgs,
    method: &Method,
    pb: &ProgressBar,
    sink: &mut Records<B::Record>,
) -> Result<()> {
    // The AlphaEdit edits under each one (`--apply-edit`'s): their recorded keys are what
    // AlphaEdit keeps.
    let mut kept: Vec<Edit> = crate::cli::edit::applied_edits(&a.model)?;
    kept.retain(|e| e.method() == EditMethod::Alphaedit);
    let preserved = loci_core::edit::Preserved::of(&kept);
    // A stop asked for (Ctrl-C in Python, a listener saying no) ends the run: no later case is
    // prepared, and the cases after it get no record.
    let mut make = |lm: &mut LoadedModel, reqs: &[RewriteRequest]| {
        method.make(lm, reqs, &preserved, &mut |m| pb.set_message(m.to_string()))
    };
    for chunk in cases.chunks(a.batch) {
        let records: Vec<SequenceRecord<B::Record>> = match bench.undone(lm, chunk, &mut make) {
            Ok(records) => records.into_iter().map(Ok).collect(),
            Err(LociError::Cancelled) => bail!(LociError::Cancelled),
            Err(e) => chunk.iter().map(|_| Err(e.to_string())).collect(),
        };
        if let Some(Ok(r)) = records.last() {
            pb.set_message(B::describe(B::metrics(r).0));
        }
        pb.suspend(|| sink.take_all(chunk, records, B::case_id))?;
        pb.inc(chunk.len() as u64);
    }
    Ok(())
}
