//! The pretrainer's settings: clap flags with environment variables, also
//! parsed from a `JobRequest`'s settings map, and their validation.

use std::path::PathBuf;

use clap::{Args, Parser};
use serde::Serialize;
use troupe_model::Config;

/// Stage 1 settings. Every flag has a `TROUPE_PRETRAIN_*` environment variable.
#[derive(Args, Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    /// Job id recorded in every checkpoint; a rerun with the same id resumes
    /// from the job's newest checkpoint.
    #[arg(long, env = "TROUPE_PRETRAIN_JOB_ID", default_value = "pretrain")]
    pub job_id: String,

    /// Registry name under which versions are published (kind `base`).
    #[arg(long, env = "TROUPE_PRETRAIN_OUTPUT", default_value = "base")]
    pub output: String,

    /// Corpus locations, comma-separated: directories (text and code files
    /// read recursively, JSONL files inside read from their `text` field) or
    /// single `.jsonl` / text files.
    #[arg(
        long,
        env = "TROUPE_PRETRAIN_CORPUS",
        value_delimiter = ',',
        default_value = "data/corpus"
    )]
    pub corpus: Vec<PathBuf>,

    /// Share of documents held out for the validation loss, from 0 to 1.
    #[arg(
        long,
        env = "TROUPE_PRETRAIN_VALIDATION_FRACTION",
        default_value_t = 0.05
    )]
    pub validation_fraction: f64,

    /// Model size preset: `tiny` (0.6M parameters) or `small` (12.6M).
    #[arg(long, env = "TROUPE_PRETRAIN_PRESET", default_value = "tiny")]
    pub preset: String,

    /// Vocabulary size in tokens, special tokens included. Defaults to the
    /// preset's when a tokenizer is trained, and to the tokenizer's when one is
    /// given with `--tokenizer`; then it must equal the tokenizer's.
    #[arg(long, env = "TROUPE_PRETRAIN_VOCAB_SIZE")]
    pub vocab_size: Option<usize>,

    /// An existing `tokenizer.json` to use instead of training a byte-level BPE.
    #[arg(long, env = "TROUPE_PRETRAIN_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,

    /// Tokens per training sequence; at most the preset's context length.
    #[arg(long, env = "TROUPE_PRETRAIN_SEQ_LEN", default_value_t = 128)]
    pub seq_len: usize,

    /// Sequences per micro-batch (one forward and backward pass).
    #[arg(long, env = "TROUPE_PRETRAIN_BATCH_SIZE", default_value_t = 16)]
    pub batch_size: usize,

    /// Micro-batches whose gradients are summed into one optimizer step.
    #[arg(long, env = "TROUPE_PRETRAIN_GRAD_ACCUM", default_value_t = 1)]
    pub grad_accum: usize,

    /// Optimizer steps in the whole run.
    #[arg(long, env = "TROUPE_PRETRAIN_STEPS", default_value_t = 600)]
    pub steps: u64,

    /// Peak learning rate, reached at the end of warmup.
    #[arg(long, env = "TROUPE_PRETRAIN_LEARNING_RATE", default_value_t = 3e-3)]
    pub learning_rate: f64,

    /// Learning rate at the last step, the floor of the cosine decay.
    #[arg(
        long,
        env = "TROUPE_PRETRAIN_MIN_LEARNING_RATE",
        default_value_t = 3e-4
    )]
    pub min_learning_rate: f64,

    /// Optimizer steps of linear warmup.
    #[arg(long, env = "TROUPE_PRETRAIN_WARMUP_STEPS", default_value_t = 30)]
    pub warmup_steps: u64,

    /// AdamW decoupled weight decay, applied to matrices only.
    #[arg(long, env = "TROUPE_PRETRAIN_WEIGHT_DECAY", default_value_t = 0.1)]
    pub weight_decay: f64,

    /// Global gradient-norm clipping threshold; 0 turns clipping off.
    #[arg(long, env = "TROUPE_PRETRAIN_GRAD_CLIP", default_value_t = 1.0)]
    pub grad_clip: f64,

    /// Optimizer steps between held-out evaluations; 0 evaluates only at the end.
    #[arg(long, env = "TROUPE_PRETRAIN_EVAL_EVERY", default_value_t = 100)]
    pub eval_every: u64,

    /// Held-out sequences per evaluation, each `--seq-len` tokens.
    #[arg(long, env = "TROUPE_PRETRAIN_EVAL_SEQUENCES", default_value_t = 64)]
    pub eval_sequences: usize,

    /// Optimizer steps between checkpoints; 0 checkpoints only at the end.
    #[arg(long, env = "TROUPE_PRETRAIN_CHECKPOINT_EVERY", default_value_t = 200)]
    pub checkpoint_every: u64,

    /// Seed of the weight initialization and of the window sampler.
    #[arg(long, env = "TROUPE_PRETRAIN_SEED", default_value_t = 0)]
    pub seed: u64,
}

/// Parses job settings: `Settings` as the only arguments.
#[derive(Parser, Debug)]
#[command(name = "pretrain-job", no_binary_name = false)]
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

    /// Returns the model configuration: the preset with the resolved vocabulary size.
    pub fn model_config(&self, vocab_size: usize) -> Result<Config, String> {
        let mut config = Config::preset(&self.preset).map_err(|e| e.to_string())?;
        config.vocab_size = vocab_size;
        Ok(config)
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
            !self.corpus.is_empty(),
            "--corpus: give at least one directory or file".into(),
        );
        check(
            self.validation_fraction > 0.0 && self.validation_fraction < 1.0,
            format!(
                "--validation-fraction {}: must be above 0 and below 1, such as 0.05",
                self.validation_fraction
            ),
        );
        match Config::preset(&self.preset) {
            Ok(preset) => check(
                self.seq_len >= 2 && self.seq_len <= preset.max_position_embeddings,
                format!(
                    "--seq-len {}: must be from 2 to the preset's context length {}",
                    self.seq_len, preset.max_position_embeddings
                ),
            ),
            Err(_) => check(
                false,
                format!("--preset {}: unknown; use tiny or small", self.preset),
            ),
        }
        if let Some(vocab) = self.vocab_size {
            check(
                vocab >= troupe_model::tokenizer::MIN_VOCAB_SIZE,
                format!(
                    "--vocab-size {vocab}: byte-level BPE needs at least {}",
                    troupe_model::tokenizer::MIN_VOCAB_SIZE
                ),
            );
        }
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
            self.eval_sequences >= 1,
            "--eval-sequences: must be at least 1".into(),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
