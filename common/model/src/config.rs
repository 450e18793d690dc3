//! Model configuration, read from and written as a Hugging Face `LlamaConfig`
//! `config.json`, with the named presets troupe trains.

use crate::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Hyperparameters of a Llama-family decoder. Field names and meanings are
/// those of Hugging Face `LlamaConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP (rows of `gate_proj` and `up_proj`).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key/value heads for grouped-query attention; divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Per-head width; Hugging Face defaults it to `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    /// Maximum sequence length (prompt plus generated tokens) the model accepts.
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding frequencies.
    pub rope_theta: f64,
    /// When set, `lm_head` reuses `model.embed_tokens.weight` and no `lm_head.weight` is stored.
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids; Hugging Face allows one id or a list.
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl Config {
    /// Returns the `tiny` preset: 2 layers of width 128, 2048-token vocabulary, about 0.63M parameters.
    pub fn tiny() -> Self {
        Config {
            vocab_size: 2048,
            hidden_size: 128,
            intermediate_size: 352,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 32,
            max_position_embeddings: 256,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: vec![2],
            pad_token_id: None,
        }
    }

    /// Returns the `small` preset: 6 layers of width 384, 8192-token vocabulary, about 12.6M parameters.
    pub fn small() -> Self {
        Config {
            vocab_size: 8192,
            hidden_size: 384,
            intermediate_size: 1024,
            num_hidden_layers: 6,
            num_attention_heads: 6,
            num_key_value_heads: 2,
            head_dim: 64,
            max_position_embeddings: 512,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: vec![2],
            pad_token_id: None,
        }
    }

    /// Looks up a preset by name (`tiny` or `small`).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            other => Err(Error::Config {
                field: "preset".into(),
                reason: format!("unknown preset `{other}`, expected `tiny` or `small`"),
            }),
        }
    }

    /// Parses a Hugging Face `config.json`. Unknown fields are ignored; a
    /// missing or mistyped field is reported by name.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(json).map_err(|e| Error::Config {
            field: "config.json".into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        Self::from_json_value(&value)
    }

    /// Builds a config from a parsed `config.json` object and validates it.
    pub fn from_json_value(value: &Value) -> Result<Self> {
        let map = value.as_object().ok_or_else(|| Error::Config {
            field: "config.json".into(),
            reason: "expected a JSON object".into(),
        })?;
        reject_unsupported(map)?;

        let hidden_size = required_usize(map, "hidden_size")?;
        let num_attention_heads = required_usize(map, "num_attention_heads")?;
        let head_dim = match optional_usize(map, "head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        let config = Config {
            vocab_size: required_usize(map, "vocab_size")?,
            hidden_size,
            intermediate_size: required_usize(map, "intermediate_size")?,
            num_hidden_layers: required_usize(map, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: optional_usize(map, "num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            head_dim,
            // Defaults below are those of transformers' LlamaConfig.
            max_position_embeddings: optional_usize(map, "max_position_embeddings")?
                .unwrap_or(2048),
            rms_norm_eps: optional_f64(map, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: optional_f64(map, "rope_theta")?.unwrap_or(10000.0),
            tie_word_embeddings: optional_bool(map, "tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: optional_token(map, "bos_token_id")?,
            eos_token_id: token_list(map, "eos_token_id")?,
            pad_token_id: optional_token(map, "pad_token_id")?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that the sizes fit together; the error names the first bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| {
            Err(Error::Config {
                field: field.into(),
                reason,
            })
        };
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!(
                    "must be a positive even number for rotary embeddings, got {}",
                    self.head_dim
                ),
            );
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            );
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(
                "rms_norm_eps",
                format!("must be positive, got {}", self.rms_norm_eps),
            );
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(
                "rope_theta",
                format!("must be positive, got {}", self.rope_theta),
            );
        }
        let ids = self.bos_token_id.iter().map(|id| ("bos_token_id", *id));
        let ids = ids.chain(self.eos_token_id.iter().map(|id| ("eos_token_id", *id)));
        for (field, id) in ids.chain(self.pad_token_id.iter().map(|id| ("pad_token_id", *id))) {
            if id as usize >= self.vocab_size {
                return bad(
                    field,
                    format!(
                        "token {id} is outside the vocabulary of {}",
                        self.vocab_size
                    ),
                );
            }
        }
        Ok(())
    }

    /// Number of parameters of the language model (embeddings, blocks, final
    /// norm and an untied `lm_head`), without reward or value heads.
    pub fn num_parameters(&self) -> usize {
        let (d, v) = (self.hidden_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attention = d * q + 2 * d * kv + q * d;
        let mlp = 3 * d * self.intermediate_size;
        let block = attention + mlp + 2 * d;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + self.num_hidden_layers * block + d + head
    }

    /// Returns the first end-of-sequence id, if any.
    pub fn eos(&self) -> Option<u32> {
        self.eos_token_id.first().copied()
    }

    /// Builds the `config.json` object, with the fields transformers needs to load it as `LlamaForCausalLM`.
    pub fn to_json_value(&self) -> Value {
        let eos = match self.eos_token_id.as_slice() {
            [] => Value::Null,
            [one] => Value::from(*one),
            many => Value::from(many.to_vec()),
        };
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        })
    }

    /// Renders the `config.json` text, pretty-printed.
    pub fn to_json_string(&self) -> String {
        // A `Value` built from plain numbers, strings and bools always serializes.
        serde_json::to_string_pretty(&self.to_json_value()).unwrap_or_default()
    }
}

impl Serialize for Config {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json_value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Config::from_json_value(&value).map_err(serde::de::Error::custom)
    }
}

fn field_error(field: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Rejects settings this implementation would otherwise silently ignore.
fn reject_unsupported(map: &Map<String, Value>) -> Result<()> {
    if let Some(model_type) = map.get("model_type").and_then(Value::as_str) {
        if !matches!(model_type, "llama" | "mistral" | "qwen2") {
            return Err(field_error(
                "model_type",
                format!("`{model_type}` is not a Llama-family model"),
            ));
        }
    }
    if let Some(act) = map.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(field_error(
                "hidden_act",
                format!("only `silu` is supported, got `{act}`"),
            ));
        }
    }
    if map.get("rope_scaling").is_some_and(|v| !v.is_null()) {
        return Err(field_error(
            "rope_scaling",
            "scaled rotary embeddings are not supported; expected null",
        ));
    }
    for field in ["attention_bias", "mlp_bias"] {
        if map.get(field).and_then(Value::as_bool) == Some(true) {
            return Err(field_error(
                field,
                "projection biases are not supported; expected false",
            ));
        }
    }
    Ok(())
}

fn required_usize(map: &Map<String, Value>, field: &str) -> Result<usize> {
    optional_usize(map, field)?.ok_or_else(|| field_error(field, "missing"))
}

fn optional_usize(map: &Map<String, Value>, field: &str) -> Result<Option<usize>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| field_error(field, format!("expected a non-negative integer, got {v}"))),
    }
}

fn optional_f64(map: &Map<String, Value>, field: &str) -> Result<Option<f64>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| field_error(field, format!("expected a number, got {v}"))),
    }
}

fn optional_bool(map: &Map<String, Value>, field: &str) -> Result<Option<bool>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| field_error(field, format!("expected true or false, got {v}"))),
    }
}

fn as_token(field: &str, v: &Value) -> Result<u32> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| field_error(field, format!("expected a token id, got {v}")))
}

fn optional_token(map: &Map<String, Value>, field: &str) -> Result<Option<u32>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => as_token(field, v).map(Some),
    }
}

fn token_list(map: &Map<String, Value>, field: &str) -> Result<Vec<u32>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(|v| as_token(field, v)).collect(),
        Some(v) => Ok(vec![as_token(field, v)?]),
    }
}
