//! The hook mechanism: capture, replace, add and stop behave as tracing and editing need.

mod common;

use candle_core::{Device, Tensor};
use loci_core::hooks::{patch_rows, Capture, Chain, FnHook, Patch};
use loci_core::{LogitsAt, NoHook, Site};

use common::tiny;

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn restoring_all_block_states_recovers_the_clean_run() {
    for name in ["tiny-gpt2", "tiny-gptj", "tiny-llama"] {
        let lm = tiny(name);
        let ids = lm
            .tokenizer
            .encode("The Eiffel Tower is located in")
            .unwrap();
        let t = lm.model.ids_tensor(std::slice::from_ref(&ids)).unwrap();
        let last = lm.model.n_layer() - 1;
        let mut clean = Capture::new([Site::Block(1), Site::Embed]);
        let clean_logits = lm
            .model
            .run(&t, &mut clean, None, LogitsAt::Last)
            .unwrap()
            .unwrap();

        // Corrupt the embeddings of tokens 1..3; restore the residual stream at layer 1 everywhere.
        let noise = |site: Site, x: &Tensor| -> loci_core::Result<Option<Tensor>> {
            if site != Site::Embed {
                return Ok(None);
            }
            // Not a constant vector: LayerNorm would cancel a uniform shift.
            let d = x.dim(2).unwrap();
            let v = Tensor::arange(0f32, d as f32, x.device())
                .unwrap()
                .affine(0.05, -1.0)
                .unwrap();
            let cells: Vec<_> = (1..3).map(|p| (0, p, v.clone())).collect();
            Ok(Some(patch_rows(x, &cells, true)?))
        };
        let corrupted = lm
            .model
            .run(&t, &mut FnHook(noise), None, LogitsAt::Last)
            .unwrap()
            .unwrap();
        assert!(
            max_abs(&corrupted, &clean_logits) > 1e-3,
            "{name}: noise changed nothing"
        );

        let h1 = clean.get(Site::Block(1)).unwrap();
        let cells: Vec<_> = (0..ids.len())
            .map(|p| (0, p, h1.get(0).unwrap().get(p).unwrap()))
            .collect();
        let mut restore = Patch {
            site: Site::Block(1),
            cells,
            add: false,
        };
        let mut noise_hook = FnHook(noise);
        let mut chain = Chain(vec![&mut noise_hook, &mut restore]);
        let restored = lm
            .model
            .run(&t, &mut chain, None, LogitsAt::Last)
            .unwrap()
            .unwrap();
        assert!(
            max_abs(&restored, &clean_logits) < 1e-5,
            "{name}: restore did not recover"
        );

        // Capture stops where asked: no logits, and deeper sites never reached.
        let mut stop =
            Capture::new([Site::MlpKey(0), Site::Block(last)]).stopping_after(Site::MlpKey(0));
        assert!(lm
            .model
            .run(&t, &mut stop, None, LogitsAt::Last)
            .unwrap()
            .is_none());
        assert_eq!(
            stop.get(Site::MlpKey(0)).unwrap().dims(),
            &[1, ids.len(), lm.model.cfg.d_ff]
        );
        assert!(stop.get(Site::Block(last)).is_err());
    }
}

#[test]
fn adding_a_delta_at_the_mlp_output_equals_editing_its_bias() {
    // ROME's v* optimisation adds δ at the MLP output; that must act like b ← b + δ at that token.
    let lm = tiny("tiny-gpt2");
    let ids = lm
        .tokenizer
        .encode("Danielle Darrieux's mother tongue is")
        .unwrap();
    let t = lm.model.ids_tensor(std::slice::from_ref(&ids)).unwrap();
    let d = lm.model.cfg.d_model;
    let delta = Tensor::arange(0f32, d as f32, &Device::Cpu)
        .unwrap()
        .affine(0.01, -0.2)
        .unwrap();
    let all: Vec<_> = (0..ids.len()).map(|p| (0, p, delta.clone())).collect();
    let mut add = Patch {
        site: Site::Mlp(2),
        cells: all,
        add: true,
    };
    let via_hook = lm
        .model
        .run(&t, &mut add, None, LogitsAt::All)
        .unwrap()
        .unwrap();

    let mut edited = lm.clone();
    let block = &mut edited.model.blocks[2];
    let down = match &mut block.mlp {
        loci_core::model::layers::Mlp::Gelu { proj, .. } => proj,
        _ => unreachable!(),
    };
    down.bias = Some((down.bias.as_ref().unwrap() + &delta).unwrap());
    let via_bias = edited
        .model
        .run(&t, &mut NoHook, None, LogitsAt::All)
        .unwrap()
        .unwrap();
    assert!(max_abs(&via_hook, &via_bias) < 1e-5);
    assert!(max_abs(&via_hook, &lm.model.logits(&t).unwrap()) > 1e-3);
}

#[test]
fn a_hook_returning_the_wrong_shape_is_an_error() {
    let lm = tiny("tiny-llama");
    let t = lm.model.ids_tensor(&[vec![1, 2, 3]]).unwrap();
    let mut bad = FnHook(|site: Site, x: &Tensor| {
        Ok((site == Site::Attn(0)).then(|| x.narrow(1, 0, 1).unwrap()))
    });
    let e = lm
        .model
        .run(&t, &mut bad, None, LogitsAt::Last)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Attn(0)"), "{e}");
}

#[test]
fn replacing_the_down_projection_and_restoring_is_bit_exact() {
    let mut lm = tiny("tiny-llama");
    let t = lm.model.ids_tensor(&[vec![5, 6, 7, 8]]).unwrap();
    let before = lm
        .model
        .logits(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let w0 = lm.model.down_proj(3).unwrap().weight.clone();
    lm.model
        .set_down_proj_weight(3, (&w0 * 1.5).unwrap())
        .unwrap();
    let changed = lm
        .model
        .logits(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(before, changed);
    lm.model.set_down_proj_weight(3, w0).unwrap();
    let after = lm
        .model
        .logits(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(before
        .iter()
        .zip(&after)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}
