//! `loci eval`: ROME, MEMIT or fine-tuning on CounterFact cases (ROME's and Hase's metrics) or
//! zsRE questions (token accuracy), each edit applied and undone — or kept, in sequence. This
//! file: the arguments, the datasets, and the dispatch to one benchmark's run.

mod benchmark;
mod counterfact;
mod method;
mod records;
mod run;
mod zsre;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
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
    /// score each case right after its own edit and again after the last one; all are undone
    /// at the end.
    #[arg(long)]
    pub sequential: bool,
    /// With --sequential: every K cases, score every case edited so far again (the retention
    /// curve: how earlier edits hold up as later ones arrive).
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// With --checkpoint-every: draw the retention curve here (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
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

/// Evaluates the method on the dataset, then checks that every edit was undone.
pub fn eval(a: EvalArgs) -> Result<()> {
    check_flags(&a)?;
    let mut lm = a.model.load()?;
    let dataset = read_dataset(&a.dataset, a.n, a.zsre_target)?;
    let method = Method::from_args(&a, &lm)?;
    let layers = method.layers();
    let original = bits(&lm, &layers)?;
    run_dataset(&dataset, &mut lm, &a, &method)?;
    if bits(&lm, &layers)? != original {
        bail!("internal error: the model differs from the original after the evaluation");
    }
    Ok(())
}

/// Refuses `--batch 0` and `--checkpoint-every` or `--plot` without what they need.
fn check_flags(a: &EvalArgs) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    match (a.checkpoint_every, a.sequential, &a.plot) {
        (Some(0), ..) => bail!("--checkpoint-every must be at least 1"),
        (Some(_), false, _) => bail!("--checkpoint-every is for --sequential"),
        (None, _, Some(_)) => bail!("--plot draws the checkpoints: add --checkpoint-every"),
        _ => {}
    }
    Ok(())
}

/// Runs the dataset's benchmark: CounterFact (scoring consistency with `--snippets`) or zsRE.
fn run_dataset(
    dataset: &Dataset,
    lm: &mut LoadedModel,
    a: &EvalArgs,
    method: &Method,
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
            run(&bench, lm, cases, a, method)?;
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
            run(&bench, lm, &set.cases, a, method)?;
        }
    }
    Ok(())
}
