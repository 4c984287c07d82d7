//! `loci eval`: ROME or MEMIT on CounterFact cases, each edit applied and undone, with ROME's and
//! Hase's metrics.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use loci_core::edit::{Edit, FtHparams, KeyStats, MemitHparams, RomeHparams};
use loci_core::eval::{
    parse_cases, summarize, AttributeSnippets, CaseRecord, Consistency, CounterFactCase,
};

use super::edit::{ft_hparams, hparams, memit_hparams, FtArgs, StatsSource};
use super::{print_json, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// CounterFact cases: ROME's format or EasyEdit's flattened records.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Editing method: rome or ft (one case at a time) or memit (`--batch` cases per edit).
    #[arg(long, default_value = "rome")]
    pub method: String,
    /// ROME's edited layer (default: Loci's shipped hyper-parameters for this model).
    #[arg(long)]
    pub layer: Option<usize>,
    /// MEMIT's or fine-tuning's layers, e.g. 3,4,5,6,7,8 (default: the shipped
    /// hyper-parameters).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    #[command(flatten)]
    pub ft: FtArgs,
    /// MEMIT: cases written by one edit (each batch is applied, scored and undone).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
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

/// The edited layers' weights, bit for bit.
fn bits(lm: &loci_core::LoadedModel, layers: &[usize]) -> Result<Vec<u32>> {
    let mut out = vec![];
    for &layer in layers {
        let w = lm
            .model
            .down_proj(layer)?
            .weight
            .to_dtype(loci_core::DType::F32)?;
        out.extend(
            w.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits()),
        );
    }
    Ok(out)
}

/// The configured method with its hyper-parameters and statistics.
enum Method {
    Rome(RomeHparams, KeyStats),
    Memit(MemitHparams, Vec<KeyStats>),
    Ft(FtHparams),
}

impl Method {
    fn layers(&self) -> Vec<usize> {
        match self {
            Method::Rome(hp, _) => vec![hp.layer],
            Method::Memit(hp, _) => hp.layers.clone(),
            Method::Ft(hp) => hp.layers.clone(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Method::Rome(hp, _) => format!("ROME at layer {}", hp.layer),
            Method::Memit(hp, _) => format!("MEMIT at layers {:?}", hp.layers),
            Method::Ft(hp) => format!(
                "fine-tuning of layers {:?} (L∞ ε {}, {} objective)",
                hp.layers,
                hp.norm_constraint
                    .map_or("none".to_string(), |e| e.to_string()),
                serde_json::to_value(hp.objective)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            ),
        }
    }
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

/// The first `n` (default: all) CounterFact cases of a file; none is an error.
pub fn read_cases(path: &std::path::Path, n: Option<usize>) -> Result<Vec<CounterFactCase>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut cases = parse_cases(&text)?;
    if let Some(n) = n {
        cases.truncate(n);
    }
    if cases.is_empty() {
        bail!("no cases in {}", path.display());
    }
    Ok(cases)
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let mut lm = a.model.load()?;
    let cases = read_cases(&a.dataset, a.n)?;
    let method = match a.method.as_str() {
        "rome" => {
            if !a.layers.is_empty() || a.batch != 1 {
                bail!("--layers and --batch are for --method memit");
            }
            let mut hp = hparams(&lm, a.layer)?;
            if let Some(s) = a.v_steps {
                hp.v_num_grad_steps = s;
            }
            let stats = a.stats.ensure(&lm, hp.layer)?;
            Method::Rome(hp, stats)
        }
        "memit" => {
            if a.layer.is_some() {
                bail!("--layer is for ROME; MEMIT edits --layers L1,L2,...");
            }
            let mut hp = memit_hparams(&lm, &a.layers)?;
            if let Some(s) = a.v_steps {
                hp.v_num_grad_steps = s;
            }
            let stats = a.stats.ensure_layers(&lm, &hp.layers)?;
            Method::Memit(hp, stats)
        }
        "ft" => {
            if a.layer.is_some() || a.batch != 1 {
                bail!("--layer is for ROME and --batch for MEMIT; fine-tuning trains --layers");
            }
            Method::Ft(ft_hparams(&lm, &a.layers, &a.ft)?)
        }
        other => bail!("--method {other:?}: use rome, memit or ft"),
    };
    let consistency = match &a.snippets {
        Some(p) if !a.no_generation => Some(consistency(p, &a.stats)?),
        Some(_) => bail!("--snippets scores generations: drop --no-generation"),
        None => None,
    };
    let layers = method.layers();
    let original = bits(&lm, &layers)?;
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
    for chunk in cases.chunks(a.batch) {
        let generate = !a.no_generation;
        let records: Result<Vec<CaseRecord>> = match &method {
            Method::Rome(hp, stats) => lm
                .eval_case(&chunk[0], hp, Some(stats), generate, consistency.as_ref())
                .map(|r| vec![r])
                .map_err(Into::into),
            Method::Ft(hp) => lm
                .eval_cases_with(chunk, generate, consistency.as_ref(), |lm, r| {
                    Ok(Edit::Ft(lm.finetune(&r[0], hp)?))
                })
                .map_err(Into::into),
            Method::Memit(hp, stats) => lm
                .eval_memit_batch(chunk, hp, stats, generate, consistency.as_ref(), &mut |m| {
                    pb.set_message(m.to_string())
                })
                .map_err(Into::into),
        };
        let records = match records {
            Ok(r) => r,
            Err(e) => {
                let ids: Vec<String> = chunk.iter().map(|c| c.case_id.to_string()).collect();
                // Through `suspend`: `println` is silent when stderr is not a terminal.
                pb.suspend(|| eprintln!("case {}: {e}", ids.join(", ")));
                pb.inc(chunk.len() as u64);
                continue;
            }
        };
        for rec in records {
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
    }
    pb.finish_and_clear();
    if let Some(mut w) = out {
        w.flush()?;
    }
    if bits(&lm, &layers)? != original {
        bail!("internal error: the model differs from the original after the evaluation");
    }
    let s = summarize(&metrics);
    if a.summary {
        return print_json(&s);
    }
    let batch = match &method {
        Method::Memit(..) => format!(", {} per edit", a.batch),
        Method::Rome(..) | Method::Ft(..) => String::new(),
    };
    println!(
        "{} on {} cases of {}{batch}",
        method.describe(),
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
