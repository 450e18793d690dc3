//! Publishing an imported model as a base-model version of the registry.
//!
//! Reading and converting run on a blocking thread, because they are CPU
//! and disk bound. The publish is the registry's usual one, so the version
//! becomes visible only when its manifest is written.

use std::path::{Path, PathBuf};
use std::time::Instant;

use troupe_model::{Config, Model, Tokenizer};
use troupe_store::{Manifest, ModelKind, ModelRegistry, NewVersion};

use crate::{ConvertError, Result};

/// A converted model ready to publish: f32 weights with Hugging Face names,
/// its config, and a tokenizer the model core loads.
pub struct ImportedModel {
    /// The model, with every tensor checked against the config.
    pub model: Model,
    /// The tokenizer, already parsed by the model core.
    pub tokenizer: Tokenizer,
    /// The `tokenizer.json` bytes stored with the version.
    pub tokenizer_json: Vec<u8>,
    /// Provenance recorded in the manifest under `source` (format, file
    /// names, SHA-256 of the source, tensor dtypes).
    pub source: serde_json::Value,
}

impl ImportedModel {
    /// Returns the model's config.
    pub fn config(&self) -> &Config {
        self.model.config()
    }
}

impl std::fmt::Debug for ImportedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportedModel")
            .field("model", &self.model)
            .field("tokenizer", &self.tokenizer)
            .field("source", &self.source)
            .finish()
    }
}

/// Reads a Hugging Face directory and publishes it as the next version of
/// base model `name`; see [`crate::read_hf_dir`] for what is checked.
pub async fn import_hf_dir(dir: &Path, registry: &ModelRegistry, name: &str) -> Result<Manifest> {
    let imported = read_blocking(dir, crate::read_hf_dir).await?;
    publish_imported(registry, name, imported).await
}

/// Reads a GGUF file and publishes it as the next version of base model
/// `name`; see [`crate::read_gguf`] for what is checked.
pub async fn import_gguf(path: &Path, registry: &ModelRegistry, name: &str) -> Result<Manifest> {
    let imported = read_blocking(path, crate::read_gguf).await?;
    publish_imported(registry, name, imported).await
}

/// Publishes `imported` as the next version of base model `name`, with no
/// parent, and returns its manifest.
///
/// NOTE: an import keeps several copies of the model in memory (source
/// bytes, f32 tensors, parameters, serialized safetensors). A test that
/// imported, sampled and exported SmolLM2-135M peaked at about 4 GB, so
/// models of billions of parameters would need streaming.
pub async fn publish_imported(
    registry: &ModelRegistry,
    name: &str,
    imported: ImportedModel,
) -> Result<Manifest> {
    let weights = imported
        .model
        .to_safetensors()
        .map_err(|source| ConvertError::StoredModel {
            model: format!("{name} (being imported)"),
            source,
        })?;
    let config = imported.config().to_json_string();
    let metadata = serde_json::json!({
        "source": imported.source,
        "importer": concat!("troupe-convert ", env!("CARGO_PKG_VERSION")),
        "parameters": imported.model.num_parameters(),
    });
    let new = NewVersion::new(
        name,
        ModelKind::Base,
        weights,
        config.into_bytes(),
        imported.tokenizer_json,
    )
    .with_metadata(metadata);
    Ok(registry.publish(new).await?)
}

/// Runs `read` on a blocking thread and logs how long it took.
async fn read_blocking(
    path: &Path,
    read: fn(&Path) -> Result<ImportedModel>,
) -> Result<ImportedModel> {
    let owned: PathBuf = path.to_path_buf();
    let started = Instant::now();
    let imported = match tokio::task::spawn_blocking(move || read(&owned)).await {
        Ok(result) => result?,
        Err(join) => match join.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => {
                return Err(ConvertError::Cancelled {
                    path: path.to_path_buf(),
                })
            }
        },
    };
    tracing::info!(
        source = %path.display(),
        parameters = imported.model.num_parameters(),
        seconds = started.elapsed().as_secs_f64(),
        "converted model"
    );
    Ok(imported)
}

/// SHA-256 of a file, as lowercase hex, for the provenance record.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
