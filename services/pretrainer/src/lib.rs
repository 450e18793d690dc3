//! Stage 1 of troupe: pretraining a Llama-family base model on a text corpus.
//!
//! A run loads the corpus, trains a byte-level BPE tokenizer (or loads a
//! given `tokenizer.json`), writes token shards to the store once, and trains
//! with AdamW, warmup plus cosine decay, gradient accumulation and clipping.
//! It evaluates the held-out loss, checkpoints complete training state to the
//! model registry and announces every published version on the bus.
//!
//! - [`settings`]: [`Settings`], the flags, also parsed from a job's settings map.
//! - [`data`]: corpus sources, tokenizer, token shards and the window sampler.
//! - [`train`]: the training loop, [`pretrain`] for the CLI.
//! - [`service`]: [`run`], the service that takes `JobRequest`s from the `jobs.pretrain`
//!   work queue.
//!
//! Not here: supervised fine-tuning (`troupe-sft-trainer`) and the model
//! itself (`troupe-model`).

pub mod data;
pub mod service;
pub mod settings;
pub mod train;

pub use service::{run, ServiceSettings};
pub use settings::Settings;
pub use train::{pretrain, PretrainOutcome};

/// Errors of a pretraining run.
#[derive(Debug, thiserror::Error)]
pub enum PretrainError {
    #[error("invalid settings:\n  {}", .0.join("\n  "))]
    Settings(Vec<String>),
    #[error(transparent)]
    Data(#[from] troupe_data::DataError),
    #[error("corpus too small: {reason}")]
    CorpusTooSmall { reason: String },
    #[error("tokenizer ({origin}): {source}")]
    Tokenizer {
        origin: String,
        #[source]
        source: troupe_model::Error,
    },
    #[error("tokenizer and model do not match: {0}")]
    VocabMismatch(String),
    #[error("token shard {key}: {reason}")]
    Shard { key: String, reason: String },
    #[error("cannot resume job {job_id} from {model}: {reason}")]
    Resume {
        job_id: String,
        model: String,
        reason: String,
    },
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

impl PretrainError {
    /// Whether retrying the same job cannot succeed (bad settings or data), so
    /// a job should be rejected rather than delivered again.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            PretrainError::Settings(_)
                | PretrainError::Data(_)
                | PretrainError::CorpusTooSmall { .. }
                | PretrainError::Tokenizer { .. }
                | PretrainError::VocabMismatch(_)
                | PretrainError::Resume { .. }
        )
    }
}
