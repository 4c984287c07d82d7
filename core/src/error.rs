//! One error type for the core: every bad input becomes a clear message, never a panic.

use thiserror::Error;

/// Every failure the core reports; each variant's message says what went wrong.
#[derive(Debug, Error)]
pub enum LociError {
    /// Bad caller input (prompt, request, hyper-parameter); the message is shown as is.
    #[error("{0}")]
    Input(String),
    /// A model file is missing, malformed or inconsistent with its config.
    #[error("model file problem: {0}")]
    Model(String),
    /// The model's architecture or a config option is one Loci does not implement.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// The tokenizer failed to load, encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A candle tensor operation failed (shape mismatch, device error, ...).
    #[error("tensor computation failed: {}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file's path, as displayed.
        path: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON document (config, data set, saved edit, ...) did not parse.
    #[error("invalid JSON in {what}: {source}")]
    Json {
        /// What was being parsed, usually a file name or a description of the input.
        what: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A long job (trace, study) stopped because its callback or observer asked it to.
    #[error("cancelled")]
    Cancelled,
}

impl LociError {
    /// A [`LociError::Input`] with this message.
    pub fn input(msg: impl Into<String>) -> Self {
        Self::Input(msg.into())
    }
    /// A [`LociError::Model`] with this message.
    pub fn model(msg: impl Into<String>) -> Self {
        Self::Model(msg.into())
    }
    /// A [`LociError::Io`] for `path`, keeping `source` as the cause.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// `std::result::Result` with [`LociError`] as the default error.
pub type Result<T, E = LociError> = std::result::Result<T, E>;

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set:
/// messages reach users (and the server's clients), and resolving a backtrace's symbols costs
/// megabytes.
pub fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}
