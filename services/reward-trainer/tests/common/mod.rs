//! Helpers shared by this crate's tests: a tokenizer trained on shipped
//! demonstrations and a random tiny base model stored as an SFT version.

#![allow(dead_code)]

use bytes::Bytes;
use candle_core::{DType, Device};
use troupe_model::{Config, Heads, Model, Tokenizer};
use troupe_store::{ModelKind, ModelRef, ModelRegistry, NewVersion};

pub fn data_path(relative: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(relative)
}

/// Demonstrations of a shipped SFT file, as (prompt, response).
pub fn demonstrations(file: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(data_path(file)).unwrap();
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            (value["prompt"].as_str().unwrap().to_string(), value["response"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Trains a byte-level BPE of `vocab` tokens on the given SFT files.
pub fn tokenizer(files: &[&str], vocab: usize) -> Tokenizer {
    let texts: Vec<String> =
        files.iter().flat_map(|file| demonstrations(file)).flat_map(|(prompt, response)| [prompt, response]).collect();
    Tokenizer::train(texts.into_iter(), vocab).unwrap()
}

/// Creates a tiny random model sized for `tokenizer`.
pub fn tiny_model(tokenizer: &Tokenizer, heads: Heads, seed: u64) -> Model {
    let mut config = Config::tiny();
    config.vocab_size = tokenizer.vocab_size();
    config.bos_token_id = tokenizer.bos_id();
    config.eos_token_id = tokenizer.eos_id().into_iter().collect();
    config.pad_token_id = tokenizer.pad_id();
    Model::new_random(&config, heads, seed, DType::F32, &Device::Cpu).unwrap()
}

/// Stores `model` as a version of `name` of `kind` and returns it.
pub async fn store_model(registry: &ModelRegistry, name: &str, kind: ModelKind, model: &Model, tokenizer: &Tokenizer) -> ModelRef {
    let version = NewVersion::new(
        name,
        kind,
        Bytes::from(model.to_safetensors().unwrap()),
        Bytes::from(model.config().to_json_string()),
        Bytes::from(tokenizer.to_json().unwrap()),
    );
    registry.publish(version).await.unwrap().model_ref()
}
