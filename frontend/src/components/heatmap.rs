//! The trace's heatmaps, one panel per restored kind side by side (as in ROME's figure 1),
//! each with a read-out of the cell under the pointer, tapped, or picked with the arrow keys,
//! and SVG and PNG downloads. The area keeps its size while rows stream in.

use leptos::prelude::*;
use loci_core::trace::{TraceKind, TraceResult};
use wasm_bindgen::JsCast;

use super::heatmap_svg::{kind_title, panel_svg, token_label, Cell};
use super::save::SaveButtons;

/// The heatmaps of `trace` (a placeholder of the same height before its first header).
#[component]
pub fn Heatmaps(#[prop(into)] trace: Signal<Option<TraceResult>>) -> impl IntoView {
    let kinds = Memo::new(move |_| {
        trace.with(|t| {
            t.as_ref()
                .map(|t| t.scores.keys().copied().collect::<Vec<_>>())
                .unwrap_or_default()
        })
    });
    view! {
        <div class="heatmap">
            {move || {
                let k = kinds.get();
                if k.is_empty() {
                    view! { <p class="placeholder">"The heatmaps appear here as the trace's rows come in."</p> }.into_any()
                } else {
                    k.into_iter().map(|kind| view! { <Panel trace=trace kind=kind /> }).collect_view().into_any()
                }
            }}
        </div>
    }
}

/// The (token, layer) cell an event's target is, if it is one.
fn cell_of(ev: &web_sys::Event) -> Option<Cell> {
    let el: web_sys::Element = ev.target()?.dyn_into().ok()?;
    let t = el.get_attribute("data-t")?.parse().ok()?;
    let l = el.get_attribute("data-l")?.parse().ok()?;
    Some((t, l))
}

/// The cell an arrow key moves to in an `n_tok` × `n_layer` grid.
fn step(key: &str, at: Option<Cell>, n_tok: usize, n_layer: usize) -> Option<Cell> {
    let (t, l) = at.unwrap_or((0, 0));
    let last = |n: usize| n.saturating_sub(1);
    Some(match key {
        "ArrowUp" => (t.saturating_sub(1), l),
        "ArrowDown" => ((t + 1).min(last(n_tok)), l),
        "ArrowLeft" => (t, l.saturating_sub(1)),
        "ArrowRight" => (t, (l + 1).min(last(n_layer))),
        "Home" => (t, 0),
        "End" => (t, last(n_layer)),
        _ => return None,
    })
}

fn readout(r: &TraceResult, kind: TraceKind, (t, l): Cell) -> Option<String> {
    let p = r.scores.get(&kind)?.get(t)?.get(l)?;
    let subj = t >= r.subject_range[0] && t < r.subject_range[1];
    Some(format!(
        "{} {}{} · layer {l} · p({}) = {p:.4}",
        kind.name(),
        token_label(&r.tokens[t]),
        if subj { " (subject)" } else { "" },
        r.answer.token.trim(),
    ))
}

#[component]
fn Panel(trace: Signal<Option<TraceResult>>, kind: TraceKind) -> impl IntoView {
    let selected = RwSignal::new(None::<Cell>);
    let shown = Memo::new(move |_| {
        trace.with(|t| {
            t.as_ref()
                .map(|t| panel_svg(t, kind, selected.get()))
                .unwrap_or_default()
        })
    });
    let plain = Signal::derive(move || {
        trace.with(|t| {
            t.as_ref()
                .map(|t| panel_svg(t, kind, None))
                .unwrap_or_default()
        })
    });
    let line = move || {
        let text = selected
            .get()
            .and_then(|c| trace.with(|t| t.as_ref().and_then(|t| readout(t, kind, c))));
        text.unwrap_or_else(|| "Point at, tap or arrow-key to a cell to read it.".into())
    };
    let on_key = move |ev: web_sys::KeyboardEvent| {
        let dims = trace.with_untracked(|t| {
            t.as_ref().map(|t| {
                let g = t.scores.get(&kind);
                (
                    t.tokens.len(),
                    g.and_then(|g| g.first()).map_or(0, Vec::len),
                )
            })
        });
        let Some((n_tok, n_layer)) = dims else { return };
        if let Some(c) = step(&ev.key(), selected.get_untracked(), n_tok, n_layer) {
            ev.prevent_default();
            selected.set(Some(c));
        }
    };
    let title = kind_title(kind);
    let readout_id = format!("readout-{}", kind.name());
    view! {
        <figure class="panel" data-kind=kind.name()>
            <div class="plot" tabindex="0" role="group"
                aria-label=format!("{title}: heatmap; arrow keys pick a cell") aria-describedby=readout_id.clone()
                on:mouseover=move |ev| if let Some(c) = cell_of(&ev) { selected.set(Some(c)) }
                on:click=move |ev| if let Some(c) = cell_of(&ev) { selected.set(Some(c)) }
                on:keydown=on_key
                inner_html=move || shown.get()></div>
            <figcaption>
                <span class="readout" id=readout_id aria-live="polite">{line}</span>
                <SaveButtons svg=plain stem=format!("trace-{}", kind.name()) what=format!("the {} heatmap", kind.name()) />
            </figcaption>
        </figure>
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn arrow_keys_stay_in_the_grid() {
        use super::step;
        assert_eq!(step("ArrowUp", None, 5, 4), Some((0, 0)));
        assert_eq!(step("ArrowDown", Some((4, 1)), 5, 4), Some((4, 1)));
        assert_eq!(step("ArrowRight", Some((2, 3)), 5, 4), Some((2, 3)));
        assert_eq!(step("End", Some((2, 0)), 5, 4), Some((2, 3)));
        assert_eq!(step("a", Some((2, 0)), 5, 4), None);
    }
}
