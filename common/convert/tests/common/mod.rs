//! Shared helpers: a tiny random Llama with sharp attention, a tokenizer
//! trained on a few sentences, and logits on a fixed batch.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use troupe_model::{Config, Heads, Model, Tokenizer};

pub const CORPUS: [&str; 6] = [
    "The capital of France is Paris. The capital of Spain is Madrid.",
    "fn main() { println!(\"hello, world\"); }",
    "Numbers: 12345 and 3.14159, dates like 2024-05-01.",
    "Ünïcödé text, emoji 🙂 and tabs\tand\nnewlines.",
    "A tokenizer turns text into ids; a model turns ids into logits.",
    "def add(a, b):\n    return a + b\n",
];

/// Texts the imported tokenizers must encode exactly as the originals do.
pub const PROBES: [&str; 6] = [
    "The capital of France is",
    " leading space and  double  spaces",
    "digits 0123456789 and 42",
    "code: let x = vec![1, 2, 3];\n",
    "Ünïcödé 🙂 outside the corpus: ñ ß 漢字",
    "<|eos|> typed by a user stays text",
];

pub fn tokenizer() -> Tokenizer {
    Tokenizer::train(CORPUS.iter(), 400).expect("train tokenizer")
}

/// Sizes the `tiny` preset to `tokenizer`, with a rotary base and epsilon
/// unlike any default, so a reader that ignores them is caught.
pub fn config(tokenizer: &Tokenizer, tie_word_embeddings: bool) -> Config {
    let mut cfg = Config::tiny();
    cfg.vocab_size = tokenizer.vocab_size();
    cfg.rope_theta = 50_000.0;
    cfg.rms_norm_eps = 2e-5;
    cfg.tie_word_embeddings = tie_word_embeddings;
    cfg.bos_token_id = tokenizer.bos_id();
    cfg.eos_token_id = tokenizer.eos_id().into_iter().collect();
    cfg.pad_token_id = tokenizer.pad_id();
    cfg
}

/// Builds a random model whose attention is sharp and whose logits are large.
///
/// With the default N(0, 0.02) initialization the attention of a tiny model
/// is nearly uniform, so a wrong `q_proj`/`k_proj` row order would hardly
/// change its logits. Scaling the projections and embeddings up makes any
/// such mistake visible.
pub fn model(cfg: &Config, seed: u64) -> Model {
    model_scaled(cfg, seed, 12.0, 3.0)
}

/// Builds a random model with `q_proj`/`k_proj` scaled by `qk_scale`, the other
/// projections by `other_scale`, embeddings by 10 and norm gains around 1.
pub fn model_scaled(cfg: &Config, seed: u64, qk_scale: f64, other_scale: f64) -> Model {
    let model = Model::new_random(cfg, Heads::default(), seed, DType::F32, &Device::Cpu)
        .expect("random model");
    for (name, var) in model.named_vars() {
        let scale = if name.contains("q_proj") || name.contains("k_proj") {
            qk_scale
        } else if name.contains("embed_tokens") || name.contains("lm_head") {
            10.0
        } else if name.ends_with("norm.weight") {
            // Norm gains of 1 would hide a norm mapped to the wrong place.
            let gains: Vec<f32> = (0..var.elem_count())
                .map(|i| 1.0 + 0.3 * (i as f32 * 0.7 + seed as f32).sin())
                .collect();
            var.set(&Tensor::from_vec(gains, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            continue;
        } else {
            other_scale
        };
        var.set(&(var.as_tensor() * scale).unwrap()).unwrap();
    }
    model
}

/// Returns a fixed batch of 2 rows of 16 token ids inside `vocab`.
pub fn input_ids(vocab: usize) -> Tensor {
    let ids: Vec<u32> = (0..32u32).map(|i| (i * 37 + 11) % vocab as u32).collect();
    Tensor::from_vec(ids, (2, 16), &Device::Cpu).unwrap()
}

pub fn logits(model: &Model) -> Vec<f32> {
    let ids = input_ids(model.config().vocab_size);
    model
        .forward(&ids, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest absolute difference between two logit vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Root mean square of a logit vector, the scale tolerances are relative to.
pub fn rms(a: &[f32]) -> f32 {
    (a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32).sqrt()
}
