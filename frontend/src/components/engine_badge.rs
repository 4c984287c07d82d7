//! The engine badge: where the current screen's jobs run — this tab's workers or the server —
//! and why (the model's size, the user's choice, or the job needing the server's statistics).

use leptos::prelude::*;
use loci_frontend::engine::{
    edit_engine, pick_engine, Choice, Engine, Mode, TAB_BUDGET_BYTES, TAB_MODEL_LIMIT_BYTES,
};
use loci_frontend::pool::{cores, pool_size};

use crate::nav::{use_screen, Screen};
use crate::state::shared;

/// (where: "tab", "server" or "none"; the badge's text; why).
pub fn placement(c: &Choice, mode: Mode, screen: Screen) -> (&'static str, String, String) {
    let mb = |b: u64| format!("{:.0} MB", b as f64 / 1e6);
    let workers = || pool_size(cores(), c.f32_bytes, TAB_BUDGET_BYTES);
    if matches!(screen, Screen::Edit | Screen::Study) {
        return match edit_engine(c, mode) {
            Ok((Engine::Tab, why)) => ("tab", format!("in this tab · {} workers", workers()), why),
            Ok((Engine::Server, why)) => ("server", "on the server".into(), why),
            Err(e) => ("none", "cannot run".into(), e),
        };
    }
    let server_job = match screen {
        Screen::Evaluate => Some("the case is edited with ROME, scored and undone on the server"),
        _ => None,
    };
    if let Some(why) = server_job {
        return if c.on_server {
            ("server", "on the server".into(), why.into())
        } else {
            (
                "none",
                "needs the server".into(),
                format!("{} is not on this server", c.name),
            )
        };
    }
    if screen == Screen::Bench {
        let why = "measures this tab's workers on a random GPT-2-small";
        return (
            "tab",
            format!("in this tab · {} workers", cores()),
            why.into(),
        );
    }
    match pick_engine(c, mode) {
        Ok(Engine::Tab) => {
            let why = match mode {
                Mode::Tab => "you chose this tab".to_string(),
                _ => format!(
                    "{} in f32 fits the tab (up to {})",
                    mb(c.f32_bytes),
                    mb(TAB_MODEL_LIMIT_BYTES)
                ),
            };
            ("tab", format!("in this tab · {} workers", workers()), why)
        }
        Ok(Engine::Server) => {
            let why = match mode {
                Mode::Server => "you chose the server".to_string(),
                _ if c.files.is_empty() => "the server offers no files for the tab".to_string(),
                _ => format!(
                    "{} in f32 is more than the tab takes ({})",
                    mb(c.f32_bytes),
                    mb(TAB_MODEL_LIMIT_BYTES)
                ),
            };
            ("server", "on the server".into(), why)
        }
        Err(e) => ("none", "cannot run".into(), e),
    }
}

#[component]
pub fn EngineBadge() -> impl IntoView {
    let s = shared();
    let screen = use_screen();
    let place = Memo::new(move |_| {
        s.current()
            .map(|c| placement(&c, s.mode.get(), screen.get()))
            .unwrap_or(("none", String::new(), String::new()))
    });
    view! {
        <p class="badge" data-engine=move || place.get().0>
            <span class="where">{move || place.get().1}</span>
            <span id="engine-choice" class="why">{move || place.get().2}</span>
        </p>
    }
}
