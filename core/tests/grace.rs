//! GRACE: an edit is a codebook entry at one layer; the weights never change, other prompts are
//! answered exactly as before, undo restores the layer bit for bit, and an edit file applies
//! wherever the entries it changes are.

mod common;

use loci_core::edit::{Edit, GraceHparams, RewriteRequest};
use loci_core::LoadedModel;

/// The edited prompt as the request fills it in (GRACE answers this prompt, not paraphrases).
const PROMPT: &str = "Eiffel Tower is located in the city of";
const OTHER: &str = "Michael Jordan plays the sport of";

fn eiffel(target: &str) -> RewriteRequest {
    common::request(
        "{} is located in the city of",
        "Eiffel Tower",
        target,
        "Paris",
    )
}

fn probs(lm: &LoadedModel, prompt: &str) -> Vec<u32> {
    let ids = lm.encode_prompt(prompt).unwrap();
    lm.next_probs(&ids)
        .unwrap()
        .iter()
        .map(|p| p.to_bits())
        .collect()
}

fn target_prob(lm: &LoadedModel, target: &str) -> f32 {
    lm.target_prob(PROMPT, target).unwrap()
}

#[test]
fn an_edit_rewrites_its_prompt_only_and_undoes_bit_for_bit() {
    for name in ["tiny-gpt2", "tiny-llama"] {
        let mut lm = common::tiny(name);
        let hp = GraceHparams::defaults(&lm.model.cfg, None).unwrap();
        let (weights, other, before) = (
            common::down_bits(&lm),
            probs(&lm, OTHER),
            probs(&lm, PROMPT),
        );
        let rome_before = target_prob(&lm, "Rome");
        let e = lm.grace(&eiffel("Rome"), &hp).unwrap();
        assert_eq!((e.base, e.stats.action.as_str()), (0, "added"), "{name}");
        let applied = lm.apply(&Edit::Grace(e)).unwrap();
        // A random test model's head caps how likely any token gets: the edit must still
        // raise the target by orders of magnitude.
        let rome = target_prob(&lm, "Rome");
        assert!(rome > 100.0 * rome_before, "{name}: {rome_before} → {rome}");
        assert_eq!(
            probs(&lm, OTHER),
            other,
            "{name}: another prompt is answered as before"
        );
        assert_eq!(common::down_bits(&lm), weights, "{name}: no weight changes");
        lm.undo_edit(applied).unwrap();
        assert_eq!(probs(&lm, PROMPT), before, "{name}");
        assert!(lm.model.down_proj(hp.layer).unwrap().codebook.is_none());
    }
}

#[test]
fn edits_share_the_layers_codebook_and_files_need_the_entries_they_change() {
    let mut lm = common::tiny("tiny-gpt2");
    let mut hp = GraceHparams::defaults(&lm.model.cfg, None).unwrap();
    hp.n_iter = 20;
    let first = Edit::Grace(lm.grace(&eiffel("Rome"), &hp).unwrap());
    let first_file = first.to_file(&lm).unwrap();
    let applied = lm.apply(&first).unwrap();
    let rome = probs(&lm, PROMPT);

    // The same fact again reuses its entry; another target for the same prompt splits it.
    let again = lm.grace(&eiffel("Rome"), &hp).unwrap();
    assert_eq!((again.base, again.stats.action.as_str()), (1, "reused"));
    assert!(again.added.is_none() && again.stats.nearest_distance == Some(0.0));
    let other = lm.grace(&eiffel("London"), &hp).unwrap();
    assert_eq!(other.stats.action, "split");
    assert!(other.added.is_some() && other.changed.len() == 1);
    let second = Edit::Grace(other);
    let second_file = second.to_file(&lm).unwrap();

    // On a fresh model: the second file alone is refused and changes nothing; after the first
    // file (which equals the edit applied directly), it applies.
    let mut fresh = common::tiny("tiny-gpt2");
    let before = probs(&fresh, PROMPT);
    let err = fresh.apply_file(&second_file).unwrap_err().to_string();
    assert!(err.contains("does not hold it"), "{err}");
    assert_eq!(probs(&fresh, PROMPT), before);
    fresh.apply_file(&first_file).unwrap();
    assert_eq!(probs(&fresh, PROMPT), rome, "the file is the edit");
    let (_, on_top) = fresh.apply_file(&second_file).unwrap();
    let cb = fresh
        .model
        .down_proj(hp.layer)
        .unwrap()
        .codebook
        .clone()
        .unwrap();
    assert_eq!(cb.entries().len(), 2);
    fresh.undo_edit(on_top).unwrap();
    assert_eq!(
        probs(&fresh, PROMPT),
        rome,
        "undo pops the second edit only"
    );

    // A view holds the codebook of its own: the model it came from is unchanged.
    lm.undo_edit(applied).unwrap();
    let view = lm.with_edits(&[&first]).unwrap();
    assert_eq!(probs(&view, PROMPT), rome);
    assert_eq!(probs(&lm, PROMPT), before);
}

#[test]
fn bad_settings_and_damaged_files_are_refused() {
    let mut lm = common::tiny("tiny-gpt2");
    let cfg = lm.model.cfg.clone();
    assert!(GraceHparams::defaults(&cfg, Some(cfg.n_layer)).is_err());
    let mut hp = GraceHparams::defaults(&cfg, None).unwrap();
    hp.goal.subject_noise = Some(0.1);
    let err = lm.grace(&eiffel("Rome"), &hp).unwrap_err().to_string();
    assert!(err.contains("subject noise"), "{err}");
    let mut hp = GraceHparams::defaults(&cfg, None).unwrap();
    hp.eps = 0.0;
    assert!(lm.grace(&eiffel("Rome"), &hp).is_err());
    let hp = GraceHparams::defaults(&cfg, None).unwrap();
    let file = Edit::Grace(lm.grace(&eiffel("Rome"), &hp).unwrap())
        .to_file(&lm)
        .unwrap();
    let mut broken = file.clone();
    let at = broken.len() - 3;
    broken[at] ^= 0x40;
    assert!(lm.apply_file(&broken).is_err());
    assert!(lm.model.down_proj(hp.layer).unwrap().codebook.is_none());
    // A fine-tuning edit computed before can be hooked on its layer, until the layer carries
    // a codebook (which replaces the outputs the hook would add to); then fine-tuning there
    // is refused, and the edited model cannot be saved as weights: the codebook is not in them.
    let ft = loci_core::edit::FtHparams::at_layers(vec![hp.layer], None);
    let tuned = Edit::Ft(lm.finetune(&eiffel("Rome"), &ft).unwrap());
    assert!(loci_core::edit::RowEdits::can_hook_on(&lm, &tuned));
    lm.apply_file(&file).unwrap();
    assert!(!loci_core::edit::RowEdits::can_hook_on(&lm, &tuned));
    let err = lm.finetune(&eiffel("Rome"), &ft).unwrap_err().to_string();
    assert!(err.contains("GRACE codebook"), "{err}");
    let err = lm.model.hf_tensors().unwrap_err().to_string();
    assert!(err.contains("GRACE codebook"), "{err}");
    let dir = std::env::temp_dir().join(format!("loci-grace-save-{}", std::process::id()));
    assert!(lm.save_hf_folder(&dir).is_err());
    assert!(!dir.exists(), "nothing is written");
}

#[test]
fn on_smollm2_grace_writes_the_new_city_and_leaves_other_facts() {
    let Some(lm) = common::smol() else { return };
    let mut lm = lm.clone();
    let hp = GraceHparams::defaults(&lm.model.cfg, None).unwrap();
    let other = probs(&lm, OTHER);
    let e = lm.grace(&eiffel("Rome"), &hp).unwrap();
    let applied = lm.apply(&Edit::Grace(e)).unwrap();
    assert!(
        target_prob(&lm, "Rome") > 0.9,
        "{}",
        target_prob(&lm, "Rome")
    );
    assert_eq!(probs(&lm, OTHER), other);
    lm.undo_edit(applied).unwrap();
    assert!(target_prob(&lm, "Paris") > 0.5);
}
