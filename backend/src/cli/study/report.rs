//! `loci study`'s report of an analysis: the chart, the JSON, or the tables of regressions,
//! per-layer means, peak-layer edits and large-effect edits.

use std::path::Path;

use anyhow::Result;
use loci_core::study::StudyAnalysis;

use crate::cli::print_json;
use crate::cli::render::save_plot;

/// An optional number to 3 decimals, or a dash.
fn fmt(v: Option<f64>) -> String {
    v.map_or("—".into(), |x| format!("{x:.3}"))
}

/// Draws the analysis to `plot` (if given), then prints it as JSON or as tables.
pub(super) fn report(an: &StudyAnalysis, plot: Option<&Path>, json: bool) -> Result<()> {
    if let Some(p) = plot {
        save_plot(p, &loci_core::plot::study_svg(an))?;
    }
    if json {
        return print_json(an);
    }
    print_conditions(an);
    print_layers(an);
    print_peak(an);
    print_large_effect(an);
    Ok(())
}

/// The counts, then one row per condition: its regressions' R² and the F-test's p.
fn print_conditions(an: &StudyAnalysis) {
    println!(
        "{} cases ({} studied), {} edits ({} failed){}",
        an.cases,
        an.cases_used,
        an.edits,
        an.failed_edits,
        an.window.map_or(String::new(), |w| format!(
            "; tracing effects of window {w}"
        ))
    );
    println!(
        "{:<6} {:<18} {:<12} {:>5} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "method", "problem", "score", "n", "R²layer", "R²trace", "R²both", "added", "p(F)"
    );
    for c in &an.conditions {
        println!(
            "{:<6} {:<18} {:<12} {:>5} {:>8} {:>8} {:>8} {:>8} {:>9}",
            c.method.name(),
            c.problem.name(),
            c.metric.name(),
            c.n,
            fmt(c.r2_layer),
            fmt(c.r2_trace),
            fmt(c.r2_both),
            fmt(c.added_by_trace),
            c.f_test
                .as_ref()
                .map_or("—".into(), |f| format!("{:.2e}", f.p)),
        );
    }
}

/// Per method and problem, each layer's edits, mean scores and tracing effect.
fn print_layers(an: &StudyAnalysis) {
    for m in &an.layers {
        println!(
            "\n{} {}: layer, edits, mean rewrite score, mean target score, mean tracing effect, r(rewrite, trace)",
            m.method.name(),
            m.problem.name()
        );
        for i in 0..m.layers.len() {
            println!(
                "  {:>3} {:>4} {:>7.3} {:>7.3} {:>7.3} {:>7}",
                m.layers[i],
                m.n[i],
                m.rewrite[i],
                m.target_score[i],
                m.tracing_effect[i],
                m.correlation[i]
                    .as_ref()
                    .map_or("—".into(), |c| format!("{:.2}", c.r))
            );
        }
    }
}

/// The mean rewrite score at each case's tracing peak and elsewhere.
fn print_peak(an: &StudyAnalysis) {
    if !an.peak.is_empty() {
        println!("\nEditing where tracing peaks (mean rewrite score):");
        for p in &an.peak {
            println!(
                "  {} {}: at each case's peak layer {:.3}, at its other layers {:.3}; \
                 best single layer {} {:.3} ({} cases)",
                p.method.name(),
                p.problem.name(),
                p.at_peak,
                p.elsewhere,
                p.best_layer,
                p.at_best_layer,
                p.cases
            );
        }
    }
}

/// The mean rewrite score of the edits with a large tracing effect, against the rest.
fn print_large_effect(an: &StudyAnalysis) {
    if let Some(le) = &an.large_effect {
        println!(
            "\nEdits where tracing's raw effect is large (above the 95th percentile, {:.3}), \
             mean rewrite score:",
            le.cutoff
        );
        for c in &le.comparisons {
            let score = |m: Option<f64>| m.map_or("—".into(), |v| format!("{v:.3}"));
            println!(
                "  {} {}: large {} ({} edits), the rest {} ({} edits)",
                c.method.name(),
                c.problem.name(),
                score(c.rewrite_large),
                c.large,
                score(c.rewrite_rest),
                c.rest
            );
        }
    }
}
