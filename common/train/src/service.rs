//! The job-service loop shared by the pretrainer, the SFT trainer and the
//! reward-model trainer: takes `JobRequest`s of one stage from the run's
//! `jobs.<stage>` subject, one at a time, and acknowledges each only after its
//! final version is stored.
//!
//! Each stage has its own job subject, so a job for another stage that
//! still arrives here (published on the wrong subject) is acknowledged
//! without acting on it. A job whose settings or data are invalid is rejected to the
//! dead-letter subject with the reason. A job interrupted by shutdown or by a
//! store or bus failure is handed back (`nak`) and, when delivered again here
//! or to another replica, resumes from its newest checkpoint.
//!
//! A trainer implements [`JobStage`] and calls [`serve`] from its own `run`.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;
use troupe_bus::{BusError, BusHandle, Delivery, QueueConfig};
use troupe_store::Store;
use troupe_wire::{Envelope, JobRequest, Stage};

/// A training stage for [`serve`], implemented by the stage's training
/// settings. It names the stage's jobs and trains one job.
pub trait JobStage: Sized + Send + Sync {
    /// The stage whose job subject this service reads.
    const STAGE: Stage;
    /// The kind of job in log messages, as in "pretraining job started".
    const JOB_KIND: &'static str;

    /// The stage's error. A bus failure while settling a delivery converts into it.
    type Error: std::fmt::Display + From<BusError> + Send;

    /// Trains one job until it finishes or `job.stop` turns true, and logs the
    /// "job finished" line with the stage's metrics. While it trains it calls
    /// `job.keepalive.0.progress()` at least every `job.keepalive.1`.
    fn train(&self, job: JobContext<'_>) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Whether `error` will recur on every delivery, so the job goes to the
    /// dead-letter subject instead of back to the queue.
    fn is_permanent(error: &Self::Error) -> bool;
}

/// What [`JobStage::train`] needs from the service besides the job's settings.
pub struct JobContext<'a> {
    pub bus: &'a BusHandle,
    pub store: &'a Store,
    /// Turns true at shutdown, when the job saves a checkpoint and returns.
    pub stop: watch::Receiver<bool>,
    /// The job's delivery and how often to call its `progress()`, a quarter
    /// of the queue's `ack_wait`.
    pub keepalive: (&'a Delivery, Duration),
}

/// Settings of the job queue, taken from each trainer's `ServiceSettings`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobQueueSettings {
    /// Durable queue name on the stage's job subject, shared by replicas.
    pub queue: String,
    /// Seconds a job may go without a sign of life before the bus delivers it
    /// again. While it trains, the trainer extends the deadline every quarter of this.
    pub job_ack_wait_secs: u64,
    /// Deliveries of one job before it goes to the dead-letter subject.
    pub job_max_deliver: u64,
    /// Seconds before a job handed back after a failure is delivered again.
    pub job_retry_delay_secs: u64,
}

impl JobQueueSettings {
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

/// Serves jobs of stage `S` until `shutdown` resolves, building each job's
/// settings with `job_settings`, which returns the reason for an invalid job
/// and must take the output model name from `JobRequest::output`.
/// A job in progress at shutdown saves a checkpoint and is handed back to the
/// queue. The caller validates `settings` first and logs the service's stop.
pub async fn serve<S: JobStage>(
    settings: JobQueueSettings,
    bus: BusHandle,
    store: Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
    job_settings: fn(&JobRequest) -> Result<S, String>,
) -> Result<(), S::Error> {
    let (stop_tx, mut stop) = watch::channel(false);
    let watcher = tokio::spawn(async move {
        shutdown.await;
        stop_tx.send(true).ok();
    });

    let ack_wait = Duration::from_secs(settings.job_ack_wait_secs);
    let mut config = QueueConfig::new(&settings.queue, &bus.subjects().jobs_for(S::STAGE));
    config.ack_wait = ack_wait;
    config.max_deliver = settings.job_max_deliver;
    // One job at a time: a job occupies the whole process.
    config.max_in_flight = 1;
    let mut queue = bus.queue(config).await?;
    tracing::info!(queue = %settings.queue, subject = %bus.subjects().jobs_for(S::STAGE), "waiting for {} jobs", S::JOB_KIND);

    let service = Service {
        settings: &settings,
        bus: &bus,
        store: &store,
        ack_wait,
        job_settings,
    };
    loop {
        let next = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            next = queue.next_message::<JobRequest>() => next?,
        };
        let (envelope, delivery) = next;
        service.handle_job(envelope, delivery, stop.clone()).await?;
    }
    watcher.abort();
    Ok(())
}

/// The parts of [`serve`] that each job needs.
struct Service<'a, S> {
    settings: &'a JobQueueSettings,
    bus: &'a BusHandle,
    store: &'a Store,
    ack_wait: Duration,
    job_settings: fn(&JobRequest) -> Result<S, String>,
}

impl<S: JobStage> Service<'_, S> {
    async fn handle_job(
        &self,
        envelope: Envelope<JobRequest>,
        delivery: Delivery,
        stop: watch::Receiver<bool>,
    ) -> Result<(), S::Error> {
        let job = envelope.payload;
        if job.stage != S::STAGE {
            tracing::debug!(job_id = %job.job_id, stage = ?job.stage, "job for another stage; skipping");
            delivery.ack().await?;
            return Ok(());
        }
        let span = tracing::info_span!("job", job_id = %job.job_id, message_id = %envelope.id);
        self.train_job(job, delivery, stop).instrument(span).await
    }

    /// Trains one job of this stage and settles its delivery by the outcome.
    async fn train_job(
        &self,
        job: JobRequest,
        delivery: Delivery,
        stop: watch::Receiver<bool>,
    ) -> Result<(), S::Error> {
        let job_settings = match (self.job_settings)(&job) {
            Ok(job_settings) => job_settings,
            Err(reason) => {
                delivery
                    .reject(&format!("job {}: {reason}", job.job_id))
                    .await?;
                return Ok(());
            }
        };
        // Every stage's `job_settings` takes the output model name from `job.output`.
        tracing::info!(output = %job.output, delivered = delivery.delivered, "{} job started", S::JOB_KIND);

        let context = JobContext {
            bus: self.bus,
            store: self.store,
            stop,
            keepalive: (&delivery, self.ack_wait / 4),
        };
        let outcome = job_settings.train(context).await;
        match outcome {
            Ok(()) => {
                delivery.ack().await?;
            }
            Err(error) if S::is_permanent(&error) => {
                tracing::warn!(%error, "{} job failed", S::JOB_KIND);
                delivery
                    .reject(&format!("job {}: {error}", job.job_id))
                    .await?;
            }
            Err(error) => {
                tracing::warn!(%error, "{} job interrupted; handing it back for a retry", S::JOB_KIND);
                delivery
                    .nak(Duration::from_secs(self.settings.job_retry_delay_secs))
                    .await?;
            }
        }
        Ok(())
    }
}
