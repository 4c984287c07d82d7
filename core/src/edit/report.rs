//! An edit with its before/after read-out: what `loci edit`, the server and the web app show.
//! The model is left edited; the returned `AppliedEdit` undoes it exactly.

use serde::{Deserialize, Serialize};

use super::delta::{delta_norm, AppliedEdit};
use super::ft::{FtEdit, FtHparams};
use super::memit::{MemitEdit, MemitHparams};
use super::rome::{RomeEdit, RomeHparams};
use super::saved::Edit;
use super::stats::KeyStats;
use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::predict::Sampling;
use crate::request::{RewriteRequest, TargetStr};

/// Probabilities of the new and the old target (the whole string, all its tokens) after a prompt.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PromptProbs {
    /// The prompt, with the subject filled in.
    pub prompt: String,
    /// p(new target | prompt).
    pub target_new: f32,
    /// p(old target | prompt): the model's answer before the edit (`target_true`).
    pub target_true: f32,
}

/// One read-out of an edit's probes, taken before or after it is applied.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EditSide {
    /// The request's own prompt.
    pub rewrite: PromptProbs,
    /// Each paraphrase prompt (the edit should generalise to them), in [`Probes`] order.
    pub paraphrase: Vec<PromptProbs>,
    /// Each neighbourhood prompt (other subjects the edit should leave alone), in order.
    pub neighborhood: Vec<PromptProbs>,
}

/// Greedy continuations of the rewrite prompt and then each paraphrase, before and after the
/// edit; both empty when [`Probes::generate_tokens`] is 0.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Generations {
    /// Texts (prompt and continuation) from the unedited model.
    pub before: Vec<String>,
    /// Texts (prompt and continuation) from the edited model.
    pub after: Vec<String>,
}

/// A one-fact edit (ROME or fine-tuning) with its probes read before and after.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EditReport {
    /// The request as edited, `target_true` filled in.
    pub request: RewriteRequest,
    /// The edited layer (for fine-tuning, the first tuned layer).
    pub layer: usize,
    /// The probes on the unedited model.
    pub before: EditSide,
    /// The probes on the edited model.
    pub after: EditSide,
    /// Greedy generations before and after.
    pub generations: Generations,
    /// ‖ΔW‖_F over every changed layer together.
    pub delta_norm: f32,
    /// The optimisation's loss at each step (ROME's v*, or the fine-tuning loss).
    pub v_losses: Vec<f32>,
    /// Wall-clock seconds for the whole edit, read-outs included.
    pub seconds: f64,
}

/// One request of a MEMIT edit, read out before and after.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RequestReport {
    /// The request, `target_true` filled in.
    pub request: RewriteRequest,
    /// Its probes on the unedited model.
    pub before: EditSide,
    /// Its probes on the edited model.
    pub after: EditSide,
    /// Greedy generations before and after.
    pub generations: Generations,
}

/// A MEMIT-family edit of several facts with each one's probes read before and after.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MemitReport {
    /// MEMIT, EMMET or AlphaEdit.
    pub method: super::EditMethod,
    /// The changed layers, in the edit's order.
    pub layers: Vec<usize>,
    /// One read-out per request, in request order.
    pub requests: Vec<RequestReport>,
    /// Per layer, ‖ΔW‖.
    pub delta_norms: Vec<f32>,
    /// Per request, the z optimisation's losses.
    pub z_losses: Vec<Vec<f32>>,
    /// Wall-clock seconds for the whole edit, read-outs included.
    pub seconds: f64,
}

/// Prompts to read out around an edit.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Probes {
    /// Rephrasings of the request's prompt (subject included) that should now give the new target.
    #[serde(default)]
    pub paraphrase: Vec<String>,
    /// Prompts about other subjects whose answers the edit should not change.
    #[serde(default)]
    pub neighborhood: Vec<String>,
    /// Greedy tokens generated after the rewrite prompt and each paraphrase (0: none).
    #[serde(default)]
    pub generate_tokens: usize,
}

impl RewriteRequest {
    /// A request from a plain prompt that contains the subject.
    pub fn from_prompt(prompt: &str, subject: &str, target_new: &str) -> Result<Self> {
        let template = if prompt.contains("{}") {
            prompt.to_string()
        } else if let Some(i) = prompt.find(subject).filter(|_| !subject.is_empty()) {
            format!("{}{{}}{}", &prompt[..i], &prompt[i + subject.len()..])
        } else {
            return Err(LociError::input(format!(
                "the subject {subject:?} does not occur in the prompt {prompt:?}"
            )));
        };
        Ok(Self {
            prompt: template,
            subject: subject.to_string(),
            target_new: TargetStr::new(target_new.to_string()),
            target_true: None,
            relation_id: None,
        })
    }
}

impl LoadedModel {
    /// Fills in `target_true` with the model's current top-1 when it is missing.
    pub fn complete_request(&self, mut req: RewriteRequest) -> Result<RewriteRequest> {
        if req.target_true.is_none() {
            let top = self.predict(&req.filled(), 1)?;
            req.target_true = Some(TargetStr::new(top.top[0].token.trim().to_string()));
        }
        Ok(req)
    }

    /// p(new target) and p(old target) after the request's prompt and each probe prompt.
    pub fn edit_side(&self, req: &RewriteRequest, probes: &Probes) -> Result<EditSide> {
        let old = req
            .target_true
            .as_ref()
            .map(|t| t.str.clone())
            .unwrap_or_default();
        let probs = |p: &str| -> Result<PromptProbs> {
            let pairs = [
                (p.to_string(), req.target_new.str.clone()),
                (p.to_string(), old.clone()),
            ];
            let s = self.score_targets(&pairs)?;
            Ok(PromptProbs {
                prompt: p.to_string(),
                target_new: s[0].prob,
                target_true: s[1].prob,
            })
        };
        Ok(EditSide {
            rewrite: probs(&req.filled())?,
            paraphrase: probes
                .paraphrase
                .iter()
                .map(|p| probs(p))
                .collect::<Result<_>>()?,
            neighborhood: probes
                .neighborhood
                .iter()
                .map(|p| probs(p))
                .collect::<Result<_>>()?,
        })
    }

    fn probe_generations(&self, req: &RewriteRequest, probes: &Probes) -> Result<Vec<String>> {
        if probes.generate_tokens == 0 {
            return Ok(vec![]);
        }
        std::iter::once(req.filled())
            .chain(probes.paraphrase.iter().cloned())
            .map(|p| {
                Ok(self
                    .generate(&p, probes.generate_tokens, Sampling::Greedy)?
                    .text)
            })
            .collect()
    }

    /// Computes a ROME edit, applies it and reads the probes before and after. On error the
    /// model is unchanged.
    pub fn rome_with_report(
        &mut self,
        req: RewriteRequest,
        hp: &RomeHparams,
        stats: Option<&KeyStats>,
        probes: &Probes,
    ) -> Result<(RomeEdit, AppliedEdit, EditReport)> {
        let (e, applied, report) =
            self.one_fact_with_report(req, probes, crate::clock::now_seconds(), |lm, r| {
                Ok(Edit::Rome(lm.rome(r, hp, stats)?))
            })?;
        let Edit::Rome(e) = e else {
            unreachable!("rome() makes ROME edits")
        };
        Ok((e, applied, report))
    }

    /// Finishes a ROME edit whose v* was stepped from outside ([`RomeRun`](super::RomeRun)),
    /// applies it and reads the probes before and after, as
    /// [`rome_with_report`](Self::rome_with_report) does. Begin the run with a request that
    /// [`complete_request`](Self::complete_request) filled in. On error the model is unchanged.
    pub fn rome_run_with_report(
        &mut self,
        run: super::RomeRun,
        probes: &Probes,
    ) -> Result<(RomeEdit, AppliedEdit, EditReport)> {
        let (req, started) = (run.request().clone(), run.started());
        let (e, applied, report) = self.one_fact_with_report(req, probes, started, |lm, _| {
            Ok(Edit::Rome(run.finish(lm)?))
        })?;
        let Edit::Rome(e) = e else {
            unreachable!("a ROME run makes a ROME edit")
        };
        Ok((e, applied, report))
    }

    /// Computes a constrained fine-tuning edit, applies it and reads the probes before and
    /// after (`layer` is the first tuned layer, `v_losses` the fine-tuning's losses). On error
    /// the model is unchanged.
    pub fn ft_with_report(
        &mut self,
        req: RewriteRequest,
        hp: &FtHparams,
        probes: &Probes,
    ) -> Result<(FtEdit, AppliedEdit, EditReport)> {
        let (e, applied, report) =
            self.one_fact_with_report(req, probes, crate::clock::now_seconds(), |lm, r| {
                Ok(Edit::Ft(lm.finetune(r, hp)?))
            })?;
        let Edit::Ft(e) = e else {
            unreachable!("finetune() makes fine-tuning edits")
        };
        Ok((e, applied, report))
    }

    /// Computes a GRACE edit, applies it and reads the probes before and after. On error the
    /// model is unchanged.
    pub fn grace_with_report(
        &mut self,
        req: RewriteRequest,
        hp: &super::GraceHparams,
        probes: &Probes,
    ) -> Result<(super::GraceEdit, AppliedEdit, EditReport)> {
        let (e, applied, report) =
            self.one_fact_with_report(req, probes, crate::clock::now_seconds(), |lm, r| {
                Ok(Edit::Grace(lm.grace(r, hp)?))
            })?;
        let Edit::Grace(e) = e else {
            unreachable!("grace() makes GRACE edits")
        };
        Ok((e, applied, report))
    }

    /// One fact's edit by `make`, applied, with the probes read before and after; the report's
    /// seconds count from `started`.
    fn one_fact_with_report(
        &mut self,
        req: RewriteRequest,
        probes: &Probes,
        started: f64,
        make: impl FnOnce(&mut LoadedModel, &RewriteRequest) -> Result<Edit>,
    ) -> Result<(Edit, AppliedEdit, EditReport)> {
        let (e, applied, mut read) =
            self.read_around(vec![req], probes, |lm, reqs| make(lm, &reqs[0]))?;
        let r = read.remove(0);
        let losses = match &e {
            Edit::Rome(r) => r.stats.losses.clone(),
            Edit::Ft(f) => f.stats.losses.clone(),
            Edit::Memit(m) => m.stats.z_losses.concat(),
            Edit::Grace(g) => g.stats.losses.clone(),
        };
        let report = EditReport {
            request: r.request,
            layer: e.layers()[0],
            before: r.before,
            after: r.after,
            generations: r.generations,
            delta_norm: e.delta_norms().iter().map(|n| n * n).sum::<f32>().sqrt(),
            v_losses: losses,
            seconds: crate::clock::now_seconds() - started,
        };
        Ok((e, applied, report))
    }

    /// Completes `reqs` (missing old targets), reads their probes, applies the edit `make`
    /// computes for them and reads the probes again; on error the model is unchanged.
    fn read_around(
        &mut self,
        reqs: Vec<RewriteRequest>,
        probes: &Probes,
        make: impl FnOnce(&mut LoadedModel, &[RewriteRequest]) -> Result<Edit>,
    ) -> Result<(Edit, AppliedEdit, Vec<RequestReport>)> {
        let reqs = reqs
            .into_iter()
            .map(|r| self.complete_request(r))
            .collect::<Result<Vec<_>>>()?;
        for p in probes.paraphrase.iter().chain(&probes.neighborhood) {
            self.encode_prompt(p)?;
        }
        let read = |lm: &LoadedModel| -> Result<Vec<(EditSide, Vec<String>)>> {
            reqs.iter()
                .map(|r| Ok((lm.edit_side(r, probes)?, lm.probe_generations(r, probes)?)))
                .collect()
        };
        let before = read(self)?;
        let e = make(self, &reqs)?;
        let applied = self.apply(&e)?;
        let after = match read(self) {
            Ok(x) => x,
            Err(err) => {
                self.undo_edit(applied)?;
                return Err(err);
            }
        };
        let reports = reqs
            .into_iter()
            .zip(before.into_iter().zip(after))
            .map(|(request, ((before, gb), (after, ga)))| RequestReport {
                request,
                before,
                after,
                generations: Generations {
                    before: gb,
                    after: ga,
                },
            })
            .collect();
        Ok((e, applied, reports))
    }

    /// Computes a MEMIT-family edit of all `reqs` (after earlier edits whose keys AlphaEdit
    /// keeps: `preserved`), applies it and reads each request's probes before and after
    /// (`probes` are read for every request). On error the model is unchanged.
    pub fn memit_with_report(
        &mut self,
        reqs: Vec<RewriteRequest>,
        hp: &MemitHparams,
        stats: &[KeyStats],
        preserved: &super::Preserved,
        probes: &Probes,
        progress: &mut dyn FnMut(&str),
    ) -> Result<(MemitEdit, AppliedEdit, MemitReport)> {
        let started = crate::clock::now_seconds();
        let (e, applied, requests) = self.read_around(reqs, probes, |lm, reqs| {
            let e = lm.memit_preserving(reqs, hp, stats, preserved, progress)?;
            Ok(Edit::Memit(e))
        })?;
        let Edit::Memit(e) = e else {
            unreachable!("memit() makes MEMIT edits")
        };
        let report = MemitReport {
            method: hp.method(),
            layers: e.layers.iter().map(|l| l.layer).collect(),
            requests,
            delta_norms: e.deltas().iter().map(delta_norm).collect(),
            z_losses: e.stats.z_losses.clone(),
            seconds: crate::clock::now_seconds() - started,
        };
        Ok((e, applied, report))
    }
}
