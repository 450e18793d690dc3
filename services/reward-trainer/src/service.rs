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

use std::future::Future;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tokio::sync::watch;
use troupe_bus::{BusHandle, Delivery, QueueConfig};
use troupe_store::Store;
use troupe_train::settings_args;
use troupe_wire::{Envelope, JobRequest, Stage};

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
        let mut problems = Vec::new();
        if self.job_ack_wait_secs < 4 {
            problems.push(format!("--job-ack-wait {}: use at least 4 seconds", self.job_ack_wait_secs));
        }
        if self.job_max_deliver == 0 {
            problems.push("--job-max-deliver: use at least 1".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
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
    let (stop_tx, mut stop) = watch::channel(false);
    let watcher = tokio::spawn(async move {
        shutdown.await;
        stop_tx.send(true).ok();
    });

    let ack_wait = Duration::from_secs(settings.job_ack_wait_secs);
    let mut config = QueueConfig::new(&settings.queue, &bus.subjects().jobs_for(troupe_wire::Stage::RewardModel));
    config.ack_wait = ack_wait;
    config.max_deliver = settings.job_max_deliver;
    // One job at a time: a job occupies the whole process.
    config.max_in_flight = 1;
    let mut queue = bus.queue(config).await?;
    tracing::info!(queue = %settings.queue, subject = %bus.subjects().jobs_for(troupe_wire::Stage::RewardModel), "waiting for reward-model jobs");

    loop {
        let next = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            next = queue.next_message::<JobRequest>() => next?,
        };
        let (envelope, delivery) = next;
        handle_job(&settings, &bus, &store, envelope, delivery, stop.clone(), ack_wait).await?;
    }
    watcher.abort();
    tracing::info!("reward trainer stopped");
    Ok(())
}

async fn handle_job(
    settings: &ServiceSettings,
    bus: &BusHandle,
    store: &Store,
    envelope: Envelope<JobRequest>,
    delivery: Delivery,
    stop: watch::Receiver<bool>,
    ack_wait: Duration,
) -> Result<(), RewardError> {
    let job = envelope.payload;
    if job.stage != Stage::RewardModel {
        tracing::debug!(job_id = %job.job_id, stage = ?job.stage, "job for another stage; skipping");
        delivery.ack().await?;
        return Ok(());
    }
    let span = tracing::info_span!("job", job_id = %job.job_id, message_id = %envelope.id);
    let _entered = span.enter();

    let job_settings = match job_settings(&job) {
        Ok(job_settings) => job_settings,
        Err(reason) => {
            delivery.reject(&format!("job {}: {reason}", job.job_id)).await?;
            return Ok(());
        }
    };
    tracing::info!(output = %job_settings.output, delivered = delivery.delivered, "reward-model job started");

    let control = Control { stop, keepalive: Some((&delivery, ack_wait / 4)) };
    match train_with(&job_settings, bus, store, control).await {
        Ok(outcome) => {
            tracing::info!(model = %outcome.model, heldout_accuracy = outcome.heldout.accuracy, "reward-model job finished");
            delivery.ack().await?;
        }
        Err(error) if error.is_permanent() => {
            tracing::warn!(%error, "reward-model job failed");
            delivery.reject(&format!("job {}: {error}", job.job_id)).await?;
        }
        Err(error) => {
            tracing::warn!(%error, "reward-model job interrupted; handing it back for a retry");
            delivery.nak(Duration::from_secs(settings.job_retry_delay_secs)).await?;
        }
    }
    Ok(())
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
