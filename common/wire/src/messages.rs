//! Payload types, one per flow between stages.
//!
//! | flow | type | from | to |
//! | --- | --- | --- | --- |
//! | prompts to sample | [`PromptBatch`] | driver, PPO learner | sampler |
//! | candidates to rank | [`CandidateSet`] | sampler | ranking intake, labeling tools |
//! | a person's or tool's order | [`Ranking`] | web page, tools, `troupe rank` | ranking intake |
//! | verdict on a ranking | [`RankingReceipt`] | ranking intake | the submitter |
//! | preference data grew | [`PreferenceUpdate`] | ranking intake | reward-model trainer |
//! | sampled response | [`Rollout`] | sampler | reward scorer |
//! | scored response | [`ScoredRollout`] | reward scorer | PPO learner |
//! | new model version | [`ModelAnnouncement`] | every trainer | samplers, scorers, drivers |
//! | work for a trainer | [`JobRequest`] | drivers | pretrainer, SFT trainer, ... |
//! | how a job goes | [`JobProgress`] | trainers | drivers, `troupe status` |
//! | a rejected message | [`DeadLetter`] | any consumer | operators |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::{Message, WireError};

/// A stored model version: the registry name and its version number.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: u64,
}

/// Sampling settings, recorded with every output they produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy decoding.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 turns the filter off.
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 turns it off.
    pub top_p: f32,
    /// Maximum number of tokens generated after the prompt.
    pub max_new_tokens: u32,
    /// Seed of the random generator for this request.
    pub seed: u64,
}

impl SamplingParams {
    fn validate(&self) -> Result<(), WireError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return invalid("sampling.temperature", format!("{} must be a finite number >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid("sampling.top_p", format!("{} must be in (0, 1]", self.top_p));
        }
        if self.max_new_tokens == 0 {
            return invalid("sampling.max_new_tokens", "0 leaves nothing to generate; use at least 1".into());
        }
        Ok(())
    }
}

/// Output mode of a sampler for each prompt of a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleMode {
    /// `k` candidates per prompt, published as one [`CandidateSet`] for ranking.
    Candidates { k: u32 },
    /// `n` responses per prompt, each published as a [`Rollout`] for PPO.
    Rollouts { n: u32 },
}

/// One prompt to sample from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// Stable id of the prompt across runs and versions.
    pub prompt_id: String,
    /// The user's message; the sampler renders it with the chat template.
    pub text: String,
    /// A known good answer, if any, for scripted labelers and evaluation.
    pub reference: Option<String>,
}

/// A batch of prompts for the sampler work queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptBatch {
    pub batch_id: String,
    pub mode: SampleMode,
    /// The policy to sample from; `None` means the newest announced version.
    pub policy: Option<ModelRef>,
    pub sampling: SamplingParams,
    pub prompts: Vec<Prompt>,
}

impl Message for PromptBatch {
    const KIND: &'static str = "prompt_batch";

    fn validate(&self) -> Result<(), WireError> {
        require_id("batch_id", &self.batch_id)?;
        self.sampling.validate()?;
        let count = match self.mode {
            SampleMode::Candidates { k } => k,
            SampleMode::Rollouts { n } => n,
        };
        if count == 0 {
            return invalid("mode", "a batch must ask for at least one output per prompt".into());
        }
        if let SampleMode::Candidates { k: 1 } = self.mode {
            return invalid("mode.candidates.k", "ranking needs at least 2 candidates per prompt".into());
        }
        if self.prompts.is_empty() {
            return invalid("prompts", "the batch has no prompts".into());
        }
        for prompt in &self.prompts {
            require_id("prompts[].prompt_id", &prompt.prompt_id)?;
        }
        Ok(())
    }
}

/// Reason generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced its end-of-sequence token.
    Eos,
    /// The response reached `max_new_tokens` without one.
    Length,
}

/// One candidate answer inside a [`CandidateSet`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Id unique within its set; rankings refer to candidates by it.
    pub candidate_id: String,
    pub text: String,
    pub finish_reason: FinishReason,
    pub token_count: u32,
}

/// The k candidates sampled for one prompt, to be ranked by people or tools.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateSet {
    pub set_id: String,
    pub prompt_id: String,
    pub prompt: String,
    pub reference: Option<String>,
    /// The policy version every candidate came from.
    pub policy: ModelRef,
    pub sampling: SamplingParams,
    pub candidates: Vec<Candidate>,
    /// After this time (ms since the epoch) rankings of the set are rejected; `None` never expires.
    pub expires_at_ms: Option<i64>,
}

impl Message for CandidateSet {
    const KIND: &'static str = "candidate_set";

    fn validate(&self) -> Result<(), WireError> {
        require_id("set_id", &self.set_id)?;
        require_id("prompt_id", &self.prompt_id)?;
        self.sampling.validate()?;
        if self.candidates.len() < 2 {
            return invalid("candidates", format!("{} candidates; a set needs at least 2", self.candidates.len()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for candidate in &self.candidates {
            require_id("candidates[].candidate_id", &candidate.candidate_id)?;
            if !seen.insert(candidate.candidate_id.as_str()) {
                return invalid("candidates", format!("candidate id {:?} appears twice", candidate.candidate_id));
            }
        }
        Ok(())
    }
}

/// A person's or a tool's judgement of one candidate set.
///
/// `order` lists groups of candidate ids from best to worst; the ids inside
/// one group are tied. A full ranking `D > C > A > B` is
/// `[["D"], ["C"], ["A"], ["B"]]`, a partial one with a tie `D > C = A > B`
/// is `[["D"], ["C", "A"], ["B"]]`, and a single pairwise choice is
/// `[["A"], ["B"]]`. Candidates left out of `order` are not compared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ranking {
    /// Id of this judgement; the same id delivered twice is stored once.
    pub ranking_id: String,
    pub set_id: String,
    /// Id of the labeler: a person's id or a tool's name.
    pub labeler: String,
    pub order: Vec<Vec<String>>,
    /// Free text from the labeler, stored with the ranking.
    #[serde(default)]
    pub note: Option<String>,
}

impl Message for Ranking {
    const KIND: &'static str = "ranking";

    fn validate(&self) -> Result<(), WireError> {
        require_id("ranking_id", &self.ranking_id)?;
        require_id("set_id", &self.set_id)?;
        require_id("labeler", &self.labeler)?;
        if self.order.len() < 2 {
            return invalid(
                "order",
                "a ranking needs at least two groups (best first), e.g. [[\"A\"], [\"B\"]]".into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for group in &self.order {
            if group.is_empty() {
                return invalid("order", "an empty group; remove it".into());
            }
            for id in group {
                if !seen.insert(id.as_str()) {
                    return invalid("order", format!("candidate id {id:?} appears twice"));
                }
            }
        }
        Ok(())
    }
}

/// The verdict on one [`Ranking`], sent to its reply subject.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankingReceipt {
    pub ranking_id: String,
    pub set_id: String,
    pub accepted: bool,
    /// Reason the ranking was rejected, or `None` when it was accepted.
    pub reason: Option<String>,
    /// Preference pairs the ranking produced (0 when rejected).
    pub pairs: u32,
    /// True when this ranking id was already stored earlier.
    pub duplicate: bool,
}

impl Message for RankingReceipt {
    const KIND: &'static str = "ranking_receipt";
}

/// Notice that a preference dataset gained a record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreferenceUpdate {
    /// Dataset name in the store.
    pub dataset: String,
    /// Id of the record appended (the ranking id).
    pub record_id: String,
    pub set_id: String,
    pub labeler: String,
    /// Pairs in the new record.
    pub pairs: u32,
    /// Records in the dataset after this one.
    pub total_records: u64,
    /// Pairs in the dataset after this one.
    pub total_pairs: u64,
}

impl Message for PreferenceUpdate {
    const KIND: &'static str = "preference_update";
}

/// One sampled response with what PPO needs to train on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub rollout_id: String,
    pub batch_id: String,
    pub prompt_id: String,
    /// The prompt as the user wrote it, before the chat template.
    pub prompt: String,
    /// The rendered prompt's token ids, as the policy saw them.
    pub prompt_tokens: Vec<u32>,
    pub response: String,
    /// Generated token ids, the end-of-sequence token included when present.
    pub response_tokens: Vec<u32>,
    /// Log-probability of each response token at the sampling temperature.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    /// The policy version that produced every token.
    pub policy: ModelRef,
    pub sampling: SamplingParams,
}

impl Message for Rollout {
    const KIND: &'static str = "rollout";

    fn validate(&self) -> Result<(), WireError> {
        self.validate_fields()
    }
}

impl Rollout {
    fn validate_fields(&self) -> Result<(), WireError> {
        require_id("rollout_id", &self.rollout_id)?;
        require_id("prompt_id", &self.prompt_id)?;
        self.sampling.validate()?;
        if self.prompt_tokens.is_empty() {
            return invalid("prompt_tokens", "empty; a rollout needs its prompt's tokens".into());
        }
        if self.logprobs.len() != self.response_tokens.len() {
            return invalid(
                "logprobs",
                format!(
                    "{} log-probs for {} response tokens; there must be one per token",
                    self.logprobs.len(),
                    self.response_tokens.len()
                ),
            );
        }
        if let Some(bad) = self.logprobs.iter().find(|value| !(value.is_finite() && **value <= 0.0)) {
            return invalid("logprobs", format!("{bad} is not a log-probability (finite and <= 0)"));
        }
        Ok(())
    }
}

/// A rollout with its reward-model score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoredRollout {
    pub rollout: Rollout,
    /// The reward model's output before normalization.
    pub raw_score: f32,
    /// The score after the normalization stored with the reward model.
    pub score: f32,
    pub reward_model: ModelRef,
}

impl Message for ScoredRollout {
    const KIND: &'static str = "scored_rollout";

    fn validate(&self) -> Result<(), WireError> {
        self.rollout.validate_fields()?;
        if !(self.raw_score.is_finite() && self.score.is_finite()) {
            return invalid("score", format!("raw {} / normalized {} must be finite", self.raw_score, self.score));
        }
        Ok(())
    }
}

/// The role a model version plays in the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Pretrained or imported base model.
    Base,
    /// Instruction-tuned by supervised fine-tuning.
    Sft,
    /// Reward model with a scalar head.
    Reward,
    /// Policy trained by PPO.
    Policy,
}

/// A model version has been stored; only this notice travels on the bus, never weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelAnnouncement {
    pub model: ModelRef,
    pub kind: ModelKind,
    /// The version it was trained from.
    pub parent: Option<ModelRef>,
    /// Object key of the version's manifest in the store.
    pub manifest_key: String,
    /// Evaluation numbers at publication, by name.
    pub metrics: BTreeMap<String, f64>,
}

impl Message for ModelAnnouncement {
    const KIND: &'static str = "model_announcement";

    fn validate(&self) -> Result<(), WireError> {
        require_id("model.name", &self.model.name)?;
        require_id("manifest_key", &self.manifest_key)
    }
}

/// The stage a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Pretrain,
    Sft,
    RewardModel,
    Ppo,
}

impl Stage {
    /// Returns the stage's name as written on the wire and in subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pretrain => "pretrain",
            Stage::Sft => "sft",
            Stage::RewardModel => "reward_model",
            Stage::Ppo => "ppo",
        }
    }
}

/// Work for a trainer service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub job_id: String,
    pub stage: Stage,
    /// The model version to start from, when the stage has one.
    pub base: Option<ModelRef>,
    /// Registry name under which the job publishes its versions.
    pub output: String,
    /// Input data locations: store keys or dataset names.
    pub inputs: Vec<String>,
    /// Settings by long flag name without dashes (`learning-rate` -> `"3e-4"`),
    /// parsed and validated by the stage exactly like its command-line flags.
    pub settings: BTreeMap<String, String>,
}

impl Message for JobRequest {
    const KIND: &'static str = "job_request";

    fn validate(&self) -> Result<(), WireError> {
        require_id("job_id", &self.job_id)?;
        require_id("output", &self.output)
    }
}

/// State of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

/// Progress of one job, published at each logged step and at the end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    pub job_id: String,
    pub stage: Stage,
    pub state: JobState,
    pub step: u64,
    pub total_steps: u64,
    /// Numbers at this step by name (`loss`, `lr`, `grad_norm`, `tokens_per_s`, ...).
    pub metrics: BTreeMap<String, f64>,
    /// A line for people, such as the failure reason.
    pub message: Option<String>,
}

impl Message for JobProgress {
    const KIND: &'static str = "job_progress";
}

/// A message a consumer rejected, with the reason, kept for operators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Subject the message arrived on.
    pub subject: String,
    /// Its message id, when it had one.
    pub message_id: Option<String>,
    /// The durable consumer that rejected it.
    pub consumer: String,
    pub reason: String,
    /// How many times it had been delivered.
    pub delivered: u64,
    /// Its content-type header, when it had one.
    pub content_type: Option<String>,
    /// The original bytes, unchanged.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl Message for DeadLetter {
    const KIND: &'static str = "dead_letter";
}

fn require_id(field: &'static str, value: &str) -> Result<(), WireError> {
    if value.trim().is_empty() {
        return invalid(field, "empty; it must name something".into());
    }
    Ok(())
}

fn invalid(field: &'static str, reason: String) -> Result<(), WireError> {
    Err(WireError::Invalid { field, reason })
}
