//! Reading a Hugging Face Llama directory: `config.json`, the weights as one
//! `model.safetensors` or as shards listed in `model.safetensors.index.json`,
//! and `tokenizer.json`.
//!
//! Every tensor is checked against the shapes the config implies before any
//! is converted, so an error names the file and tensor at fault. f16, bf16
//! and f64 tensors are converted to f32. Pickled `pytorch_model.bin` weights
//! are not read.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use troupe_model::{Config, Model, Tokenizer};

use crate::import::{sha256_hex, ImportedModel};
use crate::layout::{expected_tensors, head_tensors, is_ignorable};
use crate::{ConvertError, Result};

/// Name of the single-file weights.
pub const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the shard index of sharded weights.
pub const SHARD_INDEX_FILE: &str = "model.safetensors.index.json";
/// Architectures (`config.json` `architectures`) this importer accepts.
pub const ACCEPTED_ARCHITECTURES: [&str; 1] = ["LlamaForCausalLM"];

/// Reads and checks a Hugging Face Llama directory.
///
/// Each check fails with the file, and the tensor where there is one, named:
///
/// - `config.json` declares `LlamaForCausalLM` or `model_type` `llama` and
///   parses as a troupe [`Config`].
/// - Every tensor the config implies is present once, with its shape.
/// - No tensor is left over, except precomputed rotary frequencies and a
///   tied `lm_head.weight`.
/// - Every dtype is floating point.
/// - `tokenizer.json` loads and fits in the vocabulary.
pub fn read_hf_dir(dir: &Path) -> Result<ImportedModel> {
    if !dir.is_dir() {
        return Err(ConvertError::invalid(dir, "not a directory; a Hugging Face model is a directory with config.json, model.safetensors and tokenizer.json"));
    }
    let config_path = dir.join("config.json");
    let config_bytes = read(&config_path)?;
    let cfg = parse_config(&config_path, &config_bytes)?;

    let shards = weight_files(dir)?;
    let mut tensors = HashMap::new();
    let mut origin: HashMap<String, PathBuf> = HashMap::new();
    let mut source_files = Vec::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for (path, listed) in &shards {
        let bytes = read(path)?;
        source_files.push(serde_json::json!({
            "file": file_name(path),
            "bytes": bytes.len(),
            "sha256": sha256_hex(&bytes),
        }));
        let loaded = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
            ConvertError::invalid(path, format!("not a valid safetensors file: {e}"))
        })?;
        if let Some(listed) = listed {
            for name in listed {
                if !loaded.contains_key(name) {
                    return Err(ConvertError::tensor(path, name, format!("listed in {SHARD_INDEX_FILE} for this file, but the file does not contain it")));
                }
            }
        }
        for (name, tensor) in loaded {
            if let Some(first) = origin.get(&name) {
                return Err(ConvertError::tensor(
                    path,
                    &name,
                    format!(
                        "also stored in {}; each tensor must appear in one file",
                        first.display()
                    ),
                ));
            }
            *dtypes
                .entry(format!("{:?}", tensor.dtype()).to_lowercase())
                .or_default() += 1;
            origin.insert(name.clone(), path.clone());
            tensors.insert(name, tensor);
        }
    }
    let tensors = check_tensors(&cfg, tensors, &origin, dir)?;

    let model = Model::from_tensors(&cfg, tensors, DType::F32, &Device::Cpu)
        .map_err(|e| ConvertError::model(dir, e))?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer_json = read(&tokenizer_path)?;
    let tokenizer = load_tokenizer(&tokenizer_path, &tokenizer_json, &cfg)?;

    let source = serde_json::json!({
        "format": "hf",
        "directory": dir.display().to_string(),
        "config_sha256": sha256_hex(&config_bytes),
        "weights": source_files,
        "tensor_dtypes": dtypes,
    });
    Ok(ImportedModel {
        model,
        tokenizer,
        tokenizer_json,
        source,
    })
}

/// Parses `config.json` and checks that it describes a plain Llama.
fn parse_config(path: &Path, bytes: &[u8]) -> Result<Config> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ConvertError::invalid(path, format!("not valid JSON: {e}")))?;
    let architectures: Vec<&str> = value
        .get("architectures")
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let model_type = value.get("model_type").and_then(Value::as_str);
    let llama_architecture = architectures
        .iter()
        .any(|a| ACCEPTED_ARCHITECTURES.contains(a));
    let llama_type = model_type == Some("llama");
    if !(llama_architecture || (architectures.is_empty() && llama_type)) {
        return Err(ConvertError::unsupported(
            path,
            format!(
                "architectures {architectures:?} with model_type {model_type:?}; only Llama models (architectures [\"LlamaForCausalLM\"], model_type \"llama\") can be imported"
            ),
        ));
    }
    if model_type.is_some_and(|t| t != "llama") {
        return Err(ConvertError::unsupported(
            path,
            format!("model_type {model_type:?}; only \"llama\" can be imported"),
        ));
    }
    Config::from_json_value(&value).map_err(|e| ConvertError::model(path, e))
}

/// Lists the safetensors files of `dir`, each with the tensor names the
/// shard index assigns to it (`None` for a single `model.safetensors`).
fn weight_files(dir: &Path) -> Result<Vec<(PathBuf, Option<Vec<String>>)>> {
    let single = dir.join(SINGLE_WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![(single, None)]);
    }
    let index_path = dir.join(SHARD_INDEX_FILE);
    if !index_path.is_file() {
        let hint = if dir.join("pytorch_model.bin").exists() {
            " (pytorch_model.bin is a pickle, which troupe does not read; convert it to safetensors first)"
        } else {
            ""
        };
        return Err(ConvertError::invalid(
            dir,
            format!("neither {SINGLE_WEIGHTS_FILE} nor {SHARD_INDEX_FILE} found{hint}"),
        ));
    }

    let index: Value = serde_json::from_slice(&read(&index_path)?)
        .map_err(|e| ConvertError::invalid(&index_path, format!("not valid JSON: {e}")))?;
    let weight_map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            ConvertError::invalid(
                &index_path,
                "missing the `weight_map` object that maps tensor names to files",
            )
        })?;
    let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, file) in weight_map {
        let file = file.as_str().ok_or_else(|| {
            ConvertError::tensor(
                &index_path,
                tensor,
                format!("weight_map entry {file} is not a file name"),
            )
        })?;
        let plain = Path::new(file)
            .file_name()
            .is_some_and(|name| name == std::ffi::OsStr::new(file));
        if !plain {
            return Err(ConvertError::tensor(
                &index_path,
                tensor,
                format!("file `{file}` must be a plain file name inside the model directory"),
            ));
        }
        by_file
            .entry(file.to_string())
            .or_default()
            .push(tensor.clone());
    }
    if by_file.is_empty() {
        return Err(ConvertError::invalid(
            &index_path,
            "`weight_map` lists no tensors",
        ));
    }
    Ok(by_file
        .into_iter()
        .map(|(file, tensors)| (dir.join(file), Some(tensors)))
        .collect())
}

/// Checks names and shapes against the config and converts every tensor to
/// f32; tensors the model has no place for but may skip are dropped.
fn check_tensors(
    cfg: &Config,
    mut tensors: HashMap<String, Tensor>,
    origin: &HashMap<String, PathBuf>,
    dir: &Path,
) -> Result<HashMap<String, Tensor>> {
    let mut expected = expected_tensors(cfg);
    let heads = head_tensors(cfg.hidden_size);
    for (name, shape) in &heads {
        if tensors.contains_key(*name) {
            expected.insert(name.to_string(), shape.clone());
        }
    }

    let names: BTreeSet<String> = tensors.keys().cloned().collect();
    let mut out = HashMap::with_capacity(expected.len());
    for name in &names {
        let path = origin.get(name).map(PathBuf::as_path).unwrap_or(dir);
        let Some(tensor) = tensors.remove(name) else {
            continue;
        };
        let Some(shape) = expected.get(name) else {
            if is_ignorable(cfg, name) {
                continue;
            }
            return Err(ConvertError::tensor(path, name, "not a tensor of a Llama model with this config.json (check the architecture and num_hidden_layers)"));
        };
        if tensor.dims() != shape.as_slice() {
            return Err(ConvertError::tensor(
                path,
                name,
                format!(
                    "shape {:?}, but config.json implies {shape:?}",
                    tensor.dims()
                ),
            ));
        }
        let tensor = match tensor.dtype() {
            DType::F32 => tensor,
            DType::F16 | DType::BF16 | DType::F64 => tensor
                .to_dtype(DType::F32)
                .map_err(|e| ConvertError::tensor(path, name, e.to_string()))?,
            other => {
                return Err(ConvertError::tensor(
                    path,
                    name,
                    format!("dtype {other:?} is not a floating-point type"),
                ))
            }
        };
        out.insert(name.clone(), tensor);
    }
    for name in expected.keys() {
        if !out.contains_key(name) {
            return Err(ConvertError::tensor(
                dir,
                name,
                "missing from the weights, but config.json requires it",
            ));
        }
    }
    Ok(out)
}

/// Loads `tokenizer.json` and checks that its ids fit the model's vocabulary.
pub(crate) fn load_tokenizer(path: &Path, bytes: &[u8], cfg: &Config) -> Result<Tokenizer> {
    let tokenizer = Tokenizer::from_bytes(bytes).map_err(|e| ConvertError::model(path, e))?;
    if tokenizer.vocab_size() > cfg.vocab_size {
        return Err(ConvertError::invalid(
            path,
            format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.vocab_size(),
                cfg.vocab_size
            ),
        ));
    }
    Ok(tokenizer)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| ConvertError::io(path, e))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
