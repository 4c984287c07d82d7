//! What the command line and the server share, so neither imports the other: opening models
//! (device, precision, the default model, threads), key statistics and their one cache, the
//! bundled known facts and the noise estimate, and each method's and the study's defaults.
//! The CLI is argument parsing and printing over this; the server is routing and JSON over it.

mod atomic;
mod bars;
mod defaults;
mod known;
mod models;
mod stats;

pub use atomic::write_atomic;
pub use bars::{bar, spinner, tell, with_hidden_bars, Heard};
pub use defaults::{
    ft_hparams, key_mode, memit_hparams, read_changes, rome_hparams, study_config, with_changes,
    FtSettings, RuleSettings,
};
pub use known::{
    bundled_fact_prompts, bundled_fact_texts, bundled_facts, cached_embedding_std, read_facts,
    KnownFact,
};
pub use models::{
    apply_edit_files, default_model, device, open_model, trace_workers, workers, Precision, WORKERS,
};
pub use stats::{
    collect, collect_heard, corpus_file, corpus_texts, default_corpus, feed, keep_unedited,
    statistics_model, stats_dir, with_unedited, StatsCache, StatsSource,
};
