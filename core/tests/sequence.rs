//! Sequential editing: each edit is made on the model the earlier ones left and kept, every
//! case is scored before, right after its edit and after the last, a failing edit is recorded
//! and skipped, a cancelled one ends the sequence, and the whole sequence is undone bit for bit.

mod common;

use loci_core::edit::{Edit, RewriteRequest, RomeHparams};
use loci_core::eval::SequenceOptions;
use loci_core::LoadedModel;

/// p(new target | prompt) as the model is now.
fn p_new(lm: &LoadedModel, r: &RewriteRequest) -> loci_core::Result<f32> {
    Ok(lm.score_targets(&[(r.filled(), r.target_new.str.clone())])?[0].prob)
}

#[test]
fn edits_in_sequence_stay_applied_until_the_end_and_then_undo_exactly() {
    let mut lm = common::tiny("tiny-gpt2");
    let original = common::down_bits(&lm);
    let mut hp = RomeHparams::at_layer(1);
    hp.mom2_adjustment = false;
    hp.v_num_grad_steps = 8;
    let req = |p: &str, s: &str, t: &str| RewriteRequest::from_prompt(p, s, t).unwrap();
    let mut bad = req("{} plays the", "Miles Davis", "piano");
    bad.target_new.str = " ".into();
    let cases = vec![
        req("{} is located in the city of", "Eiffel Tower", "Rome"),
        req("The mother tongue of {} is", "Danielle Darrieux", "English"),
        bad,
        req("{} is a citizen of", "Toko Yasuda", "Canada"),
    ];
    let mut heard = vec![];
    let opts = SequenceOptions {
        batch: 1,
        checkpoint_every: 2,
        checkpoint_cases: 0,
    };
    let seq = lm
        .edit_in_sequence(
            &cases,
            opts,
            |r| r,
            p_new,
            |lm, reqs| Ok(Edit::Rome(lm.rome(&reqs[0], &hp, None)?)),
            &mut |done, scored| heard.push((done, scored.is_some())),
        )
        .unwrap();
    let out = &seq.cases;
    assert_eq!(
        common::down_bits(&lm),
        original,
        "the sequence is undone bit for bit"
    );
    // A blank target is no edit: recorded, and the sequence goes on without it.
    let why = out[2].error.as_deref().unwrap();
    assert!(why.contains("empty"), "{why}");
    assert!(out[2].pre.is_some() && out[2].post.is_none() && out[2].last.is_none());
    assert_eq!(
        heard,
        [(1, true), (2, true), (3, false), (4, true)],
        "progress in case order"
    );
    for (i, o) in out.iter().enumerate().filter(|(i, _)| *i != 2) {
        let (pre, post, last) = (o.pre.unwrap(), o.post.unwrap(), o.last.unwrap());
        assert!(o.error.is_none());
        assert!(
            post > pre,
            "case {i}: its edit raises its target ({pre} → {post})"
        );
        assert!(o.edit_seconds > 0.0);
        assert!(last.is_finite());
    }
    // The last edit is the last change: its scores after it and after the sequence agree.
    assert_eq!(out[3].post, out[3].last);
    // Later edits of the same layer move the first case's score: the edits were kept.
    assert_ne!(out[0].post, out[0].last);
    // A checkpoint after two cases rescored both: the second was the last change by then.
    assert_eq!(
        seq.checkpoints.len(),
        1,
        "the end of the sequence is `last`"
    );
    let cp = &seq.checkpoints[0];
    assert_eq!(cp.cases_done, 2);
    assert_eq!(
        cp.scores.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(Some(cp.scores[1].1), out[1].post);
    assert_ne!(
        Some(cp.scores[0].1),
        out[0].post,
        "case 0 rescored after edit 1"
    );

    // Each edit was made on the model the earlier ones left: the second edit alone, on the
    // unedited model, is a different edit.
    let first = lm.rome(&cases[0], &hp, None).unwrap();
    let applied = lm.apply(&Edit::Rome(first)).unwrap();
    let after_first = lm.rome(&cases[1], &hp, None).unwrap();
    lm.undo_edit(applied).unwrap();
    let alone = lm.rome(&cases[1], &hp, None).unwrap();
    assert_ne!(after_first.right, alone.right);
}

#[test]
fn chained_applied_edits_keep_one_original_per_layer() {
    let mut lm = common::tiny("tiny-gpt2");
    let original = common::down_bits(&lm);
    let mut hp = RomeHparams::at_layer(1);
    hp.mom2_adjustment = false;
    hp.v_num_grad_steps = 3;
    let r = RewriteRequest::from_prompt("{} is located in", "Eiffel Tower", "Rome").unwrap();
    let e = Edit::Rome(lm.rome(&r, &hp, None).unwrap());
    let a = lm.apply(&e).unwrap();
    let b = lm.apply(&e).unwrap();
    hp.layer = 2;
    let c = lm
        .apply(&Edit::Rome(lm.rome(&r, &hp, None).unwrap()))
        .unwrap();
    let all = a.then(b).then(c);
    let layers: Vec<usize> = all.originals.iter().map(|(l, _)| *l).collect();
    assert_eq!(layers, [1, 2]);
    assert_ne!(common::down_bits(&lm), original);
    lm.undo_edit(all).unwrap();
    assert_eq!(common::down_bits(&lm), original);
}

#[test]
fn a_cancelled_edit_ends_the_sequence_undone() {
    let mut lm = common::tiny("tiny-gpt2");
    let original = common::down_bits(&lm);
    let mut hp = RomeHparams::at_layer(1);
    hp.mom2_adjustment = false;
    hp.v_num_grad_steps = 4;
    let req = |p: &str, s: &str, t: &str| RewriteRequest::from_prompt(p, s, t).unwrap();
    let cases = vec![
        req("{} is located in the city of", "Eiffel Tower", "Rome"),
        req("The mother tongue of {} is", "Danielle Darrieux", "English"),
        req("{} is a citizen of", "Toko Yasuda", "Canada"),
    ];
    let mut made = 0;
    let out = lm.edit_in_sequence(
        &cases,
        SequenceOptions {
            batch: 1,
            checkpoint_every: 0,
            checkpoint_cases: 0,
        },
        |r| r,
        p_new,
        |lm, reqs| {
            made += 1;
            if made == 2 {
                return Err(loci_core::LociError::Cancelled);
            }
            Ok(Edit::Rome(lm.rome(&reqs[0], &hp, None)?))
        },
        &mut |_, _| {},
    );
    assert!(matches!(out, Err(loci_core::LociError::Cancelled)));
    assert_eq!(made, 2, "no edit is made after the stop");
    assert_eq!(common::down_bits(&lm), original, "the first edit is undone");
}
