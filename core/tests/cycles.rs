//! A thousand edit/undo cycles on SmolLM2, ROME and MEMIT mixed in random order within the undo
//! rules (edits stack; an undo takes the newest): whenever the stack comes back to contents it
//! had before, the edited layers hold the same bits as then, and when the last edit is undone
//! the model is the original, bit for bit.

mod common;

use std::collections::HashMap;

use loci_core::edit::{AppliedEdit, Edit, MemitHparams, RomeHparams};
use loci_core::LoadedModel;

/// FNV-1a over the bits of the down-projections of `layers`.
fn digest(lm: &LoadedModel, layers: &[usize]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for &l in layers {
        let w: Vec<f32> = lm
            .model
            .down_proj(l)
            .unwrap()
            .weight
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for x in w {
            h = (h ^ x.to_bits() as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

#[test]
fn a_thousand_edit_undo_cycles_end_bit_exact() {
    let Some(base) = common::smol() else { return };
    let mut lm = base.clone();
    let mut memit = MemitHparams::for_model(&lm.model.cfg).unwrap();
    memit.v_num_grad_steps = 4;
    let mut rome = RomeHparams::for_model(&lm.model.cfg).unwrap();
    rome.v_num_grad_steps = 4;
    let mut layers = memit.layers.clone();
    if !layers.contains(&rome.layer) {
        layers.push(rome.layer);
    }
    let stats = common::key_stats(&lm, &layers, 30, 256);
    let at = |l: usize| stats[layers.iter().position(|&x| x == l).unwrap()].clone();
    let eiffel = common::request(
        "{} is located in the city of",
        "Eiffel Tower",
        "Rome",
        "Paris",
    );
    let germany = common::request("The capital of {} is", "Germany", "Madrid", "Berlin");
    let jordan = common::request(
        "{} plays the sport of",
        "Michael Jordan",
        "golf",
        "basketball",
    );
    let memit_stats: Vec<_> = memit.layers.iter().map(|&l| at(l)).collect();
    let edits = [
        Edit::Rome(lm.rome(&eiffel, &rome, Some(&at(rome.layer))).unwrap()),
        Edit::Rome(lm.rome(&germany, &rome, Some(&at(rome.layer))).unwrap()),
        Edit::Memit(
            lm.memit(&[germany, jordan], &memit, &memit_stats, &mut |_| {})
                .unwrap(),
        ),
    ];
    let original = common::down_bits(&lm);

    let mut rng = 0x5eedu64;
    let mut draw = |n: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % n
    };
    let mut stack: Vec<(usize, AppliedEdit)> = vec![];
    let mut seen: HashMap<Vec<usize>, u64> = HashMap::new();
    let (mut applied, mut undone) = (0, 0);
    for _ in 0..2000 {
        if stack.is_empty() || (stack.len() < 8 && draw(2) == 0) {
            let i = draw(edits.len() as u64) as usize;
            stack.push((i, lm.apply(&edits[i]).unwrap()));
            applied += 1;
        } else {
            let (_, a) = stack.pop().unwrap();
            lm.undo_edit(a).unwrap();
            undone += 1;
        }
        let key: Vec<usize> = stack.iter().map(|(i, _)| *i).collect();
        let d = digest(&lm, &layers);
        if let Some(before) = seen.insert(key.clone(), d) {
            assert_eq!(before, d, "the stack {key:?} left other bits than before");
        }
    }
    while let Some((_, a)) = stack.pop() {
        lm.undo_edit(a).unwrap();
        undone += 1;
    }
    eprintln!(
        "{applied} edits applied, {undone} undone, {} stacks seen",
        seen.len()
    );
    assert!(applied >= 1000 && seen.len() > 50, "{applied} edits");
    assert_eq!(
        common::down_bits(&lm),
        original,
        "the original weights, bit for bit"
    );
    assert_eq!(common::down_bits(base), original);
}
