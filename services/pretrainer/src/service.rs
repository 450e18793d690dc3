//! The pretrainer as a service: takes `JobRequest`s of stage `pretrain` from
//! the run's `jobs.pretrain` subject, one at a time, and acknowledges each only after
//! its final version is stored.
//!
//! Each stage has its own job subject, so a job for another stage that
//! still arrives here (published on the wrong subject) is acknowledged
//! without acting on it. A job whose settings or data are invalid is rejected to the
//! dead-letter subject with the reason. A job interrupted by shutdown or by a
//! store or bus failure is handed back (`nak`) and, when delivered again here
//! or to another replica, resumes from its newest checkpoint.
//!
//! The loop itself is [`troupe_train::serve`]; this module supplies the
//! pretraining stage through [`troupe_train::JobStage`].

use std::future::Future;

use clap::Args;
use serde::Serialize;
use troupe_bus::BusHandle;
use troupe_store::Store;
use troupe_train::{serve, settings_args, JobContext, JobQueueSettings, JobStage};
use troupe_wire::{JobRequest, Stage};

use crate::train::{pretrain_with, Control};
use crate::{PretrainError, Settings};

/// Settings of the job service. Each job's training settings come from the
/// job itself.
#[derive(Args, Clone, Debug, PartialEq, Serialize)]
pub struct ServiceSettings {
    /// Durable queue name on the `jobs.pretrain` subject, shared by pretrainer replicas.
    #[arg(
        long = "queue",
        env = "TROUPE_PRETRAIN_QUEUE",
        default_value = "pretrainer"
    )]
    pub queue: String,

    /// Seconds a job may go without a sign of life before the bus delivers it
    /// again. While it trains, the trainer extends the deadline every quarter of this.
    #[arg(
        long = "job-ack-wait",
        env = "TROUPE_PRETRAIN_JOB_ACK_WAIT",
        default_value_t = 60
    )]
    pub job_ack_wait_secs: u64,

    /// Deliveries of one job before it goes to the dead-letter subject.
    #[arg(
        long = "job-max-deliver",
        env = "TROUPE_PRETRAIN_JOB_MAX_DELIVER",
        default_value_t = 5
    )]
    pub job_max_deliver: u64,

    /// Seconds before a job handed back after a failure is delivered again.
    #[arg(
        long = "job-retry-delay",
        env = "TROUPE_PRETRAIN_JOB_RETRY_DELAY",
        default_value_t = 5
    )]
    pub job_retry_delay_secs: u64,
}

impl ServiceSettings {
    /// Checks every setting and returns all problems at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        self.queue_settings().validate()
    }

    fn queue_settings(&self) -> JobQueueSettings {
        let ServiceSettings { queue, job_ack_wait_secs, job_max_deliver, job_retry_delay_secs } = self.clone();
        JobQueueSettings { queue, job_ack_wait_secs, job_max_deliver, job_retry_delay_secs }
    }
}

/// Serves pretraining jobs until `shutdown` resolves. A job in progress at
/// shutdown saves a checkpoint and is handed back to the queue.
pub async fn run(
    settings: ServiceSettings,
    bus: BusHandle,
    store: Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), PretrainError> {
    settings.validate().map_err(PretrainError::Settings)?;
    serve(settings.queue_settings(), bus, store, shutdown, job_settings).await?;
    tracing::info!("pretrainer stopped");
    Ok(())
}

impl JobStage for Settings {
    type Error = PretrainError;

    async fn train(&self, job: JobContext<'_>) -> Result<(), PretrainError> {
        let control = Control { stop: job.stop, keepalive: Some(job.keepalive) };
        let outcome = pretrain_with(self, job.bus, job.store, control).await?;
        tracing::info!(model = %outcome.model, heldout_loss = outcome.heldout_loss, "pretraining job finished");
        Ok(())
    }

    const STAGE: Stage = Stage::Pretrain;
    const JOB_KIND: &'static str = "pretraining";

    fn is_permanent(error: &PretrainError) -> bool {
        error.is_permanent()
    }
}

/// Builds the job's training settings: its settings map parsed like the command
/// line, with `job_id`, `output` and, when given, `inputs` (corpus paths)
/// taken from the request.
pub fn job_settings(job: &JobRequest) -> Result<Settings, String> {
    let mut args = settings_args("pretrain-job", &job.settings);
    args.push(format!("--job-id={}", job.job_id));
    args.push(format!("--output={}", job.output));
    if !job.inputs.is_empty() {
        args.push(format!("--corpus={}", job.inputs.join(",")));
    }
    if job.base.is_some() {
        return Err("pretraining starts from random weights; `base` must be empty".into());
    }
    let settings = Settings::from_args(&args).map_err(|e| format!("invalid settings: {e}"))?;
    settings
        .validate()
        .map_err(|problems| format!("invalid settings: {}", problems.join("; ")))?;
    Ok(settings)
}
