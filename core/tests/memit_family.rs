//! EMMET and AlphaEdit, MEMIT's two relatives: EMMET writes every edited key's share exactly;
//! AlphaEdit's update is zero on the key statistics' principal directions and, in sequence,
//! nearly zero on earlier edits' keys. Both undo exactly and survive a file round trip; on
//! SmolLM2 both make the new target the top-1 prediction.

mod common;

use loci_core::edit::{
    Edit, EditMethod, KeyStats, MemitEdit, MemitHparams, NullSpace, Preserved, UpdateRule,
};
use loci_core::hooks::Site;
use loci_core::LoadedModel;

/// `ΔW v` of one layer of `e` (`Σᵢ rightᵢ (leftᵢ · v)`), and ‖ΔW‖_F.
fn delta_times(e: &MemitEdit, layer: usize, v: &[f64]) -> (Vec<f64>, f64) {
    let l = &e.layers[layer];
    let n = e.requests.len();
    let (dff, dm) = (l.left.len() / n, l.right.len() / n);
    let mut out = vec![0f64; dm];
    let mut dense = vec![0f64; dm * dff];
    for i in 0..n {
        let left = &l.left[i * dff..(i + 1) * dff];
        let right = &l.right[i * dm..(i + 1) * dm];
        let c: f64 = left.iter().zip(v).map(|(a, b)| *a as f64 * b).sum();
        for r in 0..dm {
            out[r] += right[r] as f64 * c;
            for k in 0..dff {
                dense[r * dff + k] += right[r] as f64 * left[k] as f64;
            }
        }
    }
    let norm = dense.iter().map(|x| x * x).sum::<f64>().sqrt();
    (out, norm)
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// The edit computed, undone exactly, read back from its file and re-applied to the same bits.
fn check_undo_and_file(lm: &mut LoadedModel, edit: &MemitEdit, method: EditMethod) {
    let w0 = common::down_bits(lm);
    let applied = lm.apply(&Edit::Memit(edit.clone())).unwrap();
    let edited = common::down_bits(lm);
    assert_ne!(edited, w0);
    lm.undo_edit(applied).unwrap();
    assert_eq!(common::down_bits(lm), w0, "undo is bit-exact");
    let file = Edit::Memit(edit.clone()).to_file(lm).unwrap();
    let (back, applied) = lm.apply_file(&file).unwrap();
    assert_eq!(back.method(), method);
    match &back {
        Edit::Memit(b) => assert_eq!(b, edit),
        other => panic!("read back as {}", other.method()),
    }
    assert_eq!(common::down_bits(lm), edited, "the file re-applies exactly");
    lm.undo_edit(applied).unwrap();
}

#[test]
fn emmet_sets_each_edited_key_exactly() {
    let mut lm = common::tiny("tiny-gpt2");
    let st = common::key_stats(&lm, &[2], 40, 64);
    let reqs = common::two_facts();
    let mut hp = MemitHparams::at_layers(vec![2]);
    hp.v_num_grad_steps = 6;
    hp.mom2_update_weight = 1.0;
    hp.update = UpdateRule::Equality { emmet_lambda: 0.0 };
    assert_eq!(hp.method(), EditMethod::Emmet);
    let w0 = common::down_bits(&lm);
    let edit = lm.memit(&reqs, &hp, &st, &mut |_| {}).unwrap();
    assert_eq!(
        common::down_bits(&lm),
        w0,
        "computing leaves the model as it was"
    );
    assert!(
        edit.layers[0].keys.is_empty(),
        "only AlphaEdit records keys"
    );

    // The keys as the edit read them: aᵢ · kⱼ = δᵢⱼ, so ΔW kⱼ is exactly request j's share.
    let ctx = &edit.stats.templates[1..];
    let dff = lm.model.cfg.d_ff;
    for (j, r) in reqs.iter().enumerate() {
        let bare = common::f64s(&lm.subject_key(r, 2, &["{}".to_string()]).unwrap());
        let c = common::f64s(&lm.subject_key(r, 2, ctx).unwrap());
        let key: Vec<f64> = bare.iter().zip(&c).map(|(a, b)| 0.5 * (a + b)).collect();
        for i in 0..reqs.len() {
            let a = &edit.layers[0].left[i * dff..(i + 1) * dff];
            let dot: f64 = a.iter().zip(&key).map(|(x, y)| *x as f64 * y).sum();
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((dot - want).abs() < 1e-3, "a{i}·k{j} = {dot}");
        }
    }
    check_undo_and_file(&mut lm, &edit, EditMethod::Emmet);

    // The same fact twice cannot meet two equality constraints: refused, nothing changed.
    let twice = vec![reqs[0].clone(), reqs[0].clone()];
    let err = lm.memit(&twice, &hp, &st, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("not independent"), "{err}");
    assert_eq!(common::down_bits(&lm), w0);
}

#[test]
fn alphaedit_leaves_what_is_known_and_earlier_edits_alone() {
    let mut lm = common::tiny("tiny-gpt2");
    let layers = vec![1, 2];
    let st = common::key_stats(&lm, &layers, 40, 64);
    let reqs = common::two_facts();
    let ns = NullSpace::Energy(0.2);
    let mut hp = MemitHparams::at_layers(layers.clone());
    hp.v_num_grad_steps = 6;
    hp.update = UpdateRule::NullSpace {
        null_space: ns,
        l2: 1.0,
    };
    assert_eq!(hp.method(), EditMethod::Alphaedit);
    let w0 = common::down_bits(&lm);
    let first = lm.memit(&reqs[..1], &hp, &st, &mut |_| {}).unwrap();
    assert_eq!(common::down_bits(&lm), w0);

    // The projection: ΔW v = 0 for every eigenvector v of C outside the null space.
    let dff = lm.model.cfg.d_ff;
    for (i, s) in st.iter().enumerate() {
        let eigen = s.eigen().unwrap();
        let rank = ns.rank(&eigen.values);
        assert!(rank > 0 && rank < dff, "rank {rank}");
        for col in rank..dff {
            let v: Vec<f64> = (0..dff).map(|r| eigen.vectors[r * dff + col]).collect();
            let (dv, total) = delta_times(&first, i, &v);
            assert!(
                norm(&dv) <= 1e-4 * total,
                "layer {}: direction {col} moves by {} of {total}",
                layers[i],
                norm(&dv)
            );
        }
        assert_eq!(
            first.layers[i].keys.len(),
            dff,
            "the fact's key is recorded"
        );
    }
    // It writes the fact: the residual after the last layer moves towards z.
    let gap = |lm: &LoadedModel| -> f64 {
        let h = common::f64s(
            &lm.subject_states(&reqs[0], &[Site::Block(2)], &["{}".to_string()])
                .unwrap()[0],
        );
        let z = &first.stats.z[0];
        norm(
            &h.iter()
                .zip(z)
                .map(|(h, z)| h - *z as f64)
                .collect::<Vec<_>>(),
        )
    };
    let before = gap(&lm);
    let applied = lm.apply(&Edit::Memit(first.clone())).unwrap();
    assert!(gap(&lm) < 0.8 * before, "{before} -> {}", gap(&lm));

    // In sequence: the second edit, told the first's keys, barely moves them; untold, more.
    let earlier = [Edit::Memit(first.clone())];
    let kept = lm
        .memit_preserving(&reqs[1..], &hp, &st, &Preserved::of(&earlier), &mut |_| {})
        .unwrap();
    // A long sequence keeps the keys alone (gathered by layer), to the same edit.
    let mut keys = std::collections::BTreeMap::new();
    Preserved::gather(&mut keys, &earlier[0]);
    let gathered = lm
        .memit_preserving(
            &reqs[1..],
            &hp,
            &st,
            &Preserved::of_keys(&keys),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(gathered.layers, kept.layers);
    let blind = lm.memit(&reqs[1..], &hp, &st, &mut |_| {}).unwrap();
    for (i, layer) in layers.iter().enumerate() {
        let k: Vec<f64> = first.layers[i].keys.iter().map(|&x| x as f64).collect();
        let (moved_kept, _) = delta_times(&kept, i, &k);
        let (moved_blind, _) = delta_times(&blind, i, &k);
        assert!(
            norm(&moved_kept) < 0.5 * norm(&moved_blind),
            "layer {layer}: {} vs {}",
            norm(&moved_kept),
            norm(&moved_blind)
        );
    }
    lm.undo_edit(applied).unwrap();
    assert_eq!(common::down_bits(&lm), w0);
    check_undo_and_file(&mut lm, &first, EditMethod::Alphaedit);

    // Bad input: no null space, a batch bigger than it, a bad ridge; nothing changes.
    let err = |lm: &mut LoadedModel, hp: &MemitHparams, st: &[KeyStats]| {
        lm.memit(&reqs, hp, st, &mut |_| {})
            .unwrap_err()
            .to_string()
    };
    let mut bad = hp.clone();
    let smallest = st[0].eigen().unwrap().values[0];
    bad.update = UpdateRule::NullSpace {
        null_space: NullSpace::Below(smallest * 0.5),
        l2: 1.0,
    };
    assert!(err(&mut lm, &bad, &st).contains("leaves no null space"));
    let second = st[0].eigen().unwrap().values[1];
    bad.update = UpdateRule::NullSpace {
        null_space: NullSpace::Below(second),
        l2: 1.0,
    };
    assert!(err(&mut lm, &bad, &st).contains("need a null space of rank 2"));
    bad.update = UpdateRule::NullSpace {
        null_space: ns,
        l2: 0.0,
    };
    assert!(err(&mut lm, &bad, &st).contains("L2 must be positive"));
    let other = common::tiny("tiny-gptj");
    let foreign = common::key_stats(&other, &layers, 5, 32);
    assert!(err(&mut lm, &hp, &foreign).contains("made for model"));
    assert_eq!(common::down_bits(&lm), w0);

    // A file whose recorded keys are gone is refused.
    let mut stripped = first.clone();
    stripped.layers[0].keys.clear();
    let bytes = Edit::Memit(stripped).to_bytes().unwrap();
    assert!(Edit::from_bytes(&bytes).is_err());
}

#[test]
fn on_smollm2_both_make_the_new_target_top_1() {
    let Some(base) = common::smol() else { return };
    let mut lm = base.clone();
    let req = lm
        .complete_request(common::request(
            "{} is located in the city of",
            "Eiffel Tower",
            "Rome",
            "Paris",
        ))
        .unwrap();
    let top1 = |lm: &LoadedModel| -> String {
        let p = lm.predict(&req.filled(), 1).unwrap();
        p.top[0].token.clone()
    };
    assert_eq!(top1(&lm).trim(), "Paris");
    for method in [EditMethod::Emmet, EditMethod::Alphaedit] {
        let hp = MemitHparams::for_method(method, &lm.model.cfg, &[]).unwrap();
        assert_eq!(hp.method(), method);
        let st = common::key_stats(&lm, &hp.layers, 60, 256);
        let w0 = common::down_bits(&lm);
        let edit = lm
            .memit(std::slice::from_ref(&req), &hp, &st, &mut |_| {})
            .unwrap();
        let applied = lm.apply(&Edit::Memit(edit)).unwrap();
        assert_eq!(top1(&lm).trim(), "Rome", "{method}");
        lm.undo_edit(applied).unwrap();
        assert_eq!(common::down_bits(&lm), w0);
    }
}
