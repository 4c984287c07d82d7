//! Views: edits added to a shared model without changing it. A view with ROME, MEMIT and
//! fine-tuning edits (low-rank ones as factors on the layer, the dense one materialised) gives
//! the logits and the causal trace of the same edits applied to the weights, within 1e-5, and the
//! shared model keeps its weights bit for bit.

mod common;

use loci_core::edit::Edit;
use loci_core::trace::{NoiseSpec, Quiet, TraceKind, TraceRequest};
use loci_core::LoadedModel;

fn logits(lm: &LoadedModel, prompt: &str) -> Vec<f32> {
    let ids = lm.encode_prompt(prompt).unwrap();
    let t = lm.model.ids_tensor(&[ids]).unwrap();
    lm.model
        .logits(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0f32, f32::max);
    assert!(worst <= 1e-5, "{what}: off by {worst}");
}

#[test]
fn a_view_scores_and_traces_as_the_edits_applied_and_leaves_the_model_alone() {
    for name in ["tiny-gpt2", "tiny-llama"] {
        let mut lm = common::tiny(name);
        let edits = common::sequential_edits(&mut lm);
        let refs: Vec<&Edit> = edits.iter().collect();
        let original = common::down_bits(&lm);
        let view = lm.with_edits(&refs).unwrap();
        assert_eq!(
            common::down_bits(&lm),
            original,
            "{name}: the model changed"
        );

        let applied = lm.with_edits_applied(&refs).unwrap();
        let mut in_place = lm.clone();
        for e in &edits {
            in_place.apply(e).unwrap();
        }
        assert_eq!(
            common::down_bits(&applied),
            common::down_bits(&in_place),
            "{name}: a copy with the edits applied is the model with them applied"
        );
        assert_ne!(common::down_bits(&applied), original);

        for prompt in [
            "The Eiffel Tower is located in the city of",
            "Michael Jordan plays the sport of",
            "Japan, whose capital is",
        ] {
            let (v, a) = (logits(&view, prompt), logits(&applied, prompt));
            assert_close(&v, &a, &format!("{name} {prompt:?}"));
            let unedited = logits(&lm, prompt);
            let moved = v
                .iter()
                .zip(&unedited)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                moved > 1e-3,
                "{name} {prompt:?}: the view is the unedited model"
            );
        }

        let mut req =
            TraceRequest::new("The Eiffel Tower is located in the city of", "Eiffel Tower");
        req.kinds = vec![TraceKind::Hidden, TraceKind::Mlp, TraceKind::Attn];
        req.samples = 3;
        req.noise = NoiseSpec::Fixed(0.8);
        let tv = view.trace(&req, None, &mut Quiet, 2).unwrap();
        let ta = applied.trace(&req, None, &mut Quiet, 1).unwrap();
        assert_eq!(tv.answer, ta.answer);
        for kind in &req.kinds {
            let flat = |t: &loci_core::trace::TraceResult| -> Vec<f32> {
                t.scores[kind].iter().flatten().copied().collect()
            };
            assert_close(&flat(&tv), &flat(&ta), &format!("{name} {kind:?} grid"));
        }
        assert_eq!(
            common::down_bits(&lm),
            original,
            "{name}: the model changed"
        );
    }
}

#[test]
fn a_bad_edit_makes_no_view() {
    let lm = common::tiny("tiny-gpt2");
    let mut other = common::tiny("tiny-llama");
    let edits = common::sequential_edits(&mut other);
    // Edits of another shape are refused whole.
    let Err(err) = lm.with_edits(&[&edits[0]]) else {
        panic!("an edit of another shape made a view")
    };
    assert!(err.to_string().contains("d_model"), "{err}");
}
