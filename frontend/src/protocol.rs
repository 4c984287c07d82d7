//! Messages between the page and a model worker: JSON text on the wire (the core's types use
//! serde defaults and tagged enums that a binary codec would not keep), file bytes inside as
//! base64 (a JSON array of numbers would be four times bigger and slower to parse).

use loci_core::edit::{
    EditMethod, EditReport, Floats, MemitReport, NullSpace, Probes, Share, StatsProvenance,
    ValueGrad, ValueParts,
};
use loci_core::eval::CounterFactCase;
use loci_core::study::{EditProblem, StudyLine, StudyMethod};
use loci_core::trace::{TraceHeader, TraceKind, TraceMethod, TraceRequest, TraceResult};
use loci_core::{ModelInfo, Prediction, RewriteRequest};
use serde::{Deserialize, Serialize};

/// A file of a model, where the worker finds it (the Cache API first, then the network).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileRef {
    pub name: String,
    pub url: String,
}

/// File bytes (an edit, key statistics) carried as base64 inside a message.
#[derive(Clone, Debug, PartialEq)]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine;
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(Bytes)
            .map_err(serde::de::Error::custom)
    }
}

/// An edit the worker computes: the method, its facts (one for ROME and FT), the layers (empty:
/// the model's defaults) and the prompts read before and after.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EditJob {
    pub method: EditMethod,
    pub requests: Vec<RewriteRequest>,
    pub layers: Vec<usize>,
    pub probes: Probes,
    /// AlphaEdit's null space, when not the paper's (eigenvalues below 2e-2).
    #[serde(default)]
    pub null_space: Option<NullSpace>,
}

/// Hase et al.'s study of one fact (the server's `/api/study` in the tab): each cell's edit
/// made, scored and undone.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StudyJob {
    pub case: CounterFactCase,
    pub methods: Vec<StudyMethod>,
    pub problems: Vec<EditProblem>,
    /// Central layers (empty: the study's defaults).
    pub layers: Vec<usize>,
    /// Study the fact even when the model does not know it.
    pub all_cases: bool,
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
    /// A whole trace by attribution patching or knowledge neurons (gradients: no rows to
    /// share out).
    TraceWhole {
        method: TraceMethod,
        request: TraceRequest,
    },
    /// Start collecting key statistics of `layers` (texts cut to `max_len` tokens).
    StatsBegin {
        layers: Vec<usize>,
        max_len: usize,
    },
    /// Count each text's tokens as the statistics being collected would take them (cut to
    /// their maximum length), so the page can plan an exact token budget.
    StatsCount {
        texts: Vec<String>,
    },
    /// Add texts to the statistics being collected, each cut to its number of tokens.
    StatsTexts {
        texts: Vec<(String, usize)>,
    },
    /// End the collection: this worker's share as statistics files, one per layer.
    StatsFinish {
        corpus: String,
    },
    /// Use these statistics files for edits (each checked against the model and its layer).
    UseStats {
        files: Vec<Bytes>,
    },
    /// Compute an edit, apply it and read the probes (steps stream as `EditStep`).
    Edit(EditJob),
    /// Begin a ROME edit (the job's one request) whose v* this worker computes `share` of, every
    /// worker holding the same run: answers the first step's `ValueParts` (or `NeedsStats`).
    /// The run is dropped by any message but the three that step or finish it.
    RomeBegin {
        job: EditJob,
        share: Share,
    },
    /// Every worker's parts of this step, in share order: the losses, then this worker's
    /// gradient (`ValueGrad`), or `ValueDone` once the optimisation has stopped.
    ValueLosses {
        parts: Vec<ValueParts>,
    },
    /// Every worker's gradient, in share order: the optimiser's step, then the next step's
    /// forward pass (`ValueParts`).
    ValueAdvance {
        grads: Vec<ValueGrad>,
    },
    /// Finish the shared ROME edit in this worker: apply it and read the probes (`Edited`).
    RomeFinish,
    /// Run a study (its lines stream as `StudyLine`).
    Study(Box<StudyJob>),
    /// Apply a saved edit (the bytes of an edit file) on top of the model's edits.
    ApplyEdit {
        bytes: Bytes,
    },
    /// Undo the newest edit (`all`: every edit).
    UndoEdit {
        all: bool,
    },
    /// A digest of the weights an edit can change (every layer's down-projection).
    Digest,
    /// The work done so far (the benchmark's FLOP count) and the worker's memory.
    Work,
    /// Time this worker's best matrix product (the benchmark's peak).
    Peak,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FromWorker {
    /// The worker's code is running and takes messages.
    Ready,
    Loaded {
        info: ModelInfo,
        seconds: f64,
    },
    Prediction(Prediction),
    /// A finished trace (attribution patching's or knowledge neurons').
    Traced(Box<TraceResult>),
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
    /// Tokens the worker's statistics have seen so far.
    StatsTokens {
        tokens: u64,
    },
    /// Each text's tokens, as counted for `StatsCount`.
    StatsCounts {
        tokens: Vec<usize>,
    },
    StatsParts {
        files: Vec<Bytes>,
    },
    /// The statistics the worker now holds, one per layer.
    StatsHeld {
        held: Vec<StatsProvenance>,
    },
    /// A step of an edit's optimisation.
    EditStep {
        phase: String,
        step: usize,
        steps: usize,
        loss: f32,
    },
    /// This worker's parts of a shared v* step's forward pass.
    ValueParts {
        parts: ValueParts,
    },
    /// A shared v* step's losses (one per request), the step (from 1) of the most, and this
    /// worker's gradient.
    ValueGrad {
        losses: Floats,
        step: usize,
        steps: usize,
        grad: ValueGrad,
    },
    /// A shared v* optimisation stopped, with its last step's losses.
    ValueDone {
        losses: Floats,
        step: usize,
        steps: usize,
    },
    /// An edit made and applied: its file, and the read-out (ROME and FT, or MEMIT).
    Edited {
        file: Bytes,
        report: Option<Box<EditReport>>,
        memit: Option<Box<MemitReport>>,
        count: usize,
    },
    /// A study's line (the case traced, or an edit scored and undone).
    StudyLine(StudyLine),
    /// The study is over; every edit it made is undone.
    StudyDone,
    /// The edit or study needs key statistics of these layers first.
    NeedsStats {
        layers: Vec<usize>,
    },
    /// Edits now applied in this worker.
    Edits {
        count: usize,
    },
    Digest {
        digest: String,
    },
    Work {
        /// Floating-point operations of the matrix products done since the worker started.
        flops: u64,
        /// The worker's WebAssembly memory (it only grows: its peak).
        heap_bytes: u64,
    },
    Peak {
        gflops: f64,
    },
    /// The worker's memory could not grow: it asked for `bytes` with `heap` in use.
    OutOfMemory {
        bytes: u64,
        heap: u64,
    },
    /// The worker stopped with an uncaught error (the page's pool sends this for it).
    Crashed {
        message: String,
    },
    Error {
        message: String,
    },
}

pub fn encode<T: Serialize>(msg: &T) -> String {
    serde_json::to_string(msg).expect("worker messages serialise")
}

pub fn decode<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|e| format!("a garbled worker message: {e}"))
}
