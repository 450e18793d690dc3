//! A reward model: a Llama-family model with a scalar `score` head, its
//! tokenizer and chat template, and the score normalization stored with it.
//!
//! A (prompt, response) pair is rendered as the user turn, the opening of
//! the assistant turn and the response's tokens, followed by the
//! end-of-sequence token only when the response ended with it. The score is
//! read at the last real token of each row, found from the attention mask,
//! so padding (left or right) and the pad id never change it.
//!
//! Reward versions carry [`REWARD_FILE`] (normalization, snapshot of the
//! preference data, held-out numbers) and the same object under the
//! `reward` key of the manifest metadata.

use std::collections::BTreeMap;

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use troupe_model::{AdamW, Model, Tokenizer};
use troupe_store::{Manifest, ModelKind, ModelRef, ModelRegistry, NewVersion, TOKENIZER_FILE};
use troupe_train::{load_checkpoint, sha256_hex, TrainState, TRAIN_STATE_FILE};

use crate::records::DatasetSnapshot;
use crate::RewardError;

/// File in a reward version with its [`RewardInfo`].
pub const REWARD_FILE: &str = "reward.json";

/// Smallest standard deviation used to normalize; a reference set with
/// (nearly) equal scores would otherwise blow normalized scores up.
pub const MIN_NORMALIZATION_STD: f64 = 1e-6;

/// Which side of a row holds the padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadSide {
    Left,
    Right,
}

/// Mean and standard deviation of raw scores on a reference set; a
/// normalized score is `(raw - mean) / std`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: f64,
    pub std: f64,
    /// What the statistics were measured on, such as `held-out candidates`.
    pub reference: String,
    /// Responses in the reference set.
    pub count: usize,
}

impl Normalization {
    /// No change: mean 0, std 1.
    pub fn identity() -> Normalization {
        Normalization { mean: 0.0, std: 1.0, reference: "none".into(), count: 0 }
    }

    /// Measures the mean and population standard deviation of `scores`.
    pub fn measure(scores: &[f32], reference: &str) -> Normalization {
        if scores.is_empty() {
            return Normalization { reference: format!("{reference} (empty; identity used)"), ..Normalization::identity() };
        }
        let n = scores.len() as f64;
        let mean = scores.iter().map(|&s| f64::from(s)).sum::<f64>() / n;
        let variance = scores.iter().map(|&s| (f64::from(s) - mean).powi(2)).sum::<f64>() / n;
        Normalization { mean, std: variance.sqrt(), reference: reference.to_string(), count: scores.len() }
    }

    pub fn apply(&self, raw: f32) -> f32 {
        ((f64::from(raw) - self.mean) / self.std.max(MIN_NORMALIZATION_STD)) as f32
    }
}

/// What a reward version records about its training, in [`REWARD_FILE`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RewardInfo {
    pub normalization: Normalization,
    /// The preference datasets read, and how far.
    pub datasets: Vec<DatasetSnapshot>,
    /// JSONL preference files trained on, with their SHA-256.
    pub jsonl: Vec<JsonlSnapshot>,
    pub train_examples: usize,
    pub heldout_examples: usize,
    pub heldout_pairs: usize,
    pub heldout_accuracy: f64,
    pub heldout_loss: f64,
    /// Optimizer step whose weights these are (the best held-out loss).
    pub best_step: u64,
    /// Whether early stopping ended the run before `--steps`.
    pub stopped_early: bool,
    /// Longest rendered prompt and response scored, in tokens.
    pub max_tokens: usize,
}

/// A JSONL preference file a run read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonlSnapshot {
    pub path: String,
    pub sha256: String,
    pub lines: usize,
}

/// Renders `prompt` and `response` through `tokenizer`'s chat template:
/// the prompt's user turn, the assistant opening, the response tokens and,
/// when `ends_with_eos`, the end-of-sequence token. A result longer than
/// `max_tokens` keeps its last `max_tokens` tokens, where the score is read.
pub fn render_candidate(
    tokenizer: &Tokenizer,
    prompt: &str,
    response: &str,
    ends_with_eos: bool,
    max_tokens: usize,
) -> Result<Vec<u32>, troupe_model::Error> {
    let mut ids = tokenizer.render_prompt(prompt)?;
    ids.extend(tokenizer.encode(response)?);
    if ends_with_eos {
        let eos = tokenizer
            .eos_id()
            .ok_or_else(|| troupe_model::Error::Tokenizer("the tokenizer has no end-of-sequence token".into()))?;
        ids.push(eos);
    }
    Ok(keep_last(ids, max_tokens))
}

/// Keeps the last `max_tokens` ids.
pub fn keep_last(mut ids: Vec<u32>, max_tokens: usize) -> Vec<u32> {
    if ids.len() > max_tokens {
        ids.drain(..ids.len() - max_tokens);
    }
    ids
}

/// Pads `rows` to one length with `pad_id` on `side`: ids `(b, t)` u32 and
/// the attention mask `(b, t)` with 1 for real tokens.
pub fn pad_rows(rows: &[Vec<u32>], pad_id: u32, side: PadSide, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    for row in rows {
        let padding = width - row.len();
        if side == PadSide::Left {
            ids.extend(std::iter::repeat_n(pad_id, padding));
            mask.extend(std::iter::repeat_n(0u8, padding));
        }
        ids.extend_from_slice(row);
        mask.extend(std::iter::repeat_n(1u8, row.len()));
        if side == PadSide::Right {
            ids.extend(std::iter::repeat_n(pad_id, padding));
            mask.extend(std::iter::repeat_n(0u8, padding));
        }
    }
    let ids = Tensor::from_vec(ids, (rows.len(), width), device)?;
    let mask = Tensor::from_vec(mask, (rows.len(), width), device)?;
    Ok((ids, mask))
}

/// Scores `rows` in one forward pass: a differentiable `(rows,)` tensor.
/// Every row needs at least one token.
pub fn score_rows(model: &Model, rows: &[Vec<u32>], pad_id: u32, side: PadSide) -> Result<Tensor, troupe_model::Error> {
    if let Some(empty) = rows.iter().position(Vec::is_empty) {
        return Err(troupe_model::Error::Request(format!("row {empty} has no tokens to score")));
    }
    let (ids, mask) = pad_rows(rows, pad_id, side, model.device())?;
    // hidden: (b, t, hidden)
    let hidden = model.forward_hidden(&ids, Some(&mask))?;
    model.scores(&hidden, Some(&mask))
}

/// Scores `rows` in chunks of at most `chunk` rows, without gradients.
pub fn score_values(
    model: &Model,
    rows: &[Vec<u32>],
    pad_id: u32,
    chunk: usize,
) -> Result<Vec<f32>, troupe_model::Error> {
    let mut scores = Vec::with_capacity(rows.len());
    for part in rows.chunks(chunk.max(1)) {
        let values = score_rows(model, part, pad_id, PadSide::Right)?.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?;
        scores.extend(values);
    }
    Ok(scores)
}

/// A published reward model, loaded for scoring.
pub struct RewardModel {
    pub model_ref: ModelRef,
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// SHA-256 of the version's stored `tokenizer.json` (from its manifest),
    /// to compare with a policy's.
    pub tokenizer_sha256: String,
    pub pad_id: u32,
    pub normalization: Normalization,
    /// Longest rendered input; longer ones keep their last tokens.
    pub max_tokens: usize,
}

impl RewardModel {
    /// Loads `model_ref` from the registry, checking that it has a score head,
    /// a chat template and a reward file.
    pub async fn load(registry: &ModelRegistry, model_ref: &ModelRef) -> Result<RewardModel, RewardError> {
        let restored = load_checkpoint(registry, model_ref, &Device::Cpu).await?;
        let invalid = |reason: String| RewardError::NotAReward { model: model_ref.to_string(), reason };
        if !restored.model.heads().score {
            return Err(invalid("it has no score head (score.weight); train one with the reward-model trainer".into()));
        }
        let pad_id = restored.tokenizer.pad_id().ok_or_else(|| invalid("its tokenizer has no padding token".into()))?;
        let info_bytes = registry.load_file(model_ref, REWARD_FILE).await?;
        let info: RewardInfo = serde_json::from_slice(&info_bytes)
            .map_err(|error| invalid(format!("{REWARD_FILE} does not decode: {error}")))?;
        // The manifest's checksum of the stored file, as for a policy version.
        let tokenizer_sha256 = restored
            .manifest
            .file(TOKENIZER_FILE)
            .map(|entry| entry.sha256.clone())
            .ok_or_else(|| invalid(format!("its manifest lists no {TOKENIZER_FILE}")))?;
        let max_tokens = info.max_tokens.min(restored.model.config().max_position_embeddings);
        Ok(RewardModel {
            model_ref: model_ref.clone(),
            model: restored.model,
            tokenizer: restored.tokenizer,
            tokenizer_sha256,
            pad_id,
            normalization: info.normalization,
            max_tokens,
        })
    }

    /// Renders a (prompt, response) pair with this model's template.
    pub fn render(&self, prompt: &str, response: &str, ends_with_eos: bool) -> Result<Vec<u32>, troupe_model::Error> {
        render_candidate(&self.tokenizer, prompt, response, ends_with_eos, self.max_tokens)
    }

    /// Raw scores of token rows, in one forward pass.
    pub fn score_ids(&self, rows: &[Vec<u32>]) -> Result<Vec<f32>, troupe_model::Error> {
        score_values(&self.model, rows, self.pad_id, rows.len())
    }

    /// Returns (raw, normalized) scores of one (prompt, response) pair.
    pub fn score_text(&self, prompt: &str, response: &str, ends_with_eos: bool) -> Result<(f32, f32), troupe_model::Error> {
        let raw = self.score_ids(&[self.render(prompt, response, ends_with_eos)?])?[0];
        Ok((raw, self.normalization.apply(raw)))
    }
}

/// What [`publish_reward_version`] stores.
pub struct RewardVersion<'a> {
    pub name: &'a str,
    /// The model training started from; the lineage parent.
    pub parent: Option<ModelRef>,
    pub model: &'a Model,
    pub optimizer: &'a AdamW,
    pub tokenizer: &'a Tokenizer,
    pub state: &'a TrainState,
    pub settings: serde_json::Value,
    pub info: &'a RewardInfo,
}

/// Publishes a reward version: the files and metadata of a `troupe-train`
/// checkpoint (so `load_checkpoint` and `find_job_checkpoint` read it),
/// plus [`REWARD_FILE`] and the same object under metadata key `reward`.
///
/// NOTE: this repeats `troupe_train::save_checkpoint` because that function
/// takes no extra files or metadata; keep the two layouts equal.
pub async fn publish_reward_version(registry: &ModelRegistry, version: RewardVersion<'_>) -> Result<Manifest, RewardError> {
    let encode = |what: &str, result: serde_json::Result<Vec<u8>>| {
        result.map_err(|error| RewardError::NotAReward {
            model: version.name.to_string(),
            reason: format!("{what} cannot be encoded as JSON: {error}"),
        })
    };
    let tokenizer_json = version.tokenizer.to_json()?;
    let state = version.state;
    let reward_json = encode(REWARD_FILE, serde_json::to_vec_pretty(version.info))?;
    let state_json = encode(TRAIN_STATE_FILE, serde_json::to_vec_pretty(state))?;
    let metadata = serde_json::json!({
        "job_id": state.job_id,
        "step": state.step,
        "total_steps": state.total_steps,
        "finished": state.finished,
        "tokenizer_sha256": sha256_hex(tokenizer_json.as_bytes()),
        "parameters": version.model.num_parameters(),
        "metrics": state.metrics,
        "settings": version.settings,
        "reward": version.info,
    });
    let mut new = NewVersion::new(
        version.name,
        ModelKind::Reward,
        Bytes::from(version.model.to_safetensors()?),
        Bytes::from(version.model.config().to_json_string()),
        Bytes::from(tokenizer_json),
    )
    .with_metadata(metadata)
    .with_optimizer_state(Bytes::from(version.optimizer.to_safetensors()?))
    .with_file(TRAIN_STATE_FILE, Bytes::from(state_json))
    .with_file(REWARD_FILE, Bytes::from(reward_json));
    if let Some(parent) = version.parent {
        new = new.with_parent(parent);
    }
    Ok(registry.publish(new).await?)
}

/// The newest finished reward version of `name` (a version whose training
/// state says `finished`), skipping intermediate checkpoints.
pub async fn latest_finished(registry: &ModelRegistry, name: &str) -> Result<Option<ModelRef>, RewardError> {
    for version in registry.list_versions(name).await?.into_iter().rev() {
        let model = ModelRef::new(name, version);
        let manifest = registry.manifest(&model).await?;
        let finished = manifest.metadata.get("finished").and_then(|v| v.as_bool()).unwrap_or(true);
        if manifest.kind == ModelKind::Reward && finished {
            return Ok(Some(model));
        }
    }
    Ok(None)
}

/// Metrics of a reward version for announcements, by name.
pub fn announcement_metrics(info: &RewardInfo) -> BTreeMap<String, f64> {
    BTreeMap::from([
        ("heldout_accuracy".to_string(), info.heldout_accuracy),
        ("heldout_loss".to_string(), info.heldout_loss),
        ("score_mean".to_string(), info.normalization.mean),
        ("score_std".to_string(), info.normalization.std),
    ])
}
