//! ROME on a real model: the edit takes, generalises to a paraphrase, spares neighbours, undoes
//! exactly; the rank-one delta equals the closed form; statistics equal a naive sum.

mod common;

use std::time::Instant;

use candle_core::{DType, Device};
use loci_core::edit::{
    KeyStats, RewriteRequest, RomeHparams, RomeRun, Share, StatsAccumulator, TargetStr, ValueGrad,
    ValueParts,
};
use loci_core::LoadedModel;

/// The down-projection of `layer`, bit for bit.
fn weight_bits(lm: &LoadedModel, layer: usize) -> Vec<u32> {
    let w = &lm.model.down_proj(layer).unwrap().weight;
    w.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn stats(lm: &LoadedModel, layer: usize, texts: usize) -> KeyStats {
    common::key_stats(lm, &[layer], texts, 512).pop().unwrap()
}

#[test]
fn eiffel_tower_moves_to_rome() {
    let Some(base) = common::smol() else { return };
    let mut lm = base.clone();
    let layer = 6;
    let t0 = Instant::now();
    let st = stats(&lm, layer, 60);
    eprintln!(
        "stats: {} tokens in {:.1}s",
        st.provenance.tokens,
        t0.elapsed().as_secs_f64()
    );
    let mut req =
        RewriteRequest::from_prompt("{} is located in the city of", "Eiffel Tower", "Rome")
            .unwrap();
    req.target_true = Some(TargetStr::new("Paris"));
    let t1 = Instant::now();
    let edit = lm
        .rome(&req, &RomeHparams::at_layer(layer), Some(&st))
        .unwrap();
    eprintln!(
        "edit in {:.1}s, losses {:?}, templates {:?}",
        t1.elapsed().as_secs_f64(),
        edit.stats.losses,
        &edit.stats.templates[..3]
    );
    let before: Vec<u32> = weight_bits(&lm, layer);
    let applied = lm.apply_edit(&edit).unwrap();
    let top = |lm: &LoadedModel, p: &str| lm.predict(p, 1).unwrap().top[0].token.clone();
    for p in [
        "The Eiffel Tower is located in the city of",
        "Where is the Eiffel Tower? It is in the city of",
    ] {
        eprintln!("{p:?} -> {:?}", lm.predict(p, 3).unwrap().top);
    }
    assert_eq!(
        top(&lm, "The Eiffel Tower is located in the city of"),
        " Rome"
    );
    assert_eq!(top(&lm, "The Colosseum is located in the city of"), " Rome");
    assert_eq!(top(&lm, "The Louvre is located in the city of"), " Paris");
    lm.undo_edit(applied).unwrap();
    let after: Vec<u32> = weight_bits(&lm, layer);
    assert_eq!(before, after, "undo is bit-exact");
    assert_eq!(
        top(&lm, "The Eiffel Tower is located in the city of"),
        " Paris"
    );
}

fn tiny() -> LoadedModel {
    common::tiny("tiny-gpt2")
}

/// The tab's workers each collect a share of the corpus; merged, the parts equal one pass over
/// all of it, and parts of different layers do not merge.
#[test]
fn statistics_collected_in_parts_merge_to_the_whole() {
    let lm = tiny();
    let texts = common::wiki_texts(9);
    let collect = |part: &[String], layers: &[usize]| {
        let mut acc = StatsAccumulator::new(&lm, layers, 64).unwrap();
        acc.add_texts(&lm, part).unwrap();
        acc.finish(&lm, "wiki").unwrap().remove(0)
    };
    let whole = collect(&texts, &[2]);
    let (a, b) = texts.split_at(4);
    let merged = KeyStats::merge(&[collect(a, &[2]), collect(b, &[2])]).unwrap();
    assert_eq!(merged.provenance, whole.provenance);
    let (m, w) = (
        merged.mom2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        whole.mom2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    let scale = w.iter().fold(0f32, |x, v| x.max(v.abs()));
    for (x, y) in m.iter().zip(&w) {
        assert!((x - y).abs() <= 1e-5 * scale, "{x} vs {y}");
    }
    let err = KeyStats::merge(&[collect(a, &[2]), collect(b, &[1])]).unwrap_err();
    assert!(err.to_string().contains("cannot merge"), "{err}");
    assert!(KeyStats::merge(&[]).is_err());
}

#[test]
fn a_text_with_nan_keys_at_any_layer_adds_nothing_to_any() {
    // NaN down-projection weights at layer 1: its keys stay finite, layer 2's turn NaN. The
    // text is refused at every layer, and the sums hold only the text before it.
    let lm = tiny();
    let mut poisoned = lm.clone();
    let w = &lm.model.down_proj(1).unwrap().weight;
    let nan = (w.ones_like().unwrap() * f64::NAN).unwrap();
    poisoned.model.set_down_proj_weight(1, nan).unwrap();
    let texts = common::wiki_texts(2);
    let mut acc = StatsAccumulator::new(&lm, &[1, 2], 64).unwrap();
    acc.add_text(&lm, &texts[0]).unwrap();
    let err = acc.add_text(&poisoned, &texts[1]).unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
    let after = acc.finish(&lm, "test").unwrap();
    let mut alone = StatsAccumulator::new(&lm, &[1, 2], 64).unwrap();
    alone.add_text(&lm, &texts[0]).unwrap();
    let alone = alone.finish(&lm, "test").unwrap();
    let bits = |s: &KeyStats| -> Vec<u32> {
        let v = s.mom2.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    for (a, b) in after.iter().zip(&alone) {
        assert_eq!(a.provenance, b.provenance);
        assert_eq!(bits(a), bits(b));
    }
}

#[test]
fn statistics_equal_a_naive_sum_and_refuse_other_layers() {
    let lm = tiny();
    let texts = common::wiki_texts(12);
    let mut acc = StatsAccumulator::new(&lm, &[1, 2], 64).unwrap();
    for t in &texts {
        acc.add_text(&lm, t).unwrap();
    }
    let stats = acc.finish(&lm, "test").unwrap();
    let d = lm.model.cfg.d_ff;
    let mut naive = vec![0f64; d * d];
    let mut n = 0usize;
    for t in &texts {
        let mut ids = lm.tokenizer.encode(t).unwrap();
        ids.truncate(64);
        let mut cap = loci_core::Capture::new([loci_core::Site::MlpKey(2)]);
        lm.model
            .run(
                &lm.model.ids_tensor(&[ids.clone()]).unwrap(),
                &mut cap,
                None,
                loci_core::LogitsAt::Last,
            )
            .unwrap();
        let k = cap
            .get(loci_core::Site::MlpKey(2))
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for row in &k {
            for i in 0..d {
                for j in 0..d {
                    naive[i * d + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        n += ids.len();
    }
    let got = stats[1]
        .mom2
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = naive.iter().fold(0f64, |m, x| m.max(x.abs())) / n as f64;
    for (g, s) in got.iter().zip(&naive) {
        assert!(((*g as f64) - s / n as f64).abs() < 1e-5 * scale);
    }
    assert_eq!(stats[1].provenance.tokens, n as u64);
    // Round trip through bytes, and the checks on use.
    let back = KeyStats::from_bytes(&stats[1].to_bytes().unwrap()).unwrap();
    assert_eq!(back.provenance, stats[1].provenance);
    back.check_fits(&lm, 2).unwrap();
    assert!(back
        .check_fits(&lm, 1)
        .unwrap_err()
        .to_string()
        .contains("layer 2"));
    let other = LoadedModel::load(
        &common::fixtures().join("tiny-llama"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(back
        .check_fits(&other, 2)
        .unwrap_err()
        .to_string()
        .contains("made for"));
    assert!(KeyStats::from_bytes(b"garbage").is_err());
}

#[test]
fn the_rank_one_delta_is_the_closed_form_and_bad_requests_change_nothing() {
    let mut lm = tiny();
    let layer = 2;
    let mut acc = StatsAccumulator::new(&lm, &[layer], 64).unwrap();
    for t in common::wiki_texts(40) {
        acc.add_text(&lm, &t).unwrap();
    }
    let st = acc.finish(&lm, "test").unwrap().pop().unwrap();
    let req = RewriteRequest::from_prompt("{} is located in the city of", "Eiffel Tower", "Rome")
        .unwrap();
    let mut hp = RomeHparams::at_layer(layer);
    hp.v_num_grad_steps = 5;
    let w0 = lm.model.down_proj(layer).unwrap().weight.clone();
    let w0_bits = weight_bits(&lm, layer);

    // Bad requests: clear errors, weights untouched.
    let mut bad = req.clone();
    bad.prompt = "The Eiffel Tower is located in".into();
    assert!(lm
        .rome(&bad, &hp, Some(&st))
        .unwrap_err()
        .to_string()
        .contains("{}"));
    bad = req.clone();
    bad.target_new.str = "   ".into();
    assert!(lm
        .rome(&bad, &hp, Some(&st))
        .unwrap_err()
        .to_string()
        .contains("empty"));
    assert!(lm
        .rome(&req, &RomeHparams::at_layer(9), Some(&st))
        .unwrap_err()
        .to_string()
        .contains("out of range"));
    assert!(lm
        .rome(&req, &RomeHparams::at_layer(1), Some(&st))
        .unwrap_err()
        .to_string()
        .contains("layer 2"));
    assert!(lm
        .rome(&req, &hp, None)
        .unwrap_err()
        .to_string()
        .contains("statistics"));
    let now: Vec<u32> = weight_bits(&lm, layer);
    assert_eq!(now, w0_bits);

    let edit = lm.rome(&req, &hp, Some(&st)).unwrap();
    // Naively: u = C⁻¹k*/‖C⁻¹k*‖ by Gauss–Jordan, right = (v* − W k* − b)/(k*·u).
    let templates = edit.stats.templates.clone();
    let k: Vec<f64> = lm
        .subject_key(&req, layer, &templates)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let d = k.len();
    let c: Vec<f64> = st
        .mom2
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    let mut aug: Vec<Vec<f64>> = (0..d)
        .map(|i| {
            let mut r = c[i * d..(i + 1) * d].to_vec();
            r.push(k[i]);
            r
        })
        .collect();
    for col in 0..d {
        let piv = (col..d)
            .max_by(|&a, &b| aug[a][col].abs().total_cmp(&aug[b][col].abs()))
            .unwrap();
        aug.swap(col, piv);
        let p = aug[col][col];
        for x in aug[col].iter_mut() {
            *x /= p;
        }
        let pivot_row = aug[col].clone();
        for (r, row) in aug.iter_mut().enumerate() {
            let f = row[col];
            if r != col && f != 0.0 {
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    let u: Vec<f64> = aug.iter().map(|r| r[d]).collect();
    let un = u.iter().map(|x| x * x).sum::<f64>().sqrt();
    let u: Vec<f64> = u.iter().map(|x| x / un).collect();
    for (a, b) in edit.left.iter().zip(&u) {
        assert!((*a as f64 - b).abs() < 1e-3, "u differs: {a} vs {b}");
    }
    let w = w0.to_vec2::<f32>().unwrap();
    let bias = lm
        .model
        .down_proj(layer)
        .unwrap()
        .bias
        .as_ref()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let ku: f64 = k.iter().zip(&u).map(|(a, b)| a * b).sum();
    for (i, r) in edit.right.iter().enumerate() {
        let wk: f64 = (0..d).map(|j| w[i][j] as f64 * k[j]).sum::<f64>() + bias[i] as f64;
        let want = (edit.stats.target_value[i] as f64 - wk) / ku;
        assert!(
            (*r as f64 - want).abs() < 1e-3 * (1.0 + want.abs()),
            "right[{i}] {r} vs {want}"
        );
    }
    // Applied: W' = W + right ⊗ left, element by element; undo is exact; the file round-trips.
    let applied = lm.apply_edit(&edit).unwrap();
    let w1 = lm
        .model
        .down_proj(layer)
        .unwrap()
        .weight
        .to_vec2::<f32>()
        .unwrap();
    for i in 0..w1.len() {
        for j in 0..d {
            assert!((w1[i][j] - (w[i][j] + edit.right[i] * edit.left[j])).abs() < 1e-5);
        }
    }
    lm.undo_edit(applied).unwrap();
    let restored: Vec<u32> = weight_bits(&lm, layer);
    assert_eq!(restored, w0_bits);
    let back = loci_core::edit::RomeEdit::from_bytes(&edit.to_bytes().unwrap()).unwrap();
    assert_eq!(back, edit);
    assert!(loci_core::edit::RomeEdit::from_bytes(b"nope").is_err());
}

#[test]
fn metrics_follow_the_definitions() {
    use loci_core::eval::{case_metrics, ngram_entropy, CaseScores, PromptScores, TargetScore};
    let ps = |nll_new: f32, nll_true: f32| PromptScores {
        prompt: String::new(),
        target_new: TargetScore {
            nll: nll_new,
            prob: (-nll_new).exp(),
        },
        target_true: TargetScore {
            nll: nll_true,
            prob: (-nll_true).exp(),
        },
    };
    let pre = CaseScores {
        rewrite: vec![ps(3.0, 0.5)],
        paraphrase: vec![ps(3.0, 0.5)],
        neighborhood: vec![ps(3.0, 0.5)],
        ..Default::default()
    };
    let post = CaseScores {
        rewrite: vec![ps(0.1, 2.0)],
        paraphrase: vec![ps(1.0, 0.5)],
        neighborhood: vec![ps(3.0, 0.5)],
        ..Default::default()
    };
    let m = case_metrics(&pre, &post);
    assert_eq!(
        (m.efficacy_score, m.paraphrase_score, m.neighborhood_score),
        (1.0, 0.0, 1.0)
    );
    assert!((m.efficacy_magnitude - ((-0.1f32).exp() - (-2.0f32).exp())).abs() < 1e-6);
    let (p0, p1) = ((-3.0f32).exp(), (-0.1f32).exp());
    assert!((m.hase_rewrite - (p1 - p0) / (1.0 - p0)).abs() < 1e-5);
    assert!(
        (m.hase_neighborhood - 1.0).abs() < 1e-6,
        "unchanged neighbour scores 1"
    );
    // A repetitive text has lower n-gram entropy than a varied one.
    assert!(
        ngram_entropy("the cat the cat the cat the cat")
            < ngram_entropy("a quick brown fox jumps over the lazy dog")
    );
}

#[test]
fn shipped_hyperparameters_match_model_shapes() {
    let gpt2 = loci_core::ModelConfig::from_hf_json(
        r#"{"model_type":"gpt2","n_embd":768,"n_layer":12,"n_head":12,"n_positions":1024,"vocab_size":50257}"#,
    )
    .unwrap();
    assert_eq!(RomeHparams::for_model(&gpt2).unwrap().layer, 4);
    let gptj = loci_core::ModelConfig::from_hf_json(
        r#"{"model_type":"gptj","n_embd":4096,"n_layer":28,"n_head":16,"rotary_dim":64,"n_positions":2048,"vocab_size":50400}"#,
    )
    .unwrap();
    let hp = RomeHparams::for_model(&gptj).unwrap();
    assert_eq!(
        (hp.layer, hp.clamp_norm_factor, hp.v_num_grad_steps),
        (5, 4.0, 20)
    );
    assert!(RomeHparams::for_model(&tiny().model.cfg).is_none());
    if let Some(lm) = common::smol() {
        assert_eq!(RomeHparams::for_model(&lm.model.cfg).unwrap().layer, 6);
    }
}

#[test]
fn worker_threads_give_the_same_statistics_and_edit() {
    // Statistics texts and v*'s row groups spread over threads: the statistics are summed in text
    // order (bit-identical), and the groups' gradients add up to the one-batch gradient.
    let lm = tiny();
    let texts = common::wiki_texts(7);
    let run = |workers: usize| {
        loci_core::threads::set_workers(workers);
        let mut acc = StatsAccumulator::new(&lm, &[2], 64).unwrap();
        acc.add_texts(&lm, &texts).unwrap();
        let st = acc.finish(&lm, "test").unwrap().pop().unwrap();
        let req =
            RewriteRequest::from_prompt("{} is located in the city of", "Eiffel Tower", "Rome")
                .unwrap();
        let mut hp = RomeHparams::at_layer(2);
        hp.v_num_grad_steps = 6;
        let e = lm.rome(&req, &hp, Some(&st)).unwrap();
        let mom2 = st.mom2.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (mom2, e)
    };
    let (m1, e1) = run(1);
    let (m3, e3) = run(3);
    loci_core::threads::set_workers(1);
    assert_eq!(m1, m3);
    assert_eq!(e1.stats.losses.len(), e3.stats.losses.len());
    for (a, b) in e1.stats.losses.iter().zip(&e3.stats.losses) {
        assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "{a} vs {b}");
    }
    for (a, b) in e1.right.iter().zip(&e3.right) {
        assert!((a - b).abs() < 1e-3 * a.abs().max(1e-2), "{a} vs {b}");
    }
}

/// A value through JSON, as the page and its workers pass it.
fn via_json<T: serde::Serialize + serde::de::DeserializeOwned>(x: T) -> T {
    serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap()
}

/// Steps runs that share one v* as the tab's workers do: every run's parts, then every run's
/// gradient, handed to all of them each step (through JSON, as between the page and its
/// workers).
fn step_together(lm: &LoadedModel, runs: &mut [RomeRun]) {
    let forward = |runs: &mut [RomeRun]| -> Vec<ValueParts> {
        runs.iter_mut()
            .map(|r| via_json(r.value().forward(lm).unwrap()))
            .collect()
    };
    let mut parts = forward(runs);
    loop {
        for r in runs.iter_mut() {
            r.value().losses(&parts).unwrap();
        }
        if runs[0].value().done() {
            assert!(runs.iter_mut().all(|r| r.value().done()));
            return;
        }
        let grads: Vec<ValueGrad> = runs
            .iter_mut()
            .map(|r| via_json(r.value().backward().unwrap()))
            .collect();
        for r in runs.iter_mut() {
            r.value().advance(lm, &grads).unwrap();
        }
        parts = forward(runs);
    }
}

/// The tiny model, layer 2's statistics, the Eiffel Tower edit and 6 steps of v*.
fn shared_edit() -> (LoadedModel, KeyStats, RewriteRequest, RomeHparams) {
    let lm = tiny();
    let st = stats(&lm, 2, 7);
    let req = common::request(
        "{} is located in the city of",
        "Eiffel Tower",
        "Rome",
        "Paris",
    );
    let mut hp = RomeHparams::at_layer(2);
    hp.v_num_grad_steps = 6;
    (lm, st, req, hp)
}

#[test]
fn a_rome_edit_shared_by_workers_equals_the_one_process_edit() {
    // The tab splits v*'s rows over its workers: each holds the same run, computes its share
    // and takes every share's parts and gradients (through JSON). The edit equals, bit for
    // bit, the one a single process makes with as many row groups (what the native loop does
    // with as many threads).
    let (lm, st, req, hp) = shared_edit();
    let of = 2;
    let begin = |share: Share| lm.rome_run(&req, &hp, Some(&st), share).unwrap();
    let mut one = [begin(Share {
        part: 0,
        of,
        all: true,
    })];
    step_together(&lm, &mut one);
    let [one] = one;
    let one = one.finish(&lm).unwrap();
    let mut shared: Vec<RomeRun> = (0..of)
        .map(|p| begin(Share::part(p, of).unwrap()))
        .collect();
    step_together(&lm, &mut shared);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for e in shared.into_iter().map(|r| r.finish(&lm).unwrap()) {
        assert_eq!(bits(&e.right), bits(&one.right));
        assert_eq!(bits(&e.stats.target_value), bits(&one.stats.target_value));
        assert_eq!(bits(&e.stats.losses), bits(&one.stats.losses));
    }
    assert_eq!(one.stats.losses.len(), 6);
    // The same edit as `rome` makes in one call (its own row groups: within rounding).
    let plain = lm.rome(&req, &hp, Some(&st)).unwrap();
    for (a, b) in plain.right.iter().zip(&one.right) {
        assert!((a - b).abs() < 1e-3 * a.abs().max(1e-2), "{a} vs {b}");
    }
}

#[test]
fn a_shared_run_refuses_steps_out_of_order_and_incomplete_shares() {
    let (lm, st, req, hp) = shared_edit();
    let begin = |part| lm.rome_run(&req, &hp, Some(&st), Share::part(part, 2).unwrap());
    let (mut a, mut b) = (begin(0).unwrap(), begin(1).unwrap());
    let (va, vb) = (a.value(), b.value());
    // Before a forward pass: no losses, gradient, step or result.
    assert!(va.losses(&[]).is_err());
    assert!(va.backward().is_err());
    assert!(va.advance(&lm, &[]).is_err());
    let pa = va.forward(&lm).unwrap();
    let pb = vb.forward(&lm).unwrap();
    // Twice forward, a step before the losses, and one share's parts alone.
    assert!(va.forward(&lm).is_err());
    assert!(va.advance(&lm, &[]).is_err());
    assert!(va.losses(std::slice::from_ref(&pa)).is_err());
    assert!(va.losses(&[pa.clone(), pa.clone()]).is_err());
    va.losses(&[pa.clone(), pb.clone()]).unwrap();
    vb.losses(&[pa.clone(), pb]).unwrap();
    // The losses once per step; a step needs every group's gradient.
    assert!(va.losses(&[pa]).is_err());
    let (ga, gb) = (va.backward().unwrap(), vb.backward().unwrap());
    assert!(va.advance(&lm, std::slice::from_ref(&ga)).is_err());
    va.advance(&lm, &[ga.clone(), gb.clone()]).unwrap();
    vb.advance(&lm, &[ga, gb]).unwrap();
    assert!(a.finish(&lm).is_err());
    assert!(Share::part(2, 2).is_err() && Share::part(0, 0).is_err());
}
