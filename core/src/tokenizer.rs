//! Tokenizers: a Hugging Face `tokenizer.json`, or byte-level BPE rebuilt from GGUF metadata.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::error::{LociError, Result};

/// A Hugging Face `tokenizers` tokenizer plus the model's end-of-text id. Clones share the
/// tokenizer (it never changes once built): a view of a model costs no copy of its vocabulary.
#[derive(Clone)]
pub struct Tokenizer {
    inner: std::sync::Arc<tokenizers::Tokenizer>,
    /// The end-of-text token id, where the model has one: generation stops on it.
    pub eos: Option<u32>,
}

fn tok_err(e: impl std::fmt::Display) -> LociError {
    LociError::Tokenizer(e.to_string())
}

/// Rejects GGUF tokenizers other than GPT-2-style byte-level BPE (`tokenizer.ggml.model`).
fn check_gguf_model(md: &HashMap<String, Value>) -> Result<()> {
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(LociError::Unsupported(format!(
            "GGUF tokenizer model {model:?} (supported: gpt2 byte-level BPE)"
        )));
    }
    Ok(())
}

/// The string array stored under `key`, or an error if it is missing or holds anything else.
fn gguf_strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let v = md
        .get(key)
        .ok_or_else(|| tok_err(format!("GGUF metadata lacks {key}")))?
        .to_vec()
        .map_err(tok_err)?;
    v.iter()
        .map(|x| x.to_string().cloned().map_err(tok_err))
        .collect()
}

/// The BPE merges (`tokenizer.ggml.merges`), each a space-separated pair.
fn gguf_merges(md: &HashMap<String, Value>) -> Result<Vec<(String, String)>> {
    gguf_strings(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| tok_err(format!("bad merge {m:?}")))
        })
        .collect::<Result<Vec<_>>>()
}

/// Each token's type (`tokenizer.ggml.token_type`); all normal (1) when the metadata has none.
fn gguf_token_types(md: &HashMap<String, Value>, n_tokens: usize) -> Vec<i64> {
    match md.get("tokenizer.ggml.token_type").map(|v| v.to_vec()) {
        Some(Ok(v)) => v
            .iter()
            .map(|x| x.to_i32().map(i64::from).unwrap_or(1))
            .collect(),
        _ => vec![1; n_tokens],
    }
}

/// The BPE model over `tokens` (ids in order) and `merges`.
fn gguf_bpe(tokens: &[String], merges: Vec<(String, String)>) -> Result<BPE> {
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), i as u32);
    }
    BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(tok_err)
}

/// The pre-tokenizer that `tokenizer.ggml.pre` names (GPT-2's byte level when it names none).
fn gguf_pre_tokenizer(md: &HashMap<String, Value>) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::default().add_prefix_space(false).use_regex(true);
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    // llama.cpp's "smollm"/"starcoder" pre-tokenizers split every digit before GPT-2's regex.
    let pre_tok: PreTokenizerWrapper = match pre {
        "smollm" | "starcoder" | "refact" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        "default" | "gpt-2" | "gpt2" => byte_level.into(),
        other => {
            return Err(LociError::Unsupported(format!(
                "GGUF pre-tokenizer {other:?}"
            )))
        }
    };
    Ok(pre_tok)
}

/// The control tokens (type 3), to be matched whole in text as the original added_tokens are.
fn control_tokens(tokens: &[String], types: &[i64]) -> Vec<AddedToken> {
    tokens
        .iter()
        .zip(types)
        .filter(|(_, t)| **t == 3)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect()
}

/// A token id stored under `key`, if there is one.
fn gguf_id(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

/// The post-processor that prepends BOS, where `tokenizer.ggml.add_bos_token` asks for it.
fn gguf_bos_processor(
    md: &HashMap<String, Value>,
    tokens: &[String],
) -> Result<Option<TemplateProcessing>> {
    let add_bos = md
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let (true, Some(bos)) = (add_bos, gguf_id(md, "tokenizer.ggml.bos_token_id")) else {
        return Ok(None);
    };
    // A post-processor (not a manual prepend) so a saved tokenizer.json keeps the BOS.
    let bos_str = tokens
        .get(bos as usize)
        .ok_or_else(|| tok_err("BOS id outside the vocabulary"))?;
    let tp = TemplateProcessing::builder()
        .try_single(format!("{bos_str} $A"))
        .map_err(tok_err)?
        .special_tokens(vec![(bos_str.clone(), bos)])
        .build()
        .map_err(tok_err)?;
    Ok(Some(tp))
}

impl Tokenizer {
    /// From `tokenizer.json` bytes; its own post-processor decides about special tokens.
    pub fn from_json(bytes: &[u8], eos: Option<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(tok_err)?;
        Ok(Self {
            inner: inner.into(),
            eos,
        })
    }

    /// Rebuilds the model's byte-level BPE tokenizer from GGUF `tokenizer.ggml.*` metadata.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        check_gguf_model(md)?;
        let tokens = gguf_strings(md, "tokenizer.ggml.tokens")?;
        let merges = gguf_merges(md)?;
        let types = gguf_token_types(md, tokens.len());
        let mut inner = tokenizers::Tokenizer::new(gguf_bpe(&tokens, merges)?);
        inner.with_pre_tokenizer(Some(gguf_pre_tokenizer(md)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        inner
            .add_special_tokens(control_tokens(&tokens, &types))
            .map_err(tok_err)?;
        if let Some(tp) = gguf_bos_processor(md, &tokens)? {
            inner.with_post_processor(Some(tp));
        }
        Ok(Self {
            inner: inner.into(),
            eos: gguf_id(md, "tokenizer.ggml.eos_token_id"),
        })
    }

    /// Token ids of `text`, with the special tokens the model's configuration adds.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, true)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Token ids of `text` alone, never with special tokens (targets, continuations).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids`, special tokens included (byte-level pieces joined back into UTF-8).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Each token as text, as a reader would see it (e.g. `" Paris"`).
    pub fn token_strings(&self, ids: &[u32]) -> Result<Vec<String>> {
        ids.iter().map(|&i| self.decode(&[i])).collect()
    }

    /// Number of tokens in the vocabulary, added (special) tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(tok_err)
    }
}
