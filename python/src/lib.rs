//! `loci._loci`: the Python extension over Loci's core. It holds a model (`Engine`) and runs
//! the core on it with the GIL released; results cross as the same JSON the CLI prints (the
//! package's Python side turns them into numpy arrays and objects), so Python and the command
//! line cannot disagree. `loci.eval` and `loci.study` run the CLI's own `eval` and `study`
//! commands on a copy of the held model (`run_command`).

mod engine;
mod errors;
mod heed;
mod settings;

use pyo3::prelude::*;

/// The heatmap of a trace (its JSON, as `Engine.trace` returns it) as SVG.
#[pyfunction]
fn trace_svg(trace_json: &str) -> PyResult<String> {
    let r: loci_core::TraceResult = errors::json(trace_json, "a trace")?;
    Ok(loci_core::plot::trace_heatmap_svg(&r))
}

/// The chart of a study analysis (its JSON) as SVG.
#[pyfunction]
fn study_svg(analysis_json: &str) -> PyResult<String> {
    let a: loci_core::study::StudyAnalysis = errors::json(analysis_json, "a study analysis")?;
    Ok(loci_core::plot::study_svg(&a))
}

/// Runs a `loci study analyze …` command line (no model needed); returns its JSON.
#[pyfunction]
fn analyze(py: Python<'_>, argv: Vec<String>) -> PyResult<Vec<String>> {
    engine::run_without_model(py, argv)
}

#[pymodule]
fn _loci(m: &Bound<'_, PyModule>) -> PyResult<()> {
    engine::init_threads();
    m.add_class::<engine::Engine>()?;
    m.add_function(wrap_pyfunction!(trace_svg, m)?)?;
    m.add_function(wrap_pyfunction!(study_svg, m)?)?;
    m.add_function(wrap_pyfunction!(analyze, m)?)?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CUDA", cfg!(feature = "cuda"))?;
    Ok(())
}
