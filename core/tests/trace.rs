//! Causal tracing: the fast path equals the reference algorithm; a real model shows the paper's
//! pattern; bad requests are refused.

mod common;

use candle_core::{DType, Device};
use loci_core::trace::{NoiseSpec, Quiet, TraceKind, TraceObserver, TraceRequest};
use loci_core::LoadedModel;

use common::tiny;

#[test]
fn fast_path_equals_naive_path_for_every_kind_and_family() {
    for name in common::every_family() {
        let lm = tiny(name);
        for window in [1, 3, 10] {
            let mut req =
                TraceRequest::new("The Eiffel Tower is located in the city of", "Eiffel Tower");
            req.samples = 3;
            req.window = window;
            req.noise = NoiseSpec::Fixed(0.8);
            // Both the sequential and the threaded schedule must give the reference grid.
            let fast = lm.trace(&req, None, &mut Quiet, 1 + window % 2).unwrap();
            let naive = lm.trace_naive(&req, None).unwrap();
            assert_eq!(fast.subject_range, naive.subject_range);
            assert_eq!(fast.answer, naive.answer);
            assert!((fast.high - naive.high).abs() < 1e-6);
            assert!((fast.low - naive.low).abs() < 1e-5);
            for kind in TraceKind::ALL {
                let (f, n) = (&fast.scores[&kind], &naive.scores[&kind]);
                assert_eq!(f.len(), n.len());
                for (t, (fr, nr)) in f.iter().zip(n).enumerate() {
                    for (l, (a, b)) in fr.iter().zip(nr).enumerate() {
                        assert!(
                            (a - b).abs() < 2e-5 * (1.0 + b.abs()),
                            "{name} w{window} {kind:?} t{t} l{l}: fast {a} naive {b}"
                        );
                    }
                }
            }
            assert!(
                fast.work.token_layers * 3 < fast.work.naive_token_layers,
                "{:?}",
                fast.work
            );
            // The grid actually varies: restoration matters somewhere.
            let hidden = &fast.scores[&TraceKind::Hidden];
            let spread = hidden
                .iter()
                .flatten()
                .fold(0f32, |m, p| m.max((p - fast.low).abs()));
            assert!(spread > 1e-3, "{name}: restoring never changes anything");
        }
    }
}

#[test]
fn full_answer_traces_explain_the_whole_answer_and_the_fast_path_equals_naive() {
    for name in ["tiny-gpt2", "tiny-gptj", "tiny-llama"] {
        let lm = tiny(name);
        let mut req =
            TraceRequest::new("The Eiffel Tower is located in the city of", "Eiffel Tower");
        req.samples = 3;
        req.window = 3;
        req.noise = NoiseSpec::Fixed(0.8);
        req.kinds = vec![TraceKind::Mlp, TraceKind::Hidden];
        req.answer = Some("Paris, France".into());
        req.full_answer = true;
        let fast = lm.trace(&req, None, &mut Quiet, 2).unwrap();
        let naive = lm.trace_naive(&req, None).unwrap();
        let answer_ids = lm.tokenizer.encode_plain(" Paris, France").unwrap();
        assert!(answer_ids.len() > 1, "{name}: the answer must span tokens");
        assert_eq!(fast.answer.ids, answer_ids);
        assert_eq!(fast.answer.token, " Paris, France");
        // Rows are the prompt's tokens only, and the clean score is the whole answer's
        // probability as the CounterFact scorer computes it.
        let prompt_len = lm.encode_prompt(&req.prompt).unwrap().len();
        assert_eq!(fast.tokens.len(), prompt_len);
        let p = lm.target_prob(&req.prompt, "Paris, France").unwrap();
        assert!(
            (fast.high - p).abs() < 1e-5 * (1.0 + p),
            "{name}: {} vs {p}",
            fast.high
        );
        assert!((fast.high - naive.high).abs() < 1e-6);
        assert!((fast.low - naive.low).abs() < 1e-5 * (1.0 + naive.low));
        for kind in [TraceKind::Mlp, TraceKind::Hidden] {
            let (f, n) = (&fast.scores[&kind], &naive.scores[&kind]);
            assert_eq!(f.len(), prompt_len);
            for (t, (fr, nr)) in f.iter().zip(n).enumerate() {
                for (l, (a, b)) in fr.iter().zip(nr).enumerate() {
                    assert!(
                        (a - b).abs() < 2e-5 * (1.0 + b.abs()),
                        "{name} {kind:?} t{t} l{l}: fast {a} naive {b}"
                    );
                }
            }
        }
        // Restoring every layer's state at the last prompt token gives the clean run back at
        // the first answer token only, not the whole answer: the full score differs from the
        // first token's.
        let mut first = req.clone();
        first.full_answer = false;
        let one = lm.trace(&first, None, &mut Quiet, 1).unwrap();
        assert_eq!(one.answer.id, answer_ids[0]);
        assert!(one.answer.ids.is_empty());
        assert!(fast.high < one.high);
    }
    let lm = tiny("tiny-gpt2");
    let mut req = TraceRequest::new("The Eiffel Tower is located in the city of", "Eiffel Tower");
    req.full_answer = true;
    assert!(
        lm.trace(&req, None, &mut Quiet, 1).is_err(),
        "no answer given"
    );
}

#[test]
fn bad_requests_are_refused() {
    let lm = tiny("tiny-gpt2");
    let ok = TraceRequest::new("The Eiffel Tower is located in", "Eiffel Tower");
    let err = |r: &TraceRequest| {
        lm.trace(r, Some(0.1), &mut Quiet, 1)
            .unwrap_err()
            .to_string()
    };
    let mut r = ok.clone();
    r.subject = "Louvre".into();
    assert!(err(&r).contains("does not occur"));
    r = ok.clone();
    r.prompt = "".into();
    assert!(err(&r).contains("empty"));
    r = ok.clone();
    r.prompt = "The Eiffel Tower is tall. ".repeat(30);
    assert!(err(&r).contains("context"));
    r = ok.clone();
    r.samples = 0;
    assert!(err(&r).contains("samples"));
    r = ok.clone();
    r.window = 0;
    assert!(err(&r).contains("window"));
    r = ok.clone();
    r.kinds = vec![TraceKind::Mlp, TraceKind::Hidden, TraceKind::Mlp];
    assert!(err(&r).contains("mlp requested twice"));
    r = ok.clone();
    r.noise = NoiseSpec::Relative(3.0);
    assert!(lm
        .trace(&r, None, &mut Quiet, 1)
        .unwrap_err()
        .to_string()
        .contains("standard deviation"));
    assert!("abc".parse::<NoiseSpec>().is_err());
    assert_eq!("3x".parse::<NoiseSpec>().unwrap(), NoiseSpec::Relative(3.0));
    assert_eq!(
        "u0.5".parse::<NoiseSpec>().unwrap(),
        NoiseSpec::Uniform(0.5)
    );
}

#[test]
fn a_trace_can_be_cancelled_and_streams_rows() {
    struct StopAfter(usize, Vec<(TraceKind, usize)>);
    impl TraceObserver for StopAfter {
        fn on_row(&mut self, kind: TraceKind, token: usize, scores: &[f32]) -> bool {
            assert_eq!(scores.len(), 4);
            self.1.push((kind, token));
            self.1.len() < self.0
        }
    }
    let lm = tiny("tiny-llama");
    let mut req = TraceRequest::new("The Eiffel Tower is located in", "Eiffel Tower");
    req.noise = NoiseSpec::Fixed(0.5);
    let mut obs = StopAfter(3, vec![]);
    let e = lm.trace(&req, None, &mut obs, 1).unwrap_err();
    assert!(matches!(e, loci_core::LociError::Cancelled));
    assert_eq!(
        obs.1,
        // One worker goes token by token, every kind of a token in one batched pass.
        vec![
            (TraceKind::Hidden, 0),
            (TraceKind::Mlp, 0),
            (TraceKind::Attn, 0)
        ]
    );
}

#[test]
fn smollm2_trace_shows_the_papers_pattern() {
    let Some(lm) = common::smol() else { return };
    let subjects: Vec<String> =
        common::read_json(&common::root().join("static/data/known_1000.json"))
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["subject"].as_str().unwrap().to_string())
            .collect();
    let std = loci_core::trace::embedding_std(lm, &subjects).unwrap();
    assert!(std > 0.01 && std < 1.0, "embedding std {std}");
    let mut req = TraceRequest::new("The Eiffel Tower is located in the city of", "Eiffel Tower");
    req.kinds = vec![TraceKind::Hidden];
    let r = lm.trace(&req, Some(std), &mut Quiet, 2).unwrap();
    assert_eq!(r.answer.token, " Paris");
    let clean = lm.predict(&req.prompt, 1).unwrap().top[0].prob;
    assert!(
        (r.high - clean).abs() < 1e-5,
        "high {} vs clean {clean}",
        r.high
    );
    assert!(r.low < 0.5 * r.high, "low {} high {}", r.low, r.high);
    let grid = &r.scores[&TraceKind::Hidden];
    let (t_last, l_last) = (grid.len() - 1, grid[0].len() - 1);
    assert!(
        (grid[t_last][l_last] - r.high).abs() < 1e-4,
        "last cell {}",
        grid[t_last][l_last]
    );
    let n = grid[0].len();
    let frac = |p: f32| (p - r.low) / (r.high - r.low);
    let subject = r.subject_range[0]..r.subject_range[1];
    let max_over = |tokens: std::ops::Range<usize>, layers: std::ops::Range<usize>| {
        tokens
            .flat_map(|t| grid[t][layers.clone()].to_vec())
            .fold(0f32, f32::max)
    };
    // SmolLM2 keeps "Eiffel Tower" in the subject's tokens (mostly "iffel") in early-to-middle
    // layers; the last token carries the answer only in late layers. The paper's pattern.
    let early_subj = max_over(subject.clone(), 0..n / 2);
    assert!(
        frac(early_subj) > 0.5,
        "subject, early layers: {early_subj}"
    );
    let early_last = max_over(t_last..t_last + 1, 0..n / 2);
    assert!(
        frac(early_last) < 0.1,
        "last token, early layers: {early_last}"
    );
    let late_last = max_over(t_last..t_last + 1, n - 3..n);
    let late_subj = max_over(subject, n - 3..n);
    assert!(
        frac(late_last) > 0.8,
        "last token, late layers: {late_last}"
    );
    assert!(frac(late_subj) < 0.2, "subject, late layers: {late_subj}");
}

#[test]
fn rows_streamed_into_a_header_layout_rebuild_the_result() {
    use loci_core::trace::{TraceHeader, TraceResult};
    struct Collect(Option<TraceHeader>, Vec<(TraceKind, usize, Vec<f32>)>);
    impl TraceObserver for Collect {
        fn on_start(&mut self, h: &TraceHeader) {
            self.0 = Some(h.clone());
        }
        fn on_row(&mut self, kind: TraceKind, token: usize, scores: &[f32]) -> bool {
            self.1.push((kind, token, scores.to_vec()));
            true
        }
    }
    let lm = tiny("tiny-gpt2");
    let mut req = TraceRequest::new("The Eiffel Tower is located in", "Eiffel Tower");
    req.noise = NoiseSpec::Fixed(0.7);
    req.samples = 2;
    let mut c = Collect(None, vec![]);
    let full = lm.trace(&req, None, &mut c, 2).unwrap();
    let header = c.0.unwrap();
    assert_eq!(header.total_rows, 3 * full.tokens.len());
    let mut partial = TraceResult::from_header(&header, &full.model, &req);
    for (k, t, row) in c.1 {
        partial.set_row(k, t, row);
    }
    assert_eq!(partial.scores, full.scores);
    assert_eq!(partial.tracing_effect, full.tracing_effect);
    assert_eq!(
        partial.tracing_effect_subject_last,
        full.tracing_effect_subject_last
    );
}

#[test]
fn planned_rows_computed_anywhere_equal_the_trace() {
    // The web app's pool: every worker plans the same trace and computes some of its rows.
    let lm = tiny("tiny-llama");
    let mut req = TraceRequest::new("The Eiffel Tower is located in the city of", "Eiffel Tower");
    req.samples = 3;
    req.window = 3;
    let std = loci_core::trace::embedding_std(&lm, &["Eiffel Tower", "Colosseum"]).unwrap();
    let whole = lm.trace(&req, Some(std), &mut Quiet, 1).unwrap();
    let (a, b) = (
        lm.trace_plan(&req, Some(std)).unwrap(),
        lm.trace_plan(&req, Some(std)).unwrap(),
    );
    assert_eq!(a.header, b.header);
    let rows = a.rows();
    assert_eq!(rows.len(), a.header.total_rows);
    let mut rebuilt = loci_core::TraceResult::from_header(&a.header, &lm.name, &req);
    for (i, &(kind, t)) in rows.iter().enumerate() {
        let plan = if i % 2 == 0 { &a } else { &b };
        rebuilt.set_row(kind, t, lm.trace_row(plan, kind, t).unwrap());
    }
    // The trace batches all kinds of a token in one pass, a planned row only its own kind: the
    // same arithmetic in other batch shapes, equal up to rounding.
    let close = |a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-3), "{x} vs {y}");
        }
    };
    assert_eq!(
        rebuilt.scores.keys().collect::<Vec<_>>(),
        whole.scores.keys().collect::<Vec<_>>()
    );
    for (kind, grid) in &whole.scores {
        assert_eq!(rebuilt.scores[kind].len(), grid.len());
        for (row, want) in rebuilt.scores[kind].iter().zip(grid) {
            close(row, want);
        }
        close(&rebuilt.tracing_effect[kind], &whole.tracing_effect[kind]);
    }
    assert!(lm.trace_row(&a, TraceKind::Hidden, 99).is_err());
    req.kinds = vec![TraceKind::Mlp];
    let mlp_only = lm.trace_plan(&req, Some(std)).unwrap();
    assert!(lm.trace_row(&mlp_only, TraceKind::Attn, 0).is_err());
}

#[test]
fn random_models_have_the_preset_shapes_and_bench_prompts_their_length() {
    let cfg = loci_core::presets::preset_config("gptj-6b").unwrap();
    assert_eq!(
        (
            cfg.n_layer,
            cfg.d_model,
            cfg.n_head,
            cfg.rotary_dim,
            cfg.vocab_size,
            cfg.d_ff
        ),
        (28, 4096, 16, 64, 50400, 16384)
    );
    assert!(cfg.n_params() > 5_800_000_000 && cfg.n_params() < 6_200_000_000);
    let gpt2 = loci_core::presets::preset_config("gpt2").unwrap();
    assert!(gpt2.n_params() > 120_000_000 && gpt2.n_params() < 130_000_000);
    assert!(loci_core::presets::preset_config("gpt5").is_err());
    // A small random model runs end to end.
    let mut small = gpt2.clone();
    small.n_layer = 2;
    let lm = LoadedModel::random(
        "r",
        &small,
        loci_core::presets::BENCH_TOKENIZER,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for n in [10, 12] {
        let (prompt, subject) = loci_core::presets::bench_prompt(&lm.tokenizer, n).unwrap();
        assert_eq!(lm.encode_prompt(&prompt).unwrap().len(), n);
        let mut req = TraceRequest::new(prompt, subject);
        req.samples = 2;
        req.noise = NoiseSpec::Fixed(0.1);
        let r = lm.trace(&req, None, &mut Quiet, 1).unwrap();
        assert_eq!(r.scores[&TraceKind::Hidden].len(), n);
    }
}
