//! `loci eval` on one benchmark: the cases not yet in `--out` edited under a progress bar
//! (each edit undone, or all kept in sequence), then the summary printed or drawn.

use anyhow::{bail, Result};
use indicatif::ProgressBar;
use loci_core::edit::{Edit, EditMethod, RewriteRequest};
use loci_core::eval::{SequenceOptions, SequenceRecord};
use loci_core::{LoadedModel, LociError};

use super::benchmark::Benchmark;
use super::method::Method;
use super::records::{not_done, previous, Records};
use super::EvalArgs;
use crate::cli::print_json;
use crate::cli::render::save_plot;

/// Evaluates the cases not yet in `--out` (`--batch` per edit; each edit undone, or all kept
/// with `--sequential`) under a progress bar, appending each record as it is made, then prints
/// the summary of every record in `--out`.
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
    let checkpoints = edit_cases(bench, lm, &cases, a, method, &pb, &mut sink)?;
    pb.finish_and_clear();
    let summaries = Summaries::<B>::new(&sink.kept, a, &checkpoints, cases.len());
    if let Some(p) = &a.plot {
        save_plot(p, &retention_svg::<B>(&summaries.curve, &method.describe()))?;
    }
    if a.summary {
        return summaries.print_json();
    }
    let title = title(method, sink.kept.len(), a, &batch);
    summaries.print(&title);
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

/// Edits `cases`, `--batch` per edit (all kept with `--sequential`, else each undone), handing
/// each case's record to `sink`; returns the sequence's checkpoints (none when undone).
fn edit_cases<B: Benchmark>(
    bench: &B,
    lm: &mut LoadedModel,
    cases: &[B::Case],
    a: &EvalArgs,
    method: &Method,
    pb: &ProgressBar,
    sink: &mut Records<B::Record>,
) -> Result<Vec<(usize, Vec<B::Metrics>)>> {
    // The AlphaEdit edits under the next one (`--apply-edit`'s, then, in a sequence, the
    // run's own so far): their recorded keys are what AlphaEdit keeps.
    let alpha = |e: &Edit| e.method() == EditMethod::Alphaedit;
    let mut kept: Vec<Edit> = crate::cli::edit::applied_edits(&a.model)?;
    kept.retain(alpha);
    // A stop asked for (Ctrl-C in Python, a listener saying no) ends the run: no later case is
    // prepared, and the cases after it get no record.
    let cancelled = std::cell::Cell::new(false);
    let mut make = |lm: &mut LoadedModel, reqs: &[RewriteRequest]| {
        if cancelled.get() {
            return Err(LociError::Cancelled);
        }
        let preserved = loci_core::edit::Preserved::of(&kept);
        let made = method.make(lm, reqs, &preserved, &mut |m| pb.set_message(m.to_string()));
        cancelled.set(matches!(made, Err(LociError::Cancelled)));
        let e = made?;
        if a.sequential && alpha(&e) {
            kept.push(e.clone());
        }
        Ok(e)
    };
    let mut checkpoints = vec![];
    if a.sequential {
        let opts = SequenceOptions {
            batch: a.batch,
            checkpoint_every: a.checkpoint_every.unwrap_or(0),
        };
        let seq = bench.in_sequence(lm, cases, opts, &mut make, &mut |done| {
            pb.set_position(done as u64)
        })?;
        if cancelled.get() {
            bail!(LociError::Cancelled);
        }
        pb.suspend(|| sink.take_all(cases, seq.records, B::case_id))?;
        checkpoints = seq.checkpoints;
    } else {
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
    }
    Ok(checkpoints)
}

/// The summaries of the kept records: after each case's own edit, after the last edit (in a
/// sequence), and the retention curve.
struct Summaries<B: Benchmark> {
    post: B::Summary,
    last: Option<B::Summary>,
    curve: Vec<(usize, B::Summary)>,
}

impl<B: Benchmark> Summaries<B> {
    /// Summarises the kept records and the checkpoints of a sequence over `n_cases` cases.
    fn new(
        kept: &[B::Record],
        a: &EvalArgs,
        checkpoints: &[(usize, Vec<B::Metrics>)],
        n_cases: usize,
    ) -> Self {
        let post: Vec<B::Metrics> = kept.iter().map(|r| B::metrics(r).0.clone()).collect();
        let last = a.sequential.then(|| {
            let last: Vec<B::Metrics> = kept
                .iter()
                .filter_map(|r| B::metrics(r).1.cloned())
                .collect();
            B::summarize(&last)
        });
        let post = B::summarize(&post);
        // The retention curve: the checkpoints, then the end of the sequence.
        let mut curve: Vec<(usize, B::Summary)> = checkpoints
            .iter()
            .map(|(done, ms)| (*done, B::summarize(ms)))
            .collect();
        if let (Some(last), Some(_)) = (&last, a.checkpoint_every) {
            curve.push((n_cases, last.clone()));
        }
        Self { post, last, curve }
    }

    /// The summary as one JSON object (with the sequence's and the curve's, if any).
    fn print_json(&self) -> Result<()> {
        match &self.last {
            None => print_json(&self.post),
            Some(last) => print_json(&serde_json::json!({
                "after_own_edit": self.post,
                "after_all_edits": last,
                "checkpoints": self.curve
                    .iter()
                    .map(|(done, s)| serde_json::json!({"cases_done": done, "summary": s}))
                    .collect::<Vec<_>>(),
            })),
        }
    }

    /// The summary table under `title`, then the retention curve's (if any).
    fn print(&self, title: &str) {
        B::print(title, &self.post, self.last.as_ref());
        if !self.curve.is_empty() {
            let names: Vec<&str> = B::headline(&self.curve[0].1).iter().map(|h| h.0).collect();
            println!(
                "\nCases edited so far, scored after N cases (×100):\n| N | {} |\n|---|{}",
                names.join(" | "),
                "---|".repeat(names.len())
            );
            for (done, s) in &self.curve {
                let cells: Vec<String> = B::headline(s)
                    .iter()
                    .map(|(_, v)| format!("{v:.1}"))
                    .collect();
                println!("| {done} | {} |", cells.join(" | "));
            }
        }
    }
}

/// The summary's title: the method, the cases kept, the dataset and how the edits were kept.
fn title(method: &Method, kept: usize, a: &EvalArgs, batch: &str) -> String {
    format!(
        "{} on {} cases of {}{batch}{}",
        method.describe(),
        kept,
        a.dataset.display(),
        if a.sequential {
            " (in sequence: each edit kept, scored after its own and after the last)"
        } else {
            ""
        }
    )
}

/// The retention curve: each headline number of the cases edited so far, over the cases the
/// sequence has reached.
fn retention_svg<B: Benchmark>(curve: &[(usize, B::Summary)], method: &str) -> String {
    let xs: Vec<usize> = curve.iter().map(|c| c.0).collect();
    let names: Vec<&str> = curve
        .first()
        .map(|c| B::headline(&c.1).iter().map(|h| h.0).collect())
        .unwrap_or_default();
    let series = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let ys = curve.iter().map(|c| B::headline(&c.1)[i].1).collect();
            (name.to_string(), ys)
        })
        .collect();
    loci_core::plot::curves_svg(
        &format!("{method}: sequential edits (×100)"),
        "cases edited",
        &xs,
        (xs.len() / 8).max(1),
        &[("cases edited so far".to_string(), series)],
    )
}
