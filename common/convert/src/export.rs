//! Writing a stored model version as a Hugging Face directory that
//! transformers loads with `LlamaForCausalLM.from_pretrained`.
//!
//! The directory gets `config.json` (with `architectures:
//! ["LlamaForCausalLM"]`), `model.safetensors` (f32), `tokenizer.json` (the
//! stored bytes, unchanged) and `generation_config.json`. The weights are
//! loaded into the model core before they are written, so a version whose
//! files do not fit together is rejected instead of exported. Reward and
//! value heads (`score.weight`, `value_head.*`) are kept in
//! `model.safetensors`; transformers' `LlamaForCausalLM` ignores them with a
//! warning about unused weights.

use std::path::{Path, PathBuf};

use candle_core::Device;
use troupe_model::{Config, Model, Tokenizer};
use troupe_store::{Manifest, ModelRef, ModelRegistry, CONFIG_FILE, TOKENIZER_FILE};

use crate::{ConvertError, Result};

/// Name of the generation defaults file transformers reads.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

/// Writes `model` from `registry` into `dir` (created if needed) in Hugging
/// Face layout and returns its manifest. Files of the same names in `dir`
/// are replaced, each through a temporary file and a rename.
pub async fn export_hf_dir(
    registry: &ModelRegistry,
    model: &ModelRef,
    dir: &Path,
) -> Result<Manifest> {
    let loaded = registry.load(model).await?;
    let manifest = loaded.manifest.clone();
    let label = model.to_string();
    let dir_owned = dir.to_path_buf();
    let write = move || {
        write_hf_dir(
            &label,
            loaded.config(),
            loaded.weights(),
            loaded.tokenizer(),
            &dir_owned,
        )
    };
    match tokio::task::spawn_blocking(write).await {
        Ok(result) => result?,
        Err(join) => match join.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => {
                return Err(ConvertError::Cancelled {
                    path: dir.to_path_buf(),
                })
            }
        },
    }
    tracing::info!(model = %model, directory = %dir.display(), "exported model in hugging face layout");
    Ok(manifest)
}

/// Checks that the stored files load as one model, then writes the directory.
fn write_hf_dir(
    label: &str,
    config: &[u8],
    weights: &[u8],
    tokenizer: &[u8],
    dir: &Path,
) -> Result<()> {
    let stored = |source| ConvertError::StoredModel {
        model: label.to_string(),
        source,
    };
    let cfg = Config::from_json_str(&String::from_utf8_lossy(config)).map_err(stored)?;
    let model = Model::from_safetensors_bytes(&cfg, weights, &Device::Cpu).map_err(stored)?;
    let parsed = Tokenizer::from_bytes(tokenizer).map_err(stored)?;
    if parsed.vocab_size() > cfg.vocab_size {
        return Err(stored(troupe_model::Error::Tokenizer(format!(
            "{TOKENIZER_FILE} has {} tokens but {CONFIG_FILE} has vocab_size {}",
            parsed.vocab_size(),
            cfg.vocab_size
        ))));
    }

    std::fs::create_dir_all(dir).map_err(|e| ConvertError::io(dir, e))?;
    model
        .write_hf_dir(dir, None)
        .map_err(|e| ConvertError::model(dir, e))?;
    write_atomic(&dir.join(TOKENIZER_FILE), tokenizer)?;
    write_atomic(
        &dir.join(GENERATION_CONFIG_FILE),
        generation_config(&cfg).as_bytes(),
    )?;
    Ok(())
}

/// `generation_config.json`: the special token ids transformers' `generate`
/// stops on and pads with.
fn generation_config(cfg: &Config) -> String {
    let eos = match cfg.eos_token_id.as_slice() {
        [one] => serde_json::json!(one),
        many => serde_json::json!(many),
    };
    let value = serde_json::json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
    });
    // A `Value` built from numbers and nulls always serializes.
    serde_json::to_string_pretty(&value).unwrap_or_default()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::write(&partial, bytes).map_err(|e| ConvertError::io(&partial, e))?;
    std::fs::rename(&partial, path).map_err(|e| ConvertError::io(path, e))
}
