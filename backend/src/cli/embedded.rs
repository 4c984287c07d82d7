//! The commands run inside another program — the Python package's `loci.eval` and
//! `loci.study` — on a model that program already holds: the model (and its edits) handed in
//! instead of loaded, the JSON the command would print handed back, its bars hidden. The same
//! code as `loci eval` and `loci study` on the command line, so the two cannot disagree.

use std::cell::RefCell;

use anyhow::{bail, Result};
use clap::Parser;
use loci_core::edit::Edit;
use loci_core::LoadedModel;

use crate::workspace::{with_hidden_bars, Heard};

thread_local! {
    static GIVEN: RefCell<Option<(LoadedModel, Vec<Edit>)>> = const { RefCell::new(None) };
    static CAPTURED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// A command line without the program's name: `["eval", "--dataset", …]`.
#[derive(Parser, Debug)]
#[command(name = "loci", no_binary_name = true)]
struct Embedded {
    #[command(subcommand)]
    cmd: super::Command,
}

/// Runs the command `argv` on `held`: a model (a copy: the caller's never changes) and its
/// applied edits, or none for commands that need no model (`study analyze`); its bars hidden and
/// their steps told to `heard`. Returns what it printed, one JSON text per value, in order.
pub fn run_on(
    held: Option<(LoadedModel, Vec<Edit>)>,
    argv: &[String],
    heard: Option<Heard>,
) -> Result<Vec<String>> {
    let cmd = Embedded::try_parse_from(argv)
        .map_err(|e| anyhow::anyhow!("{}", e.render()))?
        .cmd;
    if !matches!(cmd, super::Command::Eval(_) | super::Command::Study(_)) {
        bail!("only eval and study run on a held model");
    }
    let mut scope = Scope::enter(held);
    with_hidden_bars(heard, || super::run(cmd))?;
    Ok(scope.printed())
}

/// One command's held model and printed JSON; the caller's (if it is itself inside a command)
/// are put back when it ends, also by a panic.
struct Scope {
    given: Option<(LoadedModel, Vec<Edit>)>,
    captured: Option<Vec<String>>,
}

impl Scope {
    fn enter(held: Option<(LoadedModel, Vec<Edit>)>) -> Scope {
        Scope {
            given: GIVEN.with(|g| g.replace(held)),
            captured: CAPTURED.with(|c| c.replace(Some(vec![]))),
        }
    }

    /// What the command printed so far.
    fn printed(&mut self) -> Vec<String> {
        CAPTURED.with(|c| {
            c.borrow_mut()
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default()
        })
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        GIVEN.with(|g| *g.borrow_mut() = self.given.take());
        CAPTURED.with(|c| *c.borrow_mut() = self.captured.take());
    }
}

/// The held model and its edits, when a command runs inside another program.
pub(super) fn given() -> Option<(LoadedModel, Vec<Edit>)> {
    GIVEN.with(|g| g.borrow().clone())
}

/// Whether a program runs the command on this thread (and takes its JSON).
pub(super) fn capturing() -> bool {
    CAPTURED.with(|c| c.borrow().is_some())
}

/// Hands `v` (JSON text) to the program running the command.
pub(super) fn keep(v: String) {
    CAPTURED.with(|c| {
        if let Some(kept) = c.borrow_mut().as_mut() {
            kept.push(v);
        }
    })
}
