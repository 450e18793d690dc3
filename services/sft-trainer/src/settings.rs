//! The SFT trainer's settings: clap flags with environment variables, also
//! parsed from a `JobRequest`'s settings map, and their validation.

use std::path::PathBuf;

use clap::{Args, Parser};
use serde::Serialize;

/// Stage 2 settings. Every flag has a `TROUPE_SFT_*` environment variable.
#[derive(Args, Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// Job id recorded in every checkpoint; a rerun with the same id resumes
    /// from the job's newest checkpoint.
    #[arg(long, env = "TROUPE_SFT_JOB_ID", default_value = "sft")]
    pub job_id: String,

    /// Registry name under which versions are published (kind `sft`).
    #[arg(long, env = "TROUPE_SFT_OUTPUT", default_value = "sft")]
    pub output: String,

    /// The model to fine-tune: `NAME@VERSION`, or `NAME` for its newest version.
    #[arg(long, env = "TROUPE_SFT_BASE", default_value = "base")]
    pub base: String,

    /// Demonstration JSONL files, comma-separated; each line is
    /// `{"prompt","response"}` or `{"messages":[...]}`.
    #[arg(
        long,
        env = "TROUPE_SFT_DEMONSTRATIONS",
        value_delimiter = ',',
        default_value = "data/sft/capitals.train.jsonl"
    )]
    pub demonstrations: Vec<PathBuf>,

    /// Held-out demonstration files, comma-separated. Empty holds out
    /// `--validation-fraction` of the training demonstrations by prompt hash.
    #[arg(
        long,
        env = "TROUPE_SFT_HELDOUT",
        value_delimiter = ',',
        default_value = "data/sft/capitals.heldout.jsonl"
    )]
    pub heldout: Vec<PathBuf>,

    /// Share of demonstrations held out when no `--heldout` file is given.
    #[arg(long, env = "TROUPE_SFT_VALIDATION_FRACTION", default_value_t = 0.1)]
    pub validation_fraction: f64,

    /// Longest rendered example in tokens; longer examples are skipped and counted.
    #[arg(long, env = "TROUPE_SFT_MAX_SEQ_LEN", default_value_t = 128)]
    pub max_seq_len: usize,

    /// Examples per micro-batch, padded on the right to the longest.
    #[arg(long, env = "TROUPE_SFT_BATCH_SIZE", default_value_t = 16)]
    pub batch_size: usize,

    /// Micro-batches whose gradients are summed into one optimizer step.
    #[arg(long, env = "TROUPE_SFT_GRAD_ACCUM", default_value_t = 1)]
    pub grad_accum: usize,

    /// Optimizer steps in the whole run.
    #[arg(long, env = "TROUPE_SFT_STEPS", default_value_t = 150)]
    pub steps: u64,

    /// Peak learning rate, reached at the end of warmup.
    #[arg(long, env = "TROUPE_SFT_LEARNING_RATE", default_value_t = 2e-3)]
    pub learning_rate: f64,

    /// Learning rate at the last step, the floor of the cosine decay.
    #[arg(long, env = "TROUPE_SFT_MIN_LEARNING_RATE", default_value_t = 2e-4)]
    pub min_learning_rate: f64,

    /// Optimizer steps of linear warmup.
    #[arg(long, env = "TROUPE_SFT_WARMUP_STEPS", default_value_t = 10)]
    pub warmup_steps: u64,

    /// AdamW decoupled weight decay, applied to matrices only.
    #[arg(long, env = "TROUPE_SFT_WEIGHT_DECAY", default_value_t = 0.0)]
    pub weight_decay: f64,

    /// Global gradient-norm clipping threshold; 0 turns clipping off.
    #[arg(long, env = "TROUPE_SFT_GRAD_CLIP", default_value_t = 1.0)]
    pub grad_clip: f64,

    /// Optimizer steps between held-out evaluations; 0 evaluates only at the end.
    #[arg(long, env = "TROUPE_SFT_EVAL_EVERY", default_value_t = 50)]
    pub eval_every: u64,

    /// Optimizer steps between checkpoints; 0 checkpoints only at the end.
    #[arg(long, env = "TROUPE_SFT_CHECKPOINT_EVERY", default_value_t = 0)]
    pub checkpoint_every: u64,

    /// Tokens a held-out response may take in the end-of-sequence evaluation.
    #[arg(long, env = "TROUPE_SFT_EVAL_MAX_NEW_TOKENS", default_value_t = 32)]
    pub eval_max_new_tokens: usize,

    /// Seed of the shuffling of demonstrations.
    #[arg(long, env = "TROUPE_SFT_SEED", default_value_t = 0)]
    pub seed: u64,
}

#[derive(Parser, Debug)]
#[command(name = "sft-job")]
pub(crate) struct JobArgs {
    #[command(flatten)]
    pub settings: Settings,
}

impl Settings {
    /// Parses settings from `--key=value` arguments (the program name first),
    /// ignoring the process environment so a job is reproducible anywhere.
    pub fn from_args(args: &[String]) -> Result<Settings, clap::Error> {
        let no_env = std::collections::HashMap::new();
        troupe_service::settings::parse_args_with_env::<JobArgs, _, _>(args, &no_env)
            .map(|job| job.settings)
    }

    /// Checks every setting and returns all problems at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, problem: String| {
            if !ok {
                problems.push(problem);
            }
        };
        check(
            !self.job_id.trim().is_empty(),
            "--job-id: must not be empty".into(),
        );
        check(
            !self.output.trim().is_empty(),
            "--output: must name the model to publish".into(),
        );
        check(
            !self.base.trim().is_empty(),
            "--base: must name the model to fine-tune, as NAME or NAME@VERSION".into(),
        );
        check(
            !self.demonstrations.is_empty(),
            "--demonstrations: give at least one JSONL file".into(),
        );
        check(
            self.validation_fraction > 0.0 && self.validation_fraction < 1.0,
            format!(
                "--validation-fraction {}: must be above 0 and below 1",
                self.validation_fraction
            ),
        );
        check(
            self.max_seq_len >= 4,
            format!("--max-seq-len {}: must be at least 4", self.max_seq_len),
        );
        check(
            self.batch_size >= 1,
            "--batch-size: must be at least 1".into(),
        );
        check(
            self.grad_accum >= 1,
            "--grad-accum: must be at least 1".into(),
        );
        check(self.steps >= 1, "--steps: must be at least 1".into());
        check(
            self.learning_rate > 0.0 && self.learning_rate.is_finite(),
            format!(
                "--learning-rate {}: must be a positive number",
                self.learning_rate
            ),
        );
        check(
            self.min_learning_rate >= 0.0 && self.min_learning_rate <= self.learning_rate,
            format!(
                "--min-learning-rate {}: must be from 0 to --learning-rate",
                self.min_learning_rate
            ),
        );
        check(
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            format!(
                "--weight-decay {}: must be 0 or positive",
                self.weight_decay
            ),
        );
        check(
            self.grad_clip >= 0.0 && self.grad_clip.is_finite(),
            format!(
                "--grad-clip {}: must be 0 (off) or positive",
                self.grad_clip
            ),
        );
        check(
            self.eval_max_new_tokens >= 1,
            "--eval-max-new-tokens: must be at least 1".into(),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
