//! The reward-model trainer's settings: clap flags with environment
//! variables, also parsed from a `JobRequest`'s settings map, and their
//! validation.

use std::path::PathBuf;

use clap::{Args, Parser};
use serde::Serialize;
use troupe_store::ModelRef;

/// Dataset read when neither `--dataset` nor `--pairs-jsonl` is given; the
/// ranking intake writes its records there by default.
pub const DEFAULT_PREFERENCE_DATASET: &str = "preferences";

/// Reward-model training settings. Every flag has a `TROUPE_REWARD_*`
/// environment variable.
#[derive(Args, Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// Job id recorded in every checkpoint; a rerun with the same id resumes
    /// from the job's newest checkpoint.
    #[arg(long, env = "TROUPE_REWARD_JOB_ID", default_value = "reward-model")]
    pub job_id: String,

    /// Registry name under which reward-model versions are published (kind `reward`).
    #[arg(long, env = "TROUPE_REWARD_OUTPUT", default_value = "reward")]
    pub output: String,

    /// Model version to start from, as NAME@VERSION, or NAME for its newest
    /// version. Any stored model works, whatever its tokenizer. Default: the
    /// most recently published version of kind `sft`.
    #[arg(long, env = "TROUPE_REWARD_BASE")]
    pub base: Option<String>,

    /// Preference datasets in the store, comma-separated (records written by
    /// the ranking intake). Default: `preferences`, unless `--pairs-jsonl` is given.
    #[arg(long, env = "TROUPE_REWARD_DATASET", value_delimiter = ',')]
    pub dataset: Vec<String>,

    /// JSONL files of `{"prompt", "chosen", "rejected"}` lines to train on,
    /// comma-separated; lines that share a prompt form one example.
    #[arg(long, env = "TROUPE_REWARD_PAIRS_JSONL", value_delimiter = ',')]
    pub pairs_jsonl: Vec<PathBuf>,

    /// JSONL preference files evaluated after training and never trained on,
    /// comma-separated; their accuracy is stored as `eval/<file stem>/accuracy`.
    #[arg(long, env = "TROUPE_REWARD_EVAL_JSONL", value_delimiter = ',')]
    pub eval_jsonl: Vec<PathBuf>,

    /// Share of prompts held out for evaluation, from 0 to 1 (split by a
    /// hash of the prompt text, so every pair of a prompt is on one side).
    #[arg(long, env = "TROUPE_REWARD_HELDOUT_FRACTION", default_value_t = 0.1)]
    pub heldout_fraction: f64,

    /// Maximum tokens of one rendered prompt and response; longer ones keep
    /// their last tokens, where the score is read. At most the model's context length.
    #[arg(long, env = "TROUPE_REWARD_MAX_TOKENS", default_value_t = 256)]
    pub max_tokens: usize,

    /// Examples (prompts, each with all its candidates) per optimizer step.
    #[arg(long, env = "TROUPE_REWARD_BATCH_SIZE", default_value_t = 8)]
    pub batch_size: usize,

    /// Optimizer steps in the whole run, unless early stopping ends it sooner.
    #[arg(long, env = "TROUPE_REWARD_STEPS", default_value_t = 200)]
    pub steps: u64,

    /// Peak learning rate, reached at the end of warmup.
    #[arg(long, env = "TROUPE_REWARD_LEARNING_RATE", default_value_t = 1e-4)]
    pub learning_rate: f64,

    /// Learning rate at the last step, the floor of the cosine decay.
    #[arg(long, env = "TROUPE_REWARD_MIN_LEARNING_RATE", default_value_t = 1e-5)]
    pub min_learning_rate: f64,

    /// Optimizer steps of linear warmup.
    #[arg(long, env = "TROUPE_REWARD_WARMUP_STEPS", default_value_t = 10)]
    pub warmup_steps: u64,

    /// AdamW decoupled weight decay, applied to matrices only.
    #[arg(long, env = "TROUPE_REWARD_WEIGHT_DECAY", default_value_t = 0.0)]
    pub weight_decay: f64,

    /// Global gradient-norm clipping threshold; 0 turns clipping off.
    #[arg(long, env = "TROUPE_REWARD_GRAD_CLIP", default_value_t = 1.0)]
    pub grad_clip: f64,

    /// Optimizer steps between held-out evaluations; 0 evaluates only at the end
    /// (and turns early stopping off).
    #[arg(long, env = "TROUPE_REWARD_EVAL_EVERY", default_value_t = 25)]
    pub eval_every: u64,

    /// Evaluations in a row without a held-out loss improvement of at least
    /// `--min-delta` that stop training; 0 turns early stopping off.
    #[arg(long, env = "TROUPE_REWARD_PATIENCE", default_value_t = 4)]
    pub patience: u32,

    /// Smallest decrease of the held-out loss, in nats per pair, that counts as an improvement.
    #[arg(long, env = "TROUPE_REWARD_MIN_DELTA", default_value_t = 1e-3)]
    pub min_delta: f64,

    /// Optimizer steps between checkpoints (published, not announced);
    /// 0 publishes only the final version.
    #[arg(long, env = "TROUPE_REWARD_CHECKPOINT_EVERY", default_value_t = 0)]
    pub checkpoint_every: u64,

    /// Seed of the score-head initialization and of the example order.
    #[arg(long, env = "TROUPE_REWARD_SEED", default_value_t = 0)]
    pub seed: u64,
}

/// Parses job settings: `Settings` as the only arguments.
#[derive(Parser, Debug)]
#[command(name = "reward-model-job")]
struct JobArgs {
    #[command(flatten)]
    settings: Settings,
}

impl Settings {
    /// Parses settings from `--key=value` arguments (the program name
    /// first), ignoring the process environment so a job is reproducible anywhere.
    pub fn from_args(args: &[String]) -> Result<Settings, clap::Error> {
        let no_env = std::collections::HashMap::new();
        troupe_service::settings::parse_args_with_env::<JobArgs, _, _>(args, &no_env).map(|job| job.settings)
    }

    /// Returns the datasets to read: the given ones, or the default one
    /// when no JSONL file is given either.
    pub fn datasets(&self) -> Vec<String> {
        if self.dataset.is_empty() && self.pairs_jsonl.is_empty() {
            vec![DEFAULT_PREFERENCE_DATASET.to_string()]
        } else {
            self.dataset.clone()
        }
    }

    /// Parses `--base`: `Ok(None)` when unset, an error message when it does not parse.
    pub fn base_ref(&self) -> Result<Option<BaseModel>, String> {
        let Some(base) = self.base.as_deref() else { return Ok(None) };
        if base.contains('@') {
            let model: ModelRef = base.parse().map_err(|e| format!("--base {base}: {e}"))?;
            Ok(Some(BaseModel::Version(model)))
        } else if base.trim().is_empty() {
            Err("--base: empty; give NAME or NAME@VERSION".into())
        } else {
            Ok(Some(BaseModel::Newest(base.to_string())))
        }
    }

    /// Checks every setting and returns all problems at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, problem: String| {
            if !ok {
                problems.push(problem);
            }
        };
        check(!self.job_id.trim().is_empty(), "--job-id: must not be empty".into());
        check(!self.output.trim().is_empty(), "--output: must name the model to publish".into());
        if let Err(problem) = self.base_ref() {
            problems.push(problem);
        }
        for name in &self.dataset {
            if name.trim().is_empty() {
                problems.push("--dataset: an empty name; remove the extra comma".into());
            }
        }
        let mut check = |ok: bool, problem: String| {
            if !ok {
                problems.push(problem);
            }
        };
        check(
            self.heldout_fraction > 0.0 && self.heldout_fraction < 1.0,
            format!("--heldout-fraction {}: must be above 0 and below 1, such as 0.1", self.heldout_fraction),
        );
        check(self.max_tokens >= 4, format!("--max-tokens {}: must be at least 4", self.max_tokens));
        check(self.batch_size >= 1, "--batch-size: must be at least 1".into());
        check(self.steps >= 1, "--steps: must be at least 1".into());
        check(
            self.learning_rate > 0.0 && self.learning_rate.is_finite(),
            format!("--learning-rate {}: must be a positive number", self.learning_rate),
        );
        check(
            self.min_learning_rate >= 0.0 && self.min_learning_rate <= self.learning_rate,
            format!("--min-learning-rate {}: must be from 0 to --learning-rate", self.min_learning_rate),
        );
        check(
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            format!("--weight-decay {}: must be 0 or positive", self.weight_decay),
        );
        check(
            self.grad_clip >= 0.0 && self.grad_clip.is_finite(),
            format!("--grad-clip {}: must be 0 (off) or positive", self.grad_clip),
        );
        check(
            self.min_delta >= 0.0 && self.min_delta.is_finite(),
            format!("--min-delta {}: must be 0 or positive", self.min_delta),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// The version a fresh run starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaseModel {
    /// Exactly this version.
    Version(ModelRef),
    /// The newest version of this model.
    Newest(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Settings {
        let mut args = vec!["x".to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        Settings::from_args(&args).unwrap()
    }

    #[test]
    fn defaults_read_preferences_dataset() {
        let settings = parse(&[]);
        assert_eq!(settings.datasets(), ["preferences"]);
        assert!(settings.validate().is_ok());
        let settings = parse(&["--pairs-jsonl=a.jsonl"]);
        assert!(settings.datasets().is_empty());
    }

    #[test]
    fn every_problem_reported_at_once() {
        let settings = parse(&["--heldout-fraction=1.5", "--batch-size=0", "--base=sft@0", "--learning-rate=0"]);
        let problems = settings.validate().unwrap_err();
        assert_eq!(problems.len(), 5, "{problems:?}");
    }

    #[test]
    fn base_forms() {
        assert_eq!(parse(&["--base=sft"]).base_ref().unwrap(), Some(BaseModel::Newest("sft".into())));
        assert_eq!(
            parse(&["--base=sft@3"]).base_ref().unwrap(),
            Some(BaseModel::Version(ModelRef::new("sft", 3)))
        );
    }
}
