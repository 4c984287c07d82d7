//! Saving a figure: its SVG text as an `.svg` file, or drawn onto a canvas at twice its size
//! and saved as a `.png`; and the pair of buttons that offer both.

use leptos::prelude::*;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};

/// Hands `url` to the browser as a download named `name` (a detached link: no navigation).
fn save_url(url: &str, name: &str) -> Result<(), JsValue> {
    let a: web_sys::HtmlAnchorElement = document().create_element("a")?.unchecked_into();
    a.set_href(url);
    a.set_download(name);
    a.click();
    Ok(())
}

/// Saves `bytes` as a file named `name`.
pub fn save_bytes(name: &str, bytes: &[u8]) {
    let parts = js_sys::Array::of1(&js_sys::Uint8Array::from(bytes));
    let Ok(blob) = web_sys::Blob::new_with_u8_array_sequence(&parts) else {
        return;
    };
    // The URL is not revoked: the download may still be reading it after the click.
    if let Ok(url) = web_sys::Url::create_object_url_with_blob(&blob) {
        let _ = save_url(&url, name);
    }
}

fn svg_data_url(svg: &str) -> String {
    format!(
        "data:image/svg+xml;charset=utf-8,{}",
        js_sys::encode_uri_component(svg)
    )
}

/// Saves `svg` as `{stem}.svg`.
pub fn save_svg(stem: &str, svg: &str) {
    let _ = save_url(&svg_data_url(svg), &format!("{stem}.svg"));
}

/// Draws `svg` onto a canvas at twice its size and saves it as `{stem}.png`.
pub fn save_png(stem: &str, svg: &str) {
    let Ok(img) = web_sys::HtmlImageElement::new() else {
        return;
    };
    let name = format!("{stem}.png");
    let img2 = img.clone();
    let onload = Closure::once_into_js(move || {
        let _ = draw_and_save(&img2, &name);
    });
    img.set_onload(Some(onload.unchecked_ref()));
    img.set_src(&svg_data_url(svg));
}

fn draw_and_save(img: &web_sys::HtmlImageElement, name: &str) -> Result<(), JsValue> {
    let scale = 2.0;
    let (w, h) = (img.natural_width().max(1), img.natural_height().max(1));
    let canvas: web_sys::HtmlCanvasElement = document().create_element("canvas")?.unchecked_into();
    canvas.set_width((w as f64 * scale) as u32);
    canvas.set_height((h as f64 * scale) as u32);
    let ctx: web_sys::CanvasRenderingContext2d = canvas
        .get_context("2d")?
        .ok_or("no 2d context")?
        .unchecked_into();
    ctx.set_fill_style_str("white");
    ctx.fill_rect(0.0, 0.0, w as f64 * scale, h as f64 * scale);
    ctx.scale(scale, scale)?;
    ctx.draw_image_with_html_image_element(img, 0.0, 0.0)?;
    save_url(&canvas.to_data_url_with_type("image/png")?, name)
}

/// "SVG" and "PNG" buttons saving the figure `svg` as `{stem}.svg` / `{stem}.png`.
#[component]
pub fn SaveButtons(
    #[prop(into)] svg: Signal<String>,
    #[prop(into)] stem: String,
    #[prop(into)] what: String,
) -> impl IntoView {
    let (s1, s2) = (stem.clone(), stem.clone());
    view! {
        <span class="save">
            <button type="button" class="small" data-save="svg" aria-label=format!("Download {what} as SVG")
                prop:disabled=move || svg.with(String::is_empty)
                on:click=move |_| save_svg(&s1, &svg.get_untracked())>"SVG"</button>
            <button type="button" class="small" data-save="png" aria-label=format!("Download {what} as PNG")
                prop:disabled=move || svg.with(String::is_empty)
                on:click=move |_| save_png(&s2, &svg.get_untracked())>"PNG"</button>
        </span>
    }
}
