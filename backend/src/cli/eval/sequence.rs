//! `loci eval --sequential`: each method's sequence of kept edits in turn (`--methods`), with the
//! model's health (held-out perplexity, known facts, edited weights' norms) at the start, at
//! each checkpoint and at the end; every checkpoint saved (`state`) so that a stopped run
//! continues; then the summary, and the chart of every number against the cases edited.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use indicatif::ProgressBar;
use loci_core::edit::{AppliedEdit, Edit, Preserved, RewriteRequest, Snapshot};
use loci_core::eval::{
    Health, HealthProbe, Sequence, SequenceCases, SequenceOptions, SequencePoint,
};
use loci_core::{LoadedModel, LociError};

use super::benchmark::Benchmark;
use super::method::{bits, Method};
use super::state::{self, PointLine, RunState};
use super::EvalArgs;
use crate::cli::{print_json, results};

/// What every method's sequence shares: the benchmark, its cases and their scores before any
/// edit, the arguments, the health probe, and where results and states go.
struct Run<'a, B: Benchmark> {
    bench: &'a B,
    cases: &'a [B::Case],
    a: &'a EvalArgs,
    probe: HealthProbe,
    /// The held-out texts' corpus, for the settings (none: no perplexity).
    held_out: String,
    fresh: Sequence<B::Scores>,
    states: Option<PathBuf>,
    out: Option<std::fs::File>,
}

/// One method's finished sequence.
struct Finished<B: Benchmark> {
    name: &'static str,
    label: String,
    lines: Vec<PointLine>,
    records: Vec<B::Record>,
}

/// Runs each method's sequence over `cases`, then prints (or draws) what they did.
pub(super) fn run<B: Benchmark>(
    bench: &B,
    lm: &mut LoadedModel,
    cases: &[B::Case],
    a: &EvalArgs,
    methods: &[Method],
) -> Result<()> {
    let states = state::state_dir(a.out.as_deref());
    let out = open_out(a, states.as_deref())?;
    let (probe, held_out) = health_probe(lm, a)?;
    let score = |lm: &LoadedModel, c: &B::Case| bench.score(lm, c);
    let on = SequenceCases {
        cases,
        request: &B::request,
        score: &score,
    };
    let mut run = Run {
        bench,
        cases,
        a,
        probe,
        held_out,
        fresh: Sequence {
            cases: vec![],
            checkpoints: vec![],
            done: 0,
        },
        states,
        out,
    };
    // Every saved state is checked before any method runs: a refusal changes nothing.
    for m in methods {
        run.check_state(lm, m)?;
    }
    eprintln!("scoring {} cases on the unedited model", cases.len());
    run.fresh = lm.start_sequence(&on);
    let mut done = vec![];
    for m in methods {
        done.push(run.method(lm, &on, m)?);
    }
    report(&done, a)
}

/// The probe of `--health-texts` held-out texts (the corpus's last: key statistics read it
/// from its start) and `--health-facts` known facts, and the held-out texts' corpus.
fn health_probe(lm: &LoadedModel, a: &EvalArgs) -> Result<(HealthProbe, String)> {
    let mut texts = std::collections::VecDeque::new();
    // Without --corpus and without the Wikipedia sample, the run goes on without perplexity.
    let corpus = match &a.edit.stats.corpus {
        Some(c) => Some(crate::workspace::corpus_file(Some(c))?),
        None => crate::workspace::default_corpus().ok(),
    };
    let held_out = match corpus {
        Some(c) if a.health_texts > 0 => {
            for t in crate::workspace::corpus_texts(&c)? {
                texts.push_back(t?);
                if texts.len() > a.health_texts {
                    texts.pop_front();
                }
            }
            c.display().to_string()
        }
        None if a.health_texts > 0 => {
            eprintln!("health: no corpus given or found (--corpus FILE): no perplexity");
            "none".into()
        }
        _ => "none".into(),
    };
    let texts: Vec<String> = texts.into();
    let facts: Vec<(String, String)> = match a.health_facts {
        0 => vec![],
        n => known_facts(a)?
            .into_iter()
            .take(n)
            .map(|f| (f.prompt, f.attribute))
            .collect(),
    };
    let probe = HealthProbe::new(lm, &texts, a.health_tokens, &facts)?;
    let (t, f) = probe.sizes();
    eprintln!("health: perplexity of {t} held-out texts, top-1 of {f} known facts");
    Ok((probe, held_out))
}

fn known_facts(a: &EvalArgs) -> Result<Vec<crate::workspace::KnownFact>> {
    match &a.known {
        Some(p) => crate::workspace::read_facts(p),
        None => Ok(crate::workspace::bundled_facts()),
    }
}

/// `--out`, to append to: a file that holds results is continued only beside its states.
fn open_out(a: &EvalArgs, states: Option<&std::path::Path>) -> Result<Option<std::fs::File>> {
    let Some(p) = &a.out else {
        return Ok(None);
    };
    let lines: Vec<serde_json::Value> = results::read_records(p, "a JSON line")?;
    if !lines.is_empty() && !states.is_some_and(|s| s.is_dir()) {
        bail!(
            "{} already holds results, and no saved sequence to continue: remove it or choose \
             another --out",
            p.display()
        );
    }
    Ok(Some(results::open_for_append(p)?))
}

/// A sequence under way: its state, the edit that undoes it, and the keys AlphaEdit keeps.
struct Going<S> {
    st: RunState<S>,
    applied: AppliedEdit,
    keys: BTreeMap<usize, Vec<f32>>,
}

impl<B: Benchmark> Run<'_, B> {
    /// One method's sequence (continued from its saved state, if there is one), undone at the
    /// end: the model's edited layers are checked to be exactly as they were.
    fn method(
        &mut self,
        lm: &mut LoadedModel,
        on: &SequenceCases<B::Case, B::Scores>,
        m: &Method,
    ) -> Result<Finished<B>> {
        let layers = m.layers();
        let original = bits(lm, &layers)?;
        let mut going = self.start(lm, m)?;
        let result = self.go(lm, on, m, &mut going);
        lm.undo_edit(std::mem::take(&mut going.applied))?;
        if bits(lm, &layers)? != original {
            bail!("internal error: the model differs from the original after the sequence");
        }
        let records = result?;
        Ok(Finished {
            name: m.name(),
            label: m.describe(),
            lines: going.st.lines,
            records,
        })
    }

    /// Refuses a saved state of `m` made with other settings or cases.
    fn check_state(&self, lm: &LoadedModel, m: &Method) -> Result<()> {
        let Some(path) = self.state_path(m) else {
            return Ok(());
        };
        if let Some(snap) = state::read(&path)? {
            let st: RunState<B::Scores> = serde_json::from_value(snap.meta)?;
            let ids: Vec<u64> = self.cases.iter().map(B::case_id).collect();
            st.check(&self.settings(lm, m), &ids, &path)?;
        }
        Ok(())
    }

    /// The sequence's start: its saved state put back, or a new one.
    fn start(&self, lm: &mut LoadedModel, m: &Method) -> Result<Going<B::Scores>> {
        let settings = self.settings(lm, m);
        let ids: Vec<u64> = self.cases.iter().map(B::case_id).collect();
        let path = self.state_path(m);
        let Some(snap) = path.as_deref().map(state::read).transpose()?.flatten() else {
            let mut keys = BTreeMap::new();
            for e in crate::cli::edit::applied_edits(&self.a.model)? {
                Preserved::gather(&mut keys, &e);
            }
            let st = RunState {
                settings,
                case_ids: ids,
                sequence: self.fresh.clone(),
                lines: vec![],
                start_norms: lm.down_norms(&m.layers())?,
                seconds: 0.0,
                finished: false,
            };
            return Ok(Going {
                st,
                applied: AppliedEdit::default(),
                keys,
            });
        };
        let path = path.expect("read from it");
        let mut st: RunState<B::Scores> = serde_json::from_value(snap.meta)?;
        st.check(&settings, &ids, &path)?;
        let had = st.sequence.cases.len();
        st.sequence
            .cases
            .extend(self.fresh.cases[had..].iter().cloned());
        st.finished &= had == ids.len();
        st.case_ids = ids;
        let applied = lm.restore_layers(&snap.layers)?;
        eprintln!(
            "{}: continuing after {} of {} cases, from {}",
            m.name(),
            st.sequence.done,
            self.cases.len(),
            path.display()
        );
        Ok(Going {
            st,
            applied,
            keys: snap.preserved,
        })
    }

    /// Edits the cases not yet done, with a point at the start, at each checkpoint and at the
    /// end; returns the records (written to `--out` after the end's point).
    fn go(
        &mut self,
        lm: &mut LoadedModel,
        on: &SequenceCases<B::Case, B::Scores>,
        m: &Method,
        g: &mut Going<B::Scores>,
    ) -> Result<Vec<B::Record>> {
        self.sync(m, g)?;
        if g.st.finished {
            return Ok(self.records(&g.st.sequence));
        }
        let clock = (Instant::now(), g.st.seconds);
        let seconds = |c: &(Instant, f64)| c.1 + c.0.elapsed().as_secs_f64();
        if g.st.lines.is_empty() {
            let line = self.line(lm, m, g, 0, serde_json::Value::Null, vec![])?;
            self.keep(lm, m, g, line, vec![])?;
        }
        let opts = SequenceOptions {
            batch: m.batch(),
            checkpoint_every: self.a.checkpoint_every.unwrap_or(0),
            checkpoint_cases: self.a.checkpoint_cases.unwrap_or(0),
        };
        let pb = bar(self.cases.len(), g.st.sequence.done, m.name());
        // An AlphaEdit edit's keys are kept once it is applied (`pending` until then).
        let keys = RefCell::new(std::mem::take(&mut g.keys));
        let pending = RefCell::new(BTreeMap::new());
        let mut make = |lm: &mut LoadedModel, reqs: &[RewriteRequest]| -> loci_core::Result<Edit> {
            let e = {
                let kept = keys.borrow();
                let preserved = Preserved::of_keys(&kept);
                m.make(lm, reqs, &preserved, &mut |msg| {
                    pb.set_message(msg.to_string())
                })?
            };
            *pending.borrow_mut() = BTreeMap::new();
            Preserved::gather(&mut pending.borrow_mut(), &e);
            Ok(e)
        };
        while !g.st.sequence.is_finished() {
            let before = g.st.sequence.done;
            let mut progress = |done: usize, _: Option<&B::Scores>| pb.set_position(done as u64);
            let made =
                lm.sequence_next(&mut g.st.sequence, on, opts.batch, &mut make, &mut progress);
            if let Err(LociError::Cancelled) = made {
                bail!(LociError::Cancelled);
            }
            let kept_keys = std::mem::take(&mut *pending.borrow_mut());
            if let Some(applied) = made? {
                g.applied = std::mem::take(&mut g.applied).then(applied);
                for (l, k) in kept_keys {
                    keys.borrow_mut().entry(l).or_default().extend(k);
                }
            }
            if opts.checkpoint_after(before, g.st.sequence.done, self.cases.len()) {
                lm.sequence_checkpoint(&mut g.st.sequence, on, opts.checkpoint_cases);
                let (summary, headline) = self.checkpoint_summary(&g.st.sequence);
                // Only the newest checkpoint's scores are needed: the older are in their lines.
                let newest = g.st.sequence.checkpoints.pop();
                g.st.sequence.checkpoints = newest.into_iter().collect();
                g.st.seconds = seconds(&clock);
                let line = self.line(lm, m, g, g.st.sequence.done, summary, headline)?;
                g.keys = keys.borrow().clone();
                pb.suspend(|| self.keep(lm, m, g, line, vec![]))?;
            }
        }
        pb.finish_and_clear();
        g.keys = keys.into_inner();
        lm.finish_sequence(&mut g.st.sequence, on);
        let records = self.records(&g.st.sequence);
        let (summary, headline) = self.last_summary(&records);
        g.st.seconds = seconds(&clock);
        let end = self.line(lm, m, g, self.cases.len(), summary, headline)?;
        g.st.finished = true;
        let cases = case_lines(m, &records)?;
        self.keep(lm, m, g, end, cases)?;
        Ok(records)
    }

    /// Keeps a point: in the state (saved first), then in `--out` with `more` lines after it —
    /// a stop between the two leaves lines for [`Run::sync`] to write when the run continues.
    fn keep(
        &mut self,
        lm: &LoadedModel,
        m: &Method,
        g: &mut Going<B::Scores>,
        line: PointLine,
        more: Vec<String>,
    ) -> Result<()> {
        let mut lines = vec![serde_json::to_string(&line)?];
        lines.extend(more);
        g.st.lines.push(line);
        self.save(lm, m, g)?;
        self.append(&lines)
    }

    /// Writes the lines a stop kept out of `--out`: the state's points it lacks and, for a
    /// finished sequence, its case records.
    fn sync(&mut self, m: &Method, g: &Going<B::Scores>) -> Result<()> {
        let Some(p) = &self.a.out else {
            return Ok(());
        };
        if g.st.lines.is_empty() {
            return Ok(());
        }
        let written: Vec<serde_json::Value> = results::read_records(p, "a JSON line")?;
        let mine = |kind: &'static str| {
            written
                .iter()
                .filter(move |l| l["kind"] == kind && l["method"] == m.name())
        };
        let points: Vec<u64> = mine("checkpoint")
            .filter_map(|l| l["cases_done"].as_u64())
            .collect();
        let mut lines = vec![];
        for l in &g.st.lines {
            if !points.contains(&(l.point.cases_done as u64)) {
                lines.push(serde_json::to_string(l)?);
            }
        }
        if g.st.finished && mine("case").next().is_none() {
            lines.extend(case_lines(m, &self.records(&g.st.sequence))?);
        }
        self.append(&lines)
    }

    /// The point after `done` cases: the health now, and the summary of the cases edited.
    fn line(
        &self,
        lm: &LoadedModel,
        m: &Method,
        g: &Going<B::Scores>,
        done: usize,
        summary: serde_json::Value,
        headline: Vec<(String, f32)>,
    ) -> Result<PointLine> {
        let health: Health = lm.health(&self.probe, &m.layers(), &g.st.start_norms)?;
        Ok(PointLine {
            kind: "checkpoint".into(),
            point: SequencePoint {
                method: m.name().into(),
                cases_done: done,
                headline,
                health,
                seconds: g.st.seconds,
            },
            label: m.describe(),
            summary,
        })
    }

    /// The last checkpoint's summary (JSON) and headline numbers.
    fn checkpoint_summary(
        &self,
        seq: &Sequence<B::Scores>,
    ) -> (serde_json::Value, Vec<(String, f32)>) {
        let cp = seq.checkpoints.last().expect("just taken");
        let ms: Vec<B::Metrics> = cp
            .scores
            .iter()
            .filter_map(|(i, s)| {
                let pre = seq.cases[*i].pre.as_ref()?;
                Some(self.bench.case_metrics(&self.cases[*i], pre, s))
            })
            .collect();
        summary_of::<B>(&ms)
    }

    /// The summary of every record's scores after the last edit.
    fn last_summary(&self, records: &[B::Record]) -> (serde_json::Value, Vec<(String, f32)>) {
        let ms: Vec<B::Metrics> = records
            .iter()
            .filter_map(|r| B::metrics(r).1.cloned())
            .collect();
        summary_of::<B>(&ms)
    }

    /// The records of the sequence's cases (those with one), their errors on stderr.
    fn records(&self, seq: &Sequence<B::Scores>) -> Vec<B::Record> {
        let eval = self.bench.records(self.cases, seq.clone());
        let mut kept = vec![];
        for (case, r) in self.cases.iter().zip(eval.records) {
            match r {
                Ok(r) => kept.push(r),
                Err(e) => eprintln!("case {}: {e}", B::case_id(case)),
            }
        }
        kept
    }

    /// The settings a continued sequence must share with the one it continues.
    fn settings(&self, lm: &LoadedModel, m: &Method) -> BTreeMap<String, String> {
        let a = self.a;
        let known = a
            .known
            .as_ref()
            .map_or("the bundled known_1000.json".into(), |p| {
                p.display().to_string()
            });
        [
            ("model", format!("{} ({})", lm.name, lm.info.fingerprint)),
            ("method settings", m.settings()),
            ("--batch", m.batch().to_string()),
            (
                "--checkpoint-cases",
                a.checkpoint_cases.unwrap_or(0).to_string(),
            ),
            (
                "--checkpoint-every",
                a.checkpoint_every.unwrap_or(0).to_string(),
            ),
            ("benchmark settings", self.bench.settings()),
            ("--no-generation", a.no_generation.to_string()),
            ("--snippets", path_or_none(a.snippets.as_deref())),
            ("--dtype", format!("{:?}", a.model.dtype).to_lowercase()),
            ("--apply-edit", paths(&a.model.apply_edit)),
            ("the held-out corpus", self.held_out.clone()),
            ("--health-texts", a.health_texts.to_string()),
            ("--health-tokens", a.health_tokens.to_string()),
            ("--health-facts", a.health_facts.to_string()),
            ("--known", known),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn state_path(&self, m: &Method) -> Option<PathBuf> {
        self.states
            .as_ref()
            .map(|d| d.join(format!("{}.safetensors", m.name())))
    }

    /// Saves the sequence as it is now (its layers, kept keys and state).
    fn save(&self, lm: &LoadedModel, m: &Method, g: &Going<B::Scores>) -> Result<()> {
        let Some(path) = self.state_path(m) else {
            return Ok(());
        };
        let snapshot = Snapshot {
            layers: lm.layer_states(&m.layers())?,
            preserved: g.keys.clone(),
            meta: serde_json::to_value(&g.st)?,
        };
        state::write(&path, &snapshot)
    }

    fn append(&mut self, lines: &[String]) -> Result<()> {
        match self.out.as_mut() {
            Some(f) => results::append_lines(f, lines),
            None => Ok(()),
        }
    }
}

fn path_or_none(p: Option<&std::path::Path>) -> String {
    p.map_or("none".into(), |p| p.display().to_string())
}

fn paths(ps: &[PathBuf]) -> String {
    let names: Vec<String> = ps.iter().map(|p| p.display().to_string()).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(",")
    }
}

/// The case records' lines of `--out`.
fn case_lines<R: serde::Serialize>(m: &Method, records: &[R]) -> Result<Vec<String>> {
    records
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r)?;
            v["kind"] = "case".into();
            v["method"] = m.name().into();
            Ok(v.to_string())
        })
        .collect()
}

/// A summary as JSON, with its headline numbers (a number without a value — no case scored
/// yet — is left out).
fn summary_of<B: Benchmark>(ms: &[B::Metrics]) -> (serde_json::Value, Vec<(String, f32)>) {
    let s = B::summarize(ms);
    let headline = B::headline(&s)
        .into_iter()
        .filter(|(_, v)| v.is_finite())
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    (serde_json::to_value(&s).unwrap_or_default(), headline)
}

/// The progress bar of one method's cases, `done` of them already done.
fn bar(len: usize, done: usize, name: &str) -> ProgressBar {
    let pb = crate::workspace::bar(
        len as u64,
        &format!("{name} {{bar:40}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta}}] {{msg}}"),
    );
    pb.set_position(done as u64);
    pb
}

/// The chart (`--plot`), then the summary: JSON (`--summary`) or tables.
fn report<B: Benchmark>(done: &[Finished<B>], a: &EvalArgs) -> Result<()> {
    let points: Vec<SequencePoint> = done
        .iter()
        .flat_map(|f| f.lines.iter().map(|l| l.point.clone()))
        .collect();
    if let Some(p) = &a.plot {
        let title = format!("{}: sequential edits", a.dataset.display());
        crate::cli::render::save_plot(p, &loci_core::plot::sequence_svg(&title, &points))?;
    }
    if a.summary {
        let each: Vec<serde_json::Value> = done.iter().map(method_json).collect();
        return match <[_; 1]>::try_from(each) {
            Ok([one]) => print_json(&one),
            Err(each) => print_json(&serde_json::json!({ "methods": each })),
        };
    }
    for f in done {
        print_method(f, a);
    }
    if done.len() > 1 {
        print_comparison(done);
    }
    Ok(())
}

impl<B: Benchmark> Finished<B> {
    /// The summaries of the records after each case's own edit and after the last edit.
    fn summaries(&self) -> (B::Summary, B::Summary) {
        let post: Vec<B::Metrics> = self
            .records
            .iter()
            .map(|r| B::metrics(r).0.clone())
            .collect();
        let last: Vec<B::Metrics> = self
            .records
            .iter()
            .filter_map(|r| B::metrics(r).1.cloned())
            .collect();
        (B::summarize(&post), B::summarize(&last))
    }
}

/// One method's summary as JSON: after each case's own edit, after all, and the checkpoints.
fn method_json<B: Benchmark>(f: &Finished<B>) -> serde_json::Value {
    let (post, last) = f.summaries();
    serde_json::json!({
        "method": f.name,
        "label": f.label,
        "after_own_edit": post,
        "after_all_edits": last,
        "checkpoints": f.lines.iter().map(|l| serde_json::json!({
            "cases_done": l.point.cases_done,
            "summary": l.summary,
            "health": l.point.health,
            "seconds": l.point.seconds,
        })).collect::<Vec<_>>(),
    })
}

/// One method's summary tables: the benchmark's, then its points.
fn print_method<B: Benchmark>(f: &Finished<B>, a: &EvalArgs) {
    let (post, last) = f.summaries();
    let title = format!(
        "{} on {} cases of {} (in sequence: each edit kept, scored after its own and after the last)",
        f.label,
        f.records.len(),
        a.dataset.display()
    );
    B::print(&title, &post, Some(&last));
    let names = headline_names(&f.lines);
    println!(
        "\nCases edited so far, after N cases (×100), and the model's health:\n| N | {} | perplexity | known facts top-1 | norm growth | seconds |\n|---|{}---|---|---|---|",
        names.join(" | "),
        "---|".repeat(names.len())
    );
    for l in &f.lines {
        let p = &l.point;
        let mut cells: Vec<String> = names.iter().map(|n| headline_cell(p, n)).collect();
        cells.push(opt(p.health.perplexity, 2));
        cells.push(opt(p.health.known_top1, 1));
        cells.push(format!("{:.3}×", p.health.max_growth()));
        cells.push(format!("{:.0}", p.seconds));
        println!("| {} | {} |", p.cases_done, cells.join(" | "));
    }
    println!();
}

/// The methods side by side at the end of their sequences.
fn print_comparison<B: Benchmark>(done: &[Finished<B>]) {
    let names = done
        .iter()
        .map(|f| headline_names(&f.lines))
        .max()
        .unwrap_or_default();
    println!(
        "After the last edit (×100), and the model's health against the unedited model:\n| method | {} | perplexity | known facts top-1 | norm growth | cases/s |\n|---|{}---|---|---|---|",
        names.join(" | "),
        "---|".repeat(names.len())
    );
    for f in done {
        let (Some(start), Some(end)) = (f.lines.first(), f.lines.last()) else {
            continue;
        };
        let (s, e) = (&start.point, &end.point);
        let mut cells: Vec<String> = names.iter().map(|n| headline_cell(e, n)).collect();
        cells.push(format!(
            "{} → {}",
            opt(s.health.perplexity, 2),
            opt(e.health.perplexity, 2)
        ));
        cells.push(format!(
            "{} → {}",
            opt(s.health.known_top1, 1),
            opt(e.health.known_top1, 1)
        ));
        cells.push(format!("{:.3}×", e.health.max_growth()));
        cells.push(format!("{:.3}", e.cases_done as f64 / e.seconds.max(1e-9)));
        println!("| {} | {} |", f.name, cells.join(" | "));
    }
}

/// The headline numbers' names (of the first point that has them).
fn headline_names(lines: &[PointLine]) -> Vec<String> {
    let with = lines.iter().find(|l| !l.point.headline.is_empty());
    with.map_or(vec![], |l| {
        l.point.headline.iter().map(|h| h.0.clone()).collect()
    })
}

/// A point's headline number `name`, or a dash.
fn headline_cell(p: &SequencePoint, name: &str) -> String {
    p.headline
        .iter()
        .find(|h| h.0 == name)
        .map_or("—".into(), |h| format!("{:.1}", h.1))
}

fn opt(v: Option<f32>, digits: usize) -> String {
    v.map_or("—".into(), |v| format!("{v:.digits$}"))
}
