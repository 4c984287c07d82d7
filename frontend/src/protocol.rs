//! Messages between the page and a model worker. JSON on the wire: the core's types use serde
//! defaults and tagged enums that a binary codec would not keep.

use gloo_worker::Codec;
use loci_core::trace::{TraceHeader, TraceKind, TraceRequest};
use loci_core::{ModelInfo, Prediction};
use serde::{Deserialize, Serialize};
use wasm_bindgen::JsValue;

/// A file of a model, where the worker finds it (the Cache API first, then the network).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileRef {
    pub name: String,
    pub url: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToWorker {
    /// Load a model from its files (a .gguf, or config.json + tokenizer.json + safetensors).
    Load {
        name: String,
        files: Vec<FileRef>,
        /// Subjects whose embedding spread sets the relative trace noise (known_1000.json's).
        subjects_url: String,
    },
    /// A model of a known shape with random weights (the in-tab benchmark).
    Random {
        preset: String,
    },
    Predict {
        prompt: String,
        top: usize,
    },
    /// Run the clean and corrupted passes of a trace; rows follow one by one.
    TracePlan {
        job: u64,
        request: TraceRequest,
    },
    TraceRow {
        job: u64,
        kind: TraceKind,
        token: usize,
    },
    TraceDrop {
        job: u64,
    },
    /// Apply a saved edit (the bytes of an edit file) on top of the model's edits.
    ApplyEdit {
        bytes: Vec<u8>,
    },
    /// Undo the newest edit (`all`: every edit).
    UndoEdit {
        all: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FromWorker {
    Loaded {
        info: ModelInfo,
        seconds: f64,
    },
    Prediction(Prediction),
    TraceHeader {
        job: u64,
        header: TraceHeader,
    },
    TraceRow {
        job: u64,
        kind: TraceKind,
        token: usize,
        scores: Vec<f32>,
        seconds: f64,
    },
    /// Edits now applied in this worker.
    Edits {
        count: usize,
    },
    Error {
        message: String,
    },
}

pub struct Json;

impl Codec for Json {
    fn encode<I: Serialize>(input: I) -> JsValue {
        JsValue::from_str(&serde_json::to_string(&input).expect("worker messages serialise"))
    }

    fn decode<O: for<'de> Deserialize<'de>>(input: JsValue) -> O {
        let text = input.as_string().unwrap_or_default();
        serde_json::from_str(&text).expect("worker messages deserialise")
    }
}
