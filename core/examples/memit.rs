//! MEMIT (Meng et al. 2023): write several facts at once, the update spread over a few layers'
//! MLP down-projections, then undo it exactly.
//!
//! Steps: key statistics of the edited layers, one edit of two facts ("Eiffel Tower → Rome",
//! "Michael Jordan → soccer") with the model's shipped settings (else the paper's GPT-J values
//! at two middle layers), the top predictions before and after, and the undo.
//!
//! Run: `cargo run --release -p loci-core --example memit -- MODEL_DIR [CORPUS.txt]`
//! (without a model, the random `tiny-gpt2` test fixture: the edit may or may not take on it;
//! without a corpus, a built-in paragraph, too little text for a real model's statistics).

mod common;

use loci_core::edit::{Edit, MemitHparams, RewriteRequest, StatsAccumulator};
use loci_core::LoadedModel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut lm = common::load_model(args.next())?;
    let texts = common::corpus(args.next())?;
    let mid = (lm.model.n_layer() / 2).max(1);
    let hp = MemitHparams::for_model(&lm.model.cfg)
        .unwrap_or_else(|| MemitHparams::at_layers(vec![mid - 1, mid]));

    // One pass over the corpus collects the statistics of every edited layer.
    let mut acc = StatsAccumulator::new(&lm, &hp.layers, 64)?;
    let tokens = acc.add_texts(&lm, &texts[..])?;
    let stats = acc.finish(&lm, "example corpus")?;
    println!("key statistics of layers {:?}: {tokens} tokens", hp.layers);

    let requests = vec![
        RewriteRequest::from_prompt("{} is located in the city of", "Eiffel Tower", "Rome")?,
        RewriteRequest::from_prompt("{} plays the sport of", "Michael Jordan", "soccer")?,
    ];
    let show = |lm: &LoadedModel, when: &str| -> loci_core::Result<()> {
        for r in &requests {
            let pred = lm.predict(&r.filled(), 1)?;
            let top = &pred.top[0];
            println!(
                "{when:>7}: {:?} → {:?} ({:.3})",
                r.filled(),
                top.token,
                top.prob
            );
        }
        Ok(())
    };
    show(&lm, "before")?;

    // Computing the edit changes the weights layer by layer and restores them when done.
    let edit = lm.memit(&requests, &hp, &stats, &mut |phase| println!("  {phase}"))?;
    // z: the residual after the last edited layer that makes each fact's target likely.
    println!(
        "‖z − h‖ per fact, before the update: {:?}",
        edit.stats.z_gap
    );
    let applied = lm.apply(&Edit::Memit(edit))?;
    show(&lm, "after")?;

    lm.undo_edit(applied)?;
    show(&lm, "undone")?;
    Ok(())
}
