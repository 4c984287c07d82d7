//! The screens as URL routes: `/?screen=edit` and so on (the query keeps every screen on the
//! one path `loci serve` answers with the app, so reloads and deep links work), the header's
//! navigation links, and the document title that follows the screen.

use leptos::prelude::*;
use leptos_router::hooks::use_query_map;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Screen {
    Trace,
    Edit,
    Study,
    Evaluate,
    Bench,
}

impl Screen {
    pub const ALL: [Screen; 5] = [
        Screen::Trace,
        Screen::Edit,
        Screen::Study,
        Screen::Evaluate,
        Screen::Bench,
    ];

    /// The name in the URL and in element ids.
    pub fn slug(self) -> &'static str {
        match self {
            Screen::Trace => "trace",
            Screen::Edit => "edit",
            Screen::Study => "study",
            Screen::Evaluate => "evaluate",
            Screen::Bench => "bench",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Screen::Trace => "Trace",
            Screen::Edit => "Edit",
            Screen::Study => "Study",
            Screen::Evaluate => "Evaluate",
            Screen::Bench => "Benchmark",
        }
    }

    pub fn from_slug(s: &str) -> Option<Screen> {
        Screen::ALL.into_iter().find(|x| x.slug() == s)
    }

    pub fn href(self) -> String {
        // Query only: the page keeps its path, so a static build works at any path of its host.
        format!("?screen={}", self.slug())
    }
}

/// The screen the URL names (Trace when it names none).
pub fn use_screen() -> Memo<Screen> {
    let query = use_query_map();
    Memo::new(move |_| {
        query
            .read()
            .get("screen")
            .and_then(|s| Screen::from_slug(&s))
            .unwrap_or(Screen::Trace)
    })
}

/// Links to the five screens; the current one is marked for assistive technology too.
#[component]
pub fn Nav() -> impl IntoView {
    let screen = use_screen();
    Effect::new(move |_| {
        document().set_title(&format!("{} · Loci", screen.get().label()));
    });
    view! {
        <nav class="screens" aria-label="Screens">
            {Screen::ALL.into_iter().map(|s| view! {
                <a id=format!("nav-{}", s.slug()) href=s.href()
                    aria-current=move || (screen.get() == s).then_some("page")>{s.label()}</a>
            }).collect_view()}
        </nav>
    }
}
