//! Constrained fine-tuning: the L∞ constraint holds, the loss falls, biases train where there are
//! any, several layers train together, bad input changes nothing, the edit undoes exactly and
//! survives a file round trip; on SmolLM2 the fact moves and a neighbour stays.

mod common;

use loci_core::edit::{Edit, FtHparams, FtObjective, RewriteRequest};
use loci_core::LoadedModel;

#[test]
fn the_constraint_holds_and_the_edit_undoes_exactly() {
    let mut lm = common::tiny("tiny-gpt2");
    let req = common::request(
        "{} is located in the city of",
        "Eiffel Tower",
        "Rome Italy",
        "Paris",
    );
    let eps = 2e-3;
    let mut hp = FtHparams::at_layers(vec![1, 2], Some(eps));
    hp.lr = 1e-2;
    hp.steps = 8;
    hp.objective = FtObjective::Sequence;
    let bits0 = common::down_bits(&lm);

    let err = |lm: &mut LoadedModel, r: &RewriteRequest, hp: &FtHparams| {
        lm.finetune(r, hp).unwrap_err().to_string()
    };
    let mut bad = hp.clone();
    bad.layers = vec![2, 1];
    assert!(err(&mut lm, &req, &bad).contains("ascending"));
    bad.layers = vec![9];
    assert!(err(&mut lm, &req, &bad).contains("out of range"));
    bad = hp.clone();
    bad.norm_constraint = Some(-1.0);
    assert!(err(&mut lm, &req, &bad).contains("≥ 0"));
    bad = hp.clone();
    bad.steps = 0;
    assert!(err(&mut lm, &req, &bad).contains("at least one step"));
    let mut empty = req.clone();
    empty.target_new.str = " ".into();
    assert!(err(&mut lm, &empty, &hp).contains("empty"));
    assert_eq!(common::down_bits(&lm), bits0);

    // Every loss is followed by its step, the last one included: one step changes the weights.
    let mut one = hp.clone();
    one.steps = 1;
    let e1 = lm.finetune(&req, &one).unwrap();
    assert_eq!(e1.stats.losses.len(), 1);
    assert!(e1.stats.max_abs_change > 0.0, "one step trains");

    let e = lm.finetune(&req, &hp).unwrap();
    assert_eq!(
        common::down_bits(&lm),
        bits0,
        "fine-tuning leaves the model as it was"
    );
    let l = &e.stats.losses;
    assert!(l.last().unwrap() < &l[0], "the loss falls: {l:?}");
    assert!(e.stats.max_abs_change <= eps as f32 * 1.0001);
    assert!(
        e.stats.max_abs_change > eps as f32 * 0.5,
        "the steps reach the bound"
    );
    assert_eq!(e.layers.len(), 2);
    for layer in &e.layers {
        let moved = layer.weight.iter().filter(|x| **x != 0.0).count();
        assert!(moved > 0, "layer {} trained", layer.layer);
        let bias = layer
            .bias
            .as_ref()
            .expect("GPT-2's down-projection has a bias");
        assert!(bias.iter().any(|x| *x != 0.0));
        assert!(bias.iter().all(|x| x.abs() <= eps as f32 * 1.0001));
    }

    // The sequence objective scores the whole target: after the edit its NLL is lower.
    let nll = |lm: &LoadedModel| -> f32 {
        let s = lm
            .score_targets(&[(req.filled(), req.target_new.str.clone())])
            .unwrap();
        -s[0].prob.ln()
    };
    let before = nll(&lm);
    let applied = lm.apply(&Edit::Ft(e.clone())).unwrap();
    assert!(nll(&lm) < before);
    let edited = common::down_bits(&lm);
    lm.undo_edit(applied).unwrap();
    assert_eq!(common::down_bits(&lm), bits0, "undo is bit-exact");

    let back = match Edit::from_bytes(&e.to_bytes().unwrap()).unwrap() {
        Edit::Ft(b) => b,
        other => panic!("a fine-tuning file read as {}", other.method()),
    };
    assert_eq!(back, e);
    let applied = lm.apply(&Edit::Ft(back)).unwrap();
    assert_eq!(common::down_bits(&lm), edited);
    lm.undo_edit(applied).unwrap();

    // A model without MLP biases refuses an edit that changes one, and changes nothing.
    let mut llama = common::tiny("tiny-llama");
    let llama0 = common::down_bits(&llama);
    assert!(llama.apply(&Edit::Ft(e)).is_err());
    assert_eq!(common::down_bits(&llama), llama0);
}

#[test]
fn smollm2_learns_the_new_city_and_keeps_the_louvre() {
    let Some(base) = common::smol() else { return };
    let mut lm = base.clone();
    let hp = FtHparams::for_model(&lm.model.cfg).expect("shipped FT hparams for SmolLM2");
    let req = common::request(
        "{} is located in the city of",
        "Eiffel Tower",
        "Rome",
        "Paris",
    );
    let e = lm.finetune(&req, &hp).unwrap();
    eprintln!("losses {:?}", e.stats.losses);
    assert!(e.stats.max_abs_change <= hp.norm_constraint.unwrap() as f32 * 1.0001);
    let top = |lm: &LoadedModel, p: &str| lm.predict(p, 1).unwrap().top[0].token.clone();
    let applied = lm.apply(&Edit::Ft(e)).unwrap();
    assert_eq!(
        top(&lm, "The Eiffel Tower is located in the city of"),
        " Rome"
    );
    assert_eq!(top(&lm, "The Louvre is located in the city of"), " Paris");
    lm.undo_edit(applied).unwrap();
    assert_eq!(
        top(&lm, "The Eiffel Tower is located in the city of"),
        " Paris"
    );
}

/// An edit file records the model it was made for: applying it to another model — even one of
/// the very same shape — is refused and changes nothing; on its own model it applies.
#[test]
fn an_edit_file_applies_only_to_its_own_model() {
    let mut lm = common::tiny("tiny-gpt2");
    let mut twin = common::tiny("tiny-gptj");
    assert_eq!(lm.model.cfg.d_ff, twin.model.cfg.d_ff, "the same shapes");
    let req = common::request(
        "{} is located in the city of",
        "Eiffel Tower",
        "Rome",
        "Paris",
    );
    let mut hp = FtHparams::at_layers(vec![1], Some(5e-3));
    hp.steps = 2;
    let edit = Edit::Ft(lm.finetune(&req, &hp).unwrap());
    let file = edit.to_file(&lm).unwrap();
    let made_for = Edit::made_for(&file).unwrap().unwrap();
    assert_eq!(made_for.fingerprint, lm.info.fingerprint);
    let bits0 = common::down_bits(&twin);
    let e = twin.apply_file(&file).unwrap_err().to_string();
    assert!(e.contains("made for model tiny-gpt2"), "{e}");
    assert_eq!(common::down_bits(&twin), bits0, "nothing changed");
    let (_, applied) = lm.apply_file(&file).unwrap();
    lm.undo_edit(applied).unwrap();
    // A file without the mark (older files) is checked by shape only.
    assert!(Edit::made_for(&edit.to_bytes().unwrap()).unwrap().is_none());
    twin.apply_file(&edit.to_bytes().unwrap()).unwrap();
}
