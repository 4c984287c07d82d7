//! JSONL results files that a stopped run continues: the records already there are read back,
//! a last line cut short by the stop is dropped, and new records are appended whole.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

/// The complete lines of a file (none when it is missing): a last line without its newline
/// was cut short and is not one.
fn complete_lines(path: &Path) -> Result<Vec<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let whole = text.rfind('\n').map_or("", |i| &text[..=i]);
    Ok(whole.lines().map(String::from).collect())
}

/// The records of a results file, in order (none when it is missing).
pub fn read_records<R: DeserializeOwned>(path: &Path, what: &str) -> Result<Vec<R>> {
    complete_lines(path)?
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not {what}", path.display(), i + 1))
        })
        .collect()
}

/// Opens a results file to append to, first dropping a last line cut short.
pub fn open_for_append(path: &Path) -> Result<std::fs::File> {
    let keep: u64 = complete_lines(path)?
        .iter()
        .map(|l| l.len() as u64 + 1)
        .sum();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    if f.metadata()?.len() > keep {
        f.set_len(keep)?;
    }
    Ok(f)
}

/// Appends lines and makes them durable together (a stop never leaves half of them).
pub fn append_lines(f: &mut std::fs::File, lines: &[String]) -> Result<()> {
    let mut buf = String::new();
    for l in lines {
        buf.push_str(l);
        buf.push('\n');
    }
    f.write_all(buf.as_bytes())?;
    f.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_cut_short_is_dropped_and_appends_go_after_the_whole_ones() {
        let dir = std::env::temp_dir().join(format!("loci-results-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.jsonl");
        assert!(read_records::<u32>(&p, "a number").unwrap().is_empty());
        std::fs::write(&p, "1\n\n2\n3").unwrap();
        assert_eq!(read_records::<u32>(&p, "a number").unwrap(), [1, 2]);
        let mut f = open_for_append(&p).unwrap();
        append_lines(&mut f, &["4".into(), "5".into()]).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "1\n\n2\n4\n5\n");
        assert_eq!(read_records::<u32>(&p, "a number").unwrap(), [1, 2, 4, 5]);
        std::fs::write(&p, "1\nx\n").unwrap();
        let e = read_records::<u32>(&p, "a number").unwrap_err();
        assert!(format!("{e:#}").contains("line 2: not a number"), "{e:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
