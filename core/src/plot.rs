//! Plots as SVG text (no I/O): tracing heatmaps like the paper's and per-layer line charts.
//! The CLI writes them (and rasterises PNGs); the server and the app show them as they are.

use std::fmt::Write;

use crate::eval::SequencePoint;
use crate::study::analysis::{Condition, Metric, StudyAnalysis};
use crate::trace::{AggregateCurves, TraceKind, TraceMethod, TraceResult};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The colour ramp of a kind (purple hidden, green MLP, red attention), `f` in [0, 1].
pub fn kind_colour(kind: TraceKind, f: f32) -> String {
    let f = f.clamp(0.0, 1.0);
    let dark = match kind {
        TraceKind::Hidden => (84, 39, 143),
        TraceKind::Mlp => (0, 109, 44),
        TraceKind::Attn => (165, 15, 21),
    };
    let mix = |d: u8| (255.0 + (d as f32 - 255.0) * f).round() as u8;
    format!("#{:02x}{:02x}{:02x}", mix(dark.0), mix(dark.1), mix(dark.2))
}

fn kind_title(kind: TraceKind, window: usize) -> (String, String) {
    match kind {
        TraceKind::Hidden => (
            "Restoring the hidden state".into(),
            "single restored layer".into(),
        ),
        TraceKind::Mlp => (
            "Restoring MLP outputs".into(),
            format!("centre of {window} restored MLP layers"),
        ),
        TraceKind::Attn => (
            "Restoring attention outputs".into(),
            format!("centre of {window} restored attention layers"),
        ),
    }
}

/// A token as a label: newlines shown as `\n`, a blank token quoted.
pub fn display_token(t: &str) -> String {
    let t = t.replace('\n', "\\n");
    if t.trim().is_empty() {
        format!("{t:?}")
    } else {
        t
    }
}

const CELL: f32 = 14.0;

/// Sizes shared by every panel of a tracing heatmap.
struct HeatmapLayout {
    /// Tokens: rows of cells.
    n_tok: usize,
    /// Layers: columns of cells.
    n_layer: usize,
    /// Room left of the cells for the longest token label.
    label_w: f32,
    /// Width of one panel, its labels included.
    panel_w: f32,
    /// Height of every panel (and of the whole plot).
    panel_h: f32,
}

impl HeatmapLayout {
    /// The layout that fits `r`'s tokens, layers and labels.
    fn of(r: &TraceResult) -> Self {
        let n_tok = r.tokens.len();
        let n_layer = r
            .scores
            .values()
            .next()
            .map_or(0, |g| g.first().map_or(0, Vec::len));
        let label_w = 8.0
            * r.tokens
                .iter()
                .map(|t| display_token(t).chars().count() + 2)
                .max()
                .unwrap_or(4) as f32
            + 10.0;
        // Wide enough for the titles and axis labels even with few layers.
        let panel_w = (label_w + CELL * n_layer as f32 + 90.0).max(label_w + 330.0);
        let panel_h = CELL * n_tok as f32 + 90.0;
        Self {
            n_tok,
            n_layer,
            label_w,
            panel_w,
            panel_h,
        }
    }
}

/// One kind's heatmap panel: where its cells start and how its colours scale.
struct HeatmapPanel {
    /// The traced kind, which picks the colour ramp.
    kind: TraceKind,
    /// Left edge of the cells.
    x0: f32,
    /// Top edge of the cells.
    y0: f32,
    /// The grid's maximum: the darkest colour.
    vmax: f32,
    /// From `low` to `vmax`, never zero.
    span: f32,
}

impl HeatmapPanel {
    /// Writes the title, the token rows of cells, the layer axis and the colour bar.
    fn write(&self, s: &mut String, r: &TraceResult, lay: &HeatmapLayout, grid: &[Vec<f32>]) {
        let (title, xlabel) = match r.method {
            TraceMethod::Neurons => (
                "Knowledge neurons: p(answer) their attributions carry".into(),
                "layer of the MLP neurons (integrated gradients)".into(),
            ),
            _ => kind_title(self.kind, r.window),
        };
        let _ = write!(
            s,
            r#"<text x="{}" y="16" font-size="12" font-weight="bold">{}</text>"#,
            self.x0,
            esc(&title)
        );
        self.write_rows(s, r, grid);
        self.write_layer_axis(s, lay, &xlabel);
        self.write_colour_bar(s, r, lay);
    }

    /// One row per token: its label (subject tokens starred and bold), then a cell per layer.
    fn write_rows(&self, s: &mut String, r: &TraceResult, grid: &[Vec<f32>]) {
        let (x0, y0, span) = (self.x0, self.y0, self.span);
        for (t, row) in grid.iter().enumerate() {
            let subj = t >= r.subject_range[0] && t < r.subject_range[1];
            let label = format!(
                "{}{}",
                display_token(&r.tokens[t]),
                if subj { "*" } else { "" }
            );
            let y = y0 + CELL * t as f32;
            let _ = write!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end"{}>{}</text>"#,
                x0 - 4.0,
                y + CELL * 0.75,
                if subj { r#" font-weight="bold""# } else { "" },
                esc(&label)
            );
            for (l, p) in row.iter().enumerate() {
                let _ = write!(
                    s,
                    r#"<rect x="{}" y="{y}" width="{CELL}" height="{CELL}" fill="{}" data-t="{t}" data-l="{l}"><title>{} · layer {l} · p = {p:.4}</title></rect>"#,
                    x0 + CELL * l as f32,
                    kind_colour(self.kind, (p - r.low) / span),
                    esc(&display_token(&r.tokens[t])),
                );
            }
        }
    }

    /// Layer numbers (every fifth) under the cells, and the axis label under them.
    fn write_layer_axis(&self, s: &mut String, lay: &HeatmapLayout, xlabel: &str) {
        let (x0, y0, n_tok, n_layer) = (self.x0, self.y0, lay.n_tok, lay.n_layer);
        let yb = y0 + CELL * n_tok as f32;
        for l in (0..n_layer).step_by(5) {
            let _ = write!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{l}</text>"#,
                x0 + CELL * (l as f32 + 0.5),
                yb + 13.0
            );
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x0 + CELL * n_layer as f32 / 2.0,
            yb + 30.0,
            esc(xlabel)
        );
    }

    /// The colour bar right of the cells, from `vmax` (top) down to `low`, titled p(answer).
    fn write_colour_bar(&self, s: &mut String, r: &TraceResult, lay: &HeatmapLayout) {
        let (x0, y0, vmax, n_tok, n_layer) = (self.x0, self.y0, self.vmax, lay.n_tok, lay.n_layer);
        let xc = x0 + CELL * n_layer as f32 + 12.0;
        let steps = 20;
        let h = CELL * n_tok as f32;
        for k in 0..steps {
            let f = 1.0 - k as f32 / steps as f32;
            let _ = write!(
                s,
                r#"<rect x="{xc}" y="{}" width="10" height="{}" fill="{}"/>"#,
                y0 + h * k as f32 / steps as f32,
                h / steps as f32 + 0.5,
                kind_colour(self.kind, f)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{}">{vmax:.3}</text><text x="{}" y="{}">{:.3}</text>"#,
            xc + 13.0,
            y0 + 9.0,
            xc + 13.0,
            y0 + h,
            r.low
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="start">p({})</text>"#,
            xc,
            y0 - 6.0,
            esc(r.answer.token.trim())
        );
    }
}

/// One heatmap panel per traced kind: tokens down, layers across, subject tokens starred, colour
/// from `low` (white) to the grid's maximum, a colour bar, and a tooltip on every cell.
pub fn trace_heatmap_svg(r: &TraceResult) -> String {
    let lay = HeatmapLayout::of(r);
    let panel_h = lay.panel_h;
    let width = lay.panel_w * r.scores.len() as f32;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{panel_h}" viewBox="0 0 {width} {panel_h}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>"#
    );
    for (i, (kind, grid)) in r.scores.iter().enumerate() {
        let vmax = grid.iter().flatten().cloned().fold(r.low, f32::max);
        let panel = HeatmapPanel {
            kind: *kind,
            x0: lay.panel_w * i as f32 + lay.label_w,
            y0: 30.0,
            vmax,
            span: (vmax - r.low).max(1e-9),
        };
        panel.write(&mut s, r, &lay, grid);
    }
    s.push_str("</svg>");
    s
}

/// A named line: one value per layer.
pub type Series = (String, Vec<f32>);
/// A titled panel of lines.
pub type Panel = (String, Vec<Series>);

/// Per-layer curves (one panel per kind), e.g. average indirect effects.
pub fn layer_curves_svg(title: &str, panels: &[Panel]) -> String {
    let n = panels
        .iter()
        .flat_map(|p| p.1.iter().map(|s| s.1.len()))
        .max()
        .unwrap_or(0);
    curves_svg(title, "layer", &(0..n).collect::<Vec<_>>(), 5, panels)
}

/// An axis bound in four or five characters: 0.123, 12.3, 123.
fn axis_value(v: f32) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.3}"),
    }
}

/// The line colours of `curves_svg`, in series order (repeating past seven).
const CURVE_COLOURS: [&str; 7] = [
    "#54278f", "#006d2c", "#a50f15", "#08519c", "#d94801", "#525252", "#c51b8a",
];

/// A long sequential run's chart: each headline score of the cases edited so far, the change of
/// held-out perplexity and of the largest weight norm since the start (%), and the known facts
/// answered top-1 (%), against the cases edited — one line per method, through its own points
/// (methods with other batches check in at other numbers of cases); of points repeated (a
/// continued run's), the last is drawn.
pub fn sequence_svg(title: &str, points: &[SequencePoint]) -> String {
    let mut methods: Vec<(&str, Vec<&SequencePoint>)> = vec![];
    for p in points {
        match methods.iter_mut().find(|m| m.0 == p.method) {
            Some(m) => {
                m.1.retain(|q| q.cases_done != p.cases_done);
                m.1.push(p)
            }
            None => methods.push((&p.method, vec![p])),
        }
    }
    for m in methods.iter_mut() {
        m.1.sort_by_key(|p| p.cases_done);
    }
    let mut xs: Vec<usize> = points.iter().map(|p| p.cases_done).collect();
    xs.sort_unstable();
    xs.dedup();
    let names: Vec<String> = points
        .iter()
        .find(|p| !p.headline.is_empty())
        .map_or(vec![], |p| p.headline.iter().map(|h| h.0.clone()).collect());
    // Each method's value at each x (NaN, left out of its line, where it has no point).
    let panel = |name: String, f: &dyn Fn(&SequencePoint, &SequencePoint) -> f32| -> Panel {
        let series = methods
            .iter()
            .map(|(m, ps)| {
                let at = |x: usize| ps.iter().find(|p| p.cases_done == x);
                let ys = xs.iter().map(|&x| at(x).map_or(f32::NAN, |p| f(ps[0], p)));
                (m.to_string(), ys.collect())
            })
            .collect();
        (name, series)
    };
    let mut panels: Vec<Panel> = names
        .iter()
        .map(|n| {
            panel(format!("{n} (edited so far)"), &|_, p| {
                p.headline
                    .iter()
                    .find(|h| &h.0 == n)
                    .map_or(f32::NAN, |h| h.1)
            })
        })
        .collect();
    let change = |now: Option<f32>, start: Option<f32>| match (now, start) {
        (Some(n), Some(s)) => 100.0 * (n / s - 1.0),
        _ => f32::NAN,
    };
    if points.iter().any(|p| p.health.perplexity.is_some()) {
        panels.push(panel("perplexity change (%)".into(), &|s, p| {
            change(p.health.perplexity, s.health.perplexity)
        }));
    }
    if points.iter().any(|p| p.health.known_top1.is_some()) {
        panels.push(panel("known facts top-1 (%)".into(), &|_, p| {
            p.health.known_top1.unwrap_or(f32::NAN)
        }));
    }
    panels.push(panel("weight norm growth (%)".into(), &|_, p| {
        100.0 * (p.health.max_growth() - 1.0)
    }));
    curves_svg(title, "cases edited", &xs, (xs.len() / 6).max(1), &panels)
}

/// Curves over `xs` (one value per x, labelled every `tick_step` points), one panel each.
pub fn curves_svg(
    title: &str,
    x_label: &str,
    xs: &[usize],
    tick_step: usize,
    panels: &[Panel],
) -> String {
    let (pw, ph, m) = (320.0f32, 220.0f32, 40.0f32);
    // The legend stands right of each panel, clear of the curves.
    let longest = panels
        .iter()
        .flat_map(|p| p.1.iter().map(|s| s.0.chars().count()))
        .max()
        .unwrap_or(0);
    let legend = 6.5 * longest as f32 + 12.0;
    let width = (pw + legend) * panels.len().max(1) as f32;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" viewBox="0 0 {width} {h}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="8" y="16" font-size="13" font-weight="bold">{}</text>"#,
        esc(title),
        h = ph + 30.0,
    );
    for (i, (name, series)) in panels.iter().enumerate() {
        let x0 = (pw + legend) * i as f32 + m;
        let (w, h, y0) = (pw - m - 10.0, ph - 60.0, 50.0);
        let panel = CurvePanel::fit(xs, series, x0, w, h, y0);
        panel.write_axes(&mut s, name, x_label, tick_step);
        panel.write_lines(&mut s, series);
    }
    s.push_str("</svg>");
    s
}

/// The x value of point `l`: `xs[l]`, or past the end of `xs` the index itself.
fn x_value(xs: &[usize], l: usize) -> f32 {
    xs.get(l).copied().unwrap_or(l) as f32
}

/// One panel of `curves_svg`: its plot area and the scales that map points into it.
struct CurvePanel<'a> {
    /// The x value of each point (past its end, the point's index).
    xs: &'a [usize],
    /// Left edge of the plot area.
    x0: f32,
    /// Top edge of the plot area.
    y0: f32,
    /// Width of the plot area.
    w: f32,
    /// Height of the plot area.
    h: f32,
    /// The value at the bottom edge (never above 0).
    lo: f32,
    /// The value at the top edge.
    hi: f32,
    /// The x value at the left edge.
    first: f32,
    /// The x range the width spans (at least 1).
    span: f32,
}

impl<'a> CurvePanel<'a> {
    /// Scales that fit every value of `series` into the area at (`x0`, `y0`) sized `w` × `h`.
    fn fit(xs: &'a [usize], series: &[Series], x0: f32, w: f32, h: f32, y0: f32) -> Self {
        let n = series.iter().map(|s| s.1.len()).max().unwrap_or(0).max(2);
        let lo = series
            .iter()
            .flat_map(|s| s.1.iter())
            .cloned()
            .fold(0f32, f32::min);
        let hi = series
            .iter()
            .flat_map(|s| s.1.iter())
            .cloned()
            .fold(lo + 1e-6, f32::max);
        let at = |l: usize| x_value(xs, l);
        let (first, span) = (at(0), (at(n - 1) - at(0)).max(1.0));
        Self {
            xs,
            x0,
            y0,
            w,
            h,
            lo,
            hi,
            first,
            span,
        }
    }

    /// Point `l` at its x value, spread over the panel's width.
    fn px(&self, l: usize) -> f32 {
        self.x0 + self.w * (x_value(self.xs, l) - self.first) / self.span
    }

    /// The height of value `v`.
    fn py(&self, v: f32) -> f32 {
        self.y0 + self.h * (1.0 - (v - self.lo) / (self.hi - self.lo))
    }

    /// The panel's title and frame, its value bounds, x ticks every `tick_step`, and x label.
    fn write_axes(&self, s: &mut String, name: &str, x_label: &str, tick_step: usize) {
        let (x0, y0, w, h) = (self.x0, self.y0, self.w, self.h);
        let _ = write!(
            s,
            r##"<text x="{x0}" y="38" font-weight="bold">{}</text><rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999999"/>"##,
            esc(name)
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><text x="{}" y="{}" text-anchor="end">{}</text>"#,
            x0 - 3.0,
            y0 + 8.0,
            axis_value(self.hi),
            x0 - 3.0,
            y0 + h,
            axis_value(self.lo)
        );
        for (l, x) in self.xs.iter().enumerate().step_by(tick_step.max(1)) {
            let _ = write!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{x}</text>"#,
                self.px(l),
                y0 + h + 13.0
            );
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x0 + w / 2.0,
            y0 + h + 27.0,
            esc(x_label)
        );
    }

    /// Each series as a coloured line, with its name in the legend right of the panel.
    fn write_lines(&self, s: &mut String, series: &[Series]) {
        let (x0, y0, w) = (self.x0, self.y0, self.w);
        for (k, (label, ys)) in series.iter().enumerate() {
            let c = CURVE_COLOURS[k % CURVE_COLOURS.len()];
            let pts: Vec<String> = ys
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(l, v)| format!("{:.1},{:.1}", self.px(l), self.py(*v)))
                .collect();
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
            let _ = write!(
                s,
                r#"<text x="{}" y="{}" fill="{c}">{}</text>"#,
                x0 + w + 8.0,
                y0 + 12.0 + 14.0 * k as f32,
                esc(label)
            );
        }
    }
}

/// The paper's summary: average indirect effect per layer, one panel per kind.
pub fn aggregate_svg(a: &AggregateCurves) -> String {
    let panels: Vec<Panel> = a
        .last_token
        .keys()
        .map(|k| {
            (
                format!("{} (AIE)", k.name()),
                vec![
                    (
                        "last subject token".to_string(),
                        a.last_subject_token[k].clone(),
                    ),
                    ("last token".to_string(), a.last_token[k].clone()),
                ],
            )
        })
        .collect();
    layer_curves_svg(
        &format!(
            "Average indirect effect over {} facts (ATE {:.3})",
            a.n_facts, a.average_total_effect
        ),
        &panels,
    )
}

/// Hase et al.'s per-layer tracing effect of one trace.
pub fn tracing_effect_svg(r: &TraceResult) -> String {
    let panels: Vec<_> = r
        .tracing_effect
        .iter()
        .map(|(k, v)| {
            (
                k.name().to_string(),
                vec![
                    ("max over tokens".to_string(), v.clone()),
                    (
                        "last subject token".to_string(),
                        r.tracing_effect_subject_last[k].clone(),
                    ),
                ],
            )
        })
        .collect();
    layer_curves_svg("Tracing effect (fraction restored)", &panels)
}

/// Hase et al.'s summary of a study: left, the variance in rewrite score explained by the
/// layer and what the tracing effect adds (stacked bars per method and problem); right, the
/// mean rewrite score per edited layer beside the mean tracing effect.
pub fn study_svg(a: &StudyAnalysis) -> String {
    let conds: Vec<_> = a
        .conditions
        .iter()
        .filter(|c| c.metric == Metric::Rewrite)
        .collect();
    let (lw, label_w) = (430.0f32, 190.0f32);
    let plot_h = (conds.len().max(1) as f32 * (STUDY_BAR_H + 6.0)).max(220.0);
    // The right panel's legend: a row under its axis for the tracing effect and each line.
    let legend_rows = a.layers.len() + 1;
    let (rw, h) = (
        420.0f32,
        (plot_h + 110.0).max(plot_h + 112.0 + 14.0 * (legend_rows - 1) as f32),
    );
    let width = lw + rw;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" viewBox="0 0 {width} {h}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/><text x="8" y="18" font-size="13" font-weight="bold">Does localization inform editing? {} cases, {} edits</text>"#,
        a.cases_used, a.edits
    );
    // Left: R² bars.
    let (x0, y0, bw) = (label_w, 60.0f32, lw - label_w - 40.0);
    write_r2_bars(&mut s, &conds, x0, y0, bw, plot_h);
    write_r2_legend(&mut s, x0, y0, bw, plot_h);
    // Right: per-layer means.
    let panel = LayerMeansPanel::fit(a, lw + 30.0, 60.0f32, rw - 60.0, plot_h);
    panel.write_axes(&mut s);
    panel.write_tracing_effect(&mut s, a);
    panel.write_rewrite_lines(&mut s, a);
    s.push_str("</svg>");
    s
}

/// Height of one condition's bar in `study_svg`'s left panel.
const STUDY_BAR_H: f32 = 18.0;

/// The line colours of `study_svg`'s right panel, in method-and-problem order.
const STUDY_COLOURS: [&str; 7] = [
    "#08519c", "#d94801", "#006d2c", "#a50f15", "#54278f", "#636363", "#e7298a",
];

/// The left panel of `study_svg`: its title and frame, then one labelled stacked bar per
/// condition (R² of the layer, then what the tracing effect adds), `bw` wide at 1.
fn write_r2_bars(s: &mut String, conds: &[&Condition], x0: f32, y0: f32, bw: f32, plot_h: f32) {
    let bar_h = STUDY_BAR_H;
    let _ = write!(
        s,
        r##"<text x="8" y="42" font-weight="bold">Rewrite score variance explained (R²)</text><rect x="{x0}" y="{y0}" width="{bw}" height="{plot_h}" fill="none" stroke="#999999"/>"##
    );
    for (i, c) in conds.iter().enumerate() {
        let y = y0 + 4.0 + i as f32 * (bar_h + 6.0);
        let layer = c.r2_layer.unwrap_or(0.0).clamp(0.0, 1.0) as f32;
        let added = (c.added_by_trace.unwrap_or(0.0).max(0.0) as f32).min(1.0 - layer);
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{} · {}</text><rect x="{x0}" y="{y}" width="{}" height="{bar_h}" fill="#6baed6"/><rect x="{}" y="{y}" width="{}" height="{bar_h}" fill="#fd8d3c"/><text x="{}" y="{}">{} {}</text>"##,
            x0 - 4.0,
            y + 13.0,
            c.method.name(),
            esc(c.problem.name()),
            bw * layer,
            x0 + bw * layer,
            bw * added,
            x0 + 3.0,
            y + 13.0,
            // "—": the scores do not vary, or too few points per layer to fit tracing on.
            c.r2_layer.map_or("—".into(), |v| format!("{v:.3}")),
            c.added_by_trace.map_or("+—".into(), |v| format!("{v:+.3}")),
        );
    }
}

/// The left panel's key (layer, + tracing effect) and its 0 and 1 marks, under the bars.
fn write_r2_legend(s: &mut String, x0: f32, y0: f32, bw: f32, plot_h: f32) {
    let ly = y0 + plot_h + 18.0;
    let _ = write!(
        s,
        r##"<rect x="{x0}" y="{}" width="10" height="10" fill="#6baed6"/><text x="{}" y="{ly}">layer</text><rect x="{}" y="{}" width="10" height="10" fill="#fd8d3c"/><text x="{}" y="{ly}">+ tracing effect</text><text x="{x0}" y="{}">0</text><text x="{}" y="{}" text-anchor="end">1</text>"##,
        ly - 9.0,
        x0 + 14.0,
        x0 + 60.0,
        ly - 9.0,
        x0 + 74.0,
        ly + 16.0,
        x0 + bw,
        ly + 16.0,
    );
}

/// The right panel of `study_svg`: its plot area and the layer count its x axis spans.
struct LayerMeansPanel {
    /// Left edge of the plot area.
    px0: f32,
    /// Top edge of the plot area.
    py0: f32,
    /// Width of the plot area.
    pw: f32,
    /// Height of the plot area.
    ph: f32,
    /// Layers on the x axis (at least 2): every traced and every edited layer.
    n_layer: usize,
}

impl LayerMeansPanel {
    /// The panel at (`px0`, `py0`) sized `pw` × `ph`, spanning every layer `a` traced or edited.
    fn fit(a: &StudyAnalysis, px0: f32, py0: f32, pw: f32, ph: f32) -> Self {
        let n_layer = a
            .mean_tracing_effect
            .len()
            .max(
                a.layers
                    .iter()
                    .flat_map(|m| m.layers.iter().map(|l| l + 1))
                    .max()
                    .unwrap_or(2),
            )
            .max(2);
        Self {
            px0,
            py0,
            pw,
            ph,
            n_layer,
        }
    }

    /// The x position of layer `l`.
    fn px(&self, l: f32) -> f32 {
        self.px0 + self.pw * l / (self.n_layer - 1) as f32
    }

    /// The y position of `v`, clamped to [0, 1].
    fn py(&self, v: f64) -> f32 {
        self.py0 + self.ph * (1.0 - v.clamp(0.0, 1.0) as f32)
    }

    /// The y position of legend row `k`, under the x axis.
    fn legend_y(&self, k: usize) -> f32 {
        self.py0 + self.ph + 44.0 + 14.0 * k as f32
    }

    /// The panel's title and frame, its 1 and 0 marks, layer ticks and the x label.
    fn write_axes(&self, s: &mut String) {
        let (px0, py0, pw, ph, n_layer) = (self.px0, self.py0, self.pw, self.ph, self.n_layer);
        let _ = write!(
            s,
            r##"<text x="{px0}" y="42" font-weight="bold">Mean rewrite score and tracing effect by layer</text><rect x="{px0}" y="{py0}" width="{pw}" height="{ph}" fill="none" stroke="#999999"/><text x="{}" y="{}" text-anchor="end">1</text><text x="{}" y="{}" text-anchor="end">0</text>"##,
            px0 - 3.0,
            py0 + 8.0,
            px0 - 3.0,
            py0 + ph
        );
        for l in (0..n_layer).step_by(5.max(n_layer / 6)) {
            let _ = write!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{l}</text>"#,
                self.px(l as f32),
                py0 + ph + 13.0
            );
        }
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">layer</text>"#,
            px0 + pw / 2.0,
            py0 + ph + 27.0
        );
    }

    /// The mean tracing effect as a dashed line, with the first legend row.
    fn write_tracing_effect(&self, s: &mut String, a: &StudyAnalysis) {
        let px0 = self.px0;
        let trace_pts: Vec<String> = a
            .mean_tracing_effect
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(l, v)| format!("{:.1},{:.1}", self.px(l as f32), self.py(*v)))
            .collect();
        let window = a.window.map_or(String::new(), |w| format!(", window {w}"));
        let _ = write!(
            s,
            r##"<polyline fill="none" stroke="#000000" stroke-dasharray="4 3" stroke-width="1.5" points="{}"/><line x1="{px0}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#000000" stroke-dasharray="4 3" stroke-width="1.5"/><text x="{}" y="{}">mean tracing effect (MLP{window})</text>"##,
            trace_pts.join(" "),
            px0 + 18.0,
            px0 + 24.0,
            self.legend_y(0),
            y = self.legend_y(0) - 4.0,
        );
    }

    /// Each method and problem's mean rewrite score per edited layer (a line with a dot per
    /// layer), with a legend row each.
    fn write_rewrite_lines(&self, s: &mut String, a: &StudyAnalysis) {
        let px0 = self.px0;
        for (k, m) in a.layers.iter().enumerate() {
            let c = STUDY_COLOURS[k % STUDY_COLOURS.len()];
            let pts: Vec<(f32, f32)> = m
                .layers
                .iter()
                .zip(&m.rewrite)
                .filter(|(_, v)| v.is_finite())
                .map(|(l, v)| (self.px(*l as f32), self.py(*v)))
                .collect();
            let line: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                line.join(" ")
            );
            for (x, y) in &pts {
                let _ = write!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="{c}"/>"#);
            }
            let _ = write!(
                s,
                r#"<line x1="{px0}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}" fill="{c}">{} · {}: mean rewrite score</text>"#,
                px0 + 18.0,
                px0 + 24.0,
                self.legend_y(k + 1),
                m.method.name(),
                esc(m.problem.name()),
                y = self.legend_y(k + 1) - 4.0,
            );
        }
    }
}
