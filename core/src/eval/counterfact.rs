//! CounterFact: ROME's probability tests (efficacy, paraphrase, neighbourhood, generation fluency
//! and consistency, docs/evaluation.md#counterfact-metrics) and Hase et al.'s normalised scores
//! (docs/evaluation.md#hase-et-als-normalised-scores).

use serde::{Deserialize, Serialize};

use super::{hmean, mean, percent, TargetScore};
use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::request::{RewriteRequest, TargetStr};

/// One CounterFact case (ROME's format; EasyEdit's flattened records convert into it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CounterFactCase {
    /// The case's id in the data set (also seeds its generations).
    pub case_id: u64,
    /// The fact to rewrite: prompt template, subject, new and true targets.
    pub requested_rewrite: RewriteRequest,
    /// Rephrasings of the rewrite prompt that should now give the new target.
    #[serde(default)]
    pub paraphrase_prompts: Vec<String>,
    /// Prompts about other subjects with the same true answer, which the edit should keep.
    #[serde(default)]
    pub neighborhood_prompts: Vec<String>,
    /// Prompts about subjects whose true answer is the new target (ROME's attribute prompts);
    /// scored, but not used by the metrics.
    #[serde(default)]
    pub attribute_prompts: Vec<String>,
    /// Prompts to generate from for fluency and consistency.
    #[serde(default)]
    pub generation_prompts: Vec<String>,
    /// The neighbours' own true answer when it differs from the case's (EasyEdit's locality).
    #[serde(default)]
    pub neighborhood_true: Option<String>,
}

#[derive(Deserialize)]
struct EasyEditRecord {
    case_id: u64,
    prompt: String,
    target_new: String,
    subject: String,
    ground_truth: String,
    #[serde(default)]
    rephrase_prompt: Option<String>,
    #[serde(default)]
    locality_prompt: Option<String>,
    #[serde(default)]
    locality_ground_truth: Option<String>,
}

/// Reads a JSON list of cases in ROME's or EasyEdit's flattened format.
pub fn parse_cases(text: &str) -> Result<Vec<CounterFactCase>> {
    from_values(super::json_values(text, "the CounterFact file")?)
}

pub(super) fn from_values(values: Vec<serde_json::Value>) -> Result<Vec<CounterFactCase>> {
    let json = |e: serde_json::Error| LociError::Json {
        what: "the CounterFact file".into(),
        source: e,
    };
    values
        .into_iter()
        .map(|v| {
            if v.get("requested_rewrite").is_some() {
                return serde_json::from_value(v).map_err(json);
            }
            if super::zsre::is_record(&v) {
                return Err(LociError::input(
                    "this is a zsRE file, not CounterFact (`loci eval` and `loci study run` read zsRE)",
                ));
            }
            let r: EasyEditRecord = serde_json::from_value(v).map_err(json)?;
            let mut rewrite = RewriteRequest::from_prompt(&r.prompt, &r.subject, &r.target_new)
                .map_err(|e| LociError::input(format!("case {}: {e}", r.case_id)))?;
            rewrite.target_true = Some(TargetStr::new(r.ground_truth));
            Ok(CounterFactCase {
                case_id: r.case_id,
                requested_rewrite: rewrite,
                paraphrase_prompts: r.rephrase_prompt.into_iter().collect(),
                neighborhood_prompts: r.locality_prompt.into_iter().collect(),
                attribute_prompts: vec![],
                generation_prompts: vec![],
                neighborhood_true: r.locality_ground_truth,
            })
        })
        .collect()
}

/// The new and the true target's scores after one prompt.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PromptScores {
    /// The prompt scored.
    pub prompt: String,
    /// The score of the requested new target.
    pub target_new: TargetScore,
    /// The score of the true target (for neighbourhood prompts, the neighbours' own answer when
    /// the case gives one).
    pub target_true: TargetScore,
}

/// A case's probability tests (and optional generations) on the model as it is.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CaseScores {
    /// The rewrite prompt itself, subject filled in (one entry).
    pub rewrite: Vec<PromptScores>,
    /// One per paraphrase prompt.
    pub paraphrase: Vec<PromptScores>,
    /// One per neighbourhood prompt.
    pub neighborhood: Vec<PromptScores>,
    /// One per attribute prompt.
    pub attribute: Vec<PromptScores>,
    /// Weighted bi/tri-gram entropy of generations (fluency), when generated.
    pub fluency: Option<f32>,
    /// The texts generated from the case's generation prompts (fluency, consistency).
    #[serde(default)]
    pub generations: Vec<String>,
}

impl LoadedModel {
    /// The probability tests of one case, as the model is now.
    pub fn score_case(&self, case: &CounterFactCase, generate: bool) -> Result<CaseScores> {
        let rw = &case.requested_rewrite;
        let new = rw.target_new.str.clone();
        let truth = rw
            .target_true
            .as_ref()
            .map(|t| t.str.clone())
            .ok_or_else(|| LociError::input("the case has no target_true"))?;
        let groups: [(Vec<String>, String); 4] = [
            (vec![rw.filled()], truth.clone()),
            (case.paraphrase_prompts.clone(), truth.clone()),
            (
                case.neighborhood_prompts.clone(),
                case.neighborhood_true.clone().unwrap_or(truth.clone()),
            ),
            (case.attribute_prompts.clone(), truth.clone()),
        ];
        let mut pairs = Vec::new();
        for (prompts, t) in &groups {
            for p in prompts {
                pairs.push((p.clone(), new.clone()));
                pairs.push((p.clone(), t.clone()));
            }
        }
        let scores = self.score_targets(&pairs)?;
        let mut it = scores.chunks(2);
        let mut take = |prompts: &[String]| -> Vec<PromptScores> {
            prompts
                .iter()
                .map(|p| {
                    let s = it.next().expect("two scores per prompt");
                    PromptScores {
                        prompt: p.clone(),
                        target_new: s[0].clone(),
                        target_true: s[1].clone(),
                    }
                })
                .collect()
        };
        let rewrite = take(&groups[0].0);
        let paraphrase = take(&groups[1].0);
        let neighborhood = take(&groups[2].0);
        let attribute = take(&groups[3].0);
        let mut texts = Vec::new();
        let fluency = if generate && !case.generation_prompts.is_empty() {
            for (i, p) in case.generation_prompts.iter().enumerate() {
                let g = self.generate(
                    p,
                    100usize.saturating_sub(self.tokenizer.encode(p)?.len()),
                    crate::predict::Sampling::TopK {
                        k: 5,
                        seed: case.case_id ^ i as u64,
                    },
                )?;
                texts.push(g.text);
            }
            Some(texts.iter().map(|t| ngram_entropy(t)).sum::<f32>() / texts.len() as f32)
        } else {
            None
        };
        Ok(CaseScores {
            rewrite,
            paraphrase,
            neighborhood,
            attribute,
            fluency,
            generations: texts,
        })
    }
}

/// ROME's fluency: 2/3·H₂ + 4/3·H₃ averaged (= H₂/3 + 2H₃/3), entropies in bits over word n-grams.
pub fn ngram_entropy(text: &str) -> f32 {
    let words: Vec<String> = text
        .split(|c: char| c.is_whitespace())
        .flat_map(|w| {
            // A light stand-in for NLTK's word_tokenize: split off punctuation.
            let mut out = Vec::new();
            let mut cur = String::new();
            for ch in w.chars() {
                if ch.is_alphanumeric() || ch == '\'' {
                    cur.push(ch);
                } else {
                    if !cur.is_empty() {
                        out.push(std::mem::take(&mut cur));
                    }
                    out.push(ch.to_string());
                }
            }
            if !cur.is_empty() {
                out.push(cur);
            }
            out
        })
        .collect();
    let entropy = |n: usize| -> f32 {
        if words.len() < n {
            return 0.0;
        }
        let mut counts = std::collections::HashMap::new();
        for g in words.windows(n) {
            *counts.entry(g.join(" ")).or_insert(0usize) += 1;
        }
        let total: usize = counts.values().sum();
        counts
            .values()
            .map(|&c| {
                let f = c as f32 / total as f32;
                -f * f.log2()
            })
            .sum()
    };
    (2.0 / 3.0 * entropy(2) + 4.0 / 3.0 * entropy(3)) / 2.0
}

/// Per-case metrics from the scores before and after an edit.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CaseMetrics {
    /// ROME: efficacy, paraphrase and neighbourhood success (fractions) and magnitudes.
    /// Efficacy success: share of rewrite prompts where, after the edit, the new target's mean
    /// token NLL is below the true one's (NaN without prompts, as for each score below).
    pub efficacy_score: f32,
    /// Mean over rewrite prompts of p̄(new) − p̄(true) after the edit, p̄ = exp(−mean NLL).
    pub efficacy_magnitude: f32,
    /// As `efficacy_score`, over the paraphrase prompts.
    pub paraphrase_score: f32,
    /// As `efficacy_magnitude`, over the paraphrase prompts.
    pub paraphrase_magnitude: f32,
    /// Share of neighbourhood prompts where the new target does not beat the true answer.
    pub neighborhood_score: f32,
    /// Mean over neighbourhood prompts of p̄(true) − p̄(new) after the edit.
    pub neighborhood_magnitude: f32,
    /// Hase et al.: normalised rewrite, paraphrase and neighbourhood scores on the first prompt of
    /// each type, and their per-case harmonic mean.
    /// Rewrite: `1 − (1 − p_post) / (1 − p_pre)` with p = p(new target), floored at 2e-8.
    pub hase_rewrite: f32,
    /// The same normalised score on the first paraphrase prompt.
    pub hase_paraphrase: f32,
    /// `1 − |p_post − p_pre| / (|p_pre − 0.5| + 0.5)` of p(new target) on the first
    /// neighbourhood prompt: 1 when the edit left it unchanged.
    pub hase_neighborhood: f32,
    /// Harmonic mean of the three Hase scores (0 when any is ≤ 0 or missing).
    pub hase_target_score: f32,
    /// Generation fluency (n-gram entropy) before the edit, when generated.
    pub fluency_pre: Option<f32>,
    /// Generation fluency after the edit, when generated.
    pub fluency_post: Option<f32>,
    /// TF-IDF similarity of the generations to Wikipedia texts about the new target (ROME's
    /// consistency), when the case's attribute snippets are known.
    #[serde(default)]
    pub consistency_pre: Option<f32>,
    /// The same consistency, of the generations after the edit.
    #[serde(default)]
    pub consistency_post: Option<f32>,
}

/// ROME's and Hase et al.'s metrics of one case from its scores before and after the edit
/// (consistency is left `None`: it needs the reference texts).
pub fn case_metrics(pre: &CaseScores, post: &CaseScores) -> CaseMetrics {
    let succ = |v: &[PromptScores]| {
        mean(
            v.iter()
                .map(|p| (p.target_true.nll > p.target_new.nll) as u8 as f32),
        )
    };
    let diff = |v: &[PromptScores]| {
        mean(
            v.iter()
                .map(|p| (-p.target_new.nll).exp() - (-p.target_true.nll).exp()),
        )
    };
    let recovered = |pre: &[PromptScores], post: &[PromptScores]| -> f32 {
        match (pre.first(), post.first()) {
            (Some(a), Some(b)) => {
                let (p0, p1) = (a.target_new.prob, b.target_new.prob);
                (1.0 - (1.0 - p1) / (1.0 - p0).max(1e-12)).max(2e-8)
            }
            _ => f32::NAN,
        }
    };
    let neigh = match (pre.neighborhood.first(), post.neighborhood.first()) {
        (Some(a), Some(b)) => {
            let (p0, p1) = (a.target_new.prob, b.target_new.prob);
            1.0 - (p1 - p0).abs() / ((p0 - 0.5).abs() + 0.5)
        }
        _ => f32::NAN,
    };
    let hr = recovered(&pre.rewrite, &post.rewrite);
    let hp = recovered(&pre.paraphrase, &post.paraphrase);
    CaseMetrics {
        efficacy_score: succ(&post.rewrite),
        efficacy_magnitude: diff(&post.rewrite),
        paraphrase_score: succ(&post.paraphrase),
        paraphrase_magnitude: diff(&post.paraphrase),
        neighborhood_score: 1.0 - succ(&post.neighborhood),
        neighborhood_magnitude: -diff(&post.neighborhood),
        hase_rewrite: hr,
        hase_paraphrase: hp,
        hase_neighborhood: neigh,
        hase_target_score: hmean(&[hr, hp, neigh]),
        fluency_pre: pre.fluency,
        fluency_post: post.fluency,
        consistency_pre: None,
        consistency_post: None,
    }
}

/// Dataset-level summary (×100 like ROME's tables; the score is the harmonic mean of ES, PS, NS).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Number of cases summarised.
    pub cases: usize,
    /// ES: mean [`CaseMetrics::efficacy_score`] × 100 (each mean skips cases without the metric).
    pub efficacy_score: f32,
    /// EM: mean efficacy magnitude × 100.
    pub efficacy_magnitude: f32,
    /// PS: mean paraphrase success × 100.
    pub paraphrase_score: f32,
    /// PM: mean paraphrase magnitude × 100.
    pub paraphrase_magnitude: f32,
    /// NS: mean neighbourhood success × 100.
    pub neighborhood_score: f32,
    /// NM: mean neighbourhood magnitude × 100.
    pub neighborhood_magnitude: f32,
    /// S: harmonic mean of ES, PS and NS.
    pub score: f32,
    /// Mean Hase rewrite score × 100.
    pub hase_rewrite: f32,
    /// Mean Hase paraphrase score × 100.
    pub hase_paraphrase: f32,
    /// Mean Hase neighbourhood score × 100.
    pub hase_neighborhood: f32,
    /// Mean of the per-case Hase harmonic means × 100.
    pub hase_target_score: f32,
    /// Mean fluency before the edits × 100, over the cases that generated (None if none did).
    pub fluency_pre: Option<f32>,
    /// Mean fluency after the edits × 100, over the cases that generated.
    pub fluency_post: Option<f32>,
    /// Mean consistency before the edits × 100, over the cases that have it.
    pub consistency_pre: Option<f32>,
    /// Mean consistency after the edits × 100, over the cases that have it.
    pub consistency_post: Option<f32>,
}

/// Averages per-case metrics into the data set's summary (see [`Summary`]).
pub fn summarize(ms: &[CaseMetrics]) -> Summary {
    let avg = |f: &dyn Fn(&CaseMetrics) -> f32| percent(ms, f);
    let opt = |f: &dyn Fn(&CaseMetrics) -> Option<f32>| {
        let v: Vec<f32> = ms.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| 100.0 * mean(v.into_iter()))
    };
    let (es, ps, ns) = (
        avg(&|m| m.efficacy_score),
        avg(&|m| m.paraphrase_score),
        avg(&|m| m.neighborhood_score),
    );
    Summary {
        cases: ms.len(),
        efficacy_score: es,
        efficacy_magnitude: avg(&|m| m.efficacy_magnitude),
        paraphrase_score: ps,
        paraphrase_magnitude: avg(&|m| m.paraphrase_magnitude),
        neighborhood_score: ns,
        neighborhood_magnitude: avg(&|m| m.neighborhood_magnitude),
        score: hmean(&[es, ps, ns]),
        hase_rewrite: avg(&|m| m.hase_rewrite),
        hase_paraphrase: avg(&|m| m.hase_paraphrase),
        hase_neighborhood: avg(&|m| m.hase_neighborhood),
        hase_target_score: avg(&|m| m.hase_target_score),
        fluency_pre: opt(&|m| m.fluency_pre),
        fluency_post: opt(&|m| m.fluency_post),
        consistency_pre: opt(&|m| m.consistency_pre),
        consistency_post: opt(&|m| m.consistency_post),
    }
}

/// ROME's attribute snippets (`attribute_snippets.json`): Wikipedia texts about subjects that
/// have a relation with a target, keyed by (relation id, target id).
#[derive(Clone, Debug, Default)]
pub struct AttributeSnippets {
    texts: std::collections::HashMap<(String, String), Vec<String>>,
}

impl AttributeSnippets {
    /// Reads `attribute_snippets.json`, gathering each (relation, target)'s sample texts.
    pub fn parse(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Sample {
            text: String,
        }
        #[derive(Deserialize)]
        struct Entry {
            relation_id: String,
            target_id: String,
            samples: Vec<Sample>,
        }
        let entries: Vec<Entry> = serde_json::from_str(text).map_err(|source| LociError::Json {
            what: "the attribute snippets file".into(),
            source,
        })?;
        let mut texts: std::collections::HashMap<(String, String), Vec<String>> =
            Default::default();
        for e in entries {
            texts
                .entry((e.relation_id, e.target_id))
                .or_default()
                .extend(e.samples.into_iter().map(|s| s.text));
        }
        Ok(Self { texts })
    }

    /// The texts for a Wikidata relation id and target id (empty when there are none).
    pub fn get(&self, relation_id: &str, target_id: &str) -> &[String] {
        self.texts
            .get(&(relation_id.to_string(), target_id.to_string()))
            .map_or(&[], Vec::as_slice)
    }
}

/// What consistency needs: IDF weights (from a Wikipedia corpus) and the reference texts.
pub struct Consistency {
    /// IDF weights fitted on the Wikipedia corpus.
    pub idf: crate::tfidf::Idf,
    /// The reference texts about each target.
    pub snippets: AttributeSnippets,
}

impl Consistency {
    /// ROME's consistency of `generations` for `case`: the TF-IDF cosine between all the
    /// generations and all the snippets about the new target, each joined into one text.
    /// None when the case has no relation/target id or no snippets, or nothing was generated.
    pub fn score(&self, case: &CounterFactCase, generations: &[String]) -> Option<f32> {
        let rw = &case.requested_rewrite;
        let refs = self
            .snippets
            .get(rw.relation_id.as_deref()?, rw.target_new.id.as_deref()?);
        if refs.is_empty() || generations.is_empty() {
            return None;
        }
        Some(self.idf.similarity(&generations.join(" "), &refs.join(" ")) as f32)
    }
}

/// One evaluated case: the scores before and after the edit, and the metrics.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CaseRecord {
    /// The case's id in the data set.
    pub case_id: u64,
    /// The case's rewrite, as edited.
    pub request: RewriteRequest,
    /// Scores before the edit.
    pub pre: CaseScores,
    /// Scores right after the edit.
    pub post: CaseScores,
    /// Metrics of `pre` → `post`.
    pub metrics: CaseMetrics,
    /// Wall-clock seconds to compute and apply the edit, shared over the cases it wrote.
    pub edit_seconds: f64,
    /// Sequential editing: the scores and metrics after the last edit of the sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<CaseScores>,
    /// Sequential editing: metrics of `pre` → `last`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_metrics: Option<CaseMetrics>,
}

impl LoadedModel {
    /// Scores a case, applies its ROME edit, scores again and undoes the edit (the model ends
    /// bit-identical to how it started, also on error).
    pub fn eval_case(
        &mut self,
        case: &CounterFactCase,
        hp: &crate::edit::RomeHparams,
        stats: Option<&crate::edit::KeyStats>,
        generate: bool,
        consistency: Option<&Consistency>,
    ) -> Result<CaseRecord> {
        let one = self.eval_cases_with(
            std::slice::from_ref(case),
            generate,
            consistency,
            |lm, r| Ok(crate::edit::Edit::Rome(lm.rome(&r[0], hp, stats)?)),
        )?;
        Ok(one.into_iter().next().expect("one case, one record"))
    }

    /// Scores the cases, applies the one edit `make` computes from their rewrites, scores each
    /// again and undoes the edit (the model ends bit-identical to how it started, also on
    /// error). `edit_seconds` is the edit's time shared over the cases.
    pub fn eval_cases_with(
        &mut self,
        cases: &[CounterFactCase],
        generate: bool,
        consistency: Option<&Consistency>,
        make: impl FnOnce(&mut LoadedModel, &[RewriteRequest]) -> Result<crate::edit::Edit>,
    ) -> Result<Vec<CaseRecord>> {
        let (pre, post, edit_seconds) = self.edit_and_rescore(
            cases,
            |c| &c.requested_rewrite,
            |lm, c| lm.score_case(c, generate),
            make,
        )?;
        Ok(cases
            .iter()
            .zip(pre)
            .zip(post)
            .map(|((case, pre), post)| record(case, pre, post, edit_seconds, consistency))
            .collect())
    }

    /// CounterFact cases edited in sequence (`edit_in_sequence`): each record's `post` is right
    /// after its own edit and `last` after the whole sequence.
    pub fn eval_sequence(
        &mut self,
        cases: &[CounterFactCase],
        opts: super::SequenceOptions,
        generate: bool,
        consistency: Option<&Consistency>,
        make: impl FnMut(&mut LoadedModel, &[RewriteRequest]) -> Result<crate::edit::Edit>,
        progress: &mut dyn FnMut(usize, Option<&CaseScores>),
    ) -> Result<super::SequenceEval<CaseRecord, CaseMetrics>> {
        let seq = self.edit_in_sequence(
            cases,
            opts,
            |c| &c.requested_rewrite,
            |lm, c| lm.score_case(c, generate),
            make,
            progress,
        )?;
        Ok(sequence_records(cases, seq, consistency))
    }
}

/// The records of a finished CounterFact sequence: `post` right after each case's own edit,
/// `last` after the whole sequence, and each checkpoint's metrics.
pub fn sequence_records(
    cases: &[CounterFactCase],
    seq: super::Sequence<CaseScores>,
    consistency: Option<&Consistency>,
) -> super::SequenceEval<CaseRecord, CaseMetrics> {
    seq.evaluate(
        cases,
        |case, pre, post, last, seconds| {
            let mut r = record(case, pre, post, seconds, consistency);
            r.last_metrics = Some(metrics_of(case, &r.pre, &last, consistency));
            r.last = Some(last);
            r
        },
        |case, pre, s| metrics_of(case, pre, s, consistency),
    )
}

/// A case's record from its scores before and after.
fn record(
    case: &CounterFactCase,
    pre: CaseScores,
    post: CaseScores,
    edit_seconds: f64,
    consistency: Option<&Consistency>,
) -> CaseRecord {
    let metrics = metrics_of(case, &pre, &post, consistency);
    CaseRecord {
        case_id: case.case_id,
        request: case.requested_rewrite.clone(),
        metrics,
        pre,
        post,
        edit_seconds,
        last: None,
        last_metrics: None,
    }
}

/// A case's metrics from its scores before and now (consistency too, given its snippets).
pub fn metrics_of(
    case: &CounterFactCase,
    pre: &CaseScores,
    post: &CaseScores,
    consistency: Option<&Consistency>,
) -> CaseMetrics {
    let mut metrics = case_metrics(pre, post);
    if let Some(c) = consistency {
        metrics.consistency_pre = c.score(case, &pre.generations);
        metrics.consistency_post = c.score(case, &post.generations);
    }
    metrics
}
