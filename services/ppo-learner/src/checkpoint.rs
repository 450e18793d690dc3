//! Policy versions as complete PPO checkpoints, and resuming from them.
//!
//! Every PPO step publishes one policy version, and that version is both the
//! weight sync for samplers and the learner's checkpoint:
//!
//! | file | contents |
//! | --- | --- |
//! | `model.safetensors` | policy weights with `value_head.weight` and `value_head.bias` |
//! | `config.json`, `tokenizer.json` | the reference's config and tokenizer |
//! | `optimizer.safetensors` | AdamW moments and step count |
//! | `train_state.json` | the shared [`TrainState`]: job id, step, metrics |
//! | `ppo_state.json` | [`PpoState`]: KL controller, reference, seed, the rollouts of the last step, settings |
//!
//! The registry writes the manifest last, so a reader never sees half a
//! version. The minibatch shuffle and the prompt batches derive from the
//! seed and the step number, so the seed and step are the whole random state.

use bytes::Bytes;
use candle_core::Device;
use serde::{Deserialize, Serialize};
use troupe_model::{Heads, Model, Tokenizer};
use troupe_store::{Manifest, ModelKind, ModelRef, ModelRegistry, NewVersion};
use troupe_train::{sha256_hex, TrainState, TRAIN_STATE_FILE};

use crate::kl::KlController;
use crate::learner::{Learner, PpoConfig};
use crate::PpoError;

/// Name of the PPO state file inside a policy version.
pub const PPO_STATE_FILE: &str = "ppo_state.json";

/// The state a resumed learner needs besides weights and optimizer moments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PpoState {
    pub job_id: String,
    /// PPO steps completed.
    pub step: u64,
    pub total_steps: u64,
    pub kl_controller: KlController,
    /// The frozen reference, pinned to a version at the start of the run.
    pub reference: ModelRef,
    pub config: PpoConfig,
    /// Ids of the rollouts trained on in the step that produced this
    /// version. After a crash between publishing the version and
    /// acknowledging them, they come back and are acknowledged untrained.
    pub trained_rollouts: Vec<String>,
    pub finished: bool,
}

/// A policy version ready to continue from.
pub struct Resumed {
    pub manifest: Manifest,
    pub learner: Learner,
    pub tokenizer: Tokenizer,
    pub state: PpoState,
}

/// Loads `reference` and builds the starting policy: a copy of it with a
/// fresh value head drawn with `seed`.
pub async fn start_from_reference(
    registry: &ModelRegistry,
    reference: &ModelRef,
    kl: KlController,
    config: PpoConfig,
) -> Result<(Learner, Tokenizer), PpoError> {
    let device = Device::Cpu;
    let restored = troupe_train::load_checkpoint(registry, reference, &device).await?;
    let weights = restored.model.to_safetensors()?;
    let mut policy = Model::from_safetensors_bytes(restored.model.config(), &weights, &device)?;
    policy.add_heads(Heads { score: false, value: true }, config.seed)?;
    let pad = restored.tokenizer.pad_id().unwrap_or(0);
    let learner = Learner::new(policy, restored.model, kl, config, pad)?;
    Ok((learner, restored.tokenizer))
}

/// Loads the policy version `manifest` and its reference and restores the learner.
pub async fn resume(registry: &ModelRegistry, manifest: Manifest) -> Result<Resumed, PpoError> {
    let device = Device::Cpu;
    let model = manifest.model_ref();
    let fail = |reason: String| PpoError::Resume { model: model.to_string(), reason };
    let state_bytes = registry.load_file(&model, PPO_STATE_FILE).await?;
    let state: PpoState = serde_json::from_slice(&state_bytes).map_err(|e| fail(format!("{PPO_STATE_FILE} is invalid: {e}")))?;
    let restored = troupe_train::load_checkpoint(registry, &model, &device).await?;
    let optimizer = restored.optimizer_state.ok_or_else(|| fail("the version has no optimizer state".into()))?;
    let reference = troupe_train::load_checkpoint(registry, &state.reference, &device).await?;
    if sha256_hex(reference.tokenizer.to_json()?.as_bytes()) != sha256_hex(restored.tokenizer.to_json()?.as_bytes()) {
        return Err(fail(format!("its tokenizer differs from the reference {}'s", state.reference)));
    }
    let pad = restored.tokenizer.pad_id().unwrap_or(0);
    let mut learner = Learner::new(restored.model, reference.model, state.kl_controller.clone(), state.config.clone(), pad)?;
    learner.restore(&optimizer, state.step)?;
    Ok(Resumed { manifest: restored.manifest, learner, tokenizer: restored.tokenizer, state })
}

/// Publishes the learner's policy as the next version of `name`, with every
/// file of a complete checkpoint; the manifest is written last.
#[allow(clippy::too_many_arguments)]
pub async fn publish(
    registry: &ModelRegistry,
    name: &str,
    parent: ModelRef,
    learner: &Learner,
    tokenizer: &Tokenizer,
    state: &PpoState,
    metrics: &std::collections::BTreeMap<String, f64>,
    settings: serde_json::Value,
) -> Result<Manifest, PpoError> {
    let tokenizer_json = tokenizer.to_json()?;
    let encode = |what: &str, value: serde_json::Result<Vec<u8>>| {
        value.map_err(|e| PpoError::Resume { model: name.to_string(), reason: format!("cannot encode {what}: {e}") })
    };
    let train_state = TrainState {
        job_id: state.job_id.clone(),
        step: state.step,
        total_steps: state.total_steps,
        data_position: serde_json::json!({ "prompt_step": state.step }),
        rng: serde_json::json!({ "seed": state.config.seed, "step": state.step }),
        finished: state.finished,
        metrics: metrics.clone(),
    };
    let metadata = serde_json::json!({
        "job_id": state.job_id,
        "step": state.step,
        "total_steps": state.total_steps,
        "finished": state.finished,
        "tokenizer_sha256": sha256_hex(tokenizer_json.as_bytes()),
        "parameters": learner.policy().num_parameters(),
        "reference": state.reference.to_string(),
        "kl_coef": learner.kl_controller().coef(),
        "metrics": metrics,
        "settings": settings,
    });
    let version = NewVersion::new(
        name,
        ModelKind::Policy,
        Bytes::from(learner.policy().to_safetensors()?),
        Bytes::from(learner.policy().config().to_json_string()),
        Bytes::from(tokenizer_json),
    )
    .with_parent(parent)
    .with_metadata(metadata)
    .with_optimizer_state(Bytes::from(learner.optimizer().to_safetensors()?))
    .with_file(TRAIN_STATE_FILE, Bytes::from(encode("the training state", serde_json::to_vec_pretty(&train_state))?))
    .with_file(PPO_STATE_FILE, Bytes::from(encode("the PPO state", serde_json::to_vec_pretty(state))?));
    Ok(registry.publish(version).await?)
}
