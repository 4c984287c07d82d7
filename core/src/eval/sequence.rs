//! Sequential editing: each edit is made on the model the earlier ones left and kept; every case
//! is scored before the first edit, right after its own and after the last, and every case edited
//! so far again at each checkpoint. The steps are public ([`LoadedModel::start_sequence`],
//! [`LoadedModel::sequence_next`], [`LoadedModel::sequence_checkpoint`],
//! [`LoadedModel::finish_sequence`]) so that a long run can measure more at its checkpoints and
//! save its [`Sequence`] (serialisable) to continue later; [`LoadedModel::edit_in_sequence`]
//! runs them all and undoes the sequence.

use serde::{Deserialize, Serialize};

use crate::edit::{AppliedEdit, Edit};
use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::request::RewriteRequest;

/// How one case fared in a sequence of edits.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InSequence<S> {
    /// Before any edit of the sequence.
    pub pre: Option<S>,
    /// Right after its own edit.
    pub post: Option<S>,
    /// After the last edit of the sequence.
    pub last: Option<S>,
    /// Its edit's seconds, shared over the cases it wrote.
    pub edit_seconds: f64,
    /// Why the case has no scores (it could not be scored, or its edit failed).
    pub error: Option<String>,
}

/// How a sequence of edits runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequenceOptions {
    /// Cases written by one edit.
    pub batch: usize,
    /// After every this many cases, every case edited so far is scored again: the sequence's
    /// retention curve (0: only after the last edit).
    pub checkpoint_every: usize,
    /// At most this many of them, spread evenly over the sequence so far (0: every one): a
    /// long sequence's checkpoints then cost the same however far it has got.
    pub checkpoint_cases: usize,
}

impl SequenceOptions {
    /// Whether a checkpoint falls in the batch that took a sequence of `total` cases from
    /// `before` to `after` cases done (none at the end: the end is scored as the last).
    pub fn checkpoint_after(&self, before: usize, after: usize, total: usize) -> bool {
        let every = self.checkpoint_every;
        every > 0 && after < total && after / every > before / every
    }
}

/// The scores, part-way through a sequence, of every case edited so far.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Checkpoint<S> {
    /// Cases the sequence had reached (edited, or failed).
    pub cases_done: usize,
    /// `(case index, scores)` of each case edited by then.
    pub scores: Vec<(usize, S)>,
}

/// A sequence under way or finished: each case's scores so far, how far it got, and its
/// checkpoints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sequence<S> {
    /// One entry per case, in the cases' order.
    pub cases: Vec<InSequence<S>>,
    /// The checkpoints' scores, in the order they were taken.
    pub checkpoints: Vec<Checkpoint<S>>,
    /// Cases reached so far (edited, or failed), from the first.
    #[serde(default)]
    pub done: usize,
}

impl<S> Sequence<S> {
    /// Whether every case has been reached.
    pub fn is_finished(&self) -> bool {
        self.done >= self.cases.len()
    }
}

/// How a sequence reads its cases: each one's rewrite, and its scores on the model as it is.
pub struct SequenceCases<'a, C, S> {
    /// The cases, in the order they are edited.
    pub cases: &'a [C],
    /// A case's rewrite.
    pub request: &'a dyn Fn(&C) -> &RewriteRequest,
    /// A case's scores on the model as it is.
    pub score: &'a dyn Fn(&LoadedModel, &C) -> Result<S>,
}

/// Makes the edit of some requests on the model as it is (the method).
pub type MakeEdit<'a> = dyn FnMut(&mut LoadedModel, &[RewriteRequest]) -> Result<Edit> + 'a;

/// Hears the cases done so far, and the last one's scores after its edit (none: it failed).
pub type SequenceProgress<'a, S> = dyn FnMut(usize, Option<&S>) + 'a;

impl LoadedModel {
    /// Sequential editing: `opts.batch` cases per edit, each edit computed on the model as the
    /// earlier ones left it and kept. Every case is scored before the first edit, right after
    /// its own and after the last (and every case edited so far at each checkpoint); then the
    /// whole sequence is undone (the model ends bit-identical to how it started, also on
    /// error). A case that cannot be scored or whose edit fails gets an `error` and the
    /// sequence goes on without it; a cancelled edit ends the sequence with
    /// [`LociError::Cancelled`] (undone). `progress` hears the cases done so far.
    pub fn edit_in_sequence<C, S>(
        &mut self,
        cases: &[C],
        opts: SequenceOptions,
        request: impl Fn(&C) -> &RewriteRequest,
        score: impl Fn(&LoadedModel, &C) -> Result<S>,
        mut make: impl FnMut(&mut LoadedModel, &[RewriteRequest]) -> Result<Edit>,
        progress: &mut SequenceProgress<S>,
    ) -> Result<Sequence<S>> {
        let on = SequenceCases {
            cases,
            request: &request,
            score: &score,
        };
        let mut seq = self.start_sequence(&on);
        let mut applied = AppliedEdit::default();
        while !seq.is_finished() {
            let before = seq.done;
            match self.sequence_next(&mut seq, &on, opts.batch, &mut make, progress) {
                Ok(made) => applied = applied.then(made.unwrap_or_default()),
                Err(stop) => {
                    self.undo_edit(applied)?;
                    return Err(stop);
                }
            }
            if opts.checkpoint_after(before, seq.done, cases.len()) {
                self.sequence_checkpoint(&mut seq, &on, opts.checkpoint_cases);
            }
        }
        self.finish_sequence(&mut seq, &on);
        self.undo_edit(applied)?;
        Ok(seq)
    }

    /// A sequence's start: every case scored on the model as it is (a case that cannot be
    /// scored gets its error and is never edited).
    pub fn start_sequence<C, S>(&self, on: &SequenceCases<C, S>) -> Sequence<S> {
        let cases = on
            .cases
            .iter()
            .map(|c| {
                let pre = (on.score)(self, c);
                InSequence {
                    error: pre.as_ref().err().map(|e| e.to_string()),
                    pre: pre.ok(),
                    post: None,
                    last: None,
                    edit_seconds: 0.0,
                }
            })
            .collect();
        Sequence {
            cases,
            checkpoints: vec![],
            done: 0,
        }
    }

    /// The sequence's next `batch` cases: those that could be scored are edited together, the
    /// edit applied and kept (its undo record returned: none when no case could be edited), and
    /// each scored right after. A failed edit is each case's error; a cancelled one is the
    /// error returned (nothing of it applied).
    pub fn sequence_next<C, S>(
        &mut self,
        seq: &mut Sequence<S>,
        on: &SequenceCases<C, S>,
        batch: usize,
        make: &mut MakeEdit,
        progress: &mut SequenceProgress<S>,
    ) -> Result<Option<AppliedEdit>> {
        let start = seq.done;
        let end = (start + batch.max(1)).min(on.cases.len());
        let (ok, failed): (Vec<usize>, Vec<usize>) =
            (start..end).partition(|&i| seq.cases[i].error.is_none());
        for _ in failed {
            seq.done += 1;
            progress(seq.done, None);
        }
        if ok.is_empty() {
            seq.done = end;
            return Ok(None);
        }
        let started = crate::clock::now_seconds();
        let reqs: Vec<RewriteRequest> = ok
            .iter()
            .map(|&i| (on.request)(&on.cases[i]).clone())
            .collect();
        let edited = make(self, &reqs).and_then(|e| self.apply(&e));
        if let Err(LociError::Cancelled) = edited {
            return Err(LociError::Cancelled);
        }
        let seconds = (crate::clock::now_seconds() - started) / ok.len() as f64;
        for i in ok {
            let r = &mut seq.cases[i];
            r.edit_seconds = seconds;
            match &edited {
                Ok(_) => match (on.score)(self, &on.cases[i]) {
                    Ok(s) => r.post = Some(s),
                    Err(e) => r.error = Some(e.to_string()),
                },
                Err(e) => r.error = Some(e.to_string()),
            }
            seq.done += 1;
            progress(seq.done, r.post.as_ref());
        }
        seq.done = end;
        Ok(edited.ok())
    }

    /// A checkpoint: the cases edited so far — at most `most` of them, spread evenly (0: all)
    /// — scored again on the model as it is now.
    pub fn sequence_checkpoint<C, S>(
        &self,
        seq: &mut Sequence<S>,
        on: &SequenceCases<C, S>,
        most: usize,
    ) {
        let edited: Vec<usize> = (0..seq.done)
            .filter(|&i| seq.cases[i].error.is_none())
            .collect();
        let scores = spread(&edited, most)
            .into_iter()
            .filter_map(|i| (on.score)(self, &on.cases[i]).ok().map(|s| (i, s)))
            .collect();
        seq.checkpoints.push(Checkpoint {
            cases_done: seq.done,
            scores,
        });
    }

    /// The end: every case edited (or still to be, when the sequence stopped early) scored on
    /// the model as it is now, as its `last`.
    pub fn finish_sequence<C, S>(&self, seq: &mut Sequence<S>, on: &SequenceCases<C, S>) {
        for (c, r) in on.cases.iter().zip(seq.cases.iter_mut()) {
            if r.error.is_none() {
                match (on.score)(self, c) {
                    Ok(s) => r.last = Some(s),
                    Err(e) => r.error = Some(e.to_string()),
                }
            }
        }
    }
}

/// At most `most` of `items` (0: all), evenly spread from the first.
fn spread(items: &[usize], most: usize) -> Vec<usize> {
    if most == 0 || items.len() <= most {
        return items.to_vec();
    }
    (0..most).map(|j| items[j * items.len() / most]).collect()
}

/// A benchmark's sequence of edits: each case's record (or why it has none), and the metrics
/// of the cases edited so far at each checkpoint.
#[derive(Clone, Debug)]
pub struct SequenceEval<R, M> {
    /// One per case, in the cases' order.
    pub records: Vec<SequenceRecord<R>>,
    /// `(cases done, metrics of each case edited and scored by then)` per checkpoint.
    pub checkpoints: Vec<(usize, Vec<M>)>,
}

impl<S> Sequence<S> {
    /// Records and checkpoint metrics from each case's scores: `record(case, pre, post, last,
    /// seconds)` and `metrics(case, pre, scores)`.
    pub fn evaluate<C, R, M>(
        self,
        cases: &[C],
        record: impl Fn(&C, S, S, S, f64) -> R,
        metrics: impl Fn(&C, &S, &S) -> M,
    ) -> SequenceEval<R, M> {
        let checkpoints = self
            .checkpoints
            .into_iter()
            .map(|cp| {
                let ms = cp
                    .scores
                    .iter()
                    .filter_map(|(i, s)| {
                        let pre = self.cases[*i].pre.as_ref()?;
                        Some(metrics(&cases[*i], pre, s))
                    })
                    .collect();
                (cp.cases_done, ms)
            })
            .collect();
        let records = cases
            .iter()
            .zip(self.cases)
            .map(|(case, o)| match (o.pre, o.post, o.last, o.error) {
                (Some(pre), Some(post), Some(last), None) => {
                    Ok(record(case, pre, post, last, o.edit_seconds))
                }
                (.., e) => Err(e.unwrap_or_else(|| "not scored".into())),
            })
            .collect();
        SequenceEval {
            records,
            checkpoints,
        }
    }
}

/// A case of a sequence: its record, or why its edit failed.
pub type SequenceRecord<R> = std::result::Result<R, String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_sample_is_spread_evenly_from_the_first() {
        let items: Vec<usize> = (0..10).map(|i| i * 3).collect();
        assert_eq!(spread(&items, 0), items);
        assert_eq!(spread(&items, 10), items);
        assert_eq!(spread(&items, 4), [0, 6, 15, 21]);
        assert_eq!(spread(&items, 1), [0]);
    }
}
