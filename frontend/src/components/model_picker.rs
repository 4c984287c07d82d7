//! The header's model picker: which model, and where predictions and traces run (chosen
//! automatically, or insisted on: this tab or the server).

use leptos::prelude::*;
use loci_frontend::engine::Mode;

use crate::state::shared;

#[component]
pub fn ModelPicker() -> impl IntoView {
    let s = shared();
    let set_mode = move |ev: leptos::ev::Event| {
        s.mode.set(match event_target_value(&ev).as_str() {
            "tab" => Mode::Tab,
            "server" => Mode::Server,
            _ => Mode::Auto,
        })
    };
    view! {
        <div class="picker">
            <label for="model">"Model"</label>
            <select id="model" on:change=move |ev| s.model.set(event_target_value(&ev)) prop:value=s.model>
                {move || s.models.get().into_iter().map(|m| {
                    view! { <option value=m.name.clone()>{m.label.clone()}</option> }
                }).collect_view()}
            </select>
            <label for="engine">"Engine"</label>
            <select id="engine" on:change=set_mode>
                <option value="auto">"automatic"</option>
                <option value="tab">"in this tab"</option>
                <option value="server" disabled=move || s.server.get() == Some(false)>"on the server"</option>
            </select>
        </div>
    }
}
