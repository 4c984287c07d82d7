//! Files written whole or not at all: a process killed while writing (`kill -9`, a full disk, a
//! lost node) leaves the old file or none, never half of the new one.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `bytes` to a temporary file beside `path`, flushes it to disk and renames it over
/// `path` (a rename within a folder is atomic): readers see the whole file or the old one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let part = part_path(path);
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&part)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&part, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    written.with_context(|| format!("writing {}", path.display()))
}

/// A name beside `path` no other writer uses (process and time), hidden, ending `.part`.
fn part_path(path: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.{}-{nanos}.part", std::process::id()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_file_is_replaced_whole_and_no_part_is_left() {
        let dir = std::env::temp_dir().join(format!("loci-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x.json");
        super::write_atomic(&f, b"old").unwrap();
        super::write_atomic(&f, b"new").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert!(super::write_atomic(&dir.join("no/such/dir"), b"x").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
