//! The Hugging Face tensor layout of a Llama model, derived from its config,
//! and llama.cpp's reordering of the `q_proj`/`k_proj` rows.
//!
//! Hugging Face Llama applies rotary embeddings "rotate-half" style: within a
//! head of width `hd`, dimension `j` is paired with dimension `j + hd/2`.
//! llama.cpp pairs neighbours (`2j` with `2j + 1`) instead, so its converter
//! (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of
//! `q_proj` and `k_proj` inside each head: row `s * hd/2 + j` of a Hugging
//! Face head moves to row `2j + s`. [`from_gguf_rotary_rows`] undoes that.

use candle_core::Tensor;
use std::collections::BTreeMap;
use troupe_model::Config;

/// Tensors some checkpoints carry that hold no parameters (precomputed rotary
/// frequencies); importers skip them.
pub const IGNORED_SUFFIXES: [&str; 1] = ["rotary_emb.inv_freq"];

/// Optional head tensors troupe adds to a Llama (reward score and PPO value
/// head), with their shapes for a model of width `hidden`.
pub fn head_tensors(hidden: usize) -> [(&'static str, Vec<usize>); 3] {
    [
        ("score.weight", vec![1, hidden]),
        ("value_head.weight", vec![1, hidden]),
        ("value_head.bias", vec![1]),
    ]
}

/// Lists every tensor a Llama with `cfg` needs, by Hugging Face name, with
/// its shape. `lm_head.weight` is listed only when the embeddings are untied.
pub fn expected_tensors(cfg: &Config) -> BTreeMap<String, Vec<usize>> {
    let (d, v, hd) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim);
    let q = cfg.num_attention_heads * hd;
    let kv = cfg.num_key_value_heads * hd;
    let ffn = cfg.intermediate_size;

    let mut tensors = BTreeMap::new();
    tensors.insert("model.embed_tokens.weight".to_string(), vec![v, d]);
    tensors.insert("model.norm.weight".to_string(), vec![d]);
    if !cfg.tie_word_embeddings {
        tensors.insert("lm_head.weight".to_string(), vec![v, d]);
    }
    for layer in 0..cfg.num_hidden_layers {
        let prefix = format!("model.layers.{layer}");
        for (name, shape) in [
            ("input_layernorm.weight", vec![d]),
            ("post_attention_layernorm.weight", vec![d]),
            ("self_attn.q_proj.weight", vec![q, d]),
            ("self_attn.k_proj.weight", vec![kv, d]),
            ("self_attn.v_proj.weight", vec![kv, d]),
            ("self_attn.o_proj.weight", vec![d, q]),
            ("mlp.gate_proj.weight", vec![ffn, d]),
            ("mlp.up_proj.weight", vec![ffn, d]),
            ("mlp.down_proj.weight", vec![d, ffn]),
        ] {
            tensors.insert(format!("{prefix}.{name}"), shape);
        }
    }
    tensors
}

/// Returns whether an importer may drop tensor `name`, which the model has no place for.
pub fn is_ignorable(cfg: &Config, name: &str) -> bool {
    IGNORED_SUFFIXES.iter().any(|suffix| name.ends_with(suffix))
        || (cfg.tie_word_embeddings && name == "lm_head.weight")
}

/// Reorders the rows of a Hugging Face `q_proj` or `k_proj` weight
/// `(heads * head_dim, in)` into llama.cpp's interleaved rotary order, as
/// llama.cpp's converter does. `heads` is the attention head count for
/// `q_proj` and the key/value head count for `k_proj`.
pub fn to_gguf_rotary_rows(weight: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    let half = rows / heads / 2;
    weight
        .reshape((heads, 2, half, cols))?
        // (heads, 2, hd/2, in): row s * hd/2 + j of each head
        .transpose(1, 2)?
        // (heads, hd/2, 2, in): row 2j + s of each head
        .contiguous()?
        .reshape((rows, cols))
}

/// Inverse of [`to_gguf_rotary_rows`]: llama.cpp's interleaved rotary row
/// order back to the Hugging Face (rotate-half) order.
pub fn from_gguf_rotary_rows(weight: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = weight.dims2()?;
    let half = rows / heads / 2;
    weight
        .reshape((heads, half, 2, cols))?
        // (heads, hd/2, 2, in): row 2j + s of each head
        .transpose(1, 2)?
        // (heads, 2, hd/2, in): row s * hd/2 + j of each head
        .contiguous()?
        .reshape((rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rotary_rows_invert() {
        let w = Tensor::arange(0f32, 48.0, &Device::Cpu)
            .unwrap()
            .reshape((12, 4))
            .unwrap();
        let there = to_gguf_rotary_rows(&w, 2).unwrap();
        let back = from_gguf_rotary_rows(&there, 2).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn rotary_rows_interleave() {
        // One head of width 6: Hugging Face rows 0..6 pair (0,3) (1,4) (2,5);
        // llama.cpp stores each pair next to each other.
        let w = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((6, 1))
            .unwrap();
        let there = to_gguf_rotary_rows(&w, 1).unwrap().flatten_all().unwrap();
        assert_eq!(
            there.to_vec1::<f32>().unwrap(),
            vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );
    }

    #[test]
    fn tied_model_has_no_lm_head() {
        let cfg = Config::tiny();
        let tensors = expected_tensors(&cfg);
        assert!(!tensors.contains_key("lm_head.weight"));
        assert_eq!(tensors.len(), 2 + 9 * cfg.num_hidden_layers);
        let params: usize = tensors
            .values()
            .map(|shape| shape.iter().product::<usize>())
            .sum();
        assert_eq!(params, cfg.num_parameters());
    }
}
