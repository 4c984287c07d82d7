//! Many independent edits at once: ROME's v* and MEMIT's z of several requests optimised in one
//! batch give each request the edit it gets alone (rewrite probabilities within 1e-4, the same
//! stopping step), on the tiny models and on SmolLM2; a request refused in a batch fails alone.

mod common;

use loci_core::edit::{Direction, EditGoal, KeyStats, MemitHparams, RewriteRequest, RomeHparams};
use loci_core::LoadedModel;

/// Facts of different lengths (their rows pad differently in the batch).
fn requests() -> Vec<RewriteRequest> {
    vec![
        common::request(
            "{} is located in the city of",
            "Eiffel Tower",
            "Rome",
            "Paris",
        ),
        common::request(
            "{} plays the sport of",
            "Michael Jordan",
            "baseball",
            "basketball",
        ),
        common::request(
            "The mother tongue of {} is",
            "Danielle Darrieux",
            "English",
            "French",
        ),
        common::request("{}, whose capital is", "Japan", "Beijing", "Tokyo"),
    ]
}

/// p(new target) after each request's prompt, the edit applied (and undone after).
fn rewrite_prob(lm: &mut LoadedModel, edit: &loci_core::edit::Edit) -> f32 {
    let req = edit.requests()[0].clone();
    let applied = lm.apply(edit).unwrap();
    let p = lm.target_prob(&req.filled(), &req.target_new.str).unwrap();
    lm.undo_edit(applied).unwrap();
    p
}

/// Within 1e-4, and within 1e-3 of the value itself when it is small (the tiny models' random
/// weights give every target a small probability: an absolute 1e-4 would hide a wrong edit).
fn close(a: f32, b: f32, what: &str) {
    let tol = (1e-3 * b.abs()).min(1e-4);
    assert!((a - b).abs() <= tol, "{what}: batched {a} vs alone {b}");
}

/// ROME's batch against each request alone, at `hp`.
fn rome_batch_equals_alone(lm: &mut LoadedModel, hp: &RomeHparams, st: Option<&KeyStats>) {
    let reqs = requests();
    let batch = lm.rome_batch(&reqs, hp, st).unwrap();
    for (req, b) in reqs.iter().zip(batch) {
        let b = b.unwrap();
        let one = lm.rome(req, hp, st).unwrap();
        assert_eq!(
            b.stats.losses.len(),
            one.stats.losses.len(),
            "{}",
            req.subject
        );
        for (x, y) in b.stats.losses.iter().zip(&one.stats.losses) {
            close(*x, *y, "loss");
        }
        let (pb, p1) = (
            rewrite_prob(lm, &loci_core::edit::Edit::Rome(b)),
            rewrite_prob(lm, &loci_core::edit::Edit::Rome(one)),
        );
        close(pb, p1, &format!("p({}) after ROME", req.target_new.str));
    }
}

fn memit_batch_equals_alone(lm: &mut LoadedModel, hp: &MemitHparams, st: &[KeyStats]) {
    let reqs = requests();
    let batch = lm.memit_batch(&reqs, hp, st).unwrap();
    for (req, b) in reqs.iter().zip(batch) {
        let b = b.unwrap();
        let one = lm
            .memit(std::slice::from_ref(req), hp, st, &mut |_| {})
            .unwrap();
        assert_eq!(b.stats.z_losses[0].len(), one.stats.z_losses[0].len());
        let (pb, p1) = (
            rewrite_prob(lm, &loci_core::edit::Edit::Memit(b)),
            rewrite_prob(lm, &loci_core::edit::Edit::Memit(one)),
        );
        close(pb, p1, &format!("p({}) after MEMIT", req.target_new.str));
    }
}

#[test]
fn batched_edits_equal_edits_alone_on_the_tiny_models() {
    for name in ["tiny-gpt2", "tiny-gptj", "tiny-llama"] {
        let mut lm = common::tiny(name);
        let st = common::key_stats(&lm, &[0, 1], 40, 64);
        let mut hp = RomeHparams::at_layer(1);
        hp.v_num_grad_steps = 6;
        rome_batch_equals_alone(&mut lm, &hp, Some(&st[1]));
        // Under subject noise (fact forcing), each request draws the noise it draws alone.
        // (Lowering is checked on SmolLM2: on these random weights every target's p is ~1e-3,
        // its gradients are at the rounding's scale, and Adam's first steps — the sign of each
        // component — follow the rounding, batched or not.)
        hp.goal = EditGoal {
            direction: Direction::Raise,
            subject_noise: Some(0.5),
        };
        rome_batch_equals_alone(&mut lm, &hp, Some(&st[1]));
        let mut mh = MemitHparams::at_layers(vec![0, 1]);
        mh.v_num_grad_steps = 6;
        memit_batch_equals_alone(&mut lm, &mh, &st);
    }
}

#[test]
fn batched_edits_equal_edits_alone_on_smollm2() {
    let Some(base) = common::smol() else { return };
    let mut lm = base.clone();
    let st = common::key_stats(&lm, &[5, 6], 12, 256);
    let mut hp = RomeHparams::at_layer(6);
    hp.v_num_grad_steps = 10;
    rome_batch_equals_alone(&mut lm, &hp, Some(&st[1]));
    // Fact erasure under subject noise, as the study poses it to ROME.
    hp.goal = EditGoal {
        direction: Direction::Lower,
        subject_noise: Some(0.1),
    };
    hp.v_lr = 5e-2;
    hp.v_num_grad_steps = 6;
    rome_batch_equals_alone(&mut lm, &hp, Some(&st[1]));
    let mut mh = MemitHparams::at_layers(vec![5, 6]);
    mh.v_num_grad_steps = 10;
    memit_batch_equals_alone(&mut lm, &mh, &st);
}

#[test]
fn a_refused_request_fails_alone_in_its_batch() {
    let lm = common::tiny("tiny-gpt2");
    let mut reqs = requests();
    reqs[1].target_new.str = "  ".into();
    let mut hp = RomeHparams::at_layer(1);
    hp.mom2_adjustment = false;
    hp.v_num_grad_steps = 3;
    let out = lm.rome_batch(&reqs, &hp, None).unwrap();
    assert!(out[1].as_ref().is_err());
    let alone = lm.rome(&reqs[0], &hp, None).unwrap();
    let batched = out[0].as_ref().unwrap();
    assert_eq!(batched.stats.losses.len(), alone.stats.losses.len());
    for (x, y) in batched.right.iter().zip(&alone.right) {
        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
    }
    assert!(out[2].is_ok() && out[3].is_ok());
    // A batch-wide fault (a layer out of range) refuses the whole batch.
    hp.layer = 99;
    assert!(lm.rome_batch(&reqs, &hp, None).is_err());
}

/// A CounterFact-shaped case of each request, with a paraphrase and a neighbour.
fn case_of(req: &RewriteRequest, id: u64) -> loci_core::eval::CounterFactCase {
    loci_core::eval::CounterFactCase {
        case_id: id,
        requested_rewrite: req.clone(),
        paraphrase_prompts: vec![format!("In short. {}", req.filled())],
        neighborhood_prompts: vec!["The Louvre is located in the city of".into()],
        attribute_prompts: vec![],
        generation_prompts: vec![],
        neighborhood_true: None,
    }
}

#[test]
fn hooked_edits_score_as_applied_weights_each_row_its_own() {
    use loci_core::edit::{Edit, RowEdits};
    use loci_core::study::{NoisedScoring, SubjectNoise};
    let mut lm = common::tiny("tiny-llama");
    let st = common::key_stats(&lm, &[0, 1], 40, 64);
    let reqs = requests();
    let mut hp = RomeHparams::at_layer(1);
    hp.v_num_grad_steps = 4;
    let mut mh = MemitHparams::at_layers(vec![0, 1]);
    mh.v_num_grad_steps = 4;
    let mut ft = loci_core::edit::FtHparams::at_layers(vec![0, 1], Some(5e-3));
    ft.lr = 1e-2;
    ft.steps = 4;
    let edits = [
        Edit::Rome(lm.rome(&reqs[0], &hp, Some(&st[1])).unwrap()),
        Edit::Memit(lm.memit(&reqs[1..3], &mh, &st, &mut |_| {}).unwrap()),
        Edit::Ft(lm.finetune(&reqs[3], &ft).unwrap()),
    ];
    assert!(edits.iter().all(RowEdits::can_hook));
    let cases: Vec<_> = reqs.iter().zip(1..).map(|(r, i)| case_of(r, i)).collect();
    let noised = Some(NoisedScoring {
        noise: SubjectNoise {
            sigma: 0.3,
            seed: 5,
        },
        samples: 2,
    });
    for scoring in [None, noised] {
        // Cases 0, 1 and 3 under the three edits, case 2 unedited, in one batch.
        let items = [
            (&cases[0], "Rome", Some(&edits[0])),
            (&cases[1], "baseball", Some(&edits[1])),
            (&cases[2], "English", None),
            (&cases[3], "Beijing", Some(&edits[2])),
        ];
        let batched = lm.problem_probs_batch(&items, scoring).unwrap();
        for ((case, target, edit), b) in items.iter().zip(&batched) {
            let ppl_hooked = lm
                .perplexity_batch(&[(&[case.requested_rewrite.filled()][..], *edit)], 16)
                .unwrap()[0];
            let applied = edit.map(|e| lm.apply(e).unwrap());
            let alone = lm.problem_probs(case, target, scoring).unwrap();
            let ppl_alone = lm
                .perplexity(&[case.requested_rewrite.filled()], 16)
                .unwrap();
            if let Some(a) = applied {
                lm.undo_edit(a).unwrap();
            }
            let pairs = [
                (b.rewrite, alone.rewrite),
                (b.paraphrase.unwrap(), alone.paraphrase.unwrap()),
                (b.neighborhood.unwrap(), alone.neighborhood.unwrap()),
                (ppl_hooked, ppl_alone),
            ];
            for (x, y) in pairs {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "{target}: {x} vs {y}"
                );
            }
        }
        // The edits did move their targets: hooked rows are not unedited rows.
        for (i, target) in [(0, "Rome"), (3, "Beijing")] {
            let unedited = lm.problem_probs(&cases[i], target, scoring).unwrap();
            let moved = (batched[i].rewrite - unedited.rewrite).abs() / unedited.rewrite;
            assert!(
                moved > 1e-2,
                "{} vs {}",
                batched[i].rewrite,
                unedited.rewrite
            );
        }
    }
}

/// Fine-tuning's batch against each request alone, at `hp`.
fn ft_batch_equals_alone(lm: &mut LoadedModel, hp: &loci_core::edit::FtHparams) {
    let mut reqs = requests();
    reqs.push(reqs[0].clone());
    reqs[4].target_new.str = "  ".into();
    let batch = lm.finetune_batch(&reqs, hp).unwrap();
    assert!(batch[4].is_err(), "a refused request fails alone");
    for (req, b) in reqs.iter().zip(batch).take(4) {
        let b = b.unwrap();
        let one = lm.finetune(req, hp).unwrap();
        assert_eq!(
            b.stats.losses.len(),
            one.stats.losses.len(),
            "{}",
            req.subject
        );
        for (x, y) in b.stats.losses.iter().zip(&one.stats.losses) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "loss {x} vs {y}");
        }
        let (pb, p1) = (
            rewrite_prob(lm, &loci_core::edit::Edit::Ft(b)),
            rewrite_prob(lm, &loci_core::edit::Edit::Ft(one)),
        );
        close(pb, p1, &format!("p({}) after FT", req.target_new.str));
    }
}

#[test]
fn batched_fine_tuning_equals_fine_tuning_alone() {
    use loci_core::edit::{FtHparams, FtObjective};
    for name in ["tiny-gpt2", "tiny-llama"] {
        let mut lm = common::tiny(name);
        let mut hp = FtHparams::at_layers(vec![0, 1], Some(2e-3));
        hp.lr = 1e-2;
        hp.steps = 6;
        ft_batch_equals_alone(&mut lm, &hp);
        // Hase et al.'s objective, lowering, under fresh subject noise every step.
        hp.objective = FtObjective::Sequence;
        hp.goal = EditGoal {
            direction: Direction::Lower,
            subject_noise: Some(0.5),
        };
        hp.noise_samples = 3;
        ft_batch_equals_alone(&mut lm, &hp);
    }
    let Some(base) = common::smol() else { return };
    let mut lm = base.clone();
    let mut hp = FtHparams::at_layers(vec![6], Some(5e-3));
    hp.lr = 5e-3;
    hp.steps = 8;
    hp.objective = FtObjective::Sequence;
    ft_batch_equals_alone(&mut lm, &hp);
}
