//! Stage 3 of troupe, first half: the reward model.
//!
//! A run starts from a stored model version (by default the newest SFT
//! version; any model works, whatever its tokenizer), adds a scalar `score`
//! head, and trains it with the Bradley-Terry pairwise loss on preferences
//! from the ranking intake's dataset or from `{"prompt","chosen","rejected"}`
//! JSONL. All pairs of one prompt form one example, so each candidate is
//! scored once per example. Prompts are split into train and held-out by a
//! hash of their text; held-out loss and pairwise accuracy are logged at
//! each evaluation and stop training early when the loss stops improving.
//! The version with the best held-out loss is published (kind `reward`)
//! with the mean and standard deviation of its scores on the held-out
//! candidates, and announced on the bus.
//!
//! - [`settings`]: [`Settings`], the flags, also parsed from a job's settings map.
//! - [`records`]: reads the ranking intake's preference records.
//! - [`examples`]: groups pairs by prompt, drops tied pairs, splits by prompt.
//! - [`loss`]: the Bradley-Terry loss and held-out accuracy.
//! - [`reward_model`]: rendering, scoring, normalization, publishing and
//!   loading reward versions; the reward scorer uses it too.
//! - [`train`]: the training loop, [`train_reward_model`] for the CLI.
//! - [`service`]: [`run`], the service that takes `JobRequest`s of stage
//!   `reward_model` from the `jobs.reward_model` work queue.
//!
//! Not here: scoring rollouts on the bus (`troupe-reward-scorer`).

pub mod examples;
pub mod loss;
pub mod records;
pub mod reward_model;
pub mod service;
pub mod settings;
pub mod train;

pub use reward_model::{RewardInfo, RewardModel, REWARD_FILE};
pub use service::{job_settings, run, ServiceSettings};
pub use settings::Settings;
pub use train::{train_reward_model, RewardOutcome};

/// Why a reward-model run failed.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("invalid settings:\n  {}", .0.join("\n  "))]
    Settings(Vec<String>),
    #[error(transparent)]
    Data(#[from] troupe_data::DataError),
    #[error("preference record {key}: {reason}")]
    Record { key: String, reason: String },
    #[error("not enough preference data: {reason}")]
    NoData { reason: String },
    #[error("base model: {reason}")]
    Base { reason: String },
    #[error("{model} is not a usable reward model: {reason}")]
    NotAReward { model: String, reason: String },
    #[error("cannot resume job {job_id} from {model}: {reason}")]
    Resume { job_id: String, model: String, reason: String },
    #[error("stopped by shutdown after step {step}; the job resumes from its checkpoint")]
    Interrupted { step: u64 },
    #[error(transparent)]
    Train(#[from] troupe_train::TrainError),
    #[error(transparent)]
    Model(#[from] troupe_model::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Store(#[from] troupe_store::StoreError),
    #[error(transparent)]
    Bus(#[from] troupe_bus::BusError),
}

impl RewardError {
    /// Whether retrying the same job cannot succeed (bad settings, data or
    /// base model), so a job should be rejected rather than delivered again.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            RewardError::Settings(_)
                | RewardError::Data(_)
                | RewardError::Record { .. }
                | RewardError::NoData { .. }
                | RewardError::Base { .. }
                | RewardError::NotAReward { .. }
                | RewardError::Resume { .. }
        )
    }
}
