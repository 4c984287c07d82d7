//! `loci eval`: ROME, MEMIT or fine-tuning on CounterFact cases (ROME's and Hase's metrics) or
//! zsRE questions (token accuracy), each edit applied and undone — or kept, in sequence. This
//! file: the arguments, the datasets, and the dispatch to one benchmark's run.

mod benchmark;
mod counterfact;
mod method;
mod records;
mod run;
mod sequence;
mod state;
mod zsre;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use loci_core::edit::EditMethod;
use loci_core::eval::zsre::ZsreTarget;
use loci_core::eval::{parse_dataset, AttributeSnippets, Consistency, CounterFactCase, Dataset};
use loci_core::LoadedModel;

use self::counterfact::CounterFact;
use self::method::{bits, Method};
use self::run::run;
use self::zsre::Zsre;
use super::{MethodArgs, ModelArgs};
use crate::workspace::StatsSource;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// CounterFact cases (ROME's format or EasyEdit's flattened records) or zsRE records
    /// (MEND's schema, as ROME's `zsre_mem_eval.json`).
    #[arg(long)]
    pub dataset: PathBuf,
    /// zsRE: write `answers[0]` (`answer`, ROME's and MEMIT's evaluation) or `alt` (MEND's and
    /// EasyEdit's).
    #[arg(long, default_value = "answer")]
    pub zsre_target: ZsreTarget,
    #[command(flatten)]
    pub edit: MethodArgs,
    /// MEMIT: cases written by one edit (each batch is applied, scored and undone, or kept with
    /// --sequential).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Evaluate the first N cases.
    #[arg(long)]
    pub n: Option<usize>,
    /// Write one JSON line per case here; cases already in it are kept and skipped, so a
    /// stopped evaluation continues.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub summary: bool,
    /// Sequential editing: keep every edit (each computed on the model the earlier ones left) and
    /// score each case right after its own edit and after the last one, with the model's health
    /// (held-out perplexity, known facts, edited weights' norms) at the start and the end; all
    /// are undone at the end. With --out, each checkpoint is saved beside it (OUT.state/) and a
    /// stopped run continues from the last one.
    #[arg(long)]
    pub sequential: bool,
    /// With --sequential: the sequence of each of these methods in turn, in one run
    /// (comma-separated; each flag goes to the methods it belongs to). Default: --method.
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<EditMethod>,
    /// With --sequential: every K cases, score every case edited so far again (the retention
    /// curve: how earlier edits hold up as later ones arrive), measure the model's health, and
    /// save the sequence to continue from.
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// With --checkpoint-every: rescore at most this many of the cases edited so far, spread
    /// evenly (default: every one; a long sequence's checkpoints then cost the same however far
    /// it has got).
    #[arg(long)]
    pub checkpoint_cases: Option<usize>,
    /// With --sequential: draw every number against the cases edited, one line per method
    /// (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// With --sequential: perplexity on this many held-out texts (the corpus's last; 0: none).
    #[arg(long, default_value_t = 32)]
    pub health_texts: usize,
    /// Each held-out text's first N tokens.
    #[arg(long, default_value_t = 256)]
    pub health_tokens: usize,
    /// With --sequential: top-1 accuracy on this many known facts (0: none).
    #[arg(long, default_value_t = 1000)]
    pub health_facts: usize,
    /// The known facts (known_1000.json format); default: the bundled copy.
    #[arg(long)]
    pub known: Option<PathBuf>,
    /// Skip the generation (fluency) test, the slow part.
    #[arg(long)]
    pub no_generation: bool,
    /// ROME's attribute_snippets.json: adds generation consistency (TF-IDF similarity of the
    /// generations to Wikipedia texts about the new target; IDF fitted on --corpus).
    #[arg(long)]
    pub snippets: Option<PathBuf>,
}

/// The snippets, and IDF weights fitted on the corpus (one document per text).
fn consistency(snippets: &std::path::Path, src: &StatsSource) -> Result<Consistency> {
    let text = std::fs::read_to_string(snippets)
        .with_context(|| format!("reading {}", snippets.display()))?;
    let snippets = AttributeSnippets::parse(&text)?;
    let corpus = match &src.corpus {
        Some(c) => c.clone(),
        None => crate::workspace::default_corpus()?,
    };
    let texts = crate::workspace::corpus_texts(&corpus)?.collect::<Result<Vec<String>>>()?;
    let idf = loci_core::tfidf::Idf::fit(&texts);
    eprintln!(
        "consistency: IDF of {} words over {} texts of {}",
        idf.weights.len(),
        idf.documents,
        corpus.display()
    );
    Ok(Consistency { idf, snippets })
}

/// The first `n` (default: all) cases of a CounterFact file, or of a zsRE file as Hase et al.
/// pose it (a new answer drawn with `seed`: `ZsreSet::hase_cases`); none is an error.
pub fn read_study_cases(
    path: &std::path::Path,
    n: Option<usize>,
    seed: u64,
) -> Result<Vec<CounterFactCase>> {
    let mut cases = match read_dataset(path, None, ZsreTarget::Answer)? {
        Dataset::CounterFact(c) => c,
        Dataset::Zsre(set) => {
            eprintln!(
                "zsRE: {} questions posed as \"Question: … Answer:\", each with a new answer \
                 drawn from the others' ({} records skipped)",
                set.cases.len(),
                set.skipped.len()
            );
            set.hase_cases(seed)
        }
    };
    if let Some(n) = n {
        cases.truncate(n);
    }
    Ok(cases)
}

/// A benchmark file's first `n` (default: all) cases; none is an error.
fn read_dataset(path: &std::path::Path, n: Option<usize>, target: ZsreTarget) -> Result<Dataset> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut cases = parse_dataset(&text, target)?;
    if let Some(n) = n {
        cases.truncate(n);
    }
    if cases.is_empty() {
        bail!("no cases in {}", path.display());
    }
    Ok(cases)
}

/// Evaluates the method (or, in sequence, each of `--methods`) on the dataset, then checks that
/// every edit was undone.
pub fn eval(a: EvalArgs) -> Result<()> {
    check_flags(&a)?;
    let mut lm = a.model.load()?;
    let dataset = read_dataset(&a.dataset, a.n, a.zsre_target)?;
    let methods = Method::all_from_args(&a, &lm)?;
    let mut layers: Vec<usize> = methods.iter().flat_map(Method::layers).collect();
    layers.sort_unstable();
    layers.dedup();
    let original = bits(&lm, &layers)?;
    run_dataset(&dataset, &mut lm, &a, &methods)?;
    if bits(&lm, &layers)? != original {
        bail!("internal error: the model differs from the original after the evaluation");
    }
    Ok(())
}

/// Refuses `--batch 0`, and the flags of a sequence without `--sequential`.
fn check_flags(a: &EvalArgs) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if a.checkpoint_every == Some(0) {
        bail!("--checkpoint-every must be at least 1");
    }
    let sequence_only = [
        ("--checkpoint-every", a.checkpoint_every.is_some()),
        ("--checkpoint-cases", a.checkpoint_cases.is_some()),
        ("--plot", a.plot.is_some()),
        ("--methods", !a.methods.is_empty()),
    ];
    if let Some((flag, _)) = sequence_only.iter().find(|f| f.1 && !a.sequential) {
        bail!("{flag} is for --sequential");
    }
    if a.checkpoint_cases.is_some() && a.checkpoint_every.is_none() {
        bail!("--checkpoint-cases samples the checkpoints: add --checkpoint-every");
    }
    Ok(())
}

/// Runs the dataset's benchmark: CounterFact (scoring consistency with `--snippets`) or zsRE.
fn run_dataset(
    dataset: &Dataset,
    lm: &mut LoadedModel,
    a: &EvalArgs,
    methods: &[Method],
) -> Result<()> {
    match dataset {
        Dataset::CounterFact(cases) => {
            let consistency = match &a.snippets {
                Some(p) if !a.no_generation => Some(consistency(p, &a.edit.stats)?),
                Some(_) => bail!("--snippets scores generations: drop --no-generation"),
                None => None,
            };
            let bench = CounterFact {
                generate: !a.no_generation,
                consistency,
            };
            bench_run(&bench, lm, cases, a, methods)?;
        }
        Dataset::Zsre(set) => {
            if a.snippets.is_some() {
                bail!("--snippets is for CounterFact: zsRE has no generation test");
            }
            if !set.skipped.is_empty() {
                eprintln!(
                    "skipped {} zsRE records that are no edit: {}",
                    set.skipped.len(),
                    set.skipped.join("; ")
                );
            }
            let bench = Zsre {
                target: a.zsre_target,
            };
            bench_run(&bench, lm, &set.cases, a, methods)?;
        }
    }
    Ok(())
}

/// The benchmark's cases edited in sequence by each method, or by the one method each edit
/// undone.
fn bench_run<B: benchmark::Benchmark>(
    bench: &B,
    lm: &mut LoadedModel,
    cases: &[B::Case],
    a: &EvalArgs,
    methods: &[Method],
) -> Result<()> {
    if a.sequential {
        sequence::run(bench, lm, cases, a, methods)
    } else {
        run(bench, lm, cases, a, &methods[0])
    }
}
