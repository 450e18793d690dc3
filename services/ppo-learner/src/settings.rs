//! The learner's flags, each also read from a `TROUPE_PPO_*` environment
//! variable, and their checks.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::kl::{KlController, KlEstimator};
use crate::learner::PpoConfig;

/// Settings of the PPO learner.
#[derive(Args, Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// The frozen reference and starting point: a registry name (its newest
    /// version) or NAME@VERSION, normally the SFT model.
    #[arg(long = "reference", env = "TROUPE_PPO_REFERENCE", default_value = "sft")]
    pub reference: String,

    /// Registry name under which policy versions are published; samplers follow it.
    #[arg(long = "policy", env = "TROUPE_PPO_POLICY", default_value = "policy")]
    pub policy: String,

    /// Id of this PPO run. A learner restarted with the same id resumes from
    /// the newest policy version the run published.
    #[arg(long = "job-id", env = "TROUPE_PPO_JOB_ID", default_value = "ppo")]
    pub job_id: String,

    /// JSONL files of prompts (`{"prompt", "response"}` or `{"messages"}`,
    /// as for SFT); the response becomes the prompt's reference answer.
    /// Comma-separated in the environment variable.
    #[arg(long = "prompts", env = "TROUPE_PPO_PROMPTS", value_delimiter = ',', required = false)]
    pub prompts: Vec<PathBuf>,

    /// PPO steps to run; each publishes one policy version.
    #[arg(long = "steps", env = "TROUPE_PPO_STEPS", default_value_t = 20)]
    pub steps: u64,

    /// Scored rollouts per PPO step. It is also the queue's in-flight bound,
    /// because the learner keeps a whole batch unacknowledged until it is trained on.
    #[arg(long = "batch-size", env = "TROUPE_PPO_BATCH_SIZE", default_value_t = 16)]
    pub batch_size: usize,

    /// Rollouts sampled per prompt; must divide --batch-size.
    #[arg(long = "rollouts-per-prompt", env = "TROUPE_PPO_ROLLOUTS_PER_PROMPT", default_value_t = 4)]
    pub rollouts_per_prompt: u32,

    /// Rollouts per optimizer step.
    #[arg(long = "minibatch-size", env = "TROUPE_PPO_MINIBATCH_SIZE", default_value_t = 8)]
    pub minibatch_size: usize,

    /// Passes over each PPO batch.
    #[arg(long = "epochs", env = "TROUPE_PPO_EPOCHS", default_value_t = 4)]
    pub epochs: usize,

    /// AdamW learning rate (constant).
    #[arg(long = "learning-rate", env = "TROUPE_PPO_LEARNING_RATE", default_value_t = 1e-5)]
    pub learning_rate: f64,

    /// Global gradient-norm bound per optimizer step.
    #[arg(long = "max-grad-norm", env = "TROUPE_PPO_MAX_GRAD_NORM", default_value_t = 1.0)]
    pub max_grad_norm: f64,

    /// Policy ratio clip epsilon.
    #[arg(long = "clip-range", env = "TROUPE_PPO_CLIP_RANGE", default_value_t = 0.2)]
    pub clip_range: f64,

    /// Value clip: how far, in reward units, a new value may move from the old one.
    #[arg(long = "value-clip-range", env = "TROUPE_PPO_VALUE_CLIP_RANGE", default_value_t = 0.2)]
    pub value_clip_range: f64,

    /// Weight of the value loss next to the policy loss.
    #[arg(long = "value-coef", env = "TROUPE_PPO_VALUE_COEF", default_value_t = 0.1)]
    pub value_coef: f64,

    /// Discount per token, in [0, 1].
    #[arg(long = "gamma", env = "TROUPE_PPO_GAMMA", default_value_t = 1.0)]
    pub gamma: f64,

    /// GAE lambda, in [0, 1].
    #[arg(long = "lambda", env = "TROUPE_PPO_LAMBDA", default_value_t = 0.95)]
    pub lambda: f64,

    /// KL coefficient (the start value when --kl-target is set).
    #[arg(long = "kl-coef", env = "TROUPE_PPO_KL_COEF", default_value_t = 0.05)]
    pub kl_coef: f64,

    /// Per-sequence KL in nats for the adaptive coefficient; unset keeps the coefficient fixed.
    #[arg(long = "kl-target", env = "TROUPE_PPO_KL_TARGET")]
    pub kl_target: Option<f64>,

    /// Rollouts over which the adaptive coefficient may change by a factor of about 1 ± --kl-clip.
    #[arg(long = "kl-horizon", env = "TROUPE_PPO_KL_HORIZON", default_value_t = 10000.0)]
    pub kl_horizon: f64,

    /// Bound on the adaptive controller's proportional error.
    #[arg(long = "kl-clip", env = "TROUPE_PPO_KL_CLIP", default_value_t = 0.2)]
    pub kl_clip: f64,

    /// KL estimator in the reward: k1 (log-ratio) or k3 (never negative).
    #[arg(long = "kl-estimator", env = "TROUPE_PPO_KL_ESTIMATOR", value_enum, default_value = "k1")]
    pub kl_estimator: KlEstimator,

    /// The normalized reward-model score is clipped to [-this, this].
    #[arg(long = "score-clip", env = "TROUPE_PPO_SCORE_CLIP", default_value_t = 5.0)]
    pub score_clip: f64,

    /// Reward added (a number <= 0) to a response that stopped at the length limit without EOS.
    #[arg(long = "missing-eos-penalty", env = "TROUPE_PPO_MISSING_EOS_PENALTY", default_value_t = -1.0, allow_hyphen_values = true)]
    pub missing_eos_penalty: f64,

    /// Rollouts whose policy version is more than this many versions behind
    /// the learner's are acknowledged without training.
    #[arg(long = "max-policy-lag", env = "TROUPE_PPO_MAX_POLICY_LAG", default_value_t = 1)]
    pub max_policy_lag: u64,

    /// Prompt batches published ahead of training: 1 samples each batch with
    /// the newest version (on-policy); more lets samplers work while the
    /// learner trains, at a lag of up to this minus 1 versions.
    #[arg(long = "prompt-batches-ahead", env = "TROUPE_PPO_PROMPT_BATCHES_AHEAD", default_value_t = 1)]
    pub prompt_batches_ahead: u64,

    /// Sampling temperature of the rollouts the learner asks for.
    #[arg(long = "temperature", env = "TROUPE_PPO_TEMPERATURE", default_value_t = 1.0)]
    pub temperature: f32,

    /// Top-k filter of the rollouts; 0 turns it off.
    #[arg(long = "top-k", env = "TROUPE_PPO_TOP_K", default_value_t = 0)]
    pub top_k: u32,

    /// Top-p filter of the rollouts; 1 turns it off.
    #[arg(long = "top-p", env = "TROUPE_PPO_TOP_P", default_value_t = 1.0)]
    pub top_p: f32,

    /// Maximum response length in tokens.
    #[arg(long = "max-new-tokens", env = "TROUPE_PPO_MAX_NEW_TOKENS", default_value_t = 32)]
    pub max_new_tokens: u32,

    /// Seed of the prompt order, the sampling seeds, the value-head init and the minibatch shuffle.
    #[arg(long = "seed", env = "TROUPE_PPO_SEED", default_value_t = 0)]
    pub seed: u64,

    /// Durable queue name on the `scored` subject.
    #[arg(long = "queue", env = "TROUPE_PPO_QUEUE", default_value = "ppo-learner")]
    pub queue: String,

    /// Seconds a held rollout may go unacknowledged before the bus delivers
    /// it again; the learner extends it every third of this while it waits or trains.
    #[arg(long = "ack-wait", env = "TROUPE_PPO_ACK_WAIT", default_value_t = 60.0)]
    pub ack_wait_secs: f64,

    /// Deliveries of one scored rollout before it goes to the dead-letter subject.
    #[arg(long = "max-deliver", env = "TROUPE_PPO_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: u64,
}

impl Settings {
    /// Settings with every default, for tests and in-process callers.
    pub fn new(reference: &str, prompts: Vec<PathBuf>) -> Settings {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            settings: Settings,
        }
        let mut settings = Wrapper::parse_from(["troupe-ppo-learner"]).settings;
        settings.reference = reference.to_string();
        settings.prompts = prompts;
        settings
    }

    /// Checks every setting and returns all problems at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, message: String| {
            if !ok {
                problems.push(message);
            }
        };
        check(!self.prompts.is_empty(), "--prompts: no prompt file given; name at least one JSONL file, such as data/sft/capitals.train.jsonl".into());
        check(self.steps >= 1, "--steps: use at least 1".into());
        check(self.batch_size >= 1, "--batch-size: use at least 1 rollout".into());
        check(self.rollouts_per_prompt >= 1, "--rollouts-per-prompt: use at least 1".into());
        check(
            self.rollouts_per_prompt >= 1 && self.batch_size.is_multiple_of(self.rollouts_per_prompt as usize),
            format!("--batch-size {} is not a multiple of --rollouts-per-prompt {}; make it one", self.batch_size, self.rollouts_per_prompt),
        );
        check(self.minibatch_size >= 1 && self.minibatch_size <= self.batch_size.max(1), format!("--minibatch-size {}: use 1 to --batch-size ({})", self.minibatch_size, self.batch_size));
        check(self.epochs >= 1, "--epochs: use at least 1".into());
        check(self.learning_rate.is_finite() && self.learning_rate > 0.0, format!("--learning-rate {}: use a number > 0, such as 1e-5", self.learning_rate));
        check(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0, format!("--max-grad-norm {}: use a number > 0", self.max_grad_norm));
        check(self.clip_range > 0.0 && self.clip_range < 1.0, format!("--clip-range {}: use a number in (0, 1), such as 0.2", self.clip_range));
        check(self.value_clip_range.is_finite() && self.value_clip_range > 0.0, format!("--value-clip-range {}: use a number > 0", self.value_clip_range));
        check(self.value_coef.is_finite() && self.value_coef >= 0.0, format!("--value-coef {}: use a number >= 0", self.value_coef));
        check((0.0..=1.0).contains(&self.gamma), format!("--gamma {}: use a number in [0, 1]", self.gamma));
        check((0.0..=1.0).contains(&self.lambda), format!("--lambda {}: use a number in [0, 1]", self.lambda));
        check(self.kl_coef.is_finite() && self.kl_coef >= 0.0, format!("--kl-coef {}: use a number >= 0", self.kl_coef));
        if let Some(target) = self.kl_target {
            check(target.is_finite() && target > 0.0, format!("--kl-target {target}: use a number of nats > 0, such as 6"));
            check(self.kl_coef > 0.0, "--kl-coef 0 with --kl-target: an adaptive coefficient cannot grow from 0; start above 0".into());
        }
        check(self.kl_horizon.is_finite() && self.kl_horizon > 0.0, format!("--kl-horizon {}: use a number of rollouts > 0", self.kl_horizon));
        check(self.kl_clip > 0.0 && self.kl_clip < 1.0, format!("--kl-clip {}: use a number in (0, 1), such as 0.2", self.kl_clip));
        check(self.score_clip.is_finite() && self.score_clip > 0.0, format!("--score-clip {}: use a number > 0", self.score_clip));
        check(self.missing_eos_penalty.is_finite() && self.missing_eos_penalty <= 0.0, format!("--missing-eos-penalty {}: use a number <= 0", self.missing_eos_penalty));
        check(self.prompt_batches_ahead >= 1, "--prompt-batches-ahead: use at least 1".into());
        check(self.temperature.is_finite() && self.temperature >= 0.0, format!("--temperature {}: use a number >= 0", self.temperature));
        check(self.top_p > 0.0 && self.top_p <= 1.0, format!("--top-p {}: use a number in (0, 1]", self.top_p));
        check(self.max_new_tokens >= 1, "--max-new-tokens: use at least 1".into());
        check(self.ack_wait_secs.is_finite() && self.ack_wait_secs >= 1.0, format!("--ack-wait {}: use at least 1 second", self.ack_wait_secs));
        check(self.max_deliver >= 1, "--max-deliver: use at least 1".into());
        for (flag, name) in [("--policy", &self.policy), ("--job-id", &self.job_id), ("--queue", &self.queue)] {
            let valid = !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            check(valid, format!("{flag} {name:?}: use 1 to 64 ASCII letters, digits, '-' or '_'"));
        }
        check(!self.reference.trim().is_empty(), "--reference: name the SFT model, such as sft or sft@3".into());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Returns the PPO hyperparameters.
    pub fn ppo_config(&self) -> PpoConfig {
        PpoConfig {
            learning_rate: self.learning_rate,
            max_grad_norm: self.max_grad_norm,
            epochs: self.epochs,
            minibatch_size: self.minibatch_size,
            clip_range: self.clip_range,
            value_clip_range: self.value_clip_range,
            value_coef: self.value_coef,
            gamma: self.gamma,
            lambda: self.lambda,
            kl_estimator: self.kl_estimator,
            score_clip: self.score_clip,
            missing_eos_penalty: self.missing_eos_penalty,
            seed: self.seed,
        }
    }

    /// Returns the KL controller at the start of a run.
    pub fn kl_controller(&self) -> KlController {
        match self.kl_target {
            Some(target) => KlController::Adaptive { coef: self.kl_coef, target, horizon: self.kl_horizon, clip: self.kl_clip },
            None => KlController::Fixed { coef: self.kl_coef },
        }
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs_f64(self.ack_wait_secs.max(1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_only_prompts() {
        let settings = Settings::new("sft", vec![PathBuf::from("prompts.jsonl")]);
        assert_eq!(settings.validate(), Ok(()));
        assert_eq!(settings.kl_controller(), KlController::Fixed { coef: 0.05 });
    }

    #[test]
    fn every_problem_is_reported() {
        let mut settings = Settings::new("sft", vec![]);
        settings.batch_size = 10;
        settings.rollouts_per_prompt = 4;
        settings.gamma = 1.5;
        settings.kl_target = Some(-1.0);
        settings.queue = "a.b".into();
        let problems = settings.validate().unwrap_err();
        for flag in ["--prompts", "--batch-size", "--gamma", "--kl-target", "--queue"] {
            assert!(problems.iter().any(|p| p.starts_with(flag)), "{flag} missing from {problems:?}");
        }
        assert_eq!(problems.len(), 5, "{problems:?}");
    }

    #[test]
    fn kl_target_makes_the_controller_adaptive() {
        let mut settings = Settings::new("sft", vec![PathBuf::from("p.jsonl")]);
        settings.kl_target = Some(6.0);
        assert!(matches!(settings.kl_controller(), KlController::Adaptive { target, .. } if target == 6.0));
    }
}
