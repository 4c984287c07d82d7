//! The editing methods by name, and where each one's default hyper-parameters come from: the
//! paper's values in code, and per-model files shipped in `core/hparams/<method>/`.

use serde::{Deserialize, Serialize};

use crate::error::{LociError, Result};

/// An editing method, as the CLI, the server, the study and the web app name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EditMethod {
    /// ROME (Meng et al. 2022): one fact, a rank-one update of one layer's down-projection.
    Rome,
    /// MEMIT (Meng et al. 2023): many facts, the update spread over several layers.
    Memit,
    /// EMMET (Gupta et al. 2024): MEMIT's spread with each edited key's output set exactly.
    Emmet,
    /// AlphaEdit (Fang et al. 2025): MEMIT's spread confined to the null space of what the
    /// model knows, earlier edits kept: thousands of edits in sequence without collapse.
    Alphaedit,
    /// Constrained fine-tuning (Zhu et al. 2020, as ROME's FT-L baseline).
    Ft,
    /// GRACE (Hartvigsen et al. 2023): a codebook on one layer, the weights untouched.
    Grace,
}

impl EditMethod {
    /// Every method, in the order menus list them.
    pub const ALL: [EditMethod; 6] = [
        EditMethod::Rome,
        EditMethod::Memit,
        EditMethod::Alphaedit,
        EditMethod::Emmet,
        EditMethod::Ft,
        EditMethod::Grace,
    ];

    /// The method's name on the command line and in the API: `rome`, `memit`, `alphaedit`,
    /// `emmet`, `ft` or `grace`.
    pub fn name(self) -> &'static str {
        match self {
            EditMethod::Rome => "rome",
            EditMethod::Memit => "memit",
            EditMethod::Emmet => "emmet",
            EditMethod::Alphaedit => "alphaedit",
            EditMethod::Ft => "ft",
            EditMethod::Grace => "grace",
        }
    }

    /// A short human label.
    pub fn label(self) -> &'static str {
        match self {
            EditMethod::Rome => "ROME",
            EditMethod::Memit => "MEMIT",
            EditMethod::Emmet => "EMMET",
            EditMethod::Alphaedit => "AlphaEdit",
            EditMethod::Ft => "fine-tuning",
            EditMethod::Grace => "GRACE",
        }
    }

    /// Whether the method edits many facts in one update (the others take one fact): the
    /// MEMIT family, which shares [`MemitHparams`](super::MemitHparams) and its edit files.
    pub fn takes_many_facts(self) -> bool {
        matches!(
            self,
            EditMethod::Memit | EditMethod::Emmet | EditMethod::Alphaedit
        )
    }
}

impl std::fmt::Display for EditMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for EditMethod {
    type Err = LociError;
    fn from_str(s: &str) -> Result<Self> {
        EditMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = EditMethod::ALL.iter().map(|m| m.name()).collect();
                LociError::input(format!("method {s:?}: use one of {}", names.join(", ")))
            })
    }
}

/// A shipped hyper-parameter file: the model shape it is for, then the method's settings.
#[derive(Deserialize)]
struct HparamFile<H> {
    family: crate::config::Family,
    n_layer: usize,
    d_model: usize,
    #[serde(flatten)]
    hparams: H,
}

/// The settings among `files` (a method's shipped JSON files) made for a model of this shape.
pub(crate) fn shipped_for<H: serde::de::DeserializeOwned>(
    files: &[&str],
    cfg: &crate::config::ModelConfig,
) -> Option<H> {
    files.iter().find_map(|text| {
        let f: HparamFile<H> = serde_json::from_str(text).expect("shipped hparams parse");
        (f.family == cfg.family && f.n_layer == cfg.n_layer && f.d_model == cfg.d_model)
            .then_some(f.hparams)
    })
}

/// The defaults of a method that edits several layers, for a model of `n_layer` layers: its
/// `shipped` settings (moved to `layers` when given), else `paper`'s at `layers`; with neither,
/// an error asking for layers, naming the method (`what`).
pub(crate) fn layered_defaults<H>(
    shipped: Option<H>,
    layers: &[usize],
    n_layer: usize,
    what: &str,
    paper: impl FnOnce(Vec<usize>) -> H,
    move_to: impl FnOnce(&mut H, Vec<usize>),
) -> Result<H> {
    check_layers(layers, n_layer)?;
    match (shipped, layers.is_empty()) {
        (Some(hp), true) => Ok(hp),
        (Some(mut hp), false) => {
            move_to(&mut hp, layers.to_vec());
            Ok(hp)
        }
        (None, false) => Ok(paper(layers.to_vec())),
        (None, true) => Err(LociError::input(format!(
            "Loci has no default {what} layers for this model; pass --layers"
        ))),
    }
}

/// Layers out of range for a model of `n` layers, as an error naming the first.
pub(crate) fn check_layers(layers: &[usize], n: usize) -> Result<()> {
    match layers.iter().find(|&&l| l >= n) {
        Some(l) => Err(LociError::input(format!(
            "layer {l} out of range (the model has {n} layers)"
        ))),
        None => Ok(()),
    }
}
