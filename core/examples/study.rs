//! Hase et al. (2023), "Does localization inform editing?": trace each case's true answer, edit
//! it at each chosen layer with each method and problem, score and undo every edit, then regress
//! the edit scores on the layer and on the tracing effect there. Tiny settings (two cases, two
//! layers, ROME and FT-1, two problems, few samples and steps): the regressions mean nothing,
//! the example shows the calls (`loci study run` is the full sweep).
//!
//! Run: `cargo run --release -p loci-core --example study -- MODEL_DIR [CORPUS.txt]`
//! (without a model, the random `tiny-gpt2` test fixture; without a corpus for ROME's key
//! statistics, a built-in paragraph).

mod common;

use loci_core::edit::{FtHparams, FtObjective, MemitHparams, RomeHparams, StatsAccumulator};
use loci_core::study::{
    analyze, CaseLine, EditLine, EditProblem, StudyConfig, StudyMethod, StudyObserver,
};

const CASES: &str = r#"[
 {"case_id": 0, "requested_rewrite": {"prompt": "{} is located in the city of",
   "subject": "The Eiffel Tower", "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
  "paraphrase_prompts": ["It is well known. The Eiffel Tower is in the city of"],
  "neighborhood_prompts": ["The Louvre is located in the city of"]},
 {"case_id": 1, "requested_rewrite": {"prompt": "{} plays the sport of",
   "subject": "Michael Jordan", "target_new": {"str": "soccer"},
   "target_true": {"str": "basketball"}},
  "paraphrase_prompts": ["A star of the Chicago Bulls, Michael Jordan plays the sport of"],
  "neighborhood_prompts": ["LeBron James plays the sport of"]}
]"#;

/// Prints each case once it is traced and each edit once it is scored (and undone).
struct Print;

impl StudyObserver for Print {
    fn on_case(&mut self, c: &CaseLine) {
        let (id, p) = (c.case_id, c.p_true);
        let effect = c.trace.as_ref().map(|t| &t.max_fraction_restored);
        println!("case {id}: p(true) {p:.4}, tracing effect per layer {effect:.2?}");
    }
    fn on_edit(&mut self, e: &EditLine) -> bool {
        let (m, p, l, score) = (e.method.name(), e.problem.name(), e.layer, e.scores.rewrite);
        let error = e.error.as_deref().unwrap_or("");
        println!("  {m} {p} at layer {l}: rewrite score {score:.3} {error}");
        true
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut lm = common::load_model(args.next())?;
    let texts = common::corpus(args.next())?;
    let cases = loci_core::eval::parse_cases(CASES)?;
    let (model, n) = (lm.model.cfg.clone(), lm.model.n_layer());
    // The study sets each method's layers; these are the rest of their settings, cut short.
    let mut rome = RomeHparams::for_model(&model).unwrap_or_else(|| RomeHparams::at_layer(0));
    rome.v_num_grad_steps = 5;
    rome.context_templates = vec![(5, 2)];
    let mut ft =
        FtHparams::for_model(&model).unwrap_or_else(|| FtHparams::at_layers(vec![0], Some(1e-2)));
    ft.steps = 5;
    ft.objective = FtObjective::Sequence; // Hase et al.'s FT: the whole target's NLL
    let subjects = ["The Eiffel Tower", "Michael Jordan"];
    let cfg = StudyConfig {
        methods: vec![StudyMethod::Rome, StudyMethod::Ft1],
        problems: vec![EditProblem::ErrorInjection, EditProblem::FactErasure],
        layers: vec![n / 4, n / 2],
        // Hase et al.: σ = 3 × the subject embeddings' standard deviation.
        noise: 3.0 * loci_core::trace::embedding_std(&lm, &subjects)?,
        trace_samples: 3,
        trace_windows: vec![3],
        localization: loci_core::trace::TraceMethod::Exact,
        // A random model knows no fact; on a real one keep the known ones (0.02 and true).
        min_prob: 0.0,
        correct_only: false,
        essence: false,
        noised_samples: 2,
        seed: 1,
        rome,
        memit: MemitHparams::for_model(&model).unwrap_or_else(|| MemitHparams::at_layers(vec![0])),
        ft,
    };
    let mut lines = vec![];
    for case in &cases {
        let result = lm.study_case(
            case,
            &cfg,
            // ROME's key statistics of the layers asked, on the unedited model `m` handed over.
            &mut |m, layers| {
                let mut acc = StatsAccumulator::new(m, layers, 64)?;
                acc.add_texts(m, &texts[..])?;
                acc.finish(m, "example corpus")
            },
            &mut Print,
        )?;
        lines.extend(result.lines());
    }

    let an = analyze(&lines);
    let (cases, edits, failed) = (an.cases, an.edits, an.failed_edits);
    println!("{cases} cases, {edits} edits ({failed} failed)");
    let f = |x: Option<f64>| x.map_or("—".to_string(), |v| format!("{v:.3}"));
    println!("method problem score: n; R² of layer, of tracing effect, of both; added by tracing");
    for c in &an.conditions {
        let (m, p, s) = (c.method.name(), c.problem.name(), c.metric.name());
        let r2 = [c.r2_layer, c.r2_trace, c.r2_both].map(f).join(", ");
        println!("  {m} {p} {s}: {}; {r2}; {}", c.n, f(c.added_by_trace));
    }
    for l in &an.layers {
        let (m, p, layers, rewrite) = (l.method.name(), l.problem.name(), &l.layers, &l.rewrite);
        println!("{m} {p}: layers {layers:?}, mean rewrite score {rewrite:.3?}");
    }
    Ok(())
}
