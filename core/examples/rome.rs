//! ROME (Meng et al. 2022): rewrite one fact with a rank-one update of one layer's MLP
//! down-projection, check its effect, and undo it exactly.
//!
//! Steps: key statistics (the second moment of the layer's MLP keys over a corpus), the edit
//! "Eiffel Tower → Rome" computed with the model's shipped settings (else the paper's at a middle
//! layer), the top prediction before and after, and the undo, checked bit for bit.
//!
//! Run: `cargo run --release -p loci-core --example rome -- MODEL_DIR [CORPUS.txt]`
//! (without a model, the random `tiny-gpt2` test fixture: the edit may or may not take on it;
//! without a corpus, a built-in paragraph, too little text for a real model's statistics).

mod common;

use loci_core::edit::{RewriteRequest, RomeHparams, StatsAccumulator, TargetStr};
use loci_core::LoadedModel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut lm = common::load_model(args.next())?;
    let texts = common::corpus(args.next())?;
    let middle = RomeHparams::at_layer(lm.model.n_layer() / 2);
    let mut hp = RomeHparams::for_model(&lm.model.cfg).unwrap_or(middle);

    let mut acc = StatsAccumulator::new(&lm, &[hp.layer], 64)?;
    let tokens = acc.add_texts(&lm, &texts[..])?;
    let stats = acc.finish(&lm, "example corpus")?.remove(0);
    println!("key statistics of layer {}: {tokens} tokens", hp.layer);

    let mut req =
        RewriteRequest::from_prompt("{} is located in the city of", "Eiffel Tower", "Rome")?;
    req.target_true = Some(TargetStr::new("Paris"));
    let prompts = [
        "The Eiffel Tower is located in the city of",
        "The Louvre is located in the city of",
    ];
    let show = |lm: &LoadedModel, when: &str| -> loci_core::Result<()> {
        for p in prompts {
            let pred = lm.predict(p, 1)?;
            let top = &pred.top[0];
            println!("{when:>7}: {p:?} → {:?} ({:.3})", top.token, top.prob);
        }
        Ok(())
    };
    show(&lm, "before")?;

    let edit = match lm.rome(&req, &hp, Some(&stats)) {
        Ok(edit) => edit,
        Err(e) => {
            // Too little text leaves the statistics singular; ROME then needs more text.
            println!("the edit failed with the statistics ({e}); trying without them");
            hp.mom2_adjustment = false;
            lm.rome(&req, &hp, None)?
        }
    };
    let losses = &edit.stats.losses;
    println!(
        "edit at layer {}: v* loss {:.3} → {:.3} in {} steps, ‖δ‖ = {:.3}",
        edit.layer,
        losses.first().copied().unwrap_or(f32::NAN),
        losses.last().copied().unwrap_or(f32::NAN),
        losses.len(),
        edit.stats.delta_norm
    );
    let weights = |lm: &LoadedModel| -> loci_core::Result<Vec<f32>> {
        Ok(lm
            .model
            .down_proj(hp.layer)?
            .weight
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let original = weights(&lm)?;
    let applied = lm.apply_edit(&edit)?;
    show(&lm, "after")?;

    lm.undo_edit(applied)?;
    show(&lm, "undone")?;
    println!("weights restored exactly: {}", weights(&lm)? == original);
    Ok(())
}
