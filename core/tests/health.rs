//! What a long sequence of edits measures and saves: the model's health (held-out perplexity,
//! known facts top-1, edited weights' norms) and the snapshot of its edited layers that a
//! stopped run continues from — put back bit for bit, refused whole when it does not fit.

mod common;

use loci_core::edit::{Edit, GraceHparams, RomeHparams, Snapshot};
use loci_core::eval::HealthProbe;
use loci_core::LoadedModel;

fn rome_edit(lm: &mut LoadedModel) -> loci_core::edit::AppliedEdit {
    let mut hp = RomeHparams::at_layer(1);
    hp.mom2_adjustment = false;
    hp.v_num_grad_steps = 6;
    let req = common::request(
        "{} is located in the city of",
        "Eiffel Tower",
        "Rome",
        "Paris",
    );
    let e = Edit::Rome(lm.rome(&req, &hp, None).unwrap());
    lm.apply(&e).unwrap()
}

#[test]
fn health_is_perplexity_known_facts_and_norm_growth_as_defined() {
    let mut lm = common::tiny("tiny-gpt2");
    let texts = common::wiki_texts(3);
    let facts = vec![
        (
            "The Eiffel Tower is located in the city of".to_string(),
            "Paris".to_string(),
        ),
        (
            "Michael Jordan plays the sport of".to_string(),
            "basketball".to_string(),
        ),
    ];
    let probe = HealthProbe::new(&lm, &texts, 40, &facts).unwrap();
    assert_eq!(probe.sizes(), (3, 2));
    let start = lm.down_norms(&[1]).unwrap();
    let h = lm.health(&probe, &[1], &start).unwrap();
    assert_eq!(h.layers[0].growth, 1.0);
    assert_eq!(h.max_growth(), 1.0);

    // Perplexity: exp of the mean NLL over every next token of the texts, by hand.
    let (mut nll, mut n) = (0f64, 0usize);
    for t in &texts {
        let mut ids = lm.tokenizer.encode(t).unwrap();
        ids.truncate(40);
        for k in 1..ids.len() {
            let p = lm.next_probs(&ids[..k]).unwrap();
            nll -= (p[ids[k] as usize] as f64).ln();
            n += 1;
        }
    }
    let want = (nll / n as f64).exp() as f32;
    let got = h.perplexity.unwrap();
    assert!((got - want).abs() <= 1e-3 * want, "{got} vs {want}");
    // Known facts: the share whose answer's first token is the top-1 prediction.
    let right = facts
        .iter()
        .filter(|(p, a)| {
            let probs = lm.next_probs(&lm.encode_prompt(p).unwrap()).unwrap();
            let top = (0..probs.len()).fold(0, |b, i| if probs[i] > probs[b] { i } else { b });
            let answer = lm.tokenizer.encode_plain(&format!(" {a}")).unwrap()[0];
            top as u32 == answer
        })
        .count();
    assert_eq!(h.known_top1.unwrap(), 50.0 * right as f32);

    // An edit grows the norm it changes, and nothing else: ‖W‖ / ‖W₀‖.
    let applied = rome_edit(&mut lm);
    let after = lm.health(&probe, &[1], &start).unwrap();
    let norm = lm.down_norms(&[1]).unwrap()[0];
    assert_eq!(after.layers[0].norm, norm);
    assert_eq!(after.layers[0].growth, norm / start[0]);
    assert_ne!(after.perplexity, h.perplexity);
    lm.undo_edit(applied).unwrap();
    assert_eq!(lm.health(&probe, &[1], &start).unwrap(), h);

    // Bad input: a blank answer, an empty prompt.
    let blank = [("The Eiffel Tower is in".to_string(), " ".to_string())];
    let err = HealthProbe::new(&lm, &texts, 40, &blank).unwrap_err();
    assert!(err.to_string().contains("empty answer"), "{err}");
    let empty = [(String::new(), "Paris".to_string())];
    assert!(HealthProbe::new(&lm, &texts, 40, &empty).is_err());
}

#[test]
fn a_snapshot_puts_edited_layers_back_exactly_and_a_bad_one_changes_nothing() {
    let mut lm = common::tiny("tiny-gpt2");
    let w0 = common::down_bits(&lm);
    // Layer 1 edited by ROME, layer 2 given a GRACE codebook: both saved.
    let edited = rome_edit(&mut lm);
    let mut hp = GraceHparams::defaults(&lm.model.cfg, Some(2)).unwrap();
    hp.n_iter = 5;
    let req = common::request(
        "{} plays the sport of",
        "Michael Jordan",
        "soccer",
        "basketball",
    );
    let grace = Edit::Grace(lm.grace(&req, &hp).unwrap());
    let graced = lm.apply(&grace).unwrap();
    let edited_bits = common::down_bits(&lm);
    let book = |lm: &LoadedModel| {
        lm.model
            .down_proj(2)
            .unwrap()
            .codebook
            .as_ref()
            .map(|c| c.bits())
    };
    let edited_book = book(&lm);
    assert!(edited_book.is_some());
    let snapshot = Snapshot {
        layers: lm.layer_states(&[1, 2]).unwrap(),
        preserved: [(1, vec![0.5f32; lm.model.cfg.d_ff])].into(),
        meta: serde_json::json!({"done": 1}),
    };
    let bytes = snapshot.to_bytes().unwrap();
    let read = Snapshot::from_bytes(&bytes).unwrap();
    assert_eq!(read, snapshot);
    lm.undo_edit(graced).unwrap();
    lm.undo_edit(edited).unwrap();
    assert_eq!(common::down_bits(&lm), w0);
    assert_eq!(book(&lm), None);

    // Put back on the unedited model: exactly the edited layers; undone: exactly the original.
    let applied = lm.restore_layers(&read.layers).unwrap();
    assert_eq!(common::down_bits(&lm), edited_bits);
    assert_eq!(book(&lm), edited_book);
    lm.undo_edit(applied).unwrap();
    assert_eq!(common::down_bits(&lm), w0);
    assert_eq!(book(&lm), None);

    // A snapshot of another model's shape, or of a layer it lacks, changes nothing; a file
    // changed on disk is refused.
    let mut wrong = read.layers.clone();
    wrong[1].weight.pop();
    let err = lm.restore_layers(&wrong).unwrap_err();
    assert!(err.to_string().contains("not a down-projection"), "{err}");
    let mut far = read.layers.clone();
    far[0].layer = 99;
    assert!(lm.restore_layers(&far).is_err());
    let mut nan = read.layers.clone();
    nan[0].weight[3] = f32::NAN;
    assert!(lm
        .restore_layers(&nan)
        .unwrap_err()
        .to_string()
        .contains("NaN"));
    assert_eq!(common::down_bits(&lm), w0);
    let mut flipped = bytes.clone();
    let at = flipped.len() - 5;
    flipped[at] ^= 1;
    assert!(Snapshot::from_bytes(&flipped).is_err());
}
