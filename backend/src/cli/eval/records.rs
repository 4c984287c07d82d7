//! The records of `loci eval`: those already in `--out` (a stopped evaluation continues after
//! them), the cases still to do, and each new record appended as it is made.

use std::path::Path;

use anyhow::{bail, Context, Result};
use loci_core::eval::SequenceRecord;

use super::EvalArgs;
use crate::cli::results;

/// Where an evaluation's records go: appended to `--out` as they are made (whole, flushed
/// lines: a stopped run continues after them) and kept, after those already there, for the
/// summary. A case without a record is reported on stderr.
pub(super) struct Records<R> {
    file: Option<std::fs::File>,
    pub(super) kept: Vec<R>,
    /// The model and settings, stamped on each line (`run`) so a continuation can check them.
    run: String,
}

impl<R: serde::Serialize> Records<R> {
    /// Records to `out` (if any), after `before`, each stamped with `run`.
    pub(super) fn new(out: Option<&Path>, before: Vec<R>, run: String) -> Result<Self> {
        Ok(Self {
            file: out.map(results::open_for_append).transpose()?,
            kept: before,
            run,
        })
    }

    /// Keeps (and appends) each case's record, or reports its error.
    pub(super) fn take_all<C>(
        &mut self,
        cases: &[C],
        records: Vec<SequenceRecord<R>>,
        id: impl Fn(&C) -> u64,
    ) -> Result<()> {
        for (case, r) in cases.iter().zip(records) {
            match r {
                Ok(r) => {
                    if let Some(f) = self.file.as_mut() {
                        let mut line = serde_json::to_value(&r)?;
                        line["run"] = self.run.clone().into();
                        results::append_lines(f, &[line.to_string()])?;
                    }
                    self.kept.push(r);
                }
                Err(e) => eprintln!("case {}: {e}", id(case)),
            }
        }
        Ok(())
    }
}

/// The records already in `--out`: a stopped evaluation continues after them, if they were
/// made by the same model and settings (`run`).
pub(super) fn previous<R: serde::de::DeserializeOwned>(
    a: &EvalArgs,
    what: &str,
    run: &str,
) -> Result<Vec<R>> {
    let Some(p) = &a.out else {
        return Ok(vec![]);
    };
    let lines: Vec<serde_json::Value> = results::read_records(p, what)?;
    if lines.is_empty() {
        return Ok(vec![]);
    }
    if let Some(other) = lines
        .iter()
        .filter_map(|l| l["run"].as_str())
        .find(|r| *r != run)
    {
        bail!(
            "{} holds results of another run ({other}), not of this one ({run}): remove it or \
             choose another --out",
            p.display()
        );
    }
    eprintln!(
        "{} cases already in {} are kept (delete it to start over)",
        lines.len(),
        p.display()
    );
    lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_value(l)
                .with_context(|| format!("{} record {}: not {what}", p.display(), i + 1))
        })
        .collect()
}

/// The cases without a record yet.
pub(super) fn not_done<C: Clone, R>(
    cases: &[C],
    done: &[R],
    case_id: impl Fn(&C) -> u64,
    record_id: impl Fn(&R) -> u64,
) -> Vec<C> {
    let done: std::collections::HashSet<u64> = done.iter().map(record_id).collect();
    cases
        .iter()
        .filter(|c| !done.contains(&case_id(c)))
        .cloned()
        .collect()
}
