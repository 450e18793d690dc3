//! The sampler: takes prompt batches from the `prompts` work queue that all
//! sampler replicas share, samples them with one policy version each, and
//! publishes the outputs: a [`CandidateSet`](troupe_wire::CandidateSet) per
//! prompt on `candidates` for ranking, or `n`
//! [`Rollout`](troupe_wire::Rollout)s per prompt on `rollouts` for PPO, each
//! with per-token log-probs at the sampling temperature.
//!
//! - [`batch`]: limits, seeds, output ids and the sampling of one batch with
//!   one version; synchronous and free of bus and store.
//! - [`policy`]: loading versions from the model registry and the bounded
//!   cache of loaded versions.
//! - [`follow`]: the task that follows `ModelAnnouncement`s and hot-reloads
//!   the followed policy.
//! - [`status`]: the version served and the work done, for `troupe status`.
//! - [`settings`]: flags and environment variables, checked all at once.
//!
//! # One batch, one version
//!
//! A batch names a version or none. With none it gets the newest version of
//! `--policy` that this sampler has loaded, read once when the batch starts.
//! A version announced while the batch is sampled is used from the next
//! batch on, so the outputs of one batch always come from one version.
//!
//! # Delivery
//!
//! Each replica samples one batch at a time and reports progress to the
//! queue while it works. It publishes every output durably under an id
//! derived from the batch id, the prompt id and the output index, and
//! acknowledges the batch only after the last publish is stored. A replica
//! that dies mid-batch leaves the batch unacknowledged, and the queue hands it
//! to another replica after `--ack-wait`. That replica samples it again with
//! the same seeds and publishes under the same ids, so the bus drops the
//! outputs it already stored, as long as they fall within its de-duplication
//! window of 2 minutes.
//!
//! A batch that cannot be sampled (malformed, over a limit, naming an unknown
//! or corrupt version, a prompt too long for the model) goes to the
//! dead-letter subject with the reason, and the sampler goes on.
//!
//! Not here: choosing prompts or seeds (the driver and the PPO learner do
//! that), and scoring (the reward scorer).

pub mod batch;
pub mod follow;
pub mod policy;
pub mod settings;
pub mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;
use troupe_bus::{BusError, BusHandle, Delivery, Published, QueueConfig};
use troupe_store::{ModelRegistry, Store};
use troupe_wire::codec::now_ms;
use troupe_wire::{Envelope, Message, ModelRef, PromptBatch};

pub use batch::{sample_batch, BatchError, Limits, Outputs};
pub use follow::newest_version;
pub use policy::{LoadError, LoadedPolicy, PolicyCache};
pub use settings::{Cli, SamplerArgs, SamplerSettings};
pub use status::{status_routes, SampledBatch, SamplerStatus, StatusHandle};

/// How long a batch waits before it is delivered again after a failure that
/// may pass: the store or the bus was unreachable, or no policy version is
/// known yet.
pub const RETRY_DELAY: Duration = Duration::from_secs(5);

/// Errors that stop the sampler. A bad batch never does.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    #[error("bus failure: {0}")]
    Bus(#[from] BusError),
}

/// Runs the sampler until `shutdown` resolves; see the crate documentation.
pub async fn run(
    settings: SamplerSettings,
    bus: BusHandle,
    store: Store,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SamplerError> {
    run_with_status(settings, bus, store, StatusHandle::new(), shutdown).await
}

/// Like [`run`], reporting into `status`, which the caller keeps to read.
pub async fn run_with_status(
    settings: SamplerSettings,
    bus: BusHandle,
    store: Store,
    status: StatusHandle,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SamplerError> {
    let registry = ModelRegistry::new(store);
    let cache = Arc::new(PolicyCache::new(registry.clone(), settings.max_loaded_versions));
    status.update(|status| status.policy_name = settings.policy.clone());

    // Subscribe before looking up the newest version, so an announcement
    // made in between is still seen.
    let announcements = bus.subscribe(&bus.subjects().models()).await?;
    let follower = follow::Follower::new(settings.policy.clone(), cache.clone(), status.clone());
    match newest_version(&bus, &registry, &settings.policy).await {
        Ok(Some(newest)) => follower.switch_to(newest).await,
        Ok(None) => tracing::info!(policy = %settings.policy, "no version of the policy announced yet"),
        Err(error) => tracing::warn!(policy = %settings.policy, error = %error, "cannot look up the newest policy version"),
    }
    let _follower = AbortOnDrop(tokio::spawn(follower.run(announcements)));

    let prompts = bus.subjects().prompts();
    let mut queue_config = QueueConfig::new(&settings.queue, &prompts);
    queue_config.ack_wait = settings.ack_wait;
    queue_config.max_in_flight = settings.max_in_flight;
    queue_config.max_deliver = settings.max_deliver;
    let mut queue = bus.queue(queue_config).await?;
    tracing::info!(
        queue = %settings.queue,
        %prompts,
        candidates = %bus.subjects().candidates(),
        rollouts = %bus.subjects().rollouts(),
        policy = %settings.policy,
        serving = status.serving().as_ref().map(policy::versioned_name).as_deref().unwrap_or("-"),
        "sampler started"
    );

    let worker = Worker { settings, bus, cache, status };
    tokio::pin!(shutdown);
    loop {
        let (envelope, delivery) = tokio::select! {
            () = &mut shutdown => break,
            next = queue.next_message::<PromptBatch>() => next?,
        };
        worker.handle(envelope, delivery).await;
    }
    let status = worker.status.snapshot();
    tracing::info!(
        sampled = status.batches_sampled,
        rejected = status.batches_rejected,
        retried = status.batches_retried,
        outputs = status.outputs_published,
        "sampler stopped"
    );
    Ok(())
}

/// Aborts a spawned task when dropped, so the announcement follower stops
/// with the sampler, however the sampler ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The decision on one batch.
enum Outcome {
    Sampled { policy: ModelRef, outputs: u64, duplicates: u64, tokens: u64 },
    /// Sampling it again would fail again: dead-letter it with the reason.
    Reject(String),
    /// A failure that may pass: deliver it again after [`RETRY_DELAY`].
    Retry(String),
}

struct Worker {
    settings: SamplerSettings,
    bus: BusHandle,
    cache: Arc<PolicyCache>,
    status: StatusHandle,
}

impl Worker {
    async fn handle(&self, envelope: Envelope<PromptBatch>, delivery: Delivery) {
        let batch = envelope.payload;
        let span = tracing::info_span!(
            "batch",
            batch_id = %batch.batch_id,
            message_id = %envelope.id,
            prompts = batch.prompts.len(),
            delivered = delivery.delivered
        );
        let started = Instant::now();
        let batch_id = batch.batch_id.clone();
        self.status.update(|status| status.in_progress = Some(batch_id.clone()));

        async {
            let outcome = self.sample_and_publish(batch, &delivery).await;
            self.settle(outcome, delivery, batch_id, started).await;
        }
        .instrument(span)
        .await
    }

    async fn sample_and_publish(&self, batch: PromptBatch, delivery: &Delivery) -> Outcome {
        if let Err(error) = batch::check_limits(&batch, &self.settings.limits) {
            return Outcome::Reject(error.to_string());
        }

        // The version is chosen once, here, and the whole batch uses it.
        let target = match &batch.policy {
            Some(named) => named.clone(),
            None => match self.status.serving().or_else(|| self.status.snapshot().announced) {
                Some(newest) => newest,
                None => {
                    let reason = format!(
                        "the batch names no policy and no version of {:?} has been announced; \
                         publish and announce one, or name a version in the batch",
                        self.settings.policy
                    );
                    return self.retry_or_reject(delivery, reason);
                }
            },
        };
        let heartbeat = self.settings.ack_wait / 3;
        let policy = match with_heartbeat(delivery, heartbeat, self.cache.get(&target)).await {
            Ok(policy) => policy,
            Err(error) if error.is_permanent() => return Outcome::Reject(error.to_string()),
            Err(error) => return self.retry_or_reject(delivery, error.to_string()),
        };
        self.status.update(|status| status.loaded = self.cache.loaded());
        let version = policy.model_ref.clone();
        tracing::info!(policy = %policy::versioned_name(&version), mode = ?batch.mode, "sampling batch");

        let limits = self.settings.limits.clone();
        let work = tokio::task::spawn_blocking(move || {
            let batch_id = batch.batch_id.clone();
            sample_batch(&policy, &batch, &limits, |done, total| {
                tracing::debug!(batch_id = %batch_id, done, total, "sequences sampled");
            })
        });
        let outputs = match with_heartbeat(delivery, heartbeat, work).await {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(error)) => return Outcome::Reject(error.to_string()),
            Err(error) => return Outcome::Reject(format!("sampling panicked: {error}")),
        };

        let tokens = outputs.generated_tokens();
        match with_heartbeat(delivery, heartbeat, self.publish(outputs)).await {
            Ok((outputs, duplicates)) => Outcome::Sampled { policy: version, outputs, duplicates, tokens },
            Err(error) => Outcome::Retry(format!("publishing the outputs failed: {error}")),
        }
    }

    /// Retries a batch that may succeed later, unless this was its last
    /// allowed delivery. Then it is rejected with `reason`, which tells an
    /// operator more than the queue's own "delivered too often" would.
    fn retry_or_reject(&self, delivery: &Delivery, reason: String) -> Outcome {
        if delivery.delivered >= self.settings.max_deliver {
            Outcome::Reject(format!("{reason} (gave up after {} deliveries)", delivery.delivered))
        } else {
            Outcome::Retry(reason)
        }
    }

    /// Publishes every output durably; returns the count and how many the bus
    /// already had.
    async fn publish(&self, outputs: Outputs) -> Result<(u64, u64), BusError> {
        let mut published = 0;
        let mut duplicates = 0;
        match outputs {
            Outputs::Candidates(sets) => {
                let subject = self.bus.subjects().candidates();
                for set in sets {
                    let id = set.set_id.clone();
                    let stored = self.publish_one(&subject, id, set).await?;
                    published += 1;
                    duplicates += u64::from(stored.duplicate);
                }
            }
            Outputs::Rollouts(rollouts) => {
                let subject = self.bus.subjects().rollouts();
                for rollout in rollouts {
                    let id = rollout.rollout_id.clone();
                    let stored = self.publish_one(&subject, id, rollout).await?;
                    published += 1;
                    duplicates += u64::from(stored.duplicate);
                }
            }
        }
        Ok((published, duplicates))
    }

    async fn publish_one<T: Message>(&self, subject: &str, id: String, payload: T) -> Result<Published, BusError> {
        let envelope = Envelope::with_id(self.bus.subjects().run().as_str(), id, now_ms(), payload);
        let stored = self.bus.publish_durable(subject, &envelope).await?;
        if stored.duplicate {
            tracing::debug!(message_id = %envelope.id, subject, "output already stored by an earlier delivery");
        }
        Ok(stored)
    }

    async fn settle(&self, outcome: Outcome, delivery: Delivery, batch_id: String, started: Instant) {
        let delivered = delivery.delivered;
        match outcome {
            Outcome::Sampled { policy, outputs, duplicates, tokens } => {
                if let Err(error) = delivery.ack().await {
                    // The outputs are stored; a redelivery re-samples and the
                    // bus drops the duplicates.
                    tracing::warn!(error = %error, "acknowledging the batch failed; it will be delivered again");
                }
                let seconds = started.elapsed().as_secs_f64();
                tracing::info!(
                    policy = %policy::versioned_name(&policy),
                    outputs,
                    duplicates,
                    tokens,
                    seconds,
                    tokens_per_s = tokens as f64 / seconds.max(1e-9),
                    "batch sampled"
                );
                metrics::counter!("troupe_sampler_batches_total", "outcome" => "sampled").increment(1);
                metrics::counter!("troupe_sampler_outputs_total").increment(outputs);
                metrics::counter!("troupe_sampler_duplicate_outputs_total").increment(duplicates);
                metrics::counter!("troupe_sampler_generated_tokens_total").increment(tokens);
                metrics::histogram!("troupe_sampler_batch_seconds").record(seconds);
                self.status.record_sampled(SampledBatch { batch_id, policy, outputs, delivered }, duplicates);
            }
            Outcome::Reject(reason) => {
                metrics::counter!("troupe_sampler_batches_total", "outcome" => "rejected").increment(1);
                self.status.update(|status| {
                    status.in_progress = None;
                    status.batches_rejected += 1;
                });
                // `reject` logs the reason with the message id.
                if let Err(error) = delivery.reject(&reason).await {
                    tracing::error!(error = %error, reason, "recording the rejected batch failed; it will be delivered again");
                }
            }
            Outcome::Retry(reason) => {
                tracing::warn!(reason, retry_in_s = RETRY_DELAY.as_secs_f64(), "batch handed back to the queue");
                metrics::counter!("troupe_sampler_batches_total", "outcome" => "retried").increment(1);
                self.status.update(|status| {
                    status.in_progress = None;
                    status.batches_retried += 1;
                });
                if let Err(error) = delivery.nak(RETRY_DELAY).await {
                    tracing::warn!(error = %error, "handing the batch back failed; it will be delivered again after ack_wait");
                }
            }
        }
    }
}

/// Runs `work` while telling the queue, every `every`, that the delivery is
/// still being worked on, so its `ack_wait` does not run out.
async fn with_heartbeat<F: Future>(delivery: &Delivery, every: Duration, work: F) -> F::Output {
    tokio::pin!(work);
    let every = every.max(Duration::from_millis(50));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = ticker.tick() => {
                if let Err(error) = delivery.progress().await {
                    tracing::warn!(error = %error, "reporting progress on the batch failed");
                }
            }
        }
    }
}
