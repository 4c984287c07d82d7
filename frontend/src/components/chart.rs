//! A line or bar chart the core draws as SVG (layer curves, the study's summary), shown at its
//! natural size (scaled down on narrow screens) with SVG and PNG downloads.

use leptos::prelude::*;

use super::save::SaveButtons;

#[component]
pub fn Chart(
    /// The chart's SVG text (none: nothing is shown).
    #[prop(into)]
    svg: Signal<Option<String>>,
    /// The downloaded files' name, without extension.
    stem: &'static str,
    /// What the chart shows, for its caption and the buttons' labels.
    title: &'static str,
) -> impl IntoView {
    let text = Signal::derive(move || svg.get().unwrap_or_default());
    view! {
        <Show when=move || svg.with(Option::is_some)>
            <figure class="chart">
                <div class="curves" inner_html=move || text.get()></div>
                <figcaption>
                    <span>{title}</span>
                    <SaveButtons svg=text stem=stem what=title.to_lowercase() />
                </figcaption>
            </figure>
        </Show>
    }
}
