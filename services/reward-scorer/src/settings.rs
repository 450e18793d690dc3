//! The reward scorer's settings: clap flags with environment variables.

use clap::Args;
use serde::Serialize;
use troupe_store::ModelRef;

/// Reward scorer settings. Every flag has a `TROUPE_SCORER_*` environment variable.
#[derive(Args, Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// Registry name of the reward model to score with; the scorer starts
    /// with its newest finished version and follows its announcements.
    #[arg(long, env = "TROUPE_SCORER_REWARD_MODEL", default_value = "reward")]
    pub reward_model: String,

    /// Score with exactly this version (NAME@VERSION) and ignore announcements.
    #[arg(long, env = "TROUPE_SCORER_PIN")]
    pub pin: Option<String>,

    /// Durable queue name on the `rollouts` subject, shared by scorer replicas.
    #[arg(long, env = "TROUPE_SCORER_QUEUE", default_value = "reward-scorer")]
    pub queue: String,

    /// Unacknowledged rollouts allowed at once across all replicas; each
    /// replica scores one at a time, so this bounds rollouts waiting in memory.
    #[arg(long, env = "TROUPE_SCORER_MAX_IN_FLIGHT", default_value_t = 16)]
    pub max_in_flight: usize,

    /// Seconds a rollout may stay unacknowledged before it is delivered again.
    #[arg(long, env = "TROUPE_SCORER_ACK_WAIT", default_value_t = 30)]
    pub ack_wait_secs: u64,

    /// Deliveries of one rollout before it goes to the dead-letter subject.
    #[arg(long, env = "TROUPE_SCORER_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: u64,

    /// Milliseconds before a rollout whose result could not be published is delivered again.
    #[arg(long, env = "TROUPE_SCORER_RETRY_DELAY_MS", default_value_t = 1000)]
    pub retry_delay_ms: u64,

    /// Policy versions whose tokenizer checksum is kept in memory; the
    /// oldest entry is dropped when it is full.
    #[arg(long, env = "TROUPE_SCORER_POLICY_CACHE", default_value_t = 64)]
    pub policy_cache: usize,

    /// Stop after this many rollouts are settled (scored or rejected); 0 runs until shutdown.
    #[arg(long, env = "TROUPE_SCORER_MAX_ROLLOUTS", default_value_t = 0)]
    pub max_rollouts: u64,
}

impl Settings {
    /// Settings with every default, for tests and embedding.
    pub fn new(reward_model: &str) -> Settings {
        Settings {
            reward_model: reward_model.to_string(),
            pin: None,
            queue: "reward-scorer".into(),
            max_in_flight: 16,
            ack_wait_secs: 30,
            max_deliver: 5,
            retry_delay_ms: 1000,
            policy_cache: 64,
            max_rollouts: 0,
        }
    }

    /// The pinned version, if any, or the reason it does not parse.
    pub fn pinned(&self) -> Result<Option<ModelRef>, String> {
        self.pin.as_deref().map(|pin| pin.parse().map_err(|e| format!("--pin {pin}: {e}"))).transpose()
    }

    /// Checks every setting and returns all problems at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.reward_model.trim().is_empty() {
            problems.push("--reward-model: must name the reward model".to_string());
        }
        if let Err(problem) = self.pinned() {
            problems.push(problem);
        }
        if self.max_in_flight == 0 {
            problems.push("--max-in-flight: use at least 1".into());
        }
        if self.ack_wait_secs == 0 {
            problems.push("--ack-wait-secs: use at least 1 second".into());
        }
        if self.max_deliver == 0 {
            problems.push("--max-deliver: use at least 1".into());
        }
        if self.policy_cache == 0 {
            problems.push("--policy-cache: use at least 1".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
