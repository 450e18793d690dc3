//! A Hugging Face `tokenizer.json` built from GGUF tokenizer metadata.
//!
//! Only `tokenizer.ggml.model` = `gpt2` (byte-level BPE) is supported: the
//! vocabulary comes from `tokenizer.ggml.tokens`, the merges from
//! `tokenizer.ggml.merges`, and tokens of type 3 (control) or 4 (user
//! defined) in `tokenizer.ggml.token_type` become added tokens, so they are
//! matched whole. The pre-tokenizer follows `tokenizer.ggml.pre`, the name
//! llama.cpp gives the split rules of the original tokenizer. The rules
//! below are those of llama.cpp's `src/llama-vocab.cpp`:
//!
//! - `gpt2`, `mpt`, `olmo`: GPT-2's regular expression, then bytes to symbols.
//! - `smollm`, `starcoder`, `refact`, `codeshell`: every digit split off
//!   alone first, then as `gpt2`.
//!
//! Any other name is rejected, because a wrong split gives wrong ids without
//! any error. That includes a file without `tokenizer.ggml.pre`, which
//! llama.cpp reads with a fallback split of its own.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::json;

use crate::gguf::Metadata;
use crate::{ConvertError, Result};

/// `tokenizer.ggml.token_type` of a control token (BOS, EOS, chat markers).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// `tokenizer.ggml.token_type` of a user-defined token, matched whole but not special.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Pre-tokenizer names that use GPT-2's split alone.
const GPT2_PRE: [&str; 3] = ["gpt2", "mpt", "olmo"];
/// Pre-tokenizer names that split digits one by one before GPT-2's split.
const DIGITS_PRE: [&str; 4] = ["smollm", "starcoder", "refact", "codeshell"];

/// The tokenizer fields of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model`.
    pub model: String,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    /// `tokenizer.ggml.tokens`: the token string of each id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, one per token; empty when absent.
    pub token_types: Vec<i64>,
    /// `tokenizer.ggml.merges`: `"left right"` pairs in priority order.
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: whether llama.cpp prepends BOS to a prompt.
    pub add_bos: Option<bool>,
}

impl GgufTokenizer {
    /// Reads the `tokenizer.ggml.*` keys; errors name the file and key.
    pub fn from_metadata(path: &Path, map: &HashMap<String, Value>) -> Result<Self> {
        let meta = Metadata { path, map };
        let model = meta.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            let hint = if model == "llama" {
                " (a SentencePiece tokenizer)"
            } else {
                ""
            };
            return Err(ConvertError::unsupported(
                path,
                format!("tokenizer.ggml.model is `{model}`{hint}; only `gpt2` (byte-level BPE) tokenizers can be imported"),
            ));
        }
        let tokens = meta
            .optional_strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| {
                ConvertError::invalid(
                    path,
                    "metadata key `tokenizer.ggml.tokens` is missing; the file has no vocabulary",
                )
            })?;
        let token_types = meta
            .optional_ints("tokenizer.ggml.token_type")?
            .unwrap_or_default();
        if !token_types.is_empty() && token_types.len() != tokens.len() {
            return Err(ConvertError::invalid(
                path,
                format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    token_types.len(),
                    tokens.len()
                ),
            ));
        }
        let merges = meta.optional_strings("tokenizer.ggml.merges")?.ok_or_else(|| {
            ConvertError::invalid(path, "metadata key `tokenizer.ggml.merges` is missing; a `gpt2` tokenizer needs its BPE merges")
        })?;
        let pre = meta.optional_string("tokenizer.ggml.pre")?.ok_or_else(|| {
            ConvertError::unsupported(path, "metadata key `tokenizer.ggml.pre` is missing, so the text split is unknown; convert the model again with a llama.cpp from May 2024 or later")
        })?;

        let tokenizer = GgufTokenizer {
            model,
            pre,
            tokens,
            token_types,
            merges,
            bos_id: meta.optional_u32("tokenizer.ggml.bos_token_id")?,
            eos_id: meta.optional_u32("tokenizer.ggml.eos_token_id")?,
            pad_id: meta.optional_u32("tokenizer.ggml.padding_token_id")?,
            add_bos: meta.optional_bool("tokenizer.ggml.add_bos_token")?,
        };
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", tokenizer.bos_id),
            ("tokenizer.ggml.eos_token_id", tokenizer.eos_id),
            ("tokenizer.ggml.padding_token_id", tokenizer.pad_id),
        ] {
            if id.is_some_and(|id| id as usize >= tokenizer.tokens.len()) {
                return Err(ConvertError::invalid(
                    path,
                    format!(
                        "{key} is {id:?}, outside the vocabulary of {} tokens",
                        tokenizer.tokens.len()
                    ),
                ));
            }
        }
        Ok(tokenizer)
    }
}

/// Builds the `tokenizer.json` text for `tokenizer`.
pub fn build_tokenizer(path: &Path, tokenizer: &GgufTokenizer) -> Result<String> {
    let pre_tokenizer = pre_tokenizer(path, &tokenizer.pre)?;

    let mut vocab = serde_json::Map::with_capacity(tokenizer.tokens.len());
    for (id, token) in tokenizer.tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(token.clone(), json!(id)) {
            return Err(ConvertError::invalid(
                path,
                format!("tokenizer.ggml.tokens lists {token:?} twice (ids {first} and {id}); each token needs one id"),
            ));
        }
    }

    let mut merges = Vec::with_capacity(tokenizer.merges.len());
    for (index, merge) in tokenizer.merges.iter().enumerate() {
        let Some((left, right)) = merge.split_once(' ') else {
            return Err(ConvertError::invalid(path, format!("tokenizer.ggml.merges item {index} {merge:?} is not two tokens separated by a space")));
        };
        for part in [left, right] {
            if !vocab.contains_key(part) {
                return Err(ConvertError::invalid(path, format!("tokenizer.ggml.merges item {index} {merge:?} uses {part:?}, which is not in the vocabulary")));
            }
        }
        merges.push(json!([left, right]));
    }

    let mut added_tokens = Vec::new();
    for (id, kind) in tokenizer.token_types.iter().enumerate() {
        if *kind == TOKEN_TYPE_CONTROL || *kind == TOKEN_TYPE_USER_DEFINED {
            added_tokens.push(json!({
                "id": id,
                "content": tokenizer.tokens[id],
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": *kind == TOKEN_TYPE_CONTROL,
            }));
        }
    }

    let document = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    serde_json::to_string(&document)
        .map_err(|e| ConvertError::invalid(path, format!("cannot encode tokenizer.json: {e}")))
}

/// Builds the `pre_tokenizer` object for llama.cpp pre-tokenizer `name`.
fn pre_tokenizer(path: &Path, name: &str) -> Result<serde_json::Value> {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    if GPT2_PRE.contains(&name) {
        return Ok(byte_level);
    }
    if DIGITS_PRE.contains(&name) {
        return Ok(json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        }));
    }
    let known: Vec<&str> = GPT2_PRE.iter().chain(DIGITS_PRE.iter()).copied().collect();
    Err(ConvertError::unsupported(
        path,
        format!("tokenizer.ggml.pre is `{name}`; supported pre-tokenizers are {known:?}"),
    ))
}
