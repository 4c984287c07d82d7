//! Reading a study's results from one file or many (the shards of an array job, or a folder of
//! them): each case counted once, every file made with the same settings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use loci_core::study::StudyLine;

/// The files `paths` name: each file as given, each folder's `.jsonl` files in name order.
fn result_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = vec![];
    for p in paths {
        if p.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()?;
            inside.retain(|f| f.is_file() && f.extension().is_some_and(|e| e == "jsonl"));
            inside.sort();
            if inside.is_empty() {
                bail!("{} holds no .jsonl results", p.display());
            }
            files.extend(inside);
        } else if p.exists() {
            files.push(p.clone());
        } else {
            bail!("{} does not exist", p.display());
        }
    }
    Ok(files)
}

/// Every line of the given result files and folders. Refused, naming the files: case lines made
/// by different runs (another model or other settings), and a case in two files.
pub fn read_results(paths: &[PathBuf]) -> Result<Vec<StudyLine>> {
    let mut first_run: Option<(serde_json::Value, PathBuf)> = None;
    let mut case_file: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut out = vec![];
    for file in result_files(paths)? {
        let records: Vec<serde_json::Value> =
            super::super::results::read_records(&file, "a study record")?;
        for r in records {
            if r["record"] == "case" {
                check_run(&r, &file, &mut first_run)?;
                check_once(&r, &file, &mut case_file)?;
            }
            let line: StudyLine = serde_json::from_value(r)
                .with_context(|| format!("{}: not a study record", file.display()))?;
            out.push(line);
        }
    }
    Ok(out)
}

/// Refuses a case line whose run differs from the first one seen.
fn check_run(
    case: &serde_json::Value,
    file: &Path,
    first: &mut Option<(serde_json::Value, PathBuf)>,
) -> Result<()> {
    let run = &case["run"];
    match first {
        Some((seen, seen_in)) if seen != run => bail!(
            "{} and {} were made by different runs (another model or other settings); \
             analyse them apart",
            seen_in.display(),
            file.display()
        ),
        Some(_) => Ok(()),
        None => {
            *first = Some((run.clone(), file.to_path_buf()));
            Ok(())
        }
    }
}

/// Refuses a case already read from another file (a shard given twice, or overlapping ones).
fn check_once(
    case: &serde_json::Value,
    file: &Path,
    seen: &mut BTreeMap<u64, PathBuf>,
) -> Result<()> {
    let Some(id) = case["case_id"].as_u64() else {
        return Ok(());
    };
    match seen.get(&id) {
        Some(other) if other != file => bail!(
            "case {id} is in both {} and {}: give each shard once",
            other.display(),
            file.display()
        ),
        _ => {
            seen.insert(id, file.to_path_buf());
            Ok(())
        }
    }
}
