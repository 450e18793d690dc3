//! Tiny models and tokenizers shared by the learner's tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device};
use troupe_model::{Config, Heads, Model, Tokenizer};

pub fn data_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data").join(relative)
}

/// A byte-level BPE trained on the capitals demonstrations.
pub fn capitals_tokenizer(vocab: usize) -> Tokenizer {
    let mut texts = Vec::new();
    for file in ["sft/capitals.train.jsonl", "sft/capitals.heldout.jsonl"] {
        let loaded = troupe_data::read_demonstrations(data_path(file), troupe_data::Mode::Strict).unwrap();
        for record in loaded.records {
            for turn in record.value.turns() {
                texts.push(turn.content.clone());
            }
        }
    }
    Tokenizer::train(texts.iter(), vocab).unwrap()
}

/// A 2-layer, 64-wide Llama config for `vocab_size` tokens.
pub fn micro_config(vocab_size: usize) -> Config {
    Config {
        vocab_size,
        hidden_size: 64,
        intermediate_size: 176,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        max_position_embeddings: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_id: vec![2],
        pad_token_id: Some(0),
    }
}

pub fn random_model(cfg: &Config, value_head: bool, seed: u64) -> Model {
    Model::new_random(cfg, Heads { score: false, value: value_head }, seed, DType::F32, &Device::Cpu).unwrap()
}

/// A copy of `model` with a fresh value head.
pub fn with_value_head(model: &Model, seed: u64) -> Model {
    let bytes = model.to_safetensors().unwrap();
    let mut copy = Model::from_safetensors_bytes(model.config(), &bytes, &Device::Cpu).unwrap();
    copy.add_heads(Heads { score: false, value: true }, seed).unwrap();
    copy
}
