//! One error type for the core: every bad input becomes a clear message, never a panic.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LociError {
    #[error("{0}")]
    Input(String),
    #[error("model file problem: {0}")]
    Model(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid JSON in {what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cancelled")]
    Cancelled,
}

impl LociError {
    pub fn input(msg: impl Into<String>) -> Self {
        Self::Input(msg.into())
    }
    pub fn model(msg: impl Into<String>) -> Self {
        Self::Model(msg.into())
    }
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

pub type Result<T, E = LociError> = std::result::Result<T, E>;
