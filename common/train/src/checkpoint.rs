//! Complete training checkpoints kept as model versions in the registry.
//!
//! A checkpoint is an ordinary model version (so any checkpoint can be
//! loaded, exported or used as a base) with two more files:
//!
//! | file | contents |
//! | --- | --- |
//! | `model.safetensors`, `config.json`, `tokenizer.json` | weights, resolved model config, tokenizer |
//! | `optimizer.safetensors` | AdamW moments, step count and hyperparameters |
//! | `train_state.json` | [`TrainState`]: job id, step, data position, RNG, metrics |
//!
//! The manifest metadata repeats the job id, step, the `finished` flag, the
//! tokenizer's SHA-256 and the trainer's resolved settings, so that
//! [`find_job_checkpoint`] can pick a job's newest checkpoint from manifests
//! alone. The registry writes the manifest last, so a crash while saving
//! leaves no half-visible checkpoint.

use std::collections::BTreeMap;

use bytes::Bytes;
use candle_core::Device;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use troupe_bus::BusHandle;
use troupe_model::{AdamW, Config, Model, Tokenizer};
use troupe_store::{
    Manifest, ModelKind, ModelRef, ModelRegistry, NewVersion, MANIFEST_FILE, MODELS_PREFIX,
};
use troupe_wire::{Envelope, ModelAnnouncement};

use crate::{Result, TrainError};

/// Name of the training-state file inside a checkpoint version.
pub const TRAIN_STATE_FILE: &str = "train_state.json";

/// Everything besides weights and optimizer moments that a resumed run needs
/// to continue exactly where the saved one stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// The job this run belongs to; a restart looks checkpoints up by it.
    pub job_id: String,
    /// Optimizer steps completed; the next step to run has this index.
    pub step: u64,
    /// Optimizer steps the run was planned for.
    pub total_steps: u64,
    /// Position of the data loader, in the loader's own terms.
    pub data_position: serde_json::Value,
    /// The loader's random-generator state (seed and draws so far).
    pub rng: serde_json::Value,
    /// Set on the version published when the run completed.
    pub finished: bool,
    /// Numbers at this step by name (`train_loss`, `heldout_loss`, ...).
    pub metrics: BTreeMap<String, f64>,
}

/// Contents of a checkpoint, as [`save_checkpoint`] stores them.
pub struct Checkpoint<'a> {
    /// Registry name of the model the run publishes.
    pub name: &'a str,
    pub kind: ModelKind,
    /// The version training started from, recorded as the lineage parent.
    pub parent: Option<ModelRef>,
    pub model: &'a Model,
    pub optimizer: &'a AdamW,
    pub tokenizer: &'a Tokenizer,
    pub state: &'a TrainState,
    /// The trainer's resolved settings, saved for people and for resume checks.
    pub settings: serde_json::Value,
}

/// A checkpoint read back from the registry.
pub struct Restored {
    pub manifest: Manifest,
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// AdamW state for [`AdamW::load_safetensors`]; absent in plain model versions.
    pub optimizer_state: Option<Bytes>,
    /// Absent in versions that were not written by a troupe trainer.
    pub state: Option<TrainState>,
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Object key of the manifest of `model`, as announcements carry it.
pub fn manifest_key(model: &ModelRef) -> String {
    format!(
        "{MODELS_PREFIX}/{}/{:08}/{MANIFEST_FILE}",
        model.name, model.version
    )
}

/// Checks that every id `tokenizer` can produce is a row of the model's
/// embedding and that both agree on the end-of-sequence token.
pub fn check_tokenizer_matches(tokenizer: &Tokenizer, config: &Config) -> Result<()> {
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(TrainError::Invalid {
            what: "tokenizer",
            reason: format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}; use the tokenizer the model was \
                 trained with, or set the vocabulary size to {}",
                tokenizer.vocab_size(),
                config.vocab_size,
                tokenizer.vocab_size()
            ),
        });
    }
    if let (Some(eos), Some(config_eos)) = (tokenizer.eos_id(), config.eos()) {
        if !config.eos_token_id.contains(&eos) {
            return Err(TrainError::Invalid {
                what: "tokenizer",
                reason: format!("the tokenizer's EOS id is {eos} but the model config's eos_token_id is {config_eos}"),
            });
        }
    }
    Ok(())
}

/// Publishes a complete checkpoint as the next version of `checkpoint.name`
/// and returns its manifest.
pub async fn save_checkpoint(
    registry: &ModelRegistry,
    checkpoint: Checkpoint<'_>,
) -> Result<Manifest> {
    let config = checkpoint.model.config();
    let weights = checkpoint.model.to_safetensors()?;
    let optimizer = checkpoint.optimizer.to_safetensors()?;
    let tokenizer_json = checkpoint.tokenizer.to_json()?;
    let tokenizer_sha256 = sha256_hex(tokenizer_json.as_bytes());
    let state = checkpoint.state;
    let state_json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Checkpoint {
        model: checkpoint.name.to_string(),
        reason: format!("the training state cannot be encoded as JSON: {e}"),
    })?;
    let metadata = serde_json::json!({
        "job_id": state.job_id,
        "step": state.step,
        "total_steps": state.total_steps,
        "finished": state.finished,
        "tokenizer_sha256": tokenizer_sha256,
        "parameters": checkpoint.model.num_parameters(),
        "metrics": state.metrics,
        "settings": checkpoint.settings,
    });

    let mut version = NewVersion::new(
        checkpoint.name,
        checkpoint.kind,
        Bytes::from(weights),
        Bytes::from(config.to_json_string()),
        Bytes::from(tokenizer_json),
    )
    .with_metadata(metadata)
    .with_optimizer_state(Bytes::from(optimizer))
    .with_file(TRAIN_STATE_FILE, Bytes::from(state_json));
    if let Some(parent) = checkpoint.parent {
        version = version.with_parent(parent);
    }
    Ok(registry.publish(version).await?)
}

/// Loads `model` from the registry: weights, tokenizer (checked against the
/// SHA-256 in the manifest when there is one), optimizer and training state.
pub async fn load_checkpoint(
    registry: &ModelRegistry,
    model: &ModelRef,
    device: &Device,
) -> Result<Restored> {
    let loaded = registry.load(model).await?;
    let fail = |reason: String| TrainError::Checkpoint {
        model: model.to_string(),
        reason,
    };

    let config_text = std::str::from_utf8(loaded.config())
        .map_err(|e| fail(format!("config.json is not UTF-8: {e}")))?;
    let config = Config::from_json_str(config_text)?;
    let weights = Model::from_safetensors_bytes(&config, loaded.weights(), device)?;
    let tokenizer_bytes = loaded.tokenizer();
    if let Some(expected) = loaded
        .manifest
        .metadata
        .get("tokenizer_sha256")
        .and_then(|v| v.as_str())
    {
        let actual = sha256_hex(tokenizer_bytes);
        if actual != expected {
            return Err(fail(format!(
                "tokenizer.json has SHA-256 {actual}, the manifest metadata records {expected}"
            )));
        }
    }
    let tokenizer = Tokenizer::from_bytes(tokenizer_bytes)?;
    check_tokenizer_matches(&tokenizer, &config)?;

    let state = match loaded.file(TRAIN_STATE_FILE) {
        Some(bytes) => Some(serde_json::from_slice::<TrainState>(bytes).map_err(|e| {
            fail(format!(
                "{TRAIN_STATE_FILE} is not a valid training state: {e}"
            ))
        })?),
        None => None,
    };
    let optimizer_state = loaded.file(troupe_store::OPTIMIZER_FILE).cloned();
    Ok(Restored {
        manifest: loaded.manifest,
        model: weights,
        tokenizer,
        optimizer_state,
        state,
    })
}

/// The manifest of the newest version of `name` that job `job_id` published,
/// or `None` when the job has published nothing yet.
///
/// Reads manifests from the newest version down, so its cost grows with the
/// versions published after the job's last checkpoint.
pub async fn find_job_checkpoint(
    registry: &ModelRegistry,
    name: &str,
    job_id: &str,
) -> Result<Option<Manifest>> {
    let versions = registry.list_versions(name).await?;
    for version in versions.into_iter().rev() {
        let manifest = registry.manifest(&ModelRef::new(name, version)).await?;
        if manifest.metadata.get("job_id").and_then(|v| v.as_str()) == Some(job_id) {
            return Ok(Some(manifest));
        }
    }
    Ok(None)
}

/// Announces a published version on the `models` subject. The message id is
/// derived from the version, so announcing one version twice (after a crash
/// between publish and announce) stores one message.
pub async fn announce(
    bus: &BusHandle,
    manifest: &Manifest,
    metrics: BTreeMap<String, f64>,
) -> Result<()> {
    let wire_ref = |m: &ModelRef| troupe_wire::ModelRef {
        name: m.name.clone(),
        version: m.version,
    };
    let model = manifest.model_ref();
    let announcement = ModelAnnouncement {
        model: wire_ref(&model),
        kind: match manifest.kind {
            ModelKind::Base => troupe_wire::ModelKind::Base,
            ModelKind::Sft => troupe_wire::ModelKind::Sft,
            ModelKind::Reward => troupe_wire::ModelKind::Reward,
            ModelKind::Policy => troupe_wire::ModelKind::Policy,
        },
        parent: manifest.parent.as_ref().map(wire_ref),
        manifest_key: manifest_key(&model),
        metrics,
    };
    let run = bus.subjects().run().to_string();
    let id = format!("model-{}-{}", model.name, model.version);
    let envelope = Envelope::with_id(run, id, troupe_wire::codec::now_ms(), announcement);
    bus.publish_durable(&bus.subjects().models(), &envelope)
        .await?;
    Ok(())
}
