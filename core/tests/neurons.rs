//! Knowledge neurons (integrated gradients over MLP neurons) against what they estimate: each
//! cell's attributions add up to p(answer) minus p(answer) with that cell's neurons zeroed
//! (completeness), more closely with more points of the path; the zeroed probability comes from a
//! plain full forward pass, so the split run a cell uses (clean keys and values before its
//! token) is checked too.

mod common;

use candle_core::{IndexOp, Tensor};
use loci_core::hooks::{FnHook, Site};
use loci_core::trace::{Quiet, TraceKind, TraceMethod, TraceRequest, TraceResult};
use loci_core::LoadedModel;

const PROMPT: &str = "The Eiffel Tower is located in the city of";

fn neurons(lm: &LoadedModel, steps: usize) -> TraceResult {
    let mut req = TraceRequest::new(PROMPT, "Eiffel Tower");
    req.kinds = vec![TraceKind::Mlp];
    req.samples = steps;
    lm.trace_by(TraceMethod::Neurons, &req, None, &mut Quiet, 1)
        .unwrap()
}

/// p(answer) with layer `l`'s MLP neurons at token `t` set to zero, by a full forward pass.
fn zeroed(lm: &LoadedModel, l: usize, t: usize, answer: u32) -> f32 {
    let ids = lm.encode_prompt(PROMPT).unwrap();
    let ids = lm.model.ids_tensor(&[ids]).unwrap();
    let mut zero = FnHook(|site: Site, x: &Tensor| {
        if site != Site::MlpKey(l) {
            return Ok(None);
        }
        let (_, len, d) = x.dims3()?;
        let mask: Vec<f32> = (0..len).map(|i| (i != t) as u8 as f32).collect();
        let mask = Tensor::from_vec(mask, (1, len, 1), x.device())?;
        Ok(Some(x.broadcast_mul(&mask.broadcast_as((1, len, d))?)?))
    });
    let probs = lm.model.next_token_probs(&ids, &mut zero).unwrap();
    probs.i((0, answer as usize)).unwrap().to_scalar().unwrap()
}

#[test]
fn each_cell_adds_up_to_what_zeroing_its_neurons_takes_away() {
    for name in ["tiny-gpt2", "tiny-llama"] {
        let lm = common::tiny(name);
        let (coarse, fine) = (neurons(&lm, 4), neurons(&lm, 64));
        assert_eq!(fine.method, TraceMethod::Neurons);
        assert_eq!(fine.low, 0.0);
        let grid = &fine.scores[&TraceKind::Mlp];
        let (subject_last, last) = (fine.subject_range[1] - 1, grid.len() - 1);
        let (mut err_fine, mut err_coarse, mut biggest) = (0f32, 0f32, 0f32);
        for t in [subject_last, last] {
            let coarse_row = &coarse.scores[&TraceKind::Mlp][t];
            for (l, (&got, &rough)) in grid[t].iter().zip(coarse_row).enumerate() {
                let want = fine.high - zeroed(&lm, l, t, fine.answer.id);
                biggest = biggest.max(want.abs());
                err_fine = err_fine.max((got - want).abs());
                err_coarse = err_coarse.max((rough - want).abs());
            }
        }
        assert!(biggest > 1e-4, "{name}: zeroing neurons must matter");
        assert!(err_fine < 0.05 * biggest, "{name}: {err_fine} of {biggest}");
        assert!(err_fine < err_coarse, "{name}: {err_fine} vs {err_coarse}");
        // Only the two attributed tokens have cells.
        for (t, row) in grid.iter().enumerate() {
            if t != subject_last && t != last {
                assert!(row.iter().all(|&v| v == 0.0), "{name}: row {t}");
            }
        }
    }
}

#[test]
fn the_neurons_listed_pass_a_fifth_of_their_tokens_largest_attribution() {
    let lm = common::tiny("tiny-gpt2");
    let r = neurons(&lm, 8);
    assert!(!r.neurons.is_empty());
    assert!(r
        .neurons
        .windows(2)
        .all(|w| w[0].attribution >= w[1].attribution));
    for n in &r.neurons {
        let best = r
            .neurons
            .iter()
            .filter(|m| m.token == n.token)
            .map(|m| m.attribution)
            .fold(0f32, f32::max);
        assert!(n.attribution > loci_core::trace::NEURON_THRESHOLD * best);
        assert!(n.layer < lm.model.n_layer() && n.neuron < lm.model.cfg.d_ff);
    }
    // The study reads the effect as the fraction of p(answer) the layer's neurons carry.
    let grid = &r.scores[&TraceKind::Mlp];
    for (l, e) in r.tracing_effect[&TraceKind::Mlp].iter().enumerate() {
        let best = grid.iter().map(|row| row[l] / r.high).fold(0f32, f32::max);
        assert!((e - best).abs() < 1e-6, "layer {l}: {e} vs {best}");
    }
}

#[test]
fn knowledge_neurons_are_mlp_neurons_only() {
    let lm = common::tiny("tiny-gpt2");
    for kinds in [vec![TraceKind::Hidden], TraceKind::ALL.to_vec()] {
        let mut req = TraceRequest::new(PROMPT, "Eiffel Tower");
        req.kinds = kinds;
        let err = lm
            .trace_by(TraceMethod::Neurons, &req, None, &mut Quiet, 1)
            .unwrap_err();
        assert!(err.to_string().contains("MLP neurons"), "{err}");
    }
    assert_eq!(
        "neurons".parse::<TraceMethod>().unwrap(),
        TraceMethod::Neurons
    );
    let err = "kn".parse::<TraceMethod>().unwrap_err().to_string();
    assert!(err.contains("neurons"), "{err}");
}
