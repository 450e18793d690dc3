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

use std::future::Future;
use std::time::Duration;

use clap::Args;
use serde::Serialize;
use tokio::sync::watch;
use tracing::Instrument;
use troupe_bus::{BusHandle, Delivery, QueueConfig};
use troupe_store::Store;
use troupe_train::settings_args;
use troupe_wire::{Envelope, JobRequest, Stage};

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
        let mut problems = Vec::new();
        if self.job_ack_wait_secs < 4 {
            problems.push(format!(
                "--job-ack-wait {}: use at least 4 seconds",
                self.job_ack_wait_secs
            ));
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

/// Serves pretraining jobs until `shutdown` resolves. A job in progress at
/// shutdown saves a checkpoint and is handed back to the queue.
pub async fn run(
    settings: ServiceSettings,
    bus: BusHandle,
    store: Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), PretrainError> {
    settings.validate().map_err(PretrainError::Settings)?;
    let (stop_tx, mut stop) = watch::channel(false);
    let watcher = tokio::spawn(async move {
        shutdown.await;
        stop_tx.send(true).ok();
    });

    let ack_wait = Duration::from_secs(settings.job_ack_wait_secs);
    let mut config = QueueConfig::new(&settings.queue, &bus.subjects().jobs_for(troupe_wire::Stage::Pretrain));
    config.ack_wait = ack_wait;
    config.max_deliver = settings.job_max_deliver;
    // One job at a time: a job occupies the whole process.
    config.max_in_flight = 1;
    let mut queue = bus.queue(config).await?;
    tracing::info!(queue = %settings.queue, subject = %bus.subjects().jobs_for(troupe_wire::Stage::Pretrain), "waiting for pretraining jobs");

    loop {
        let next = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            next = queue.next_message::<JobRequest>() => next?,
        };
        let (envelope, delivery) = next;
        handle_job(
            &settings,
            &bus,
            &store,
            envelope,
            delivery,
            stop.clone(),
            ack_wait,
        )
        .await?;
    }
    watcher.abort();
    tracing::info!("pretrainer stopped");
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
) -> Result<(), PretrainError> {
    let job = envelope.payload;
    if job.stage != Stage::Pretrain {
        tracing::debug!(job_id = %job.job_id, stage = ?job.stage, "job for another stage; skipping");
        delivery.ack().await?;
        return Ok(());
    }
    let span = tracing::info_span!("job", job_id = %job.job_id, message_id = %envelope.id);
    train_job(settings, bus, store, job, delivery, stop, ack_wait)
        .instrument(span)
        .await
}

/// Trains one job of this stage and settles its delivery by the outcome.
async fn train_job(
    settings: &ServiceSettings,
    bus: &BusHandle,
    store: &Store,
    job: JobRequest,
    delivery: Delivery,
    stop: watch::Receiver<bool>,
    ack_wait: Duration,
) -> Result<(), PretrainError> {
    let job_settings = match job_settings(&job) {
        Ok(job_settings) => job_settings,
        Err(reason) => {
            delivery
                .reject(&format!("job {}: {reason}", job.job_id))
                .await?;
            return Ok(());
        }
    };
    tracing::info!(output = %job_settings.output, delivered = delivery.delivered, "pretraining job started");

    let control = Control {
        stop,
        keepalive: Some((&delivery, ack_wait / 4)),
    };
    let outcome = pretrain_with(&job_settings, bus, store, control).await;
    match outcome {
        Ok(outcome) => {
            tracing::info!(model = %outcome.model, heldout_loss = outcome.heldout_loss, "pretraining job finished");
            delivery.ack().await?;
        }
        Err(error) if error.is_permanent() => {
            tracing::warn!(%error, "pretraining job failed");
            delivery
                .reject(&format!("job {}: {error}", job.job_id))
                .await?;
        }
        Err(error) => {
            tracing::warn!(%error, "pretraining job interrupted; handing it back for a retry");
            delivery
                .nak(Duration::from_secs(settings.job_retry_delay_secs))
                .await?;
        }
    }
    Ok(())
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
