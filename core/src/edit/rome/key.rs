//! The key side of an edit: the rows of a request's templates, where the subject sits in each,
//! and the activations at the subject's last token averaged over the templates (ROME's k*,
//! MEMIT's keys).

use candle_core::{DType, Tensor};

use crate::error::{LociError, Result};
use crate::hooks::noise::{subject_noise, SubjectNoise};
use crate::hooks::{Capture, Chain, Site};
use crate::loader::LoadedModel;
use crate::model::LogitsAt;
use crate::request::{subject_span, RewriteRequest};

/// Rows `(batch, position)` of a `[b, t, w]` activation, as `[n, w]`.
pub(super) fn gather(x: &Tensor, cells: &[(usize, usize)]) -> Result<Tensor> {
    let (_, t, w) = x.dims3()?;
    let idx: Vec<u32> = cells.iter().map(|&(b, p)| (b * t + p) as u32).collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    Ok(x.reshape(((), w))?.index_select(&idx, 0)?)
}

/// `(row, first, end)` of each row's span.
pub(super) fn rows_spans(spans: &[(usize, usize)]) -> Vec<(usize, usize, usize)> {
    spans
        .iter()
        .enumerate()
        .map(|(i, &(a, b))| (i, a, b))
        .collect()
}

pub(super) struct Texts {
    pub(super) ids: Vec<Vec<u32>>,
    /// Each row's subject-last token.
    pub(super) lookup: Vec<usize>,
    /// Each row's subject tokens `[first, end)`.
    pub(super) spans: Vec<(usize, usize)>,
}

pub(super) fn texts(lm: &LoadedModel, templates: &[String], subject: &str) -> Result<Texts> {
    let mut ids = Vec::new();
    let mut lookup = Vec::new();
    let mut spans = Vec::new();
    for t in templates {
        let span = subject_span(lm, t, subject)?;
        let row = lm.tokenizer.encode(&t.replacen("{}", subject, 1))?;
        if span.1 > row.len() {
            return Err(LociError::input(format!(
                "cannot place the subject in {t:?}"
            )));
        }
        ids.push(row);
        lookup.push(span.1 - 1);
        spans.push(span);
    }
    Ok(Texts { ids, lookup, spans })
}

impl LoadedModel {
    /// The MLP key (down-projection input) of `layer` at the subject's last token, averaged over
    /// `templates` (each holding `{}` for the request prompt).
    pub fn subject_key(
        &self,
        req: &RewriteRequest,
        layer: usize,
        templates: &[String],
    ) -> Result<Tensor> {
        Ok(self
            .subject_states(req, &[Site::MlpKey(layer)], templates)?
            .remove(0))
    }

    /// The activations at `sites` at the subject's last token, each averaged over `templates`
    /// (holding `{}` for the request prompt), in f32; one pass that stops after the last site.
    pub fn subject_states(
        &self,
        req: &RewriteRequest,
        sites: &[Site],
        templates: &[String],
    ) -> Result<Vec<Tensor>> {
        self.subject_states_noised(req, sites, templates, None)
    }

    /// `subject_states` with the subject's embeddings noised in every row: what the
    /// layers see of a corrupted subject (fact forcing edits keys as the noised model reads them).
    pub fn subject_states_noised(
        &self,
        req: &RewriteRequest,
        sites: &[Site],
        templates: &[String],
        noise: Option<SubjectNoise>,
    ) -> Result<Vec<Tensor>> {
        let filled: Vec<String> = templates
            .iter()
            .map(|t| t.replacen("{}", &req.prompt, 1))
            .collect();
        let tx = texts(self, &filled, &req.subject)?;
        let last = *sites
            .iter()
            .max_by_key(|s| s.order())
            .ok_or_else(|| LociError::input("no site to read"))?;
        let mut cap = Capture::new(sites.iter().copied()).stopping_after(last);
        let mut noise = subject_noise(&rows_spans(&tx.spans), noise, self.model.width_on_device())?;
        self.model.run(
            &self.padded_ids(&tx.ids, 0)?,
            &mut Chain(vec![&mut noise, &mut cap]),
            None,
            LogitsAt::Last,
        )?;
        let cells: Vec<(usize, usize)> = tx.lookup.iter().copied().enumerate().collect();
        sites
            .iter()
            .map(|&s| Ok(gather(cap.get(s)?, &cells)?.to_dtype(DType::F32)?.mean(0)?))
            .collect()
    }
}
