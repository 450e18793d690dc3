//! The reward scorer: takes `Rollout`s from the `rollouts` work queue,
//! which its replicas share, scores each (prompt, response) with the current
//! reward-model version, and publishes a `ScoredRollout` (raw score,
//! normalized score, reward-model version) durably on `scored`.
//!
//! - Hot reload: the scorer follows `ModelAnnouncement`s of kind `reward`
//!   for its reward-model name and switches to a newer version between two
//!   rollouts; a rollout is scored by exactly one version, named in its result.
//! - Tokenizers: when the policy's stored `tokenizer.json` has the same
//!   SHA-256 as the reward model's, the rollout's token ids are reused.
//!   Otherwise, and when the policy version is not in the registry, the
//!   prompt and response text are rendered again through the reward model's
//!   own tokenizer and chat template. The scorer never needs the policy's
//!   weights, so a rollout from an unknown policy version is still scored.
//! - Delivery: the result is published with the message id
//!   `scored-<rollout id>`, so a redelivered rollout is stored once, and the
//!   rollout is acknowledged only after that publish. A rollout that cannot
//!   be decoded or scored is rejected to the dead-letter subject with the reason.
//!
//! - [`settings`]: [`Settings`], flags and environment variables.
//! - [`score`]: turning one rollout into token ids and a score; pure, no bus.
//! - [`service`]: [`run`], the loop on the bus.

pub mod score;
pub mod service;
pub mod settings;

pub use score::{rollout_ids, score_rollout, Tokenization};
pub use service::{run, ScorerSummary};
pub use settings::Settings;

/// Why the scorer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ScorerError {
    #[error("invalid settings:\n  {}", .0.join("\n  "))]
    Settings(Vec<String>),
    #[error(transparent)]
    Reward(#[from] troupe_reward_trainer::RewardError),
    #[error(transparent)]
    Store(#[from] troupe_store::StoreError),
    #[error(transparent)]
    Bus(#[from] troupe_bus::BusError),
}
