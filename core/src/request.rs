//! What an edit or a trace is asked about: CounterFact's rewrite request, its target strings,
//! and where the subject sits among a prompt's tokens. Tracing and every editing method read
//! these; they belong to neither.

use serde::{Deserialize, Serialize};

use crate::error::{LociError, Result};
use crate::loader::LoadedModel;
use crate::tokenizer::Tokenizer;

/// The request's new target as the edit methods read it: its tokens after a leading space,
/// refused when it tokenizes to nothing.
pub fn target_ids(lm: &LoadedModel, req: &RewriteRequest) -> Result<Vec<u32>> {
    let ids = lm.tokenizer.encode_plain(&spaced(&req.target_new.str))?;
    if ids.is_empty() {
        return Err(LociError::input(format!(
            "the target {:?} tokenizes to nothing",
            req.target_new.str
        )));
    }
    Ok(ids)
}

/// An answer of a rewrite request (the new or the true target), as text and, from
/// CounterFact, its Wikidata id.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TargetStr {
    /// The answer's text as it follows the prompt (scored with a leading space: see [`spaced`]).
    pub str: String,
    /// CounterFact's Wikidata id of the target (keys the attribute snippets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl TargetStr {
    /// A target with text `s` and no Wikidata id.
    pub fn new(s: impl Into<String>) -> Self {
        Self {
            str: s.into(),
            id: None,
        }
    }
}

/// CounterFact's `requested_rewrite`: `prompt` holds `{}` where the subject goes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RewriteRequest {
    /// The prompt template: `{}` exactly once, where the subject goes (`"{} is located in"`).
    pub prompt: String,
    /// The subject put in the prompt's `{}` (`"Eiffel Tower"`); the edit is about it.
    pub subject: String,
    /// The answer the edit makes the model give.
    pub target_new: TargetStr,
    /// The model's answer before the edit, when known (reports fill in the top-1 when not).
    #[serde(default)]
    pub target_true: Option<TargetStr>,
    /// CounterFact's Wikidata relation (P-id), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation_id: Option<String>,
}

impl RewriteRequest {
    /// The prompt with the subject filled in.
    pub fn filled(&self) -> String {
        self.prompt.replacen("{}", &self.subject, 1)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.prompt.matches("{}").count() != 1 {
            return Err(LociError::input(format!(
                "the prompt {:?} must contain {{}} exactly once, where the subject goes",
                self.prompt
            )));
        }
        if self.subject.trim().is_empty() {
            return Err(LociError::input("the subject is empty"));
        }
        if self.target_new.str.trim().is_empty() {
            return Err(LociError::input("the new target is empty"));
        }
        Ok(())
    }
}

/// Targets are scored with a leading space, as ROME does.
pub fn spaced(target: &str) -> String {
    if target.starts_with(' ') {
        target.to_string()
    } else {
        format!(" {target}")
    }
}

/// Index of the subject's last token in `template` (holding `{}` for the subject), by tokenizing
/// the prefix, the subject and the suffix separately (docs/rome.md#the-subjects-last-token).
pub fn subject_last_index(lm: &LoadedModel, template: &str, subject: &str) -> Result<usize> {
    Ok(subject_span(lm, template, subject)?.1 - 1)
}

/// The subject's tokens `[first, end)` in `template`, located as `subject_last_index` does.
pub fn subject_span(lm: &LoadedModel, template: &str, subject: &str) -> Result<(usize, usize)> {
    let (prefix, _) = template
        .split_once("{}")
        .ok_or_else(|| LociError::input(format!("template {template:?} has no {{}}")))?;
    let (prefix, word) = if prefix.is_empty() {
        (String::new(), subject.to_string())
    } else {
        let p = prefix.strip_suffix(' ').ok_or_else(|| {
            LociError::input(format!(
                "the text before the subject must end in a space: {prefix:?}"
            ))
        })?;
        (p.to_string(), format!(" {}", subject.trim()))
    };
    let n_special = lm.tokenizer.encode("")?.len();
    let p = if prefix.is_empty() {
        0
    } else {
        lm.tokenizer.encode_plain(&prefix)?.len()
    };
    let w = lm.tokenizer.encode_plain(&word)?.len();
    if w == 0 {
        return Err(LociError::input("the subject tokenizes to nothing"));
    }
    Ok((n_special + p, n_special + p + w))
}

/// Half-open token range `[start, end)` of the first occurrence of `subject` in the prompt whose
/// tokens are `ids`: decode each token, join the pieces, find the subject's characters, and map
/// them back to the tokens that cover them.
pub fn subject_range(tok: &Tokenizer, ids: &[u32], subject: &str) -> Result<(usize, usize)> {
    if subject.trim().is_empty() {
        return Err(LociError::input("the subject is empty"));
    }
    let pieces = tok.token_strings(ids)?;
    let joined: String = pieces.concat();
    let find = |s: &str| joined.find(s).map(|at| (at, s.len()));
    // Like Hase's fallback, also try the subject without surrounding spaces.
    let (char_loc, len) = find(subject)
        .or_else(|| find(subject.trim()))
        .ok_or_else(|| {
            LociError::input(format!(
                "the subject {subject:?} does not occur in the prompt {joined:?}"
            ))
        })?;
    let mut start = None;
    let mut pos = 0;
    for (i, p) in pieces.iter().enumerate() {
        pos += p.len();
        if start.is_none() && pos > char_loc {
            start = Some(i);
        }
        if pos >= char_loc + len {
            return Ok((start.unwrap_or(i), i + 1));
        }
    }
    Err(LociError::input(format!(
        "the subject {subject:?} could not be aligned with the prompt's tokens"
    )))
}
