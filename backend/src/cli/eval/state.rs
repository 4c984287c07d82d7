//! A sequential run's saved state: at each checkpoint, every method writes its edited layers,
//! AlphaEdit's kept keys and its scores so far into one file of the folder beside `--out`
//! (`OUT.state/METHOD.safetensors`, replaced whole), so that a stopped run — or one asked for
//! more cases — continues from there with the same settings, and is refused with other ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use loci_core::edit::Snapshot;
use loci_core::eval::{Sequence, SequencePoint};
use serde::{Deserialize, Serialize};

/// One checkpoint's line of the results file: the point the chart draws, the method's
/// settings, and the benchmark's whole summary of the cases edited so far.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct PointLine {
    /// Always `checkpoint` (the case records' lines say `case`).
    pub kind: String,
    #[serde(flatten)]
    pub point: SequencePoint,
    /// The method and its layers, in words.
    pub label: String,
    /// The benchmark's summary (none at the start).
    pub summary: serde_json::Value,
}

/// Everything a method's sequence needs to continue, beside its layers' weights.
#[derive(Serialize, Deserialize)]
#[serde(bound = "S: Serialize + serde::de::DeserializeOwned")]
pub(super) struct RunState<S> {
    /// The settings the sequence depends on, by the flag that sets them.
    pub settings: BTreeMap<String, String>,
    /// The cases' ids, in order.
    pub case_ids: Vec<u64>,
    /// Each case's scores so far, and how far the sequence got.
    pub sequence: Sequence<S>,
    /// The checkpoints so far.
    pub lines: Vec<PointLine>,
    /// The edited layers' norms before the first edit.
    pub start_norms: Vec<f32>,
    /// Seconds run, over every session.
    pub seconds: f64,
    /// Whether the last case was reached and the records written.
    pub finished: bool,
}

impl<S: Serialize + serde::de::DeserializeOwned> RunState<S> {
    /// Refuses to continue with other settings (naming the first that differs) or other cases;
    /// more cases than before are fine (the sequence goes on to them).
    pub fn check(&self, now: &BTreeMap<String, String>, ids: &[u64], file: &Path) -> Result<()> {
        for (name, value) in now {
            let was = self.settings.get(name).map_or("(not set)", String::as_str);
            if was != value {
                bail!(
                    "{} holds a sequence run with {name} {was}, not {value}: continue it with the \
                     same settings, or remove it to start over",
                    file.display()
                );
            }
        }
        if self.case_ids.len() > ids.len() {
            bail!(
                "{} holds a sequence of {} cases, more than this run's {}: give --n {} or more",
                file.display(),
                self.case_ids.len(),
                ids.len(),
                self.case_ids.len()
            );
        }
        if let Some(i) = (0..self.case_ids.len()).find(|&i| self.case_ids[i] != ids[i]) {
            bail!(
                "{} holds a sequence whose case {} is #{}, not #{}: continue it on the same \
                 dataset, or remove it to start over",
                file.display(),
                i + 1,
                self.case_ids[i],
                ids[i]
            );
        }
        Ok(())
    }
}

/// The folder of the run's saved states: beside `--out` (none without it).
pub(super) fn state_dir(out: Option<&Path>) -> Option<PathBuf> {
    out.map(|o| {
        let mut name = o.file_name().unwrap_or_default().to_os_string();
        name.push(".state");
        o.with_file_name(name)
    })
}

/// A method's saved state, if it has one.
pub(super) fn read(path: &Path) -> Result<Option<Snapshot>> {
    if !path.exists() {
        return Ok(None);
    }
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Snapshot::from_bytes(&data)
        .map(Some)
        .with_context(|| format!("{} is no sequence state", path.display()))
}

/// Writes the state whole: to a temporary file first, then renamed over the old one (a stop
/// mid-write leaves the previous checkpoint's).
pub(super) fn write(path: &Path, snapshot: &Snapshot) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, snapshot.to_bytes()?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
