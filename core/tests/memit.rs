//! MEMIT: several facts written at once over several layers; the update is the regularised
//! least-squares solution of the spec; the edit undoes exactly and survives a file round trip.

mod common;

use loci_core::edit::{Edit, KeyStats, MemitHparams, RewriteRequest};
use loci_core::hooks::Site;
use loci_core::LoadedModel;

#[test]
fn the_update_is_the_regularised_least_squares_solution_and_undoes_exactly() {
    let mut lm = common::tiny("tiny-gpt2");
    let layers = vec![1, 2];
    let st = common::key_stats(&lm, &layers, 40, 64);
    let reqs = common::two_facts();
    let mut hp = MemitHparams::at_layers(layers.clone());
    hp.v_num_grad_steps = 6;
    hp.mom2_update_weight = 50.0;
    let w0 = common::down_bits(&lm);

    // Bad input: clear errors, weights untouched.
    let err =
        |lm: &mut LoadedModel, reqs: &[RewriteRequest], hp: &MemitHparams, st: &[KeyStats]| {
            lm.memit(reqs, hp, st, &mut |_| {}).unwrap_err().to_string()
        };
    assert!(err(&mut lm, &[], &hp, &st).contains("at least one request"));
    let mut bad = hp.clone();
    bad.layers = vec![2, 1];
    assert!(err(&mut lm, &reqs, &bad, &st).contains("ascending"));
    bad.layers = vec![1, 9];
    assert!(err(&mut lm, &reqs, &bad, &st).contains("out of range"));
    assert!(err(&mut lm, &reqs, &hp, &st[..1]).contains("statistics for 1"));
    let swapped = vec![st[1].clone(), st[0].clone()];
    assert!(err(&mut lm, &reqs, &hp, &swapped).contains("layer 2, not 1"));
    let mut bad_req = reqs.clone();
    bad_req[1].target_new.str = "  ".into();
    assert!(err(&mut lm, &bad_req, &hp, &st).contains("empty"));
    bad_req[1] = reqs[1].clone();
    bad_req[1].prompt = "Michael Jordan plays".into();
    assert!(err(&mut lm, &bad_req, &hp, &st).contains("{}"));
    assert_eq!(common::down_bits(&lm), w0);

    let mut heard = vec![];
    let edit = lm
        .memit(&reqs, &hp, &st, &mut |p| heard.push(p.to_string()))
        .unwrap();
    assert_eq!(
        common::down_bits(&lm),
        w0,
        "computing an edit leaves the model as it was"
    );
    assert!(heard.iter().any(|p| p.contains("layer 2")), "{heard:?}");
    assert_eq!(edit.layers.len(), 2);
    assert_eq!(edit.stats.templates.len(), 6, "{:?}", edit.stats.templates);
    let (dm, dff) = (lm.model.cfg.d_model, lm.model.cfg.d_ff);

    // Layer 1 sees the unedited model: its keys and gaps can be recomputed here, and the spec's
    // formula solved densely: (λC + K Kᵀ) aᵢ = kᵢ, rightᵢ = (zᵢ − hᵢ) / |R|.
    let ctx = &edit.stats.templates[1..];
    let keys: Vec<Vec<f64>> = reqs
        .iter()
        .map(|r| {
            let bare = common::f64s(&lm.subject_key(r, 1, &["{}".to_string()]).unwrap());
            let c = common::f64s(&lm.subject_key(r, 1, ctx).unwrap());
            bare.iter().zip(&c).map(|(a, b)| 0.5 * (a + b)).collect()
        })
        .collect();
    let c = common::f64s(&st[0].mom2);
    let first = &edit.layers[0];
    assert_eq!(first.layer, 1);
    for (j, key) in keys.iter().enumerate() {
        let a = &first.left[j * dff..(j + 1) * dff];
        for row in 0..dff {
            let lhs: f64 = (0..dff)
                .map(|k| {
                    let kk: f64 = keys.iter().map(|q| q[row] * q[k]).sum();
                    (hp.mom2_update_weight * c[row * dff + k] + kk) * a[k] as f64
                })
                .sum();
            assert!(
                (lhs - key[row]).abs() < 1e-3 * (1.0 + key[row].abs()),
                "key {j} row {row}: {lhs} vs {}",
                key[row]
            );
        }
        let h = common::f64s(
            &lm.subject_states(&reqs[j], &[Site::Block(2)], &["{}".to_string()])
                .unwrap()[0],
        );
        let z = &edit.stats.z[j];
        for i in 0..dm {
            let want = (z[i] as f64 - h[i]) / 2.0;
            let got = first.right[j * dm + i] as f64;
            assert!(
                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{got} vs {want}"
            );
        }
    }

    // Applied, the residual after the last layer moves most of the way to z.
    let gap = |lm: &LoadedModel, j: usize| -> f64 {
        let h = common::f64s(
            &lm.subject_states(&reqs[j], &[Site::Block(2)], &["{}".to_string()])
                .unwrap()[0],
        );
        h.iter()
            .zip(&edit.stats.z[j])
            .map(|(h, z)| (h - *z as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let before: Vec<f64> = (0..2).map(|j| gap(&lm, j)).collect();
    let applied = lm.apply(&Edit::Memit(edit.clone())).unwrap();
    for (j, b) in before.iter().enumerate() {
        let after = gap(&lm, j);
        assert!(after < 0.5 * b, "request {j}: gap {b} -> {after}");
        assert!((*b as f32 - edit.stats.z_gap[j]).abs() < 1e-3 * b.max(1.0) as f32);
    }
    assert_ne!(common::down_bits(&lm), w0);
    let edited = common::down_bits(&lm);
    lm.undo_edit(applied).unwrap();
    assert_eq!(common::down_bits(&lm), w0, "undo is bit-exact");

    // A file round trip gives the same edit, and the same weights once applied.
    let back = match Edit::from_bytes(&edit.to_bytes().unwrap()).unwrap() {
        Edit::Memit(e) => e,
        other => panic!("a MEMIT file read as {}", other.method()),
    };
    assert_eq!(back, edit);
    let applied = lm.apply(&Edit::Memit(back)).unwrap();
    assert_eq!(common::down_bits(&lm), edited);
    lm.undo_edit(applied).unwrap();
    assert!(Edit::from_bytes(b"garbage").is_err());

    // An edit made for another shape is refused whole.
    let mut wrong = edit.clone();
    wrong.layers[1].right.pop();
    assert!(lm.apply(&Edit::Memit(wrong)).is_err());
    assert_eq!(common::down_bits(&lm), w0);
}

#[test]
fn shipped_hyperparameters_match_the_papers() {
    let cfg = |json: &str| loci_core::ModelConfig::from_hf_json(json).unwrap();
    let gptj = cfg(
        r#"{"model_type":"gptj","n_embd":4096,"n_layer":28,"n_head":16,"rotary_dim":64,"n_positions":2048,"vocab_size":50400}"#,
    );
    let hp = MemitHparams::for_model(&gptj).unwrap();
    assert_eq!(hp.layers, vec![3, 4, 5, 6, 7, 8]);
    assert_eq!(
        (
            hp.mom2_update_weight,
            hp.clamp_norm_factor,
            hp.v_num_grad_steps
        ),
        (15000.0, 0.75, 25)
    );
    assert_eq!(hp, MemitHparams::at_layers(vec![3, 4, 5, 6, 7, 8]));
    let xl = cfg(
        r#"{"model_type":"gpt2","n_embd":1600,"n_layer":48,"n_head":25,"n_positions":1024,"vocab_size":50257}"#,
    );
    let hp = MemitHparams::for_model(&xl).unwrap();
    assert_eq!(hp.layers, vec![13, 14, 15, 16, 17]);
    assert_eq!((hp.mom2_update_weight, hp.v_num_grad_steps), (20000.0, 20));
    let tiny = common::tiny("tiny-gpt2");
    assert!(MemitHparams::for_model(&tiny.model.cfg).is_none());
}

#[test]
fn two_facts_move_at_once_on_smollm2_and_neighbours_stay() {
    let Some(base) = common::smol() else { return };
    let mut lm = base.clone();
    let hp = MemitHparams::for_model(&lm.model.cfg).expect("shipped MEMIT hparams for SmolLM2");
    let st = common::key_stats(&lm, &hp.layers, 60, 512);
    let reqs = vec![
        common::request(
            "{} is located in the city of",
            "Eiffel Tower",
            "Rome",
            "Paris",
        ),
        common::request(
            "The capital of {} is the city of",
            "Germany",
            "Madrid",
            "Berlin",
        ),
    ];
    let t = std::time::Instant::now();
    let edit = lm
        .memit(&reqs, &hp, &st, &mut |p| eprintln!("{p}"))
        .unwrap();
    eprintln!(
        "MEMIT of 2 facts in {:.1}s: {:?}, z losses {:?}, ‖ΔW‖ {:?}",
        t.elapsed().as_secs_f64(),
        edit.stats.seconds,
        edit.stats.z_losses,
        Edit::Memit(edit.clone()).delta_norms()
    );
    let w0 = common::down_bits(&lm);
    let top = |lm: &LoadedModel, p: &str| lm.predict(p, 1).unwrap().top[0].token.clone();
    let probes = [
        (
            "The Eiffel Tower is located in the city of",
            " Paris",
            " Rome",
        ),
        (
            "The capital of Germany is the city of",
            " Berlin",
            " Madrid",
        ),
        ("The Louvre is located in the city of", " Paris", " Paris"),
        ("The capital of France is the city of", " Paris", " Paris"),
    ];
    for (p, before, _) in probes {
        assert_eq!(top(&lm, p), before, "{p}");
    }
    let applied = lm.apply(&Edit::Memit(edit)).unwrap();
    for (p, _, after) in probes {
        eprintln!("{p:?} -> {:?}", lm.predict(p, 3).unwrap().top);
        assert_eq!(top(&lm, p), after, "{p}");
    }
    lm.undo_edit(applied).unwrap();
    assert_eq!(common::down_bits(&lm), w0);
}
