//! Finding the subject's tokens in a prompt (ROME's `find_token_range`, spec §3.2).

use crate::error::{LociError, Result};
use crate::tokenizer::Tokenizer;

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
