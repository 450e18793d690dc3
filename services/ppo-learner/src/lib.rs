//! The PPO learner of stage 3: takes scored rollouts from the `scored` work
//! queue, trains the policy with PPO and a per-token KL penalty to the
//! frozen SFT reference, and publishes each new policy version to the model
//! registry with an announcement on the bus. It also drives the loop: after
//! each version it publishes the next prompt batch for the samplers.
//!
//! - [`learner`]: one PPO step on a batch, free of bus and store.
//! - [`advantage`]: per-token rewards, GAE, masked whitening, explained variance.
//! - [`kl`]: the k1 and k3 KL estimators and the fixed or adaptive coefficient.
//! - [`prompts`]: the prompt set and the prompt batch of each step.
//! - [`checkpoint`]: policy versions as complete checkpoints, and resume.
//! - [`service`]: [`run`], the loop on the bus.
//! - [`settings`]: [`Settings`], the flags.
//!
//! # The algorithm
//!
//! PPO with a clipped surrogate (Schulman et al. 2017, "Proximal Policy
//! Optimization Algorithms", arXiv:1707.06347) in the RLHF form of Ziegler
//! et al. 2019 (arXiv:1909.08593) and Ouyang et al. 2022 (arXiv:2203.02155):
//! each response token is an action, its reward is `-beta * KL_t` (the
//! estimate for that token, k1 `log π - log π_ref` by default), and the
//! final token also gets the reward model's normalized score clipped to
//! `[-score_clip, score_clip]` plus a penalty when the response has no EOS.
//! Advantages come from GAE on a value head and are whitened over the
//! response tokens of the batch. The loss is the clipped policy surrogate
//! plus `value_coef` times the clipped value loss, over several epochs of
//! minibatches, with global gradient-norm clipping. Log-probs of the policy
//! and the reference are computed at the temperature each rollout was
//! sampled with. The models have no dropout.
//!
//! The value head is a fresh linear head (`value_head`, drawn with `--seed`)
//! on the policy's own trunk, as in Ziegler et al.'s setup: it adds one
//! vector to the policy, works whatever the reward model's base and
//! tokenizer are, and is published with every policy version so a resumed
//! learner keeps it. Its gradients reach the shared trunk, weighted by
//! `--value-coef`.
//!
//! # Staleness
//!
//! A rollout whose policy version is more than `--max-policy-lag` versions
//! behind the learner's is not trained on. It is valid, only old, so it is
//! counted (`troupe_ppo_stale_rollouts_total`, `stale_total` in progress),
//! logged and acknowledged, not dead-lettered. A rollout from another model
//! name, or one that does not fit the policy (too long, unknown token ids),
//! is rejected to the dead-letter subject.
//!
//! # Delivery
//!
//! The learner holds the deliveries of one batch (at most `--batch-size`,
//! which is also the queue's in-flight bound) and extends their deadline
//! while it waits and trains. It acknowledges them only after the version
//! trained on them is stored and announced. A learner killed earlier leaves
//! them unacknowledged, so the queue delivers them again after `--ack-wait`,
//! and the restarted learner resumes from its newest version. The ids of
//! the last step's rollouts are kept in that version, so rollouts that were
//! trained on but not acknowledged before a crash are acknowledged again
//! without a second update. Samplers keep serving the last announced
//! version meanwhile, because nothing else is announced.
//!
//! # Simplifications relative to the published recipes
//!
//! - No pretraining-gradient mix (PPO-ptx of Ouyang et al.).
//! - No entropy bonus; entropy is only measured.
//! - Rewards are not normalized or whitened, only advantages; the reward
//!   model's own normalization and `--score-clip` bound the score.
//! - The value head shares the policy trunk; there is no separate value model
//!   and no value-head warm-up before policy updates.
//! - A response cut at the length limit is treated as a terminal state (no
//!   bootstrapped value after its last token); the missing-EOS penalty
//!   stands in for what continuing would be worth.
//! - The learning rate is constant, with no warmup or decay.
//! - The adaptive KL controller updates once per PPO step, with the batch's
//!   rollout count as `n` in the formula.
//! - `π_old` in the ratio is the sampling policy's recorded log-probs, so
//!   rollouts up to `--max-policy-lag` versions old are corrected by the
//!   ratio and clipping rather than recomputed.
//! - One learner process per job; no data or model parallelism.

pub mod advantage;
pub mod checkpoint;
pub mod kl;
pub mod learner;
pub mod prompts;
pub mod service;
pub mod settings;

pub use kl::{KlController, KlEstimator};
pub use learner::{Learner, PpoConfig, Sample, StepReport, Targets};
pub use service::{run, PpoSummary};
pub use settings::Settings;

/// Why the learner stopped or a step failed.
#[derive(Debug, thiserror::Error)]
pub enum PpoError {
    #[error("invalid settings:\n  {}", .0.join("\n  "))]
    Settings(Vec<String>),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot resume from {model}: {reason}")]
    Resume { model: String, reason: String },
    #[error(transparent)]
    Data(#[from] troupe_data::DataError),
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
