//! Stage 2 of troupe: supervised fine-tuning of a base model on
//! demonstrations, with the loss on response tokens only.
//!
//! Demonstrations are rendered through the model crate's one chat template.
//! The loss covers each assistant response and the EOS token that ends it,
//! so the model learns to stop. Batches are padded on the right with the
//! tokenizer's pad id, which is distinct from EOS, and the attention mask
//! hides the padding. Each published version has kind `sft` and the base
//! version as its lineage parent.
//!
//! - [`settings`]: [`Settings`], the flags, also parsed from a job's settings map.
//! - [`data`]: rendering, padded batches with masks, and the epoch order.
//! - [`train`]: the training loop, [`fine_tune`] for the CLI.
//! - [`service`]: [`run`], the service that takes `JobRequest`s of stage `sft`.

pub mod data;
pub mod service;
pub mod settings;
pub mod train;

pub use service::{run, ServiceSettings};
pub use settings::Settings;
pub use train::{fine_tune, SftOutcome};

/// Errors of a fine-tuning run.
#[derive(Debug, thiserror::Error)]
pub enum SftError {
    #[error("invalid settings:\n  {}", .0.join("\n  "))]
    Settings(Vec<String>),
    #[error(transparent)]
    Data(#[from] troupe_data::DataError),
    #[error("no usable examples: {0}")]
    NoExamples(String),
    #[error("base model {base}: {reason}")]
    Base { base: String, reason: String },
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

impl SftError {
    /// Whether retrying the same job cannot succeed, so it should be rejected.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            SftError::Settings(_)
                | SftError::Data(_)
                | SftError::NoExamples(_)
                | SftError::Base { .. }
                | SftError::Resume { .. }
        ) || matches!(
            self,
            SftError::Train(troupe_train::TrainError::Invalid { .. })
        )
    }
}
