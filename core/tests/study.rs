//! Hase et al.'s study: the five problems pose a case as the paper does, erasure lowers and
//! forcing noises what it should, the scores and perplexities are computed as defined, and on
//! SmolLM2 a layer sweep traces, edits, scores and leaves the model exactly as it was.

mod common;

use loci_core::edit::{Direction, Edit, FtHparams, FtObjective, RomeHparams};
use loci_core::eval::CounterFactCase;
use loci_core::study::{
    analyze, EditProblem, Metric, NoisedScoring, Quietly, StudyConfig, StudyLine, StudyMethod,
    StudyObserver, SubjectNoise,
};
use loci_core::LoadedModel;

fn tiny() -> LoadedModel {
    common::tiny("tiny-gpt2")
}

fn eiffel() -> CounterFactCase {
    CounterFactCase {
        case_id: 7,
        requested_rewrite: common::request(
            "{} is located in the city of",
            "The Eiffel Tower",
            "Rome",
            "Paris",
        ),
        paraphrase_prompts: vec!["It is well known. The Eiffel Tower is in the city of".into()],
        neighborhood_prompts: vec!["The Louvre is located in the city of".into()],
        attribute_prompts: vec![],
        generation_prompts: vec![],
        neighborhood_true: None,
    }
}

const NOISE: SubjectNoise = SubjectNoise {
    sigma: 0.5,
    seed: 1,
};

#[test]
fn each_problem_poses_the_case_as_the_paper_does() {
    let lm = tiny();
    let case = eiffel();
    let target = |p: EditProblem| lm.problem_case(&case, p, NOISE).unwrap();
    assert_eq!(target(EditProblem::ErrorInjection).target(), "Rome");
    for p in [
        EditProblem::FactErasure,
        EditProblem::FactAmplification,
        EditProblem::FactForcing,
    ] {
        assert_eq!(target(p).target(), "Paris", "{p:?}");
    }
    // Tracing reversal: the noised model's own continuation, without the prompt, the same on
    // every call (fixed seed) and within the 12-token budget.
    let rev = target(EditProblem::TracingReversal);
    let rw = &case.requested_rewrite;
    let again = lm.noised_continuation(rw, NOISE, 12).unwrap();
    assert!(
        again.starts_with(rev.target()),
        "{again:?} vs {:?}",
        rev.target()
    );
    assert!(!rev.target().contains("located in"));
    let prompt = lm.encode_prompt(&rw.filled()).unwrap().len();
    let budget = 12usize.saturating_sub(prompt).max(1);
    assert_eq!(
        rev.target(),
        lm.noised_continuation(rw, NOISE, budget).unwrap()
    );
    // The noise matters: without it (σ → 0) the continuation is the clean greedy one.
    let clean = lm
        .generate(&rw.filled(), 3, loci_core::Sampling::Greedy)
        .unwrap();
    let quiet = SubjectNoise {
        sigma: 1e-9,
        seed: 1,
    };
    assert_eq!(
        lm.noised_continuation(rw, quiet, 3).unwrap(),
        lm.tokenizer.decode(&clean.new_ids).unwrap()
    );
    assert_eq!(
        EditProblem::FactErasure.direction(),
        Direction::Lower,
        "erasure lowers"
    );
    for p in EditProblem::ALL {
        assert_eq!(p.name().parse::<EditProblem>().unwrap(), p);
        assert_eq!(p.noised(), p == EditProblem::FactForcing);
    }
    assert!("fact_guessing".parse::<EditProblem>().is_err());
}

#[test]
fn noised_scoring_corrupts_the_subject_prompts_only() {
    let lm = tiny();
    let case = eiffel();
    let clean = lm.problem_probs(&case, "Paris", None).unwrap();
    let rw = &case.requested_rewrite;
    // The case's rows are scored in one right-padded batch: its matrix products have other
    // shapes than the prompt's alone, so the two agree to f32 rounding, not bit for bit.
    let alone = lm.target_prob(&rw.filled(), "Paris").unwrap();
    assert!(
        (clean.rewrite - alone).abs() <= 1e-5 * alone,
        "{} vs {alone}",
        clean.rewrite
    );
    let noised = NoisedScoring {
        noise: SubjectNoise {
            sigma: 2.0,
            seed: 3,
        },
        samples: 4,
    };
    let n = lm.problem_probs(&case, "Paris", Some(noised)).unwrap();
    assert!((n.rewrite - clean.rewrite).abs() > 1e-6 * clean.rewrite);
    assert!((n.paraphrase.unwrap() - clean.paraphrase.unwrap()).abs() > 1e-9);
    // The neighbour is another subject: scored clean, alone in its row or not.
    assert!((n.neighborhood.unwrap() - clean.neighborhood.unwrap()).abs() < 1e-6);
    // Perplexity of a padded batch is the mean of each text's own.
    let a = "The Eiffel Tower is a wrought-iron lattice tower in Paris.".to_string();
    let b = "Rome is the capital city of Italy.".to_string();
    let both = lm.perplexity(&[a.clone(), b.clone()], 100).unwrap();
    let (pa, pb) = (
        lm.perplexity(std::slice::from_ref(&a), 100).unwrap(),
        lm.perplexity(std::slice::from_ref(&b), 100).unwrap(),
    );
    assert!(
        (both - (pa + pb) / 2.0).abs() < 1e-4 * both,
        "{both} {pa} {pb}"
    );
    assert!(pa > 1.0);
    // Truncation: only the first tokens count.
    let short = lm.perplexity(std::slice::from_ref(&a), 4).unwrap();
    assert!((short - pa).abs() > 1e-6);
    assert!(lm.perplexity(&[], 100).is_err());
}

#[test]
fn erasure_lowers_the_true_object_and_forcing_edits_under_noise() {
    let mut lm = tiny();
    let case = eiffel();
    let rw = &case.requested_rewrite;
    let stats = common::key_stats(&lm, &[1], 20, 64).pop().unwrap();
    let bits0 = common::down_bits(&lm);
    let mut erase = rw.clone();
    erase.target_new = rw.target_true.clone().unwrap();
    let before = lm.target_prob(&rw.filled(), "Paris").unwrap();

    let mut hp = RomeHparams::at_layer(1);
    hp.context_templates = vec![(3, 2)];
    hp.v_num_grad_steps = 10;
    hp.goal.direction = Direction::Lower;
    let e = lm.rome(&erase, &hp, Some(&stats)).unwrap();
    // Lowering never stops early: it runs every step, and its loss is p itself (≤ 1 + KL/WD).
    assert_eq!(e.stats.losses.len(), hp.v_num_grad_steps);
    let applied = lm.apply(&Edit::Rome(e)).unwrap();
    let after = lm.target_prob(&rw.filled(), "Paris").unwrap();
    lm.undo_edit(applied).unwrap();
    assert!(after < before, "ROME erasure: {before} → {after}");

    let mut ft = FtHparams::at_layers(vec![1], Some(1e-2));
    ft.lr = 1e-2;
    ft.steps = 10;
    ft.objective = FtObjective::Sequence;
    ft.goal.direction = Direction::Lower;
    let e = lm.finetune(&erase, &ft).unwrap();
    assert_eq!(e.stats.losses.len(), 10);
    assert!((e.stats.losses[0] - before).abs() < 1e-4 * (1.0 + before));
    let applied = lm.apply(&Edit::Ft(e)).unwrap();
    let after = lm.target_prob(&rw.filled(), "Paris").unwrap();
    lm.undo_edit(applied).unwrap();
    assert!(after < before, "FT erasure: {before} → {after}");

    // Fact forcing: the same request with the subject noised computes another edit.
    let mut force = hp.clone();
    force.goal.direction = Direction::Raise;
    let plain = lm.rome(&erase, &force, Some(&stats)).unwrap();
    force.goal.subject_noise = Some(0.5);
    let noised = lm.rome(&erase, &force, Some(&stats)).unwrap();
    assert_ne!(plain.right, noised.right);
    assert_ne!(
        plain.left, noised.left,
        "the key is read from the noised subject"
    );
    let mut ftn = ft.clone();
    ftn.goal.direction = Direction::Raise;
    let plain = lm.finetune(&erase, &ftn).unwrap();
    ftn.goal.subject_noise = Some(0.5);
    ftn.noise_samples = 3;
    let noised = lm.finetune(&erase, &ftn).unwrap();
    assert_ne!(plain.stats.losses[0], noised.stats.losses[0]);
    ftn.noise_samples = 0;
    assert!(lm.finetune(&erase, &ftn).is_err());
    assert_eq!(
        common::down_bits(&lm),
        bits0,
        "every edit was undone exactly"
    );
}

#[test]
fn smollm2_layer_sweep_traces_edits_scores_and_restores_the_model() {
    let Some(base) = common::smol() else { return };
    let mut lm = base.clone();
    let n_layer = lm.model.n_layer();
    let layers = vec![4, 8];
    let stats = common::key_stats(&lm, &layers, 30, 256);
    // Fewer optimisation steps and context templates than the shipped settings keep the test
    // short.
    let mut rome = RomeHparams::for_model(&lm.model.cfg).unwrap();
    rome.v_num_grad_steps = 12;
    rome.context_templates = vec![(5, 2)];
    let mut ft = FtHparams::for_model(&lm.model.cfg).unwrap();
    ft.steps = 10;
    ft.objective = FtObjective::Sequence;
    let cfg = StudyConfig {
        methods: vec![StudyMethod::Rome, StudyMethod::Ft1],
        problems: vec![EditProblem::ErrorInjection, EditProblem::FactErasure],
        layers: layers.clone(),
        noise: 0.35,
        trace_windows: vec![5, 1],
        localization: loci_core::trace::TraceMethod::Exact,
        trace_samples: 5,
        min_prob: 0.02,
        correct_only: true,
        essence: false,
        noised_samples: 4,
        seed: 1,
        rome: rome.clone(),
        memit: loci_core::edit::MemitHparams::for_model(&lm.model.cfg).unwrap(),
        ft,
    };
    let bits0 = common::down_bits(&lm);
    let mut case = eiffel();
    case.requested_rewrite.subject = "The Eiffel Tower".into();
    struct Seen(Vec<u64>, usize);
    impl StudyObserver for Seen {
        fn on_case(&mut self, c: &loci_core::study::CaseLine) {
            assert!(
                c.trace.is_some(),
                "the case arrives traced, before its edits"
            );
            self.0.push(c.case_id);
        }
        fn on_edit(&mut self, _: &loci_core::study::EditLine) -> bool {
            assert_eq!(self.0.len(), 1);
            self.1 += 1;
            true
        }
    }
    let mut seen = Seen(vec![], 0);
    let result = lm
        .study_case(
            &case,
            &cfg,
            &mut |_, ls| {
                Ok(ls
                    .iter()
                    .map(|l| stats[layers.iter().position(|x| x == l).unwrap()].clone())
                    .collect())
            },
            &mut seen,
        )
        .unwrap();
    assert_eq!(
        common::down_bits(&lm),
        bits0,
        "the sweep leaves the weights as they were"
    );
    let c = &result.case;
    assert!(c.skipped.is_none() && c.is_correct, "{c:?}");
    let trace = c.trace.as_ref().unwrap();
    // The trace explains the whole true object: its clean score is p(" Paris").
    assert!(
        (trace.high - c.p_true).abs() < 1e-4,
        "{} {}",
        trace.high,
        c.p_true
    );
    assert!(trace.low < trace.high);
    assert_eq!(trace.max_fraction_restored.len(), n_layer);
    // Window 1 is traced too, for re-analysis: one layer restores less than five.
    assert_eq!(trace.window, 5);
    let w1 = trace.at_window(1).unwrap();
    assert_eq!(w1.max_fraction_restored.len(), n_layer);
    assert!(trace.at_window(3).is_none());
    let sum = |v: &[f32]| v.iter().sum::<f32>();
    assert!(
        sum(&w1.max_fraction_restored) < sum(&trace.max_fraction_restored),
        "{w1:?} {trace:?}"
    );
    assert_eq!(result.edits.len(), 8);
    assert_eq!(seen.1, 8);
    for e in &result.edits {
        assert!(e.error.is_none(), "{e:?}");
        assert_eq!(e.tracing_effect, trace.max_fraction_restored[e.layer]);
        assert_eq!(e.edited_layers, vec![e.layer]);
        let s = &e.scores;
        for v in [s.rewrite, s.paraphrase.unwrap(), s.neighborhood.unwrap()] {
            assert!((0.0..=1.0).contains(&v), "{e:?}");
        }
        match (e.method, e.problem) {
            (_, EditProblem::ErrorInjection) => {
                assert_eq!(e.target, "Rome");
                assert!(e.post.rewrite > e.pre.rewrite, "{e:?}");
            }
            (_, EditProblem::FactErasure) => {
                assert_eq!(e.target, "Paris");
                assert!(e.post.rewrite < e.pre.rewrite, "{e:?}");
            }
            _ => unreachable!(),
        }
        if e.method == StudyMethod::Rome && e.problem == EditProblem::ErrorInjection {
            assert!(
                s.rewrite > 0.5,
                "ROME writes the fact at layer {}: {e:?}",
                e.layer
            );
        }
    }
    // The lines survive JSON and analyse into the paper's regressions.
    let lines: Vec<StudyLine> = result
        .lines()
        .into_iter()
        .map(|l| serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap())
        .collect();
    let an = analyze(&lines);
    assert_eq!((an.cases, an.cases_used, an.edits), (1, 1, 8));
    let cond = an
        .conditions
        .iter()
        .find(|c| {
            c.method == StudyMethod::Rome
                && c.problem == EditProblem::ErrorInjection
                && c.metric == Metric::Rewrite
        })
        .unwrap();
    assert_eq!(cond.n, 2);
    // Two points, one per layer: the layer explains everything, and there is nothing left to
    // test tracing on.
    assert!((cond.r2_layer.unwrap() - 1.0).abs() < 1e-9);
    assert!(cond.added_by_trace.is_none() && cond.f_test.is_none());
    let svg = loci_core::plot::study_svg(&an);
    assert!(svg.contains("rome · error_injection") && svg.contains("ft-1 · fact_erasure"));
    // Re-analysed with window 1's effects joined to the edits.
    assert_eq!(an.window, Some(5), "the window every case was joined with");
    let an1 = loci_core::study::analyze_window(&lines, 1).unwrap();
    assert_eq!(an1.window, Some(1));
    let rome1 = an1
        .layers
        .iter()
        .find(|m| m.method == StudyMethod::Rome && m.problem == EditProblem::ErrorInjection)
        .unwrap();
    let want: Vec<f64> = layers
        .iter()
        .map(|&l| w1.max_fraction_restored[l] as f64)
        .collect();
    assert_eq!(rome1.tracing_effect, want);
    assert_eq!(
        an1.mean_tracing_effect,
        w1.max_fraction_restored
            .iter()
            .map(|&x| x as f64)
            .collect::<Vec<_>>()
    );
    let e = loci_core::study::analyze_window(&lines, 3).unwrap_err();
    assert!(e.contains("window 3"), "{e}");

    // A case the model does not know is left out before any work.
    let mut unknown = eiffel();
    unknown.requested_rewrite = common::request(
        "{} is located in the city of",
        "The Eiffel Tower",
        "Rome",
        "Ulaanbaatar",
    );
    let r = lm
        .study_case(&unknown, &cfg, &mut |_, _| unreachable!(), &mut Quietly)
        .unwrap();
    assert!(r.case.skipped.is_some() && r.edits.is_empty());
    // Bad settings are refused.
    let mut bad = cfg.clone();
    bad.layers = vec![n_layer];
    assert!(lm
        .study_case(&case, &bad, &mut |_, _| unreachable!(), &mut Quietly)
        .is_err());
    let mut bad = cfg.clone();
    bad.trace_windows = vec![];
    assert!(lm
        .study_case(&case, &bad, &mut |_, _| unreachable!(), &mut Quietly)
        .is_err());
}

#[test]
fn an_edit_that_cannot_be_made_is_recorded_and_the_sweep_goes_on() {
    let mut lm = tiny();
    let stats = common::key_stats(&lm, &[1], 10, 64);
    let mut case = eiffel();
    // ROME needs the prompt to go on after the subject; fine-tuning does not.
    case.requested_rewrite = common::request("We visited {}", "the Eiffel Tower", "Rome", "Paris");
    let mut rome = RomeHparams::at_layer(1);
    rome.context_templates = vec![];
    let mut ft = FtHparams::at_layers(vec![1], Some(1e-2));
    ft.steps = 3;
    let cfg = StudyConfig {
        methods: vec![StudyMethod::Rome, StudyMethod::Ft1],
        problems: vec![EditProblem::ErrorInjection],
        layers: vec![1],
        noise: 0.5,
        trace_windows: vec![5],
        localization: loci_core::trace::TraceMethod::Exact,
        trace_samples: 2,
        min_prob: 0.0,
        correct_only: false,
        essence: false,
        noised_samples: 2,
        seed: 1,
        rome,
        memit: loci_core::edit::MemitHparams::at_layers(vec![1]),
        ft,
    };
    let bits0 = common::down_bits(&lm);
    let r = lm
        .study_case(&case, &cfg, &mut |_, _| Ok(stats.clone()), &mut Quietly)
        .unwrap();
    assert_eq!(r.edits.len(), 2);
    let (rome, ft) = (&r.edits[0], &r.edits[1]);
    assert!(
        rome.error
            .as_deref()
            .unwrap()
            .contains("continue after the subject"),
        "{rome:?}"
    );
    assert!(ft.error.is_none() && ft.post.rewrite > 0.0, "{ft:?}");
    assert_eq!(common::down_bits(&lm), bits0);
    // The analysis leaves the failed edit out and counts it.
    let an = analyze(&r.lines());
    assert_eq!((an.edits, an.failed_edits), (2, 1));
}
