//! Loci's web app (leptos, client-side rendered). For now it shows what the engine supports;
//! tracing and editing screens grow on it.

use leptos::prelude::*;
use loci_core::Family;

#[component]
fn App() -> impl IntoView {
    let families = [Family::Gpt2, Family::Gptj, Family::Llama]
        .map(|f| view! { <li><code>{f.name()}</code></li> })
        .to_vec();
    view! {
        <main>
            <h1>"Loci"</h1>
            <p>"Find where a language model keeps a fact — and rewrite it."</p>
            <p>"Model families this build runs:"</p>
            <ul>{families}</ul>
            <p id="status" data-status="ready">"Engine loaded (WebAssembly)."</p>
        </main>
    }
}

fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}
