//! What the examples share: the model they load and a small corpus for key statistics.

#![allow(dead_code)]

use std::path::PathBuf;

use loci_core::{DType, Device, LoadedModel};

/// The test fixture: a 4-layer GPT-2 with random weights. Everything runs in seconds on it, but
/// it knows no facts, so edits and traces show the machinery rather than the paper's findings.
pub const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tiny-gpt2");

/// Loads the model folder (or `.gguf`) named by `arg`, else the fixture; f32 on the CPU.
pub fn load_model(arg: Option<String>) -> loci_core::Result<LoadedModel> {
    let dir = arg.map_or_else(|| PathBuf::from(DEFAULT_MODEL), PathBuf::from);
    println!("model: {}", dir.display());
    LoadedModel::load(&dir, DType::F32, &Device::Cpu)
}

/// Texts for key statistics: the file `arg` cut into 24-word pieces, or the built-in paragraph
/// in overlapping 24-word windows (the same words at many positions: enough distinct keys for a
/// small model's statistics). Real edits want far more text (ROME: 100,000 Wikipedia articles).
pub fn corpus(arg: Option<String>) -> std::io::Result<Vec<String>> {
    let (text, step) = match arg {
        Some(path) => (std::fs::read_to_string(path)?, 24),
        None => (PARAGRAPH.to_string(), 4),
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    Ok((0..words.len())
        .step_by(step)
        .map(|i| words[i..(i + 24).min(words.len())].join(" "))
        .collect())
}

/// A paragraph of encyclopaedic text.
const PARAGRAPH: &str = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars \
in Paris, France. It is named after the engineer Gustave Eiffel, whose company designed and built \
the tower for the 1889 World's Fair. Locally nicknamed the Iron Lady, it was criticised by some of \
France's leading artists and intellectuals, but it has become a global cultural icon of France and \
one of the most recognisable structures in the world. Rome is the capital city of Italy and the \
seat of the Italian government. Founded, as legend says, in 753 BC, it was the capital of the \
Roman Kingdom, the Roman Republic and the Roman Empire, and it is often called the Eternal City. The \
Colosseum, an elliptical amphitheatre in the centre of the city, is the largest ancient \
amphitheatre ever built. Michael Jordan is an American businessman and former professional \
basketball player who played fifteen seasons in the National Basketball Association. He won six \
championships with the Chicago Bulls and is widely regarded as one of the greatest players of all \
time. Football, also called soccer, is a team sport played between two teams of eleven players \
with a spherical ball, by some 250 million players in over 200 countries.";
