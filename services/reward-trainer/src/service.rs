//! The reward-model trainer as a service: takes `JobRequest`s of stage
//! `reward_model` from the run's `jobs.reward_model` subject, one at a time, and
//! acknowledges each only after its final version is stored and announced.
//!
//! Each stage has its own job subject, so a job for another stage that
//! still arrives here (published on the wrong subject) is acknowledged
//! without acting on it. A job whose settings, data or base model are invalid is rejected
//! to the dead-letter subject with the reason. A job interrupted by
//! shutdown or by a store or bus failure is handed back (`nak`) and, when
//! delivered again, resumes from its newest checkpoint.
//!
//! The loop itself is [`troupe_train::serve`]; this module supplies the
//! reward-model stage through [`troupe_train::JobStage`].

use std::future::Future;

use clap::Args;
use serde::Serialize;
use troupe_bus::BusHandle;
use troupe_store::Store;
use troupe_train::{serve, settings_args, JobContext, JobQueueSettings, JobStage};
use troupe_wire::{JobRequest, Stage};

use crate::train::{train_with, Control};
use crate::{RewardError, Settings};

/// Settings of the job service. Each job's training settings come from the job.
#[derive(Args, Clone, Debug, PartialEq, Serialize)]
pub struct ServiceSettings {
    /// Durable queue name on the `jobs.reward_model` subject, shared by reward-trainer replicas.
    #[arg(long = "queue", env = "TROUPE_REWARD_QUEUE", default_value = "reward-trainer")]
    pub queue: String,

    /// Seconds a job may go without a sign of life before the bus delivers it
    /// again; the trainer extends it every quarter of this while it trains.
    #[arg(long = "job-ack-wait", env = "TROUPE_REWARD_JOB_ACK_WAIT", default_value_t = 60)]
    pub job_ack_wait_secs: u64,

    /// Deliveries of one job before it goes to the dead-letter subject.
    #[arg(long = "job-max-deliver", env = "TROUPE_REWARD_JOB_MAX_DELIVER", default_value_t = 5)]
    pub job_max_deliver: u64,

    /// Seconds before a job handed back after a failure is delivered again.
    #[arg(long = "job-retry-delay", env = "TROUPE_REWARD_JOB_RETRY_DELAY", default_value_t = 5)]
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

/// Serves reward-model jobs until `shutdown` resolves. A job in progress at
/// shutdown saves a checkpoint and is handed back to the queue.
pub async fn run(
    settings: ServiceSettings,
    bus: BusHandle,
    store: Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RewardError> {
    settings.validate().map_err(RewardError::Settings)?;
    serve(settings.queue_settings(), bus, store, shutdown, job_settings).await?;
    tracing::info!("reward trainer stopped");
    Ok(())
}

impl JobStage for Settings {
    type Error = RewardError;

    async fn train(&self, job: JobContext<'_>) -> Result<(), RewardError> {
        let control = Control { stop: job.stop, keepalive: Some(job.keepalive) };
        let outcome = train_with(self, job.bus, job.store, control).await?;
        tracing::info!(model = %outcome.model, heldout_accuracy = outcome.heldout.accuracy, "reward-model job finished");
        Ok(())
    }

    const STAGE: Stage = Stage::RewardModel;
    const JOB_KIND: &'static str = "reward-model";

    fn is_permanent(error: &RewardError) -> bool {
        error.is_permanent()
    }
}

/// The job's training settings: its settings map parsed like the command
/// line, with `job_id`, `output`, `base` and `inputs` taken from the
/// request. An input ending in `.jsonl` is a preference file; any other
/// input names a preference dataset in the store.
pub fn job_settings(job: &JobRequest) -> Result<Settings, String> {
    let mut args = settings_args("reward-model-job", &job.settings);
    args.push(format!("--job-id={}", job.job_id));
    args.push(format!("--output={}", job.output));
    if let Some(base) = &job.base {
        args.push(format!("--base={}@{}", base.name, base.version));
    }
    let (files, datasets): (Vec<&String>, Vec<&String>) = job.inputs.iter().partition(|input| input.ends_with(".jsonl"));
    if !datasets.is_empty() {
        args.push(format!("--dataset={}", datasets.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")));
    }
    if !files.is_empty() {
        args.push(format!("--pairs-jsonl={}", files.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")));
    }
    let settings = Settings::from_args(&args).map_err(|e| format!("invalid settings: {e}"))?;
    settings.validate().map_err(|problems| format!("invalid settings: {}", problems.join("; ")))?;
    Ok(settings)
}
