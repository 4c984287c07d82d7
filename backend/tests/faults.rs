//! `kill -9` at random points of `loci stats`, `loci eval --out`, `loci study run --out` and
//! `loci edit --save-edit`: after every kill, each file on disk is whole and valid or absent,
//! and a rerun continues to the same records an uninterrupted run writes — none lost, none
//! twice.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::root;

fn tiny() -> String {
    root()
        .join("tests/fixtures/tiny-gpt2")
        .display()
        .to_string()
}

fn corpus() -> PathBuf {
    root().join("../shared/data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl")
}

fn counterfact() -> PathBuf {
    root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json")
}

fn fresh(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loci-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Kill points drawn from a fixed seed: fractions of a whole run's time.
struct Points(u64);

impl Points {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        0.05 + 0.9 * ((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// Runs `cmd` to its end; its time.
fn whole(cmd: &mut Command) -> Duration {
    let started = Instant::now();
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

/// Starts `cmd` and kills it (SIGKILL) after `after`, unless it ended first; whether it was
/// killed.
fn kill_after(cmd: &mut Command, after: Duration) -> bool {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < after {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

/// Kills runs of `cmd` at `kills` random points of the time `scale` gives for each run (what
/// is left of the work), checking `check` after each.
fn kill_repeatedly(
    mut cmd: impl FnMut() -> Command,
    mut scale: impl FnMut() -> Duration,
    kills: usize,
    seed: u64,
    mut check: impl FnMut(),
) -> usize {
    let mut points = Points(seed);
    let mut killed = 0;
    for _ in 0..kills {
        let at = scale().mul_f64(points.next());
        if kill_after(&mut cmd(), at) {
            killed += 1;
        }
        check();
    }
    killed
}

/// Every file in `dir` named like a result (not a hidden part being written) reads as valid.
fn valid_stats(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let bytes = std::fs::read(e.path()).unwrap();
        loci_core::edit::KeyStats::from_bytes(&bytes)
            .unwrap_or_else(|err| panic!("{name} is on disk but not valid: {err}"));
    }
}

#[test]
fn killed_statistics_leave_whole_files_or_none() {
    let dir = fresh("stats");
    let stats = |out: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_loci"));
        c.args([
            "stats",
            "--model",
            &tiny(),
            "--layers",
            "0,1,2,3",
            "--tokens",
            "20000",
        ])
        .arg("--corpus")
        .arg(corpus())
        .arg("--out")
        .arg(out);
        c
    };
    let reference = dir.join("reference");
    let t = whole(&mut stats(&reference));
    let out = dir.join("killed");
    let killed = kill_repeatedly(|| stats(&out), || t, 6, 1, || valid_stats(&out));
    eprintln!("loci stats: {killed} of 6 runs killed mid-way");
    assert!(killed >= 3, "only {killed} runs were killed");
    whole(&mut stats(&out));
    valid_stats(&out);
    for l in 0..4 {
        let name = format!("layer{l}.safetensors");
        let read = |d: &Path| {
            loci_core::edit::KeyStats::from_bytes(&std::fs::read(d.join(&name)).unwrap()).unwrap()
        };
        let (got, want) = (read(&out), read(&reference));
        assert_eq!(got.provenance, want.provenance, "{name}");
        // The sums' order follows the threads: equal up to rounding.
        let flat = |k: &loci_core::edit::KeyStats| -> Vec<f32> {
            k.mom2.flatten_all().unwrap().to_vec1().unwrap()
        };
        let worst = flat(&got)
            .iter()
            .zip(flat(&want))
            .map(|(a, b)| (a - b).abs() / (1e-3 + b.abs()))
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{name}: off by {worst}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_killed_saved_edit_is_whole_or_absent() {
    let dir = fresh("edit");
    let stats = dir.join("stats");
    let file = dir.join("edit.safetensors");
    let edit = || {
        let mut c = common::eiffel_edit(&tiny(), "1");
        c.args(["--v-steps", "8", "--stats-tokens", "2000"])
            .arg("--corpus")
            .arg(corpus())
            .arg("--stats")
            .arg(&stats)
            .arg("--save-edit")
            .arg(&file);
        c
    };
    whole(&mut edit());
    // Timed with the statistics in place, as every later run has them.
    let t = whole(&mut edit());
    let want = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    let check = || {
        if let Ok(bytes) = std::fs::read(&file) {
            loci_core::edit::Edit::from_bytes(&bytes).expect("a saved edit on disk is whole");
        }
    };
    let killed = kill_repeatedly(edit, || t, 6, 2, check);
    eprintln!("loci edit --save-edit: {killed} of 6 runs killed mid-way");
    assert!(killed >= 3, "only {killed} runs were killed");
    whole(&mut edit());
    // The same edit (its header's order and timings aside): the same vectors, bit for bit.
    let vectors = |bytes: &[u8]| match loci_core::edit::Edit::from_bytes(bytes).unwrap() {
        loci_core::edit::Edit::Rome(e) => (e.layer, e.left, e.right),
        other => panic!("not a ROME edit: {:?}", other.method()),
    };
    assert_eq!(vectors(&std::fs::read(&file).unwrap()), vectors(&want));
    let _ = std::fs::remove_dir_all(dir);
}

/// The JSON records of a results file, each without its timings.
fn records(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            strip_timings(&mut v);
            v
        })
        .collect()
}

fn strip_timings(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, _| !k.contains("seconds"));
            m.values_mut().for_each(strip_timings);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_timings),
        _ => {}
    }
}

/// Kills a resumable run (`--out FILE`) at random points, resuming each time, then lets it end:
/// its records are the uninterrupted run's, in order, each once.
fn resumes_exactly(name: &str, args: &[&str], seed: u64) {
    // The command, on tiny GPT-2 and CounterFact, writing to `out` with statistics in `stats`.
    let run = |out: &Path, stats: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_loci"));
        c.args(args)
            .args(["--model", &tiny(), "--stats-tokens", "2000"])
            .arg("--dataset")
            .arg(counterfact())
            .arg("--corpus")
            .arg(corpus())
            .arg("--stats")
            .arg(stats)
            .arg("--out")
            .arg(out);
        c
    };
    let dir = fresh(name);
    let stats = dir.join("stats");
    let reference = dir.join("reference.jsonl");
    whole(&mut run(&reference, &stats));
    // Timed with the statistics in place, as every rerun has them.
    let t = whole(&mut run(&dir.join("timing.jsonl"), &stats));
    let out = dir.join("killed.jsonl");
    let total = records(&reference).len();
    let lines = || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .matches('\n')
            .count()
    };
    let mut seen = 0;
    let killed = kill_repeatedly(
        || run(&out, &stats),
        // A rerun does what is left.
        || t.mul_f64(1.0 - lines() as f64 / total as f64),
        6,
        seed,
        || {
            // A kill may cut the last line short: the rest is whole and never shrinks.
            assert!(lines() >= seen, "records were lost");
            seen = lines();
        },
    );
    eprintln!("{name}: {killed} of 6 runs killed mid-way");
    assert!(killed >= 3, "only {killed} runs were killed");
    whole(&mut run(&out, &stats));
    let (got, want) = (records(&out), records(&reference));
    assert!(!want.is_empty());
    assert_eq!(got.len(), want.len(), "records lost or written twice");
    assert_eq!(got, want);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_killed_evaluation_resumes_with_every_case_once() {
    let args = [
        "eval",
        "--layer",
        "1",
        "--n",
        "8",
        "--v-steps",
        "3",
        "--no-generation",
    ];
    resumes_exactly("eval", &args, 3);
}

#[test]
fn a_killed_study_resumes_with_every_record_once() {
    let args = [
        "study",
        "run",
        "--n",
        "3",
        "--layers",
        "0,2",
        "--all-cases",
        "--min-prob",
        "0",
        "--samples",
        "3",
        "--no-essence",
        "--v-steps",
        "2",
        "--trace-windows",
        "3",
    ];
    resumes_exactly("study", &args, 4);
}
