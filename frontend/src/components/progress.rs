//! A job's progress bar with its stop button, always laid out (so nothing below it moves when
//! a job starts or rows stream in).

use leptos::prelude::*;

use crate::state::shared;

#[component]
pub fn Progress(
    /// Rows (or edits) done and expected; (0, 0) before the job says.
    #[prop(into)]
    done: Signal<(usize, usize)>,
    /// Whether this screen's job is the one running.
    #[prop(into)]
    running: Signal<bool>,
    /// The stop button's id.
    id: &'static str,
    /// What the bar counts, e.g. "rows".
    unit: &'static str,
    /// The stop button's text.
    #[prop(default = "Cancel")]
    stop: &'static str,
) -> impl IntoView {
    let s = shared();
    let text = move || {
        let (d, t) = done.get();
        match (t, running.get()) {
            (0, _) if d > 0 => format!("{d} {unit}"),
            (0, true) => "starting…".to_string(),
            (0, false) => String::new(),
            _ => format!("{d} / {t} {unit}"),
        }
    };
    view! {
        <div class="progress">
            <progress max=move || done.get().1.max(1).to_string() value=move || done.get().0.to_string()
                aria-label=format!("{unit} done")></progress>
            <span class="count">{text}</span>
            <button type="button" id=id on:click=move |_| s.cancel() prop:disabled=move || !running.get()>{stop}</button>
        </div>
    }
}
