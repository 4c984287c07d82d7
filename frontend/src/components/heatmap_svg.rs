//! One causal-trace heatmap panel as SVG text: tokens down, restored layers across, subject
//! tokens starred, a colour legend with the probability scale, layer ticks, a tooltip on every
//! cell and an outline on the selected one. Self-contained (white ground, fonts named), so the
//! same text is shown and saved.

use std::fmt::Write;

use loci_core::plot::{display_token, kind_colour};
use loci_core::trace::{TraceKind, TraceResult};

/// A cell: (token, layer).
pub type Cell = (usize, usize);

pub fn kind_title(kind: TraceKind) -> &'static str {
    match kind {
        TraceKind::Hidden => "Restoring the hidden state",
        TraceKind::Mlp => "Restoring MLP outputs",
        TraceKind::Attn => "Restoring attention outputs",
    }
}

fn axis_label(kind: TraceKind, window: usize) -> String {
    match kind {
        TraceKind::Hidden => "single restored layer".into(),
        TraceKind::Mlp => format!("centre of {window} restored MLP layers"),
        TraceKind::Attn => format!("centre of {window} restored attention layers"),
    }
}

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A token as a label: newlines shown, blanks quoted, long ones cut.
pub fn token_label(t: &str) -> String {
    let t = display_token(t);
    if t.chars().count() > 18 {
        format!("{}…", t.chars().take(17).collect::<String>())
    } else {
        t
    }
}

/// The colour scale of a kind's grid: its low end (the corrupted run's p) and its maximum.
pub fn scale(r: &TraceResult, kind: TraceKind) -> (f32, f32) {
    let vmax = r
        .scores
        .get(&kind)
        .map_or(r.low, |g| g.iter().flatten().cloned().fold(r.low, f32::max));
    (r.low, vmax)
}

/// Every few layers, so that about a dozen ticks show.
fn tick_step(n_layer: usize) -> usize {
    [1, 2, 5, 10, 20]
        .into_iter()
        .find(|s| n_layer.div_ceil(*s) <= 12)
        .unwrap_or(25)
}

const ROW_H: f32 = 20.0;
const TOP: f32 = 48.0;
const FONT: &str = "system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', Arial, sans-serif";
const INK: &str = "#1d2230";

/// The panel of `kind` from `r`, with `selected` outlined.
pub fn panel_svg(r: &TraceResult, kind: TraceKind, selected: Option<Cell>) -> String {
    let empty = vec![];
    let grid = r.scores.get(&kind).unwrap_or(&empty);
    let n_tok = r.tokens.len();
    let n_layer = grid.first().map_or(0, Vec::len);
    let col_w = (240.0 / n_layer.max(1) as f32).clamp(6.0, 24.0);
    let label_w = 7.0
        * r.tokens
            .iter()
            .map(|t| token_label(t).chars().count() + 1)
            .max()
            .unwrap_or(4) as f32
        + 14.0;
    let (x0, grid_w, grid_h) = (label_w, col_w * n_layer as f32, ROW_H * n_tok as f32);
    let xc = x0 + grid_w + 16.0;
    let width = (xc + 60.0).max(240.0);
    let height = TOP + grid_h + 44.0;
    let (low, vmax) = scale(r, kind);
    let span = (vmax - low).max(1e-9);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="{FONT}" font-size="12" fill="{INK}"><rect width="100%" height="100%" fill="white"/>"#
    );
    let _ = write!(
        s,
        r##"<text x="8" y="18" font-size="14" font-weight="600">{}</text><text x="8" y="35" fill="#4a5060">p({}) with the state restored</text>"##,
        kind_title(kind),
        esc(r.answer.token.trim())
    );
    for (t, row) in grid.iter().enumerate() {
        let subj = t >= r.subject_range[0] && t < r.subject_range[1];
        let y = TOP + ROW_H * t as f32;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end"{}>{}{}</text>"#,
            x0 - 5.0,
            y + ROW_H * 0.7,
            if subj { r#" font-weight="700""# } else { "" },
            esc(&token_label(&r.tokens[t])),
            if subj { "*" } else { "" }
        );
        for (l, p) in row.iter().enumerate() {
            let _ = write!(
                s,
                r#"<rect x="{}" y="{y}" width="{}" height="{ROW_H}" fill="{}" data-t="{t}" data-l="{l}" data-p="{p}"><title>{} · layer {l} · p = {p:.4}</title></rect>"#,
                x0 + col_w * l as f32,
                col_w + 0.02,
                kind_colour(kind, (p - low) / span),
                esc(&token_label(&r.tokens[t])),
            );
        }
    }
    let _ = write!(
        s,
        r##"<rect x="{x0}" y="{TOP}" width="{grid_w}" height="{grid_h}" fill="none" stroke="#8a90a0" stroke-width="0.5"/>"##
    );
    if let Some((t, l)) = selected.filter(|(t, l)| *t < n_tok && *l < n_layer) {
        let _ = write!(
            s,
            r##"<rect x="{}" y="{}" width="{col_w}" height="{ROW_H}" fill="none" stroke="#000" stroke-width="2.5" pointer-events="none"/><rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#fff" stroke-width="1" pointer-events="none"/>"##,
            x0 + col_w * l as f32,
            TOP + ROW_H * t as f32,
            x0 + col_w * l as f32 + 1.75,
            TOP + ROW_H * t as f32 + 1.75,
            (col_w - 3.5).max(0.5),
            ROW_H - 3.5,
        );
    }
    axes(&mut s, kind, r.window, x0, col_w, n_layer, grid_h);
    legend(&mut s, kind, xc, grid_h, low, vmax);
    s.push_str("</svg>");
    s
}

fn axes(s: &mut String, kind: TraceKind, window: usize, x0: f32, col_w: f32, n: usize, h: f32) {
    let yb = TOP + h;
    for l in (0..n).step_by(tick_step(n)) {
        let x = x0 + col_w * (l as f32 + 0.5);
        let _ = write!(
            s,
            r##"<line x1="{x}" x2="{x}" y1="{yb}" y2="{}" stroke="#4a5060"/><text x="{x}" y="{}" text-anchor="middle">{l}</text>"##,
            yb + 4.0,
            yb + 17.0
        );
    }
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#4a5060">{}</text>"##,
        x0 + col_w * n as f32 / 2.0,
        yb + 36.0,
        esc(&axis_label(kind, window))
    );
}

fn legend(s: &mut String, kind: TraceKind, xc: f32, h: f32, low: f32, vmax: f32) {
    let id = format!("ramp-{}", kind.name());
    let _ = write!(
        s,
        r##"<defs><linearGradient id="{id}" x1="0" y1="1" x2="0" y2="0"><stop offset="0" stop-color="{}"/><stop offset="1" stop-color="{}"/></linearGradient></defs><rect x="{xc}" y="{TOP}" width="12" height="{h}" fill="url(#{id})" stroke="#8a90a0" stroke-width="0.5"/>"##,
        kind_colour(kind, 0.0),
        kind_colour(kind, 1.0)
    );
    for (f, v) in [(1.0, vmax), (0.5, (low + vmax) / 2.0), (0.0, low)] {
        let y = TOP + h * (1.0 - f);
        let _ = write!(
            s,
            r##"<line x1="{}" x2="{}" y1="{y}" y2="{y}" stroke="#4a5060"/><text x="{}" y="{}">{v:.3}</text>"##,
            xc + 12.0,
            xc + 16.0,
            xc + 18.0,
            y + 4.0
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ticks_stay_about_a_dozen() {
        assert_eq!(super::tick_step(4), 1);
        assert_eq!(super::tick_step(12), 1);
        assert_eq!(super::tick_step(24), 2);
        assert_eq!(super::tick_step(48), 5);
    }

    #[test]
    fn labels_are_readable() {
        assert_eq!(super::token_label("\n"), "\\n");
        assert_eq!(super::token_label(" "), "\" \"");
        assert_eq!(super::token_label(" Tower"), " Tower");
        assert_eq!(super::token_label(&"x".repeat(30)).chars().count(), 18);
    }
}
