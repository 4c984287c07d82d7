//! Loci core: hookable transformer language models (GPT-2, GPT-J, LLaMA-style) on candle,
//! with the machinery for causal tracing and model editing. No I/O assumptions beyond the
//! optional file loaders, so it builds for wasm32 as well as natively.

#![deny(missing_docs)]

#[cfg(not(target_arch = "wasm32"))]
pub mod blas;
pub mod clock;
pub mod config;
pub mod edit;
pub mod error;
pub mod eval;
pub mod flops;
pub mod hooks;
pub mod kernels;
pub mod loader;
pub mod model;
pub mod plot;
pub mod predict;
pub mod presets;
pub mod progress;
pub mod request;
pub mod rng;
pub mod study;
pub mod tfidf;
pub mod threads;
pub mod tokenizer;
pub mod trace;

pub use candle_core::{DType, Device, Tensor};
pub use config::{Family, ModelConfig};
pub use error::{LociError, Result};
pub use hooks::{Capture, Hook, NoHook, Site};
pub use loader::{LoadedModel, ModelInfo};
pub use model::{KvCache, LogitsAt, Model};
pub use predict::{DecodeBatch, Generation, GenerationStart, Prediction, Sampling, TokenProb};
pub use request::{RewriteRequest, TargetStr};
pub use tokenizer::Tokenizer;
pub use trace::{TraceKind, TraceRequest, TraceResult};
