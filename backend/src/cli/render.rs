//! Writing plots: SVG as is, PNG rasterised with resvg (system fonts for the labels).

use std::path::Path;

use anyhow::{bail, Context, Result};

pub fn save_plot(path: &Path, svg: &str) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "svg" => crate::workspace::write_atomic(path, svg.as_bytes()),
        "png" => crate::workspace::write_atomic(path, &svg_to_png(svg, 2.0)?),
        _ => bail!("plot file {} must end in .svg or .png", path.display()),
    }
}

pub fn svg_to_png(svg: &str, scale: f32) -> Result<Vec<u8>> {
    let mut opt = resvg::usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    let tree = resvg::usvg::Tree::from_str(svg, &opt).context("parsing the SVG")?;
    let size = tree
        .size()
        .to_int_size()
        .scale_by(scale)
        .context("empty plot")?;
    let mut pixmap =
        resvg::tiny_skia::Pixmap::new(size.width(), size.height()).context("plot too large")?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    pixmap.encode_png().context("encoding PNG")
}
