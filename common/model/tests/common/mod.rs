//! Shared fixtures: a micro configuration small enough for finite differences.

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use troupe_model::{Config, Heads, Model};

/// 2 layers, 4 query heads sharing 2 key/value heads, width 16.
pub fn micro_config(tie_word_embeddings: bool) -> Config {
    Config {
        vocab_size: 48,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings,
        bos_token_id: Some(1),
        eos_token_id: vec![2],
        pad_token_id: Some(0),
    }
}

pub const ALL_HEADS: Heads = Heads {
    score: true,
    value: true,
};

pub fn micro_model(dtype: DType, seed: u64) -> Model {
    micro_model_with(micro_config(false), dtype, seed)
}

/// Builds a model whose weights are larger than the default init (std 0.02), so its
/// logits are far from uniform and comparisons are not trivially satisfied.
pub fn micro_model_with(cfg: Config, dtype: DType, seed: u64) -> Model {
    let model = Model::new_random(&cfg, ALL_HEADS, seed, dtype, &Device::Cpu).unwrap();
    for (name, var) in model.named_vars() {
        if !name.ends_with("norm.weight") {
            let scaled = (var.as_tensor() * 20.0).unwrap();
            var.set(&scaled).unwrap();
        }
    }
    model
}

/// Ids `(b, t)` and mask `(b, t)` for `rows`, padded with `pad` on the left or the right.
pub fn padded(rows: &[Vec<u32>], pad: u32, left: bool) -> (Tensor, Tensor) {
    let t = rows.iter().map(Vec::len).max().unwrap();
    let mut ids: Vec<u32> = Vec::new();
    let mut mask: Vec<u32> = Vec::new();
    for row in rows {
        let n = t - row.len();
        let (pads, pad_mask) = (vec![pad; n], vec![0u32; n]);
        let real_mask = vec![1u32; row.len()];
        if left {
            ids.extend(pads.iter().chain(row));
            mask.extend(pad_mask.iter().chain(&real_mask));
        } else {
            ids.extend(row.iter().chain(&pads));
            mask.extend(real_mask.iter().chain(&pad_mask));
        }
    }
    let b = rows.len();
    (
        Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap(),
    )
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
