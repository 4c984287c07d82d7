//! Loci's web app (leptos, client-side rendered): wires the shared state and each screen's
//! state into context, the header (navigation, model picker, engine badge, status) and the
//! router that shows the Trace, Edit, Study, Evaluate or Benchmark screen. Jobs run on the
//! engine `loci_frontend::engine` picks: this tab's workers or the server.

mod components;
mod link;
mod nav;
mod screens;
mod state;

use leptos::prelude::*;
use leptos_router::components::{Route, Router, Routes};
use leptos_router::path;

use components::engine_badge::EngineBadge;
use components::model_picker::ModelPicker;
use nav::{use_screen, Nav, Screen};
use screens::bench::{BenchScreen, BenchState};
use screens::edit::{EditScreen, EditState};
use screens::evaluate::{EvalState, EvaluateScreen};
use screens::study::{StudyScreen, StudyState};
use screens::trace::{TraceScreen, TraceState};
use state::{shared, Shared};

#[component]
fn App() -> impl IntoView {
    let s = Shared::new();
    provide_context(s);
    s.load();
    let (trace, edit) = (TraceState::new(), EditState::new());
    provide_context(trace);
    provide_context(edit);
    link::follow(s, trace, edit);
    provide_context(StudyState::new());
    provide_context(EvalState::new());
    provide_context(BenchState::new());
    view! {
        <Router>
            <Header />
            <main id="main">
                <Routes fallback=|| view! { <p class="card">"No such page. " <a href=Screen::Trace.href()>"Go to Trace"</a></p> }>
                    <Route path=path!("/*any") view=Screens />
                </Routes>
            </main>
        </Router>
    }
}

#[component]
fn Header() -> impl IntoView {
    let s = shared();
    view! {
        <header class="top">
            <div class="hrow">
                <p class="brand"><span class="logo" aria-hidden="true">"◉"</span>"Loci"
                    <span class="tagline">"locate and edit facts in language models"</span></p>
                <Nav />
            </div>
            <div class="hrow tools">
                <ModelPicker />
                <EngineBadge />
            </div>
            <div class="statusline">
                <p id="status" role="status" data-status=move || s.status.get().0 data-busy=move || s.busy.get().to_string()>
                    {move || s.status.get().1}
                </p>
                {move || s.download.get().map(|(got, total)| view! {
                    <progress id="download" max=total.to_string() value=got.to_string() aria-label="model download"></progress>
                })}
            </div>
        </header>
    }
}

/// The screen the URL names.
#[component]
fn Screens() -> impl IntoView {
    let screen = use_screen();
    move || match screen.get() {
        Screen::Trace => view! { <TraceScreen /> }.into_any(),
        Screen::Edit => view! { <EditScreen /> }.into_any(),
        Screen::Study => view! { <StudyScreen /> }.into_any(),
        Screen::Evaluate => view! { <EvaluateScreen /> }.into_any(),
        Screen::Bench => view! { <BenchScreen /> }.into_any(),
    }
}

fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}
