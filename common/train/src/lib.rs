//! Pieces shared by every troupe trainer, so the pretrainer, the SFT trainer, the
//! reward-model trainer and the PPO learner behave alike.
//!
//! - [`schedule`]: [`LrSchedule`], linear warmup then cosine decay to a floor.
//! - [`accumulate`]: [`GradAccumulator`], gradients summed over micro-batches.
//! - [`checkpoint`]: [`Checkpoint`] and [`Restored`], a complete training state
//!   (weights, AdamW moments, step, data position, RNG, resolved settings,
//!   tokenizer SHA-256) kept as a model version in the registry, and
//!   [`find_job_checkpoint`] to resume a job after a crash.
//! - [`progress`]: [`StepReporter`], the fixed-format line per step, a progress
//!   bar on a terminal and `JobProgress` on the bus.
//! - [`eval`]: held-out loss, unigram entropy and the rate at which sampled
//!   responses end with EOS.
//! - [`job`]: turns a `JobRequest`'s settings map into command-line arguments
//!   for the trainer's clap `Settings`.
//! - [`service`]: [`serve`], the job-service loop that takes a stage's
//!   `JobRequest`s from its durable queue, trains each through the stage's
//!   [`JobStage`] and settles the delivery by the outcome.
//!
//! Not here: the training loops themselves, which stay in each service so each
//! reads top to bottom, and data loading, which differs per stage.

pub mod accumulate;
pub mod checkpoint;
pub mod eval;
pub mod job;
pub mod progress;
pub mod schedule;
pub mod service;

pub use accumulate::GradAccumulator;
pub use checkpoint::{
    announce, find_job_checkpoint, load_checkpoint, manifest_key, save_checkpoint, sha256_hex,
    Checkpoint, Restored, TrainState, TRAIN_STATE_FILE,
};
pub use eval::{eos_rate, mean_loss, unigram_entropy};
pub use job::settings_args;
pub use progress::{DerivedSizes, StepReporter, StepStats};
pub use schedule::LrSchedule;
pub use service::{serve, JobContext, JobQueueSettings, JobStage};

/// Errors of the training helpers.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] troupe_model::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Store(#[from] troupe_store::StoreError),
    #[error(transparent)]
    Bus(#[from] troupe_bus::BusError),
    #[error("checkpoint {model}: {reason}")]
    Checkpoint { model: String, reason: String },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

pub type Result<T> = std::result::Result<T, TrainError>;
