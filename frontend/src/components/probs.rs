//! Probability tables: the next-token prediction (top k with bars) and the before → after
//! probabilities of an edit's new and true targets on its rewrite, paraphrase and
//! neighbourhood prompts.

use leptos::prelude::*;
use loci_core::edit::{EditSide, PromptProbs, RewriteRequest};
use loci_core::Prediction;

/// A probability (or a difference of two): four decimals, or scientific when tiny.
pub fn prob(x: f32) -> String {
    if x.abs() >= 1e-3 || x == 0.0 {
        format!("{x:.4}")
    } else {
        format!("{x:.1e}")
    }
}

/// The top next tokens, with bars.
#[component]
pub fn PredictionTable(p: Prediction) -> impl IntoView {
    // The exact probabilities, for comparisons with other engines (the table rounds them).
    let exact = serde_json::to_string(&p.top).unwrap_or_default();
    view! {
        <section id="prediction" class="card" aria-label="Prediction" data-top=exact>
            <h3>"Next token after " <q>{p.prompt.clone()}</q></h3>
            <table>
                {p.top.iter().map(|t| {
                    let width = format!("width: {:.1}%", t.prob * 100.0);
                    view! { <tr><td class="tok">{format!("{:?}", t.token)}</td><td class="num">{format!("{:.4}", t.prob)}</td><td class="barcell"><div class="bar" style=width></div></td></tr> }
                }).collect_view()}
            </table>
        </section>
    }
}

/// One row: label, prompt, then new-target and true-target probabilities before and after.
pub fn prob_row(label: &str, prompt: &str, [bn, an, bt, at]: [f32; 4]) -> AnyView {
    let (label, prompt) = (label.to_string(), prompt.to_string());
    view! { <tr><th scope="row">{label}</th><td class="prompt">{prompt}</td>
    <td class="num">{prob(bn)}</td><td class="num">{prob(an)}</td>
    <td class="num">{prob(bt)}</td><td class="num">{prob(at)}</td></tr> }
    .into_any()
}

/// The header of a before → after table for new target `new` and true target `old`.
pub fn prob_header(new: &str, old: &str) -> AnyView {
    view! {
        <tr><th scope="col">""</th><th scope="col">"prompt"</th>
        <th scope="col" colspan="2">{format!("p({new:?}) before → after")}</th>
        <th scope="col" colspan="2">{format!("p({old:?}) before → after")}</th></tr>
    }
    .into_any()
}

fn edit_row(label: &str, b: &PromptProbs, a: &PromptProbs) -> AnyView {
    prob_row(
        label,
        &b.prompt,
        [b.target_new, a.target_new, b.target_true, a.target_true],
    )
}

/// The before → after table of one edited request.
pub fn edit_table(r: &RewriteRequest, before: &EditSide, after: &EditSide) -> impl IntoView {
    let old = r.target_true.as_ref().map(|t| t.str.as_str()).unwrap_or("");
    let mut rows = vec![
        prob_header(&r.target_new.str, old),
        edit_row("rewrite", &before.rewrite, &after.rewrite),
    ];
    for (label, b, a) in [
        ("paraphrase", &before.paraphrase, &after.paraphrase),
        ("neighbourhood", &before.neighborhood, &after.neighborhood),
    ] {
        rows.extend(b.iter().zip(a).map(|(b, a)| edit_row(label, b, a)));
    }
    view! { <div class="scroll" tabindex="0" role="region" aria-label="Probabilities before and after"><table class="probs">{rows}</table></div> }
}
