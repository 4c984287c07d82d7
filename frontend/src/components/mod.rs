//! The pieces the screens are built from: heatmaps, charts, probability tables, progress with
//! its stop button, the model picker, the engine badge, and figure downloads.

pub mod chart;
pub mod engine_badge;
pub mod heatmap;
pub mod heatmap_svg;
pub mod model_picker;
pub mod probs;
pub mod progress;
pub mod save;
