//! Reading a GGUF file (versions 2 and 3) of a Llama model, as llama.cpp's
//! `convert_hf_to_gguf.py` writes it.
//!
//! The header and tensors are parsed by candle-core 0.11's
//! `quantized::gguf_file`, which also dequantizes every ggml tensor type to
//! f32 (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the k-quants).
//! This module then
//!
//! - builds a Hugging Face [`Config`] from the `llama.*` metadata,
//! - renames tensors to Hugging Face names (`blk.N.attn_q.weight` becomes
//!   `model.layers.N.self_attn.q_proj.weight`, and so on),
//! - undoes llama.cpp's rotary row order of `attn_q` and `attn_k`
//!   (see [`crate::layout`]),
//! - and builds a `tokenizer.json` from the `tokenizer.ggml.*` metadata
//!   (see [`crate::gguf_tokenizer`]).
//!
//! Not supported, each rejected with the metadata key that selects it:
//! architectures other than `llama`, scaled rotary embeddings, partial rotary
//! dimensions, per-layer head counts, and SentencePiece (`llama`) tokenizers.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use candle_core::{DType, Device, Tensor};
use troupe_model::{Config, Model};

use crate::gguf_tokenizer::{build_tokenizer, GgufTokenizer};
use crate::import::{sha256_hex, ImportedModel};
use crate::layout::{expected_tensors, from_gguf_rotary_rows};
use crate::{ConvertError, Result};

/// The only `general.architecture` this reader accepts.
pub const LLAMA_ARCHITECTURE: &str = "llama";

/// Defaults llama.cpp uses when a Llama GGUF leaves the key out.
const DEFAULT_ROPE_FREQ_BASE: f64 = 10_000.0;
const DEFAULT_CONTEXT_LENGTH: usize = 2048;

/// Rotary row order of a tensor: none, or that of `attn_q` or `attn_k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rotary {
    None,
    Query,
    Key,
}

/// Reads and checks a GGUF Llama file; see the module docs for what is
/// converted and what is rejected.
pub fn read_gguf(path: &Path) -> Result<ImportedModel> {
    let bytes = std::fs::read(path).map_err(|e| ConvertError::io(path, e))?;
    let sha256 = sha256_hex(&bytes);
    let mut reader = std::io::Cursor::new(&bytes);
    let content = Content::read(&mut reader)
        .map_err(|e| ConvertError::invalid(path, format!("not a readable GGUF file: {e}")))?;
    let version =
        match content.magic {
            VersionedMagic::GgufV1 => return Err(ConvertError::unsupported(
                path,
                "GGUF version 1; convert the model again with a current llama.cpp to get version 3",
            )),
            VersionedMagic::GgufV2 => 2,
            VersionedMagic::GgufV3 => 3,
        };
    let meta = Metadata {
        path,
        map: &content.metadata,
    };

    let architecture = meta.string("general.architecture")?;
    if architecture != LLAMA_ARCHITECTURE {
        return Err(ConvertError::unsupported(path, format!("general.architecture is `{architecture}`; only `{LLAMA_ARCHITECTURE}` can be imported")));
    }
    let tokenizer = GgufTokenizer::from_metadata(path, &content.metadata)?;
    let mut cfg = config_from_metadata(&meta, &content, &tokenizer)?;

    let tensors = read_tensors(path, &content, &mut reader, &cfg)?;
    let tokenizer_json = build_tokenizer(path, &tokenizer)?;
    let tokenizer_bytes = tokenizer_json.into_bytes();
    let loaded = crate::hf::load_tokenizer(path, &tokenizer_bytes, &cfg)?;
    cfg.pad_token_id = choose_pad(&cfg, tokenizer.pad_id, loaded.pad_id());
    let model = Model::from_tensors(&cfg, tensors, DType::F32, &Device::Cpu)
        .map_err(|e| ConvertError::model(path, e))?;

    let mut tensor_types: BTreeMap<String, usize> = BTreeMap::new();
    for info in content.tensor_infos.values() {
        *tensor_types
            .entry(format!("{:?}", info.ggml_dtype).to_lowercase())
            .or_default() += 1;
    }
    let source = serde_json::json!({
        "format": "gguf",
        "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "bytes": bytes.len(),
        "sha256": sha256,
        "gguf_version": version,
        "name": meta.optional_string("general.name")?,
        "tensor_types": tensor_types,
        "tokenizer_model": tokenizer.model,
        "tokenizer_pre": tokenizer.pre,
        "add_bos_token": tokenizer.add_bos,
    });
    Ok(ImportedModel {
        model,
        tokenizer: loaded,
        tokenizer_json: tokenizer_bytes,
        source,
    })
}

/// Builds the Hugging Face config of the model a GGUF file describes.
fn config_from_metadata(
    meta: &Metadata,
    content: &Content,
    tokenizer: &GgufTokenizer,
) -> Result<Config> {
    let path = meta.path;
    if let Some(scaling) = meta.optional_string("llama.rope.scaling.type")? {
        if scaling != "none" {
            return Err(ConvertError::unsupported(path, format!("llama.rope.scaling.type is `{scaling}`; scaled rotary embeddings are not supported")));
        }
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(ConvertError::unsupported(
            path,
            "tensor rope_freqs.weight (Llama 3.1 rotary scaling) is not supported",
        ));
    }

    let hidden_size = meta.usize("llama.embedding_length")?;
    let num_attention_heads = meta.usize("llama.attention.head_count")?;
    let num_key_value_heads = meta
        .optional_usize("llama.attention.head_count_kv")?
        .unwrap_or(num_attention_heads);
    let head_dim = match meta.optional_usize("llama.attention.key_length")? {
        Some(d) => d,
        None if num_attention_heads > 0 => hidden_size / num_attention_heads,
        None => 0,
    };
    if let Some(value_length) = meta.optional_usize("llama.attention.value_length")? {
        if value_length != head_dim {
            return Err(ConvertError::unsupported(path, format!("llama.attention.value_length {value_length} differs from the key length {head_dim}")));
        }
    }
    if let Some(rotary) = meta.optional_usize("llama.rope.dimension_count")? {
        if rotary != head_dim {
            return Err(ConvertError::unsupported(path, format!("llama.rope.dimension_count is {rotary} but heads are {head_dim} wide; partial rotary embeddings are not supported")));
        }
    }

    let embedding = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| {
            ConvertError::tensor(
                path,
                "token_embd.weight",
                "missing; a Llama GGUF always has the token embeddings",
            )
        })?;
    let embedding_rows = embedding.shape.dims().first().copied().unwrap_or(0);
    let vocab_size = meta
        .optional_usize("llama.vocab_size")?
        .unwrap_or(embedding_rows);
    if vocab_size != embedding_rows {
        return Err(ConvertError::tensor(
            path,
            "token_embd.weight",
            format!("{embedding_rows} rows, but llama.vocab_size is {vocab_size}"),
        ));
    }

    let cfg = Config {
        vocab_size,
        hidden_size,
        intermediate_size: meta.usize("llama.feed_forward_length")?,
        num_hidden_layers: meta.usize("llama.block_count")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        max_position_embeddings: meta
            .optional_usize("llama.context_length")?
            .unwrap_or(DEFAULT_CONTEXT_LENGTH),
        rms_norm_eps: meta.f64("llama.attention.layer_norm_rms_epsilon")?,
        rope_theta: meta
            .optional_f64("llama.rope.freq_base")?
            .unwrap_or(DEFAULT_ROPE_FREQ_BASE),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        bos_token_id: tokenizer.bos_id,
        eos_token_id: tokenizer.eos_id.into_iter().collect(),
        pad_token_id: None,
    };
    cfg.validate().map_err(|e| ConvertError::model(path, e))?;
    Ok(cfg)
}

/// Picks the config's pad id: the file's own when it differs from EOS,
/// because troupe keeps PAD and EOS apart, else the tokenizer's.
fn choose_pad(cfg: &Config, from_file: Option<u32>, from_tokenizer: Option<u32>) -> Option<u32> {
    match from_file {
        Some(pad) if !cfg.eos_token_id.contains(&pad) => Some(pad),
        _ => from_tokenizer.filter(|pad| (*pad as usize) < cfg.vocab_size),
    }
}

/// Reads, dequantizes and renames every tensor, checking each shape
/// against `cfg` before the rotary rows are reordered.
fn read_tensors(
    path: &Path,
    content: &Content,
    reader: &mut std::io::Cursor<&Vec<u8>>,
    cfg: &Config,
) -> Result<HashMap<String, Tensor>> {
    let expected = expected_tensors(cfg);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();

    let mut tensors = HashMap::with_capacity(names.len());
    for gguf_name in names {
        let (hf_name, rotary) = hf_name(gguf_name).ok_or_else(|| {
            ConvertError::tensor(
                path,
                gguf_name,
                "not a tensor of a Llama model; the file may be of another architecture",
            )
        })?;
        let shape = expected.get(&hf_name).ok_or_else(|| {
            ConvertError::tensor(
                path,
                gguf_name,
                format!(
                    "maps to `{hf_name}`, which a model with llama.block_count = {} does not have",
                    cfg.num_hidden_layers
                ),
            )
        })?;
        let info = &content.tensor_infos[gguf_name];
        if info.shape.dims() != shape.as_slice() {
            return Err(ConvertError::tensor(
                path,
                gguf_name,
                format!(
                    "shape {:?} (rows, columns), but the metadata implies {shape:?}",
                    info.shape.dims()
                ),
            ));
        }

        let quantized = info
            .read(reader, content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| {
                ConvertError::tensor(
                    path,
                    gguf_name,
                    format!("cannot read {:?} data: {e}", info.ggml_dtype),
                )
            })?;
        let dequantize = |q: &candle_core::quantized::QTensor| -> candle_core::Result<Tensor> {
            let tensor = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
            match rotary {
                Rotary::None => Ok(tensor),
                Rotary::Query => from_gguf_rotary_rows(&tensor, cfg.num_attention_heads),
                Rotary::Key => from_gguf_rotary_rows(&tensor, cfg.num_key_value_heads),
            }
        };
        let tensor = dequantize(&quantized).map_err(|e| {
            ConvertError::tensor(
                path,
                gguf_name,
                format!("cannot dequantize {:?} data: {e}", info.ggml_dtype),
            )
        })?;
        tensors.insert(hf_name, tensor);
    }
    for hf in expected.keys() {
        if !tensors.contains_key(hf) {
            return Err(ConvertError::tensor(
                path,
                &gguf_name(hf),
                format!("missing (Hugging Face name `{hf}`)"),
            ));
        }
    }
    Ok(tensors)
}

/// Per-layer GGUF tensor suffixes and their Hugging Face names within `model.layers.N`.
const BLOCK_TENSORS: [(&str, &str, Rotary); 9] = [
    ("attn_norm.weight", "input_layernorm.weight", Rotary::None),
    ("attn_q.weight", "self_attn.q_proj.weight", Rotary::Query),
    ("attn_k.weight", "self_attn.k_proj.weight", Rotary::Key),
    ("attn_v.weight", "self_attn.v_proj.weight", Rotary::None),
    (
        "attn_output.weight",
        "self_attn.o_proj.weight",
        Rotary::None,
    ),
    (
        "ffn_norm.weight",
        "post_attention_layernorm.weight",
        Rotary::None,
    ),
    ("ffn_gate.weight", "mlp.gate_proj.weight", Rotary::None),
    ("ffn_up.weight", "mlp.up_proj.weight", Rotary::None),
    ("ffn_down.weight", "mlp.down_proj.weight", Rotary::None),
];

/// Tensors outside the blocks: GGUF name, Hugging Face name.
const GLOBAL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Returns the Hugging Face name of GGUF tensor `name` and its rotary row order.
fn hf_name(name: &str) -> Option<(String, Rotary)> {
    if let Some((_, hf)) = GLOBAL_TENSORS.iter().find(|(gguf, _)| *gguf == name) {
        return Some((hf.to_string(), Rotary::None));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf, rotary) = BLOCK_TENSORS.iter().find(|(gguf, _, _)| *gguf == suffix)?;
    Some((format!("model.layers.{layer}.{hf}"), *rotary))
}

/// Returns the GGUF name of Hugging Face tensor `name`, for error messages.
fn gguf_name(name: &str) -> String {
    if let Some((gguf, _)) = GLOBAL_TENSORS.iter().find(|(_, hf)| *hf == name) {
        return gguf.to_string();
    }
    let found = name.strip_prefix("model.layers.").and_then(|rest| {
        let (layer, suffix) = rest.split_once('.')?;
        let (gguf, _, _) = BLOCK_TENSORS.iter().find(|(_, hf, _)| *hf == suffix)?;
        Some(format!("blk.{layer}.{gguf}"))
    });
    found.unwrap_or_else(|| name.to_string())
}

/// Typed access to GGUF metadata; errors name the file and key.
pub(crate) struct Metadata<'a> {
    pub(crate) path: &'a Path,
    pub(crate) map: &'a HashMap<String, Value>,
}

impl Metadata<'_> {
    fn missing(&self, key: &str) -> ConvertError {
        ConvertError::invalid(self.path, format!("metadata key `{key}` is missing"))
    }

    fn mistyped(&self, key: &str, expected: &str, value: &Value) -> ConvertError {
        ConvertError::invalid(
            self.path,
            format!(
                "metadata key `{key}` should be {expected}, found {:?}",
                value.value_type()
            ),
        )
    }

    pub(crate) fn optional_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(value) = self.map.get(key) else {
            return Ok(None);
        };
        let number = match value {
            Value::U8(v) => Some(*v as u64),
            Value::U16(v) => Some(*v as u64),
            Value::U32(v) => Some(*v as u64),
            Value::U64(v) => Some(*v),
            Value::I8(v) => u64::try_from(*v).ok(),
            Value::I16(v) => u64::try_from(*v).ok(),
            Value::I32(v) => u64::try_from(*v).ok(),
            Value::I64(v) => u64::try_from(*v).ok(),
            Value::Array(_) => {
                return Err(ConvertError::unsupported(self.path, format!("metadata key `{key}` is an array (one value per layer), which troupe's Llama does not support")))
            }
            other => return Err(self.mistyped(key, "a non-negative integer", other)),
        };
        let number = number.and_then(|n| usize::try_from(n).ok());
        number
            .map(Some)
            .ok_or_else(|| self.mistyped(key, "a non-negative integer", value))
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        self.optional_usize(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn optional_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.optional_usize(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n).map(Some).map_err(|_| {
                ConvertError::invalid(
                    self.path,
                    format!("metadata key `{key}` is {n}, too large for a token id"),
                )
            }),
        }
    }

    fn optional_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(shortest_f64(*v))),
            Some(Value::F64(v)) => Ok(Some(*v)),
            Some(other) => Err(self.mistyped(key, "a floating-point number", other)),
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        self.optional_f64(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn optional_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(v)) => Ok(Some(*v)),
            Some(other) => Err(self.mistyped(key, "a boolean", other)),
        }
    }

    pub(crate) fn optional_string(&self, key: &str) -> Result<Option<String>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(v)) => Ok(Some(v.clone())),
            Some(other) => Err(self.mistyped(key, "a string", other)),
        }
    }

    pub(crate) fn string(&self, key: &str) -> Result<String> {
        self.optional_string(key)?.ok_or_else(|| self.missing(key))
    }

    /// Reads an array-of-strings key.
    pub(crate) fn optional_strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(value) = self.map.get(key) else {
            return Ok(None);
        };
        let Value::Array(items) = value else {
            return Err(self.mistyped(key, "an array of strings", value));
        };
        let strings = items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(ConvertError::invalid(
                    self.path,
                    format!(
                        "metadata key `{key}` item {i} should be a string, found {:?}",
                        other.value_type()
                    ),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(strings))
    }

    /// Reads an array-of-integers key.
    pub(crate) fn optional_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(value) = self.map.get(key) else {
            return Ok(None);
        };
        let Value::Array(items) = value else {
            return Err(self.mistyped(key, "an array of integers", value));
        };
        let ints = items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::I32(v) => Ok(*v as i64),
                Value::U32(v) => Ok(*v as i64),
                Value::I8(v) => Ok(*v as i64),
                Value::U8(v) => Ok(*v as i64),
                Value::I16(v) => Ok(*v as i64),
                Value::U16(v) => Ok(*v as i64),
                Value::I64(v) => Ok(*v),
                other => Err(ConvertError::invalid(
                    self.path,
                    format!(
                        "metadata key `{key}` item {i} should be an integer, found {:?}",
                        other.value_type()
                    ),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(ints))
    }
}

/// Widens `value` to the f64 of its shortest decimal form, so an epsilon
/// stored as f32 1e-5 becomes f64 1e-5 rather than 9.9999997e-6.
fn shortest_f64(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(value as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (gguf, hf) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.11.ffn_down.weight",
                "model.layers.11.mlp.down_proj.weight",
            ),
            (
                "blk.0.attn_k.weight",
                "model.layers.0.self_attn.k_proj.weight",
            ),
        ] {
            assert_eq!(hf_name(gguf).map(|(name, _)| name).as_deref(), Some(hf));
            assert_eq!(gguf_name(hf), gguf);
        }
        assert_eq!(
            hf_name("blk.0.attn_q.weight").map(|(_, r)| r),
            Some(Rotary::Query)
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.0.attn_qkv.weight"), None);
    }

    #[test]
    fn f32_metadata_widened_exactly() {
        assert_eq!(shortest_f64(1e-5), 1e-5);
        assert_eq!(shortest_f64(100_000.0), 100_000.0);
    }
}
