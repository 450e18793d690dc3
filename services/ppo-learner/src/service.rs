//! The learner on the bus: drives the prompt batches, collects scored
//! rollouts from the `scored` work queue, trains, publishes and announces
//! each new policy version, and only then acknowledges the rollouts it
//! trained on.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::Instant;

use troupe_bus::{BusHandle, Delivery, QueueConfig};
use troupe_store::{ModelRef, ModelRegistry, Store};
use troupe_train::{find_job_checkpoint, DerivedSizes, StepReporter, StepStats};
use troupe_wire::codec::now_ms;
use troupe_wire::{Envelope, FinishReason, JobState, ScoredRollout, Stage};

use crate::checkpoint::{self, PpoState};
use crate::learner::{Learner, Sample};
use crate::prompts::{prompt_batch, BatchRequest, PromptSet};
use crate::{PpoError, Settings};

/// What one call of [`run`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PpoSummary {
    /// PPO steps completed by this call.
    pub steps_run: u64,
    /// PPO steps completed by the job, this call and earlier ones.
    pub job_steps: u64,
    /// The newest policy version.
    pub final_version: Option<ModelRef>,
    /// Rollouts trained on by this call.
    pub trained: u64,
    /// Rollouts acknowledged untrained because their policy was too old.
    pub stale: u64,
    /// Rollouts acknowledged untrained because a step already used them.
    pub duplicates: u64,
    /// Rollouts rejected to the dead-letter subject.
    pub rejected: u64,
    /// Whether the job has reached its last step.
    pub finished: bool,
}

/// One held delivery and what it carries.
struct Held {
    rollout_id: String,
    sample: Sample,
    delivery: Delivery,
}

/// Runs the learner until the job's last step or until `shutdown` resolves.
/// On shutdown, held rollouts stay unacknowledged and are delivered again
/// after `--ack-wait`, to this learner restarted or to another.
pub async fn run(
    settings: Settings,
    bus: BusHandle,
    store: Store,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<PpoSummary, PpoError> {
    settings.validate().map_err(PpoError::Settings)?;
    let registry = ModelRegistry::new(store);
    let prompts = PromptSet::load(&settings.prompts, settings.seed)?;
    let settings_json = serde_json::to_value(&settings).unwrap_or_default();

    // Resume the job, or start it from the reference.
    let (mut learner, tokenizer, mut state, mut current) =
        match find_job_checkpoint(&registry, &settings.policy, &settings.job_id).await? {
            Some(manifest) => {
                let resumed = checkpoint::resume(&registry, manifest).await?;
                let current = resumed.manifest.model_ref();
                tracing::info!(job_id = %settings.job_id, policy = %current, step = resumed.state.step, "resuming from checkpoint");
                troupe_train::announce(&bus, &resumed.manifest, BTreeMap::new()).await?;
                (resumed.learner, resumed.tokenizer, resumed.state, current)
            }
            None => {
                let reference = resolve_reference(&registry, &settings.reference).await?;
                let (learner, tokenizer) =
                    checkpoint::start_from_reference(&registry, &reference, settings.kl_controller(), settings.ppo_config()).await?;
                let state = PpoState {
                    job_id: settings.job_id.clone(),
                    step: 0,
                    total_steps: settings.steps,
                    kl_controller: learner.kl_controller().clone(),
                    reference: reference.clone(),
                    config: learner.config().clone(),
                    trained_rollouts: Vec::new(),
                    finished: false,
                };
                let manifest = checkpoint::publish(
                    &registry, &settings.policy, reference.clone(), &learner, &tokenizer, &state, &BTreeMap::new(), settings_json.clone(),
                )
                .await?;
                troupe_train::announce(&bus, &manifest, BTreeMap::new()).await?;
                tracing::info!(job_id = %settings.job_id, %reference, policy = %manifest.model_ref(), "starting policy published");
                (learner, tokenizer, state, manifest.model_ref())
            }
        };

    let scored = bus.subjects().scored();
    let mut queue_config = QueueConfig::new(&settings.queue, &scored);
    queue_config.ack_wait = settings.ack_wait();
    queue_config.max_in_flight = settings.batch_size;
    queue_config.max_deliver = settings.max_deliver;
    let mut queue = bus.queue(queue_config).await?;

    let request = BatchRequest {
        rollouts_per_prompt: settings.rollouts_per_prompt,
        prompts_per_batch: settings.batch_size / settings.rollouts_per_prompt as usize,
        sampling: troupe_wire::SamplingParams {
            temperature: settings.temperature,
            top_k: settings.top_k,
            top_p: settings.top_p,
            max_new_tokens: settings.max_new_tokens,
            seed: settings.seed,
        },
    };
    let sizes = DerivedSizes {
        parameters: learner.policy().num_parameters(),
        micro_batch: settings.minibatch_size,
        grad_accum: 1,
        tokens_per_step: settings.batch_size * settings.max_new_tokens as usize,
        total_steps: settings.steps,
    };
    tracing::info!(
        scored = %scored,
        prompts_subject = %bus.subjects().prompts(),
        models = %bus.subjects().models(),
        policy = %current,
        reference = %state.reference,
        prompts = prompts.len(),
        optimizer_steps_per_ppo_step = settings.epochs * settings.batch_size.div_ceil(settings.minibatch_size),
        "ppo learner started"
    );
    sizes.log();

    let mut reporter = StepReporter::new(&settings.job_id, Stage::Ppo, state.step, settings.steps, Some(bus.clone()));
    let mut summary = PpoSummary { job_steps: state.step, final_version: Some(current.clone()), ..PpoSummary::default() };
    let mut already_trained: HashSet<String> = state.trained_rollouts.iter().cloned().collect();
    let mut held: Vec<Held> = Vec::with_capacity(settings.batch_size);
    let heartbeat = settings.ack_wait() / 3;
    tokio::pin!(shutdown);

    while state.step < settings.steps {
        let step = state.step;

        // Ask for rollouts.
        for ahead in 0..settings.prompt_batches_ahead {
            let batch_step = step + ahead;
            if batch_step >= settings.steps {
                break;
            }
            let wire_policy = troupe_wire::ModelRef { name: current.name.clone(), version: current.version };
            let batch = prompt_batch(&prompts, &settings.job_id, batch_step, &wire_policy, &request);
            let envelope = Envelope::with_id(bus.subjects().run().as_str(), batch.batch_id.clone(), now_ms(), batch);
            bus.publish_durable(&bus.subjects().prompts(), &envelope).await?;
        }

        // Collect a batch.
        let wait_started = Instant::now();
        while held.len() < settings.batch_size {
            let next = tokio::select! {
                () = &mut shutdown => {
                    tracing::info!(held = held.len(), "shutdown requested; held rollouts will be delivered again");
                    return Ok(summary);
                }
                () = tokio::time::sleep(heartbeat) => None,
                next = queue.next_message::<ScoredRollout>() => Some(next?),
            };
            match next {
                None => extend_deadlines(&held).await,
                Some((envelope, delivery)) => {
                    admit(&settings, &learner, &current, &mut already_trained, &mut held, &mut summary, envelope, delivery).await?;
                }
            }
        }
        let wait_s = wait_started.elapsed().as_secs_f64();

        // Train.
        let train_started = Instant::now();
        let samples: Vec<Sample> = held.iter().map(|h| h.sample.clone()).collect();
        let work = tokio::task::spawn_blocking(move || {
            let report = learner.train_step(&samples);
            (learner, report)
        });
        tokio::pin!(work);
        let (returned, report) = loop {
            tokio::select! {
                joined = &mut work => break joined.map_err(|e| PpoError::Invalid(format!("the training step panicked: {e}")))?,
                () = tokio::time::sleep(heartbeat) => extend_deadlines(&held).await,
            }
        };
        learner = returned;
        let report = report?;
        let train_s = train_started.elapsed().as_secs_f64();

        // Publish, announce, acknowledge.
        let sync_started = Instant::now();
        state.step = learner.step();
        state.kl_controller = learner.kl_controller().clone();
        state.trained_rollouts = held.iter().map(|h| h.rollout_id.clone()).collect();
        state.finished = state.step >= settings.steps;
        let mut metrics = report.metrics();
        metrics.insert("wait_s".into(), wait_s);
        metrics.insert("train_s".into(), train_s);
        metrics.insert("stale_total".into(), summary.stale as f64);
        let manifest =
            checkpoint::publish(&registry, &settings.policy, current.clone(), &learner, &tokenizer, &state, &metrics, settings_json.clone())
                .await?;
        troupe_train::announce(&bus, &manifest, metrics.clone()).await?;
        current = manifest.model_ref();
        let trained_ids: Vec<String> = held.iter().map(|h| h.rollout_id.clone()).collect();
        for item in held.drain(..) {
            if let Err(error) = item.delivery.ack().await {
                tracing::warn!(rollout_id = %item.rollout_id, %error, "acknowledging a trained rollout failed; it will come back and be skipped");
            }
        }
        already_trained = trained_ids.into_iter().collect();
        let sync_s = sync_started.elapsed().as_secs_f64();
        metrics.insert("sync_s".into(), sync_s);

        // Log.
        summary.steps_run += 1;
        summary.job_steps = state.step;
        summary.trained += report.rollouts as u64;
        summary.final_version = Some(current.clone());
        tracing::info!(
            step = step + 1,
            policy = %current,
            reward = format!("{:.4}", report.reward),
            reward_raw = format!("{:.4}", report.reward_raw),
            kl = format!("{:.4}", report.kl),
            kl_k3 = format!("{:.4}", report.kl_k3),
            kl_coef = format!("{:.4}", report.kl_coef),
            clip_fraction = format!("{:.3}", report.clip_fraction),
            approx_kl = format!("{:.5}", report.approx_kl),
            entropy = format!("{:.3}", report.entropy),
            value_loss = format!("{:.4}", report.value_loss),
            explained_variance = format!("{:.3}", report.explained_variance),
            response_length = format!("{:.1}", report.response_length),
            eos_rate = format!("{:.2}", report.eos_rate),
            policy_lag = format!("{:.2}", report.policy_lag),
            wait_s = format!("{wait_s:.2}"),
            train_s = format!("{train_s:.2}"),
            sync_s = format!("{sync_s:.2}"),
            "ppo step"
        );
        let stats = StepStats {
            step,
            loss: report.policy_loss + learner.config().value_coef * report.value_loss,
            lr: learner.config().learning_rate,
            grad_norm: report.grad_norm,
            tokens: report.response_tokens,
        };
        reporter.step(&stats, &metrics).await;
    }

    summary.finished = true;
    let mut final_metrics = BTreeMap::new();
    final_metrics.insert("stale_total".into(), summary.stale as f64);
    reporter.finish(JobState::Succeeded, state.step, final_metrics, Some(format!("final policy {current}"))).await;
    tracing::info!(policy = %current, steps = summary.steps_run, trained = summary.trained, stale = summary.stale, duplicates = summary.duplicates, rejected = summary.rejected, "ppo learner finished");
    Ok(summary)
}

/// Looks up `NAME` (its newest version) or `NAME@VERSION` in the registry.
async fn resolve_reference(registry: &ModelRegistry, reference: &str) -> Result<ModelRef, PpoError> {
    if reference.contains('@') {
        return reference.parse::<ModelRef>().map_err(PpoError::from);
    }
    match registry.latest(reference).await? {
        Some(manifest) => Ok(manifest.model_ref()),
        None => Err(PpoError::Invalid(format!(
            "--reference {reference}: the registry has no version of {reference:?}; run SFT first or name an existing model"
        ))),
    }
}

/// Restarts the `ack_wait` clock of every held delivery.
async fn extend_deadlines(held: &[Held]) {
    for item in held {
        if let Err(error) = item.delivery.progress().await {
            tracing::warn!(rollout_id = %item.rollout_id, %error, "extending the acknowledgement deadline failed");
        }
    }
}

/// Decides what to do with one scored rollout: hold it for training, or
/// settle it now as stale, duplicate or invalid.
#[allow(clippy::too_many_arguments)]
async fn admit(
    settings: &Settings,
    learner: &Learner,
    current: &ModelRef,
    already_trained: &mut HashSet<String>,
    held: &mut Vec<Held>,
    summary: &mut PpoSummary,
    envelope: Envelope<ScoredRollout>,
    delivery: Delivery,
) -> Result<(), PpoError> {
    let scored = envelope.payload;
    let rollout = &scored.rollout;
    let rollout_id = rollout.rollout_id.clone();

    if rollout.policy.name != current.name {
        summary.rejected += 1;
        let reason = format!(
            "rollout {rollout_id} was sampled from {}@{}, but this learner trains {}; point the sampler at --policy {}",
            rollout.policy.name, rollout.policy.version, current.name, current.name
        );
        delivery.reject(&reason).await?;
        return Ok(());
    }
    if already_trained.contains(&rollout_id) || held.iter().any(|h| h.rollout_id == rollout_id) {
        summary.duplicates += 1;
        tracing::debug!(%rollout_id, "rollout already trained on or held; acknowledged");
        delivery.ack().await?;
        return Ok(());
    }
    let lag = current.version.saturating_sub(rollout.policy.version);
    if lag > settings.max_policy_lag || rollout.policy.version > current.version {
        summary.stale += 1;
        metrics::counter!("troupe_ppo_stale_rollouts_total").increment(1);
        tracing::info!(%rollout_id, rollout_version = rollout.policy.version, learner_version = current.version, lag, max_policy_lag = settings.max_policy_lag, "stale rollout acknowledged without training");
        delivery.ack().await?;
        return Ok(());
    }
    let sample = Sample {
        prompt_tokens: rollout.prompt_tokens.clone(),
        response_tokens: rollout.response_tokens.clone(),
        sampler_logprobs: rollout.logprobs.clone(),
        temperature: rollout.sampling.temperature,
        ended_with_eos: rollout.finish_reason == FinishReason::Eos,
        score: scored.score,
        raw_score: scored.raw_score,
        lag,
    };
    if let Err(reason) = learner.check_sample(&sample) {
        summary.rejected += 1;
        delivery.reject(&format!("rollout {rollout_id}: {reason}")).await?;
        return Ok(());
    }
    held.push(Held { rollout_id, sample, delivery });
    Ok(())
}
