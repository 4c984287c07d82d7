//! zsRE: records become edit cases, teacher-forced predictions match next-token predictions,
//! and a ROME edit of SmolLM2 answers a new question while leaving an unrelated one alone.

mod common;

use loci_core::edit::{Edit, RomeHparams};
use loci_core::eval::zsre::{parse_zsre, zsre_metrics, ZsreTarget};
use loci_core::eval::{parse_cases, parse_dataset, Dataset};

fn zsre_text() -> String {
    std::fs::read_to_string(common::root().join("../shared/data/zsre/zsre_mend_train-1k.json"))
        .unwrap()
}

#[test]
fn zsre_records_become_cases_and_are_told_from_counterfact() {
    let text = zsre_text();
    let set = parse_zsre(&text, ZsreTarget::Answer).unwrap();
    assert!(set.skipped.is_empty(), "{:?}", set.skipped);
    let cases = set.cases;
    assert_eq!(cases.len(), 1000);
    let c = &cases[0];
    assert_eq!(c.case_id, 0);
    assert_eq!(
        c.requested_rewrite.prompt,
        "What is the product made by {}?"
    );
    assert_eq!(c.requested_rewrite.subject, "UniFirst");
    assert_eq!(c.requested_rewrite.target_new.str, "uniform");
    assert_eq!(
        c.paraphrase_prompts,
        ["What will be the product of UniFirst?"]
    );
    assert_eq!(
        c.neighborhood.prompt,
        "nq question: john goodman's character in the big lebowski?"
    );
    assert_eq!(c.neighborhood.answer, "Walter Sobchak");
    // Two records of MEND's sample have an empty `alt`: skipped, with why, keeping the ids.
    let alt = parse_zsre(&text, ZsreTarget::Alt).unwrap();
    assert_eq!(alt.skipped.len(), 2, "{:?}", alt.skipped);
    assert!(alt.skipped[0].starts_with("record 534: an empty answer"));
    assert_eq!(alt.cases.len(), 998);
    assert_eq!(alt.cases[534].case_id, 535);
    let alt = alt.cases;
    assert_eq!(alt[0].requested_rewrite.target_new.str, "unmanned aircraft");
    assert_eq!(alt[0].requested_rewrite.prompt, c.requested_rewrite.prompt);

    assert!(matches!(
        parse_dataset(&text, ZsreTarget::Answer).unwrap(),
        Dataset::Zsre(v) if v.cases.len() == 1000
    ));
    let cf = std::fs::read_to_string(
        common::root().join("../shared/data/counterfact/counterfact_rome_format_sample500.json"),
    )
    .unwrap();
    assert!(matches!(
        parse_dataset(&cf, ZsreTarget::Answer).unwrap(),
        Dataset::CounterFact(v) if v.len() == 500
    ));
    let e = parse_cases(&text).unwrap_err().to_string();
    assert!(e.contains("zsRE"), "{e}");

    let record = |subject: &str, answers: &str| {
        format!(
            r#"[{{"subject": "{subject}", "src": "Who founded Acme?", "answers": {answers},
            "alt": "x", "rephrase": "Acme was founded by?", "loc": "nq question: a",
            "loc_ans": "b"}}]"#
        )
    };
    let skipped = |subject: &str, answers: &str| {
        let set = parse_zsre(&record(subject, answers), ZsreTarget::Answer).unwrap();
        assert!(set.cases.is_empty());
        set.skipped.join("")
    };
    let e = skipped("Zenith", r#"["Bob"]"#);
    assert!(e.contains("record 0") && e.contains("Zenith"), "{e}");
    assert!(skipped("Acme", "[]").contains("no answers"));
    let ok = parse_zsre(&record("Acme", r#"["Bob"]"#), ZsreTarget::Answer).unwrap();
    assert_eq!(ok.cases.len(), 1);
    // A record of the wrong shape is a broken file, not a skipped case.
    assert!(parse_zsre(r#"[{"subject": "Acme"}]"#, ZsreTarget::Answer).is_err());
    assert!("answers".parse::<ZsreTarget>().is_err());
    assert_eq!("alt".parse::<ZsreTarget>().unwrap(), ZsreTarget::Alt);
}

#[test]
fn the_study_poses_zsre_as_hase_et_al_do() {
    let set = parse_zsre(&zsre_text(), ZsreTarget::Answer).unwrap();
    let cases = set.hase_cases(1);
    assert_eq!(cases.len(), 1000);
    let c = &cases[0];
    let rw = &c.requested_rewrite;
    assert_eq!(
        rw.prompt,
        "Question: What is the product made by {}? Answer:"
    );
    assert_eq!(rw.target_true.as_ref().unwrap().str, "uniform");
    assert_eq!(
        c.paraphrase_prompts,
        ["Question: What will be the product of UniFirst? Answer:"]
    );
    assert_eq!(c.neighborhood_true.as_deref(), Some("Walter Sobchak"));
    let answers: Vec<&str> = set.cases.iter().map(|c| c.answer.as_str()).collect();
    for c in &cases {
        let new = &c.requested_rewrite.target_new.str;
        assert_ne!(
            Some(new),
            c.requested_rewrite.target_true.as_ref().map(|t| &t.str)
        );
        assert!(answers.contains(&new.as_str()));
    }
    // The draws spread over the answers, repeat with the seed and change with it.
    let distinct: std::collections::BTreeSet<&str> = cases
        .iter()
        .map(|c| c.requested_rewrite.target_new.str.as_str())
        .collect();
    assert!(distinct.len() > 400, "{}", distinct.len());
    assert_eq!(set.hase_cases(1), cases);
    let other = set.hase_cases(2);
    let same = other.iter().zip(&cases).filter(|(a, b)| a == b).count();
    assert!(same < 50, "{same} of 1000 cases drew the same answer");
}

#[test]
fn teacher_forced_predictions_are_next_token_predictions() {
    let lm = common::tiny("tiny-gpt2");
    let (prompt, answer) = ("The capital of France is", "the city of Paris");
    let got = lm
        .target_predictions(&[(prompt.to_string(), answer.to_string())])
        .unwrap()
        .remove(0);
    let target = lm.tokenizer.encode_plain(&format!(" {answer}")).unwrap();
    assert_eq!(got.target, target);
    assert_eq!(got.predicted.len(), target.len());
    for j in 0..target.len() {
        let text = format!("{prompt}{}", lm.tokenizer.decode(&target[..j]).unwrap());
        // The text re-encodes to the same tokens, so its next-token prediction is position j's.
        let mut ids = lm.tokenizer.encode_plain(prompt).unwrap();
        ids.extend(&target[..j]);
        assert_eq!(lm.tokenizer.encode_plain(&text).unwrap(), ids);
        assert_eq!(got.predicted[j], lm.predict(&text, 1).unwrap().top[0].id);
    }
    let hits = got
        .predicted
        .iter()
        .zip(&got.target)
        .filter(|(a, b)| a == b)
        .count();
    assert_eq!(got.accuracy(), hits as f32 / target.len() as f32);
}

#[test]
fn rome_teaches_smollm2_a_zsre_answer() {
    let Some(base) = common::smol() else { return };
    let mut lm = base.clone();
    let layer = 6;
    let stats = common::key_stats(&lm, &[layer], 60, 512).pop().unwrap();
    let case = parse_zsre(&zsre_text(), ZsreTarget::Answer)
        .unwrap()
        .cases
        .remove(0);
    let before = common::down_bits(&lm);
    let records = lm
        .eval_zsre_with(std::slice::from_ref(&case), |lm, reqs| {
            Ok(Edit::Rome(lm.rome(
                &reqs[0],
                &RomeHparams::at_layer(layer),
                Some(&stats),
            )?))
        })
        .unwrap();
    let m = &records[0].metrics;
    eprintln!("{m:?}");
    // "What is the product made by UniFirst?" → " uniform": unknown before, answered after,
    // also when asked in other words; the unrelated NQ question keeps its predictions.
    assert_eq!((m.efficacy_pre, m.efficacy), (0.0, 1.0));
    assert_eq!((m.paraphrase_pre, m.paraphrase), (0.0, 1.0));
    assert_eq!(m.locality, 1.0);
    assert_eq!(m.specificity, m.specificity_pre);
    assert_eq!(*m, zsre_metrics(&records[0].pre, &records[0].post));
    assert_eq!(common::down_bits(&lm), before, "the edit is undone exactly");
}
