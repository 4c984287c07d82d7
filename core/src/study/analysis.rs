//! From a study's lines to Hase et al.'s findings (docs/study.md#the-regressions-and-f-tests): per
//! method, problem and score, the variance explained by the layer, by the tracing effect, and added
//! by tracing to the layer (with its F-test); per layer, the mean edit score beside the mean
//! tracing effect.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::problem::EditProblem;
use super::regress::{f_test, fit_group_lines, fit_groups, fit_line, pearson, Correlation, FTest};
use super::sweep::{CaseLine, CaseTrace, EditLine, StudyLine, StudyMethod};

/// The scores regressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Hase et al.'s normalised rewrite score (`HaseScores::rewrite`).
    Rewrite,
    /// The normalised paraphrase score (edits without one are left out).
    Paraphrase,
    /// The neighbourhood score (edits without one are left out).
    Neighborhood,
    /// The essence score from perplexity drift (edits without one are left out).
    Essence,
}

impl Metric {
    /// Every metric, in the order the analysis reports them.
    pub const ALL: [Metric; 4] = [
        Metric::Rewrite,
        Metric::Paraphrase,
        Metric::Neighborhood,
        Metric::Essence,
    ];

    /// The snake_case name, as serialised.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Rewrite => "rewrite",
            Metric::Paraphrase => "paraphrase",
            Metric::Neighborhood => "neighborhood",
            Metric::Essence => "essence",
        }
    }

    fn of(self, e: &EditLine) -> Option<f32> {
        match self {
            Metric::Rewrite => Some(e.scores.rewrite),
            Metric::Paraphrase => e.scores.paraphrase,
            Metric::Neighborhood => e.scores.neighborhood,
            Metric::Essence => e.essence_score,
        }
    }
}

/// The three regressions of one (method, problem, metric).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Condition {
    /// The method whose edits are regressed.
    pub method: StudyMethod,
    /// The problem those edits were posed as.
    pub problem: EditProblem,
    /// The score regressed.
    pub metric: Metric,
    /// Number of edits (points) in the regressions.
    pub n: usize,
    /// score ~ factor(layer)
    pub r2_layer: Option<f64>,
    /// score ~ tracing effect
    pub r2_trace: Option<f64>,
    /// score ~ factor(layer) × tracing effect
    pub r2_both: Option<f64>,
    /// R²_both − R²_layer: what tracing adds to knowing the layer.
    pub added_by_trace: Option<f64>,
    /// The nested-model test of that addition.
    pub f_test: Option<FTest>,
}

/// Means per central layer of one (method, problem).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerMeans {
    /// The method whose edits are averaged.
    pub method: StudyMethod,
    /// The problem those edits were posed as.
    pub problem: EditProblem,
    /// The central layers edited, ascending; the vectors below are indexed alike.
    pub layers: Vec<usize>,
    /// Number of successful edits at each layer.
    pub n: Vec<usize>,
    /// Mean rewrite score at each layer.
    pub rewrite: Vec<f64>,
    /// Mean per-case harmonic target score at each layer.
    pub target_score: Vec<f64>,
    /// Mean tracing effect (at the central layer) of the edits at each layer.
    pub tracing_effect: Vec<f64>,
    /// Pearson's r of rewrite score and tracing effect among the edits at each layer.
    pub correlation: Vec<Option<Correlation>>,
}

/// Everything the analysis of a study's lines finds: the regressions, per-layer means, the
/// peak and large-effect comparisons.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StudyAnalysis {
    /// The tracing window whose effects were regressed (None: the cases were traced at
    /// different windows, each regressed at its own).
    #[serde(default)]
    pub window: Option<usize>,
    /// Distinct cases in the lines.
    pub cases: usize,
    /// Cases kept (the model knows the fact).
    pub cases_used: usize,
    /// Edits of the kept cases, failed ones included.
    pub edits: usize,
    /// Edits that could not be made (their optimisation diverged), left out of the fits.
    pub failed_edits: usize,
    /// The regressions of each (method, problem, metric) with data.
    pub conditions: Vec<Condition>,
    /// The per-layer means of each (method, problem).
    pub layers: Vec<LayerMeans>,
    /// The mean tracing effect per layer over the kept cases (all layers).
    pub mean_tracing_effect: Vec<f64>,
    /// Per method and problem: does editing where tracing peaks do better?
    #[serde(default)]
    pub peak: Vec<PeakComparison>,
    /// Hase et al.'s large-effect flag: do edits where tracing's raw effect is in the top 5%
    /// do better? (None when no kept case has a grid at the analysed window.)
    #[serde(default)]
    pub large_effect: Option<LargeEffect>,
}

/// Hase et al.'s `large_tracing_effect` (docs/study.md#the-large-effect-flag): an edit is flagged
/// when the largest raw restoration effect at its central layer, max over tokens of p(restored) −
/// p(corrupted), exceeds the 95th percentile of every cell's raw effect (the kept cases' grids, all
/// tokens and layers, at the traced window; rows before the subject count with their effect of 0).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LargeEffect {
    /// The 95th percentile (linear interpolation, R's default `quantile`).
    pub cutoff: f64,
    /// One comparison per (method, problem).
    pub comparisons: Vec<LargeEffectComparison>,
}

/// Flagged edits against the others, of one method and problem.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LargeEffectComparison {
    /// The method whose edits are compared.
    pub method: StudyMethod,
    /// The problem those edits were posed as.
    pub problem: EditProblem,
    /// Number of flagged edits (raw effect above the cutoff).
    pub large: usize,
    /// Number of the other edits.
    pub rest: usize,
    /// Mean rewrite scores (None for an empty group).
    pub rewrite_large: Option<f64>,
    /// Mean rewrite score of the other edits.
    pub rewrite_rest: Option<f64>,
}

/// The `p`-quantile of `v` by linear interpolation between order statistics (R's type 7).
fn quantile(v: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let h = (v.len() - 1) as f64 * p;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    Some(v[lo] + (h - lo as f64) * (v[hi] - v[lo]))
}

/// `LargeEffect` of the edits `by_cond`, from the grids of `traces` (case id → trace).
fn large_effect(
    traces: &BTreeMap<u64, &CaseTrace>,
    by_cond: &BTreeMap<(StudyMethod, EditProblem), Vec<&EditLine>>,
) -> Option<LargeEffect> {
    let raw = |t: &CaseTrace, row: &[f32], l: usize| row.get(l).map(|p| (p - t.low) as f64);
    let cells: Vec<f64> = traces
        .values()
        .flat_map(|t| {
            t.scores
                .iter()
                .flat_map(move |row| (0..row.len()).filter_map(move |l| raw(t, row, l)))
        })
        .collect();
    let cutoff = quantile(&cells, 0.95)?;
    let comparisons = by_cond
        .iter()
        .map(|((method, problem), es)| {
            let (mut large, mut rest) = (vec![], vec![]);
            for e in es {
                let Some(t) = traces.get(&e.case_id) else {
                    continue;
                };
                let max_token_effect = t
                    .scores
                    .iter()
                    .filter_map(|row| raw(t, row, e.layer))
                    .fold(f64::NEG_INFINITY, f64::max);
                let v = e.scores.rewrite as f64;
                if max_token_effect > cutoff {
                    large.push(v);
                } else {
                    rest.push(v);
                }
            }
            LargeEffectComparison {
                method: *method,
                problem: *problem,
                large: large.len(),
                rest: rest.len(),
                rewrite_large: (!large.is_empty()).then(|| mean(&large)),
                rewrite_rest: (!rest.is_empty()).then(|| mean(&rest)),
            }
        })
        .collect();
    Some(LargeEffect {
        cutoff,
        comparisons,
    })
}

/// Does editing where tracing peaks do better (the paper's question, asked directly)? Each
/// case's edit at the swept layer with its largest tracing effect against its edits at the
/// other layers, beside the single layer that is best on average.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeakComparison {
    /// The method whose edits are compared.
    pub method: StudyMethod,
    /// The problem those edits were posed as.
    pub problem: EditProblem,
    /// Cases edited at two or more layers.
    pub cases: usize,
    /// Mean rewrite score of each case's edit at its peak layer.
    pub at_peak: f64,
    /// Mean rewrite score of the cases' edits at the other layers.
    pub elsewhere: f64,
    /// The layer with the best mean rewrite score, and that mean: what choosing by layer alone
    /// gives.
    pub best_layer: usize,
    /// The mean rewrite score at `best_layer`.
    pub at_best_layer: f64,
}

/// `PeakComparison` of one method and problem's edits (None without a case edited at two
/// layers). Ties in tracing effect go to the lowest layer.
fn peak_comparison(
    method: StudyMethod,
    problem: EditProblem,
    edits: &[&EditLine],
) -> Option<PeakComparison> {
    let mut by_case: BTreeMap<u64, Vec<&EditLine>> = BTreeMap::new();
    for e in edits {
        by_case.entry(e.case_id).or_default().push(e);
    }
    let (mut peak, mut other) = (vec![], vec![]);
    let mut cases = 0;
    for es in by_case.values().filter(|es| es.len() >= 2) {
        cases += 1;
        let top = es.iter().enumerate().fold(0, |best, (i, e)| {
            let b = es[best];
            if e.tracing_effect > b.tracing_effect
                || (e.tracing_effect == b.tracing_effect && e.layer < b.layer)
            {
                i
            } else {
                best
            }
        });
        for (i, e) in es.iter().enumerate() {
            let v = e.scores.rewrite as f64;
            if i == top {
                peak.push(v);
            } else {
                other.push(v);
            }
        }
    }
    if cases == 0 {
        return None;
    }
    let mut per_layer: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for e in edits {
        per_layer
            .entry(e.layer)
            .or_default()
            .push(e.scores.rewrite as f64);
    }
    let (best_layer, at_best_layer) = per_layer
        .iter()
        .map(|(l, v)| (*l, mean(v)))
        .fold((0, f64::NEG_INFINITY), |b, x| if x.1 > b.1 { x } else { b });
    Some(PeakComparison {
        method,
        problem,
        cases,
        at_peak: mean(&peak),
        elsewhere: mean(&other),
        best_layer,
        at_best_layer,
    })
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Analyses the lines of one or more study runs (later lines of a case replace earlier ones).
pub fn analyze(lines: &[StudyLine]) -> StudyAnalysis {
    analyze_at(lines, None)
}

/// `analyze` with the tracing effects of another traced window (`--trace-windows`) joined to
/// the edits; an error names a kept case that was not traced at that window.
pub fn analyze_window(lines: &[StudyLine], window: usize) -> Result<StudyAnalysis, String> {
    let mut effects = BTreeMap::new();
    for l in lines {
        let StudyLine::Case(c) = l else { continue };
        let Some(t) = &c.trace else { continue };
        match t.at_window(window) {
            Some(e) => {
                effects.insert(c.case_id, e);
            }
            None if c.skipped.is_none() => {
                return Err(format!(
                    "case {} was not traced at window {window} (run the study with \
                     --trace-windows {},{window})",
                    c.case_id, t.window
                ))
            }
            None => {}
        }
    }
    // The lines with the window's effects in place of the joined ones.
    let moved: Vec<StudyLine> = lines
        .iter()
        .cloned()
        .map(|mut l| {
            match &mut l {
                StudyLine::Case(c) => {
                    if let (Some(t), Some(e)) = (&mut c.trace, effects.get(&c.case_id)) {
                        t.max_fraction_restored = e.max_fraction_restored.clone();
                        t.subject_last_fraction = e.subject_last_fraction.clone();
                    }
                }
                StudyLine::Edit(ed) => {
                    if let Some(e) = effects.get(&ed.case_id) {
                        let at = |v: &[f32]| v.get(ed.layer).copied().unwrap_or(f32::NAN);
                        ed.tracing_effect = at(&e.max_fraction_restored);
                        ed.subject_last_effect = at(&e.subject_last_fraction);
                    }
                }
            }
            l
        })
        .collect();
    Ok(analyze_at(&moved, Some(window)))
}

/// The edits of one method and problem, by (method, problem).
type ByCondition<'a> = BTreeMap<(StudyMethod, EditProblem), Vec<&'a EditLine>>;

/// The lines of a study, sorted out: cases by id, the cases kept (traced, not skipped), and
/// the kept cases' edits (the last line of each edit wins, as a resumed run rewrites it).
struct Sorted<'a> {
    cases: BTreeMap<u64, &'a CaseLine>,
    kept: BTreeSet<u64>,
    /// Edits of kept cases that were made.
    ok: Vec<&'a EditLine>,
    /// Edits of kept cases that could not be made.
    failed: usize,
}

impl<'a> Sorted<'a> {
    fn new(lines: &'a [StudyLine]) -> Self {
        let mut cases = BTreeMap::new();
        let mut edits: BTreeMap<(u64, StudyMethod, EditProblem, usize), &EditLine> =
            BTreeMap::new();
        for l in lines {
            match l {
                StudyLine::Case(c) => {
                    cases.insert(c.case_id, c);
                }
                StudyLine::Edit(e) => {
                    edits.insert((e.case_id, e.method, e.problem, e.layer), e);
                }
            }
        }
        let kept: BTreeSet<u64> = cases
            .values()
            .filter(|c| c.skipped.is_none() && c.trace.is_some())
            .map(|c| c.case_id)
            .collect();
        let used: Vec<&EditLine> = edits
            .values()
            .filter(|e| kept.contains(&e.case_id))
            .copied()
            .collect();
        let failed = used.iter().filter(|e| e.error.is_some()).count();
        let ok = used.into_iter().filter(|e| e.error.is_none()).collect();
        Self {
            cases,
            kept,
            ok,
            failed,
        }
    }

    /// The kept cases' traces.
    fn traces(&self) -> impl Iterator<Item = (u64, &'a CaseTrace)> + '_ {
        self.cases
            .values()
            .filter(|c| self.kept.contains(&c.case_id))
            .filter_map(|c| c.trace.as_ref().map(|t| (c.case_id, t)))
    }
}

/// The analysis of `lines`, whose edits carry the tracing effects of `window` (None: each
/// case's joined window).
fn analyze_at(lines: &[StudyLine], window: Option<usize>) -> StudyAnalysis {
    let sorted = Sorted::new(lines);
    let mut by_cond: ByCondition = BTreeMap::new();
    for e in &sorted.ok {
        by_cond.entry((e.method, e.problem)).or_default().push(e);
    }
    let mut conditions = vec![];
    let mut layers = vec![];
    for ((method, problem), es) in &by_cond {
        for metric in Metric::ALL {
            conditions.extend(condition(*method, *problem, metric, es));
        }
        layers.push(layer_means(*method, *problem, es));
    }
    let traces: Vec<&Vec<f32>> = sorted
        .traces()
        .map(|(_, t)| &t.max_fraction_restored)
        .collect();
    let n_layer = traces.iter().map(|t| t.len()).max().unwrap_or(0);
    let mean_tracing_effect = (0..n_layer)
        .map(|l| {
            let at: Vec<f64> = traces
                .iter()
                .filter_map(|t| t.get(l).map(|&v| v as f64))
                .collect();
            mean(&at)
        })
        .collect();
    // Without a window asked for, the one every kept case was joined with, if they agree.
    let joined: BTreeSet<usize> = sorted.traces().map(|(_, t)| t.window).collect();
    // The grids are of each case's traced window: they serve an analysis at that window.
    let grids: BTreeMap<u64, &CaseTrace> = sorted
        .traces()
        .filter(|(_, t)| window.is_none_or(|w| w == t.window))
        .collect();
    let window = window.or_else(|| match joined.len() {
        1 => joined.first().copied(),
        _ => None,
    });
    StudyAnalysis {
        window,
        cases: sorted.cases.len(),
        cases_used: sorted.kept.len(),
        edits: sorted.ok.len() + sorted.failed,
        failed_edits: sorted.failed,
        conditions,
        layers,
        mean_tracing_effect,
        peak: by_cond
            .iter()
            .filter_map(|((m, p), es)| peak_comparison(*m, *p, es))
            .collect(),
        large_effect: large_effect(&grids, &by_cond),
    }
}

/// The regressions of one metric of one method and problem, if any edit has the metric.
fn condition(
    method: StudyMethod,
    problem: EditProblem,
    metric: Metric,
    es: &[&EditLine],
) -> Option<Condition> {
    let pts: Vec<(f64, f64, usize)> = es
        .iter()
        .filter_map(|e| {
            metric
                .of(e)
                .map(|y| (y as f64, e.tracing_effect as f64, e.layer))
        })
        .collect();
    if pts.is_empty() {
        return None;
    }
    let y: Vec<f64> = pts.iter().map(|p| p.0).collect();
    let x: Vec<f64> = pts.iter().map(|p| p.1).collect();
    let g: Vec<usize> = pts.iter().map(|p| p.2).collect();
    let (fl, ft, fb) = (
        fit_groups(&y, &g),
        fit_line(&y, &x),
        fit_group_lines(&y, &x, &g),
    );
    Some(Condition {
        method,
        problem,
        metric,
        n: y.len(),
        // A saturated interaction model (a line through every layer's points) fits anything:
        // it says nothing about tracing.
        added_by_trace: fb
            .r2
            .zip(fl.r2)
            .filter(|_| fb.df_resid > 0)
            .map(|(b, l)| b - l),
        f_test: f_test(&fl, &fb),
        r2_layer: fl.r2,
        r2_trace: ft.r2,
        r2_both: fb.r2,
    })
}

/// Per edited layer of one method and problem: the mean scores and tracing effect, and the
/// correlation of effect and rewrite score.
fn layer_means(method: StudyMethod, problem: EditProblem, es: &[&EditLine]) -> LayerMeans {
    let mut per: BTreeMap<usize, Vec<&EditLine>> = BTreeMap::new();
    for e in es {
        per.entry(e.layer).or_default().push(e);
    }
    let col = |f: &dyn Fn(&EditLine) -> f64| -> Vec<f64> {
        per.values()
            .map(|v| mean(&v.iter().map(|e| f(e)).collect::<Vec<_>>()))
            .collect()
    };
    LayerMeans {
        method,
        problem,
        layers: per.keys().copied().collect(),
        n: per.values().map(Vec::len).collect(),
        rewrite: col(&|e| e.scores.rewrite as f64),
        target_score: col(&|e| e.scores.target_score as f64),
        tracing_effect: col(&|e| e.tracing_effect as f64),
        correlation: per
            .values()
            .map(|v| {
                let x: Vec<f64> = v.iter().map(|e| e.tracing_effect as f64).collect();
                let y: Vec<f64> = v.iter().map(|e| e.scores.rewrite as f64).collect();
                pearson(&x, &y)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::study::score::HaseScores;

    fn edit(case_id: u64, layer: usize, tracing_effect: f32, rewrite: f32) -> EditLine {
        EditLine {
            case_id,
            method: StudyMethod::Rome,
            problem: EditProblem::ErrorInjection,
            layer,
            edited_layers: vec![layer],
            target: "Rome".into(),
            tracing_effect,
            subject_last_effect: 0.0,
            pre: Default::default(),
            post: Default::default(),
            scores: HaseScores {
                rewrite,
                ..Default::default()
            },
            essence_ppl_post: None,
            essence_score: None,
            seconds: 0.0,
            error: None,
        }
    }

    #[test]
    fn editing_at_the_tracing_peak_is_set_against_elsewhere_and_the_best_layer() {
        let edits = [
            // Case 1 peaks at layer 4, where its edit does worst.
            edit(1, 0, 0.1, 0.9),
            edit(1, 4, 0.7, 0.2),
            edit(1, 8, 0.3, 0.8),
            // Case 2 ties at layers 0 and 4: the lower one is its peak.
            edit(2, 0, 0.5, 0.6),
            edit(2, 4, 0.5, 0.4),
            // Case 3 has one edit: no comparison within it, but it counts for its layer.
            edit(3, 8, 0.9, 1.0),
        ];
        let refs: Vec<&EditLine> = edits.iter().collect();
        let p = peak_comparison(StudyMethod::Rome, EditProblem::ErrorInjection, &refs).unwrap();
        assert_eq!(p.cases, 2);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(p.at_peak, (0.2 + 0.6) / 2.0), "{p:?}");
        assert!(close(p.elsewhere, (0.9 + 0.8 + 0.4) / 3.0), "{p:?}");
        assert_eq!(p.best_layer, 8);
        assert!(close(p.at_best_layer, (0.8 + 1.0) / 2.0), "{p:?}");
        assert!(
            peak_comparison(StudyMethod::Rome, EditProblem::ErrorInjection, &refs[5..]).is_none()
        );
    }

    #[test]
    fn quantiles_interpolate_like_r() {
        // R: quantile(c(3, 1, 2, 10), .95) = 8.95; quantile(1:5, .5) = 3.
        assert!((quantile(&[3.0, 1.0, 2.0, 10.0], 0.95).unwrap() - 8.95).abs() < 1e-12);
        assert_eq!(quantile(&[5.0, 4.0, 3.0, 2.0, 1.0], 0.5), Some(3.0));
        assert_eq!(quantile(&[7.0], 0.95), Some(7.0));
        assert_eq!(quantile(&[f64::NAN], 0.95), None);
    }

    #[test]
    fn edits_at_large_raw_effects_are_flagged_against_the_cutoff() {
        // Two cases, 2 tokens × 3 layers each; raw effects are scores − low.
        let trace = |low: f32, scores: Vec<Vec<f32>>| CaseTrace {
            window: 5,
            tokens: vec!["a".into(), "b".into()],
            subject_range: [0, 1],
            high: 1.0,
            low,
            max_fraction_restored: vec![0.0; 3],
            subject_last_fraction: vec![0.0; 3],
            scores,
            other_windows: vec![],
        };
        let t1 = trace(0.1, vec![vec![0.1, 0.2, 0.1], vec![0.1, 0.9, 0.3]]);
        let t2 = trace(0.0, vec![vec![0.0, 0.0, 0.1], vec![0.0, 0.0, 0.2]]);
        // Effects: 0, .1, 0, 0, .8, .2 and 0, 0, .1, 0, 0, .2 → sorted, the 95th percentile
        // lies between .2 and .8: .2 + (11·.95 − 10)·.6 = .47.
        let traces: BTreeMap<u64, &CaseTrace> = [(1, &t1), (2, &t2)].into_iter().collect();
        let edits = [
            edit(1, 1, 0.0, 0.9),
            edit(1, 2, 0.0, 0.5),
            edit(2, 2, 0.0, 0.3),
        ];
        let by_cond: BTreeMap<(StudyMethod, EditProblem), Vec<&EditLine>> = [(
            (StudyMethod::Rome, EditProblem::ErrorInjection),
            edits.iter().collect(),
        )]
        .into_iter()
        .collect();
        let le = large_effect(&traces, &by_cond).unwrap();
        assert!((le.cutoff - 0.47).abs() < 1e-6, "{le:?}");
        let c = &le.comparisons[0];
        // Only case 1's layer 1 (max raw effect .8) is large.
        assert_eq!((c.large, c.rest), (1, 2));
        assert!((c.rewrite_large.unwrap() - 0.9).abs() < 1e-6);
        assert!((c.rewrite_rest.unwrap() - 0.4).abs() < 1e-6);
        assert!(large_effect(&BTreeMap::new(), &by_cond).is_none());
    }
}
