//! `loci eval`: ROME on CounterFact cases, each applied and undone, with ROME's and Hase's metrics.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use loci_core::eval::{parse_cases, summarize, AttributeSnippets, Consistency};

use super::edit::{hparams, StatsSource};
use super::{print_json, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// CounterFact cases: ROME's format or EasyEdit's flattened records.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Editing method (rome).
    #[arg(long, default_value = "rome")]
    pub method: String,
    /// The edited layer (default: Loci's shipped hyper-parameters for this model).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Evaluate the first N cases.
    #[arg(long)]
    pub n: Option<usize>,
    /// Write one JSON line per case here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub summary: bool,
    #[command(flatten)]
    pub stats: StatsSource,
    /// Skip the generation (fluency) test, the slow part.
    #[arg(long)]
    pub no_generation: bool,
    #[arg(long)]
    pub v_steps: Option<usize>,
    /// ROME's attribute_snippets.json: adds generation consistency (TF-IDF similarity of the
    /// generations to Wikipedia texts about the new target; IDF fitted on --corpus).
    #[arg(long)]
    pub snippets: Option<PathBuf>,
}

fn bits(lm: &loci_core::LoadedModel, layer: usize) -> Result<Vec<u32>> {
    let w = lm
        .model
        .down_proj(layer)?
        .weight
        .to_dtype(loci_core::DType::F32)?;
    Ok(w.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|x| x.to_bits())
        .collect())
}

/// The snippets, and IDF weights fitted on the corpus (one document per text).
fn consistency(snippets: &std::path::Path, src: &StatsSource) -> Result<Consistency> {
    let text = std::fs::read_to_string(snippets)
        .with_context(|| format!("reading {}", snippets.display()))?;
    let snippets = AttributeSnippets::parse(&text)?;
    let corpus = match &src.corpus {
        Some(c) => c.clone(),
        None => super::edit::default_corpus()?,
    };
    let texts = super::edit::corpus_texts(&corpus)?.collect::<Result<Vec<String>>>()?;
    let idf = loci_core::tfidf::Idf::fit(&texts);
    eprintln!(
        "consistency: IDF of {} words over {} texts of {}",
        idf.weights.len(),
        idf.documents,
        corpus.display()
    );
    Ok(Consistency { idf, snippets })
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if a.method != "rome" {
        bail!("--method {:?}: only rome is implemented so far", a.method);
    }
    let mut lm = a.model.load()?;
    let text = std::fs::read_to_string(&a.dataset)
        .with_context(|| format!("reading {}", a.dataset.display()))?;
    let mut cases = parse_cases(&text)?;
    if let Some(n) = a.n {
        cases.truncate(n);
    }
    if cases.is_empty() {
        bail!("no cases in {}", a.dataset.display());
    }
    let mut hp = hparams(&lm, a.layer)?;
    if let Some(s) = a.v_steps {
        hp.v_num_grad_steps = s;
    }
    let layer = hp.layer;
    let stats = a.stats.ensure(&lm, layer)?;
    let consistency = match &a.snippets {
        Some(p) if !a.no_generation => Some(consistency(p, &a.stats)?),
        Some(_) => bail!("--snippets scores generations: drop --no-generation"),
        None => None,
    };
    let original = bits(&lm, layer)?;
    let mut out = match &a.out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let pb = ProgressBar::new(cases.len() as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "cases {bar:40} {pos}/{len} [{elapsed_precise} < {eta}] {msg}",
        )
        .expect("template"),
    );
    let mut metrics = Vec::new();
    for case in &cases {
        let rec = match lm.eval_case(
            case,
            &hp,
            Some(&stats),
            !a.no_generation,
            consistency.as_ref(),
        ) {
            Ok(r) => r,
            Err(e) => {
                pb.println(format!("case {}: {e}", case.case_id));
                pb.inc(1);
                continue;
            }
        };
        let m = &rec.metrics;
        pb.set_message(format!(
            "ES {:.0} PS {:.0} NS {:.0}",
            m.efficacy_score * 100.0,
            m.paraphrase_score * 100.0,
            m.neighborhood_score * 100.0
        ));
        if let Some(w) = out.as_mut() {
            writeln!(w, "{}", serde_json::to_string(&rec)?)?;
        }
        metrics.push(rec.metrics);
        pb.inc(1);
    }
    pb.finish_and_clear();
    if let Some(mut w) = out {
        w.flush()?;
    }
    if bits(&lm, layer)? != original {
        bail!("internal error: the model differs from the original after the evaluation");
    }
    let s = summarize(&metrics);
    if a.summary {
        return print_json(&s);
    }
    println!(
        "ROME at layer {layer} on {} cases of {}",
        s.cases,
        a.dataset.display()
    );
    println!("| metric | value |\n|---|---|");
    for (name, v) in [
        ("Score S (hmean ES, PS, NS)", s.score),
        ("Efficacy score ES", s.efficacy_score),
        ("Efficacy magnitude EM", s.efficacy_magnitude),
        ("Paraphrase score PS", s.paraphrase_score),
        ("Paraphrase magnitude PM", s.paraphrase_magnitude),
        ("Neighborhood score NS", s.neighborhood_score),
        ("Neighborhood magnitude NM", s.neighborhood_magnitude),
        ("Hase rewrite score", s.hase_rewrite),
        ("Hase paraphrase score", s.hase_paraphrase),
        ("Hase neighborhood score", s.hase_neighborhood),
        ("Hase target score (per-case hmean)", s.hase_target_score),
    ] {
        println!("| {name} | {v:.1} |");
    }
    if let (Some(a), Some(b)) = (s.fluency_pre, s.fluency_post) {
        println!("| Fluency (n-gram entropy ×100) pre → post | {a:.0} → {b:.0} |");
    }
    if let (Some(a), Some(b)) = (s.consistency_pre, s.consistency_post) {
        println!("| Consistency (TF-IDF ×100) pre → post | {a:.1} → {b:.1} |");
    }
    Ok(())
}
