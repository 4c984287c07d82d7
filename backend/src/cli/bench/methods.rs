//! `loci bench edit --methods …`: every editing method making the same sequence of one-fact
//! edits on one model, each kept (AlphaEdit keeping the earlier ones' keys), then all undone —
//! edits per second, peak memory and the work against the machine's peak, in one run.

use std::path::Path;

use anyhow::Result;
use loci_core::edit::{
    Edit, EditMethod, FtHparams, GraceHparams, KeyStats, MemitHparams, Preserved, RewriteRequest,
    RomeHparams, StatsAccumulator,
};
use loci_core::LoadedModel;
use serde::Serialize;

use super::peak::{counted, Peak, Speed};
use crate::workspace::RuleSettings;

/// One method's sequence.
#[derive(Serialize)]
pub struct MethodBench {
    method: EditMethod,
    layers: Vec<usize>,
    edits: usize,
    seconds: f64,
    edits_per_second: f64,
    /// p(new target) of the last fact right after its edit (read inside the timed sequence:
    /// one short forward pass per edit).
    p_new_last: Option<f32>,
    /// The sequence's work against the peak.
    speed: Speed,
    /// The process's peak resident memory during this method's sequence (Linux: the peak is
    /// reset before each method).
    peak_rss_mib: Option<f64>,
    /// Why the method stopped early, if it did (e.g. AlphaEdit's null space is empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl MethodBench {
    /// One line for the terminal.
    pub fn describe(&self) -> String {
        let mut line = format!(
            "{} at layers {:?}: {} edits in {:.1} s ({:.2} edits/s, {:.0}% of peak), peak {:.0} MiB, last p(new) {:.3}",
            self.method.label(),
            self.layers,
            self.edits,
            self.seconds,
            self.edits_per_second,
            100.0 * self.speed.fraction_of_peak,
            self.peak_rss_mib.unwrap_or(f64::NAN),
            self.p_new_last.unwrap_or(f32::NAN)
        );
        if let Some(e) = &self.error {
            line += &format!("; stopped: {e}");
        }
        line
    }
}

/// Facts rewritten in turn (each subject once per round of the cycle).
const FACTS: [(&str, &str, &str); 8] = [
    ("{} is located in the city of", "Eiffel Tower", "Rome"),
    ("{} plays the sport of", "Michael Jordan", "soccer"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{} is a product of", "iPhone", "Nokia"),
    ("The capital of {} is the city of", "Germany", "Madrid"),
    ("{} was born in the city of", "Barack Obama", "Paris"),
    ("{}, which is headquartered in", "Toyota", "Seattle"),
    ("The official language of {} is", "Brazil", "Finnish"),
];

fn request(i: usize) -> Result<RewriteRequest> {
    let (prompt, subject, target) = FACTS[i % FACTS.len()];
    Ok(RewriteRequest::from_prompt(prompt, subject, target)?)
}

/// A method's settings around `layer`: one layer for ROME, EMMET, FT and GRACE, the
/// five-layer window for MEMIT and AlphaEdit (the model's shipped settings where it has them).
enum Settings {
    Rome(RomeHparams),
    Family(MemitHparams),
    Ft(FtHparams),
    Grace(GraceHparams),
}

impl Settings {
    fn new(
        lm: &LoadedModel,
        method: EditMethod,
        layer: usize,
        rule: &RuleSettings,
    ) -> Result<Self> {
        let cfg = &lm.model.cfg;
        let (lo, hi) = loci_core::trace::window_layers(layer, 5, cfg.n_layer);
        let family = |layers: &[usize]| -> Result<Self> {
            let hp = crate::workspace::memit_hparams(lm, method, layers, &rule.of(method))?;
            Ok(Settings::Family(hp))
        };
        match method {
            EditMethod::Rome => Ok(Settings::Rome(RomeHparams::defaults(cfg, Some(layer))?)),
            EditMethod::Ft => Ok(Settings::Ft(FtHparams::defaults(cfg, &[layer])?)),
            EditMethod::Grace => Ok(Settings::Grace(GraceHparams::defaults(cfg, Some(layer))?)),
            EditMethod::Emmet => family(&[layer]),
            _ => family(&(lo..hi).collect::<Vec<_>>()),
        }
    }

    fn layers(&self) -> Vec<usize> {
        match self {
            Settings::Rome(hp) => vec![hp.layer],
            Settings::Family(hp) => hp.layers.clone(),
            Settings::Ft(hp) => hp.layers.clone(),
            Settings::Grace(hp) => vec![hp.layer],
        }
    }

    /// The edit of `req` after the edits `earlier`.
    fn edit(
        &self,
        lm: &mut LoadedModel,
        req: &RewriteRequest,
        stats: &[KeyStats],
        earlier: &[Edit],
    ) -> Result<Edit> {
        let of = |l: usize| stats.iter().find(|s| s.provenance.layer == l);
        Ok(match self {
            Settings::Rome(hp) => Edit::Rome(lm.rome(req, hp, of(hp.layer))?),
            Settings::Family(hp) => {
                let st: Vec<KeyStats> = hp.layers.iter().filter_map(|&l| of(l).cloned()).collect();
                let kept = Preserved::of(earlier);
                let one = std::slice::from_ref(req);
                Edit::Memit(lm.memit_preserving(one, hp, &st, &kept, &mut |_| {})?)
            }
            Settings::Ft(hp) => Edit::Ft(lm.finetune(req, hp)?),
            Settings::Grace(hp) => Edit::Grace(lm.grace(req, hp)?),
        })
    }
}

/// Each of `methods` (with the MEMIT family's `rule` settings where they belong) making `edits`
/// edits in sequence on `lm` (left as it was), with key statistics of every layer they touch
/// collected once up front from `corpus`.
pub fn run(
    lm: &mut LoadedModel,
    (methods, rule): (&[EditMethod], &RuleSettings),
    (edits, layer): (usize, usize),
    (corpus, stats_tokens): (&Path, u64),
    peak: &Peak,
) -> Result<Vec<MethodBench>> {
    if methods.is_empty() {
        return Ok(vec![]);
    }
    let settings = methods
        .iter()
        .map(|&m| Ok((m, Settings::new(lm, m, layer, rule)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut layers: Vec<usize> = settings.iter().flat_map(|(_, s)| s.layers()).collect();
    layers.sort_unstable();
    layers.dedup();
    let mut acc = StatsAccumulator::new(lm, &layers, 1024)?;
    crate::workspace::feed(&mut acc, lm, corpus, stats_tokens, |_| true)?;
    let stats = acc.finish(lm, &corpus.display().to_string())?;
    let mut out = vec![];
    for (method, s) in settings {
        reset_peak_rss();
        // AlphaEdit's earlier edits (their keys are kept); the others need none.
        let mut made: Vec<Edit> = vec![];
        let mut count = 0;
        let mut applied = vec![];
        let mut p_new_last = None;
        let mut error = None;
        let (_, flops, seconds) = counted(|| {
            for i in 0..edits {
                let req = request(i)?;
                let e = match s.edit(lm, &req, &stats, &made) {
                    Ok(e) => e,
                    Err(e) => {
                        error = Some(format!("{e:#}"));
                        break;
                    }
                };
                applied.push(lm.apply(&e)?);
                p_new_last = Some(lm.target_prob(&req.filled(), &req.target_new.str)?);
                count += 1;
                if method == EditMethod::Alphaedit {
                    made.push(e);
                }
            }
            Ok(())
        })?;
        for a in applied.into_iter().rev() {
            lm.undo_edit(a)?;
        }
        out.push(MethodBench {
            method,
            layers: s.layers(),
            edits: count,
            seconds,
            edits_per_second: count as f64 / seconds.max(1e-9),
            p_new_last,
            speed: peak.speed(flops, seconds),
            peak_rss_mib: super::peak_rss_mib(),
            error,
        });
    }
    Ok(out)
}

/// Starts the process's peak-memory count afresh (Linux: writing 5 to clear_refs resets
/// VmHWM); elsewhere the peak stays the process's.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
