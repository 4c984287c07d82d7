//! Errors as Python sees them: bad input is `loci.LociError` (a `ValueError`), a missing file
//! `loci.LociFileNotFoundError` (a `FileNotFoundError`), a stop asked by Ctrl-C the
//! `KeyboardInterrupt` Python raised. The message is the core's.

use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyValueError};
use pyo3::prelude::*;

create_exception!(
    loci,
    LociError,
    PyValueError,
    "Bad input or a failure of Loci's core."
);
create_exception!(
    loci,
    LociFileNotFoundError,
    PyFileNotFoundError,
    "A file Loci needs is missing."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("LociError", m.py().get_type::<LociError>())?;
    m.add(
        "LociFileNotFoundError",
        m.py().get_type::<LociFileNotFoundError>(),
    )?;
    Ok(())
}

/// The Python exception for an error of the core or the CLI's code.
pub fn to_py(e: anyhow::Error) -> PyErr {
    let missing = e.chain().any(|c| {
        let io = c.downcast_ref::<std::io::Error>().or_else(|| {
            match c.downcast_ref::<loci_core::LociError>() {
                Some(loci_core::LociError::Io { source, .. }) => Some(source),
                _ => None,
            }
        });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    });
    let cancelled = e
        .chain()
        .any(|c| matches!(c.downcast_ref(), Some(loci_core::LociError::Cancelled)));
    let message = format!("{e:#}");
    if cancelled {
        PyKeyboardInterrupt::new_err(message)
    } else if missing {
        LociFileNotFoundError::new_err(message)
    } else {
        LociError::new_err(message)
    }
}

/// `anyhow`'s and the core's results as Python's.
pub trait OrPy<T> {
    fn or_py(self) -> PyResult<T>;
}

impl<T, E: Into<anyhow::Error>> OrPy<T> for Result<T, E> {
    fn or_py(self) -> PyResult<T> {
        self.map_err(|e| to_py(e.into()))
    }
}

/// Parses `text` as JSON of `what`.
pub fn json<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> PyResult<T> {
    serde_json::from_str(text).map_err(|e| LociError::new_err(format!("{what}: {e}")))
}

/// `v` as JSON text.
pub fn to_json<T: serde::Serialize>(v: &T) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| LociError::new_err(e.to_string()))
}
