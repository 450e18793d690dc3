//! The scorer's loop on the bus.
//!
//! One task per replica handles one rollout at a time, so a replica keeps
//! at most one model and one rollout in memory; `--max-in-flight` bounds the
//! unacknowledged rollouts across replicas. Announcements arrive on a live
//! subscription; one that is missed (the subscriber fell behind) is caught
//! up by the next, because the scorer always loads the announced version
//! when it is newer than the one it has.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use troupe_bus::{BusHandle, Delivery, Outgoing, QueueConfig};
use troupe_reward_trainer::reward_model::latest_finished;
use troupe_reward_trainer::RewardModel;
use troupe_store::{ModelRef, ModelRegistry, Store, StoreError, TOKENIZER_FILE};
use troupe_wire::{ContentType, Envelope, ModelAnnouncement, ModelKind, Rollout};

use crate::score::{score_rollout, Tokenization};
use crate::{ScorerError, Settings};

/// How often a scorer without any reward model looks in the registry again,
/// besides listening for announcements.
const NO_MODEL_POLL: Duration = Duration::from_secs(2);

/// Counts of one [`run`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScorerSummary {
    /// Rollouts scored and published.
    pub scored: u64,
    /// Of those, the ones whose result was already stored (a redelivery).
    pub duplicates: u64,
    /// Rollouts rendered again with the reward model's tokenizer.
    pub retokenized: u64,
    /// Rollouts rejected to the dead-letter subject by this replica.
    pub rejected: u64,
    /// Reward-model versions loaded, the first one included.
    pub loads: u64,
    /// Rollout ids this replica scored, in order.
    pub rollout_ids: Vec<String>,
}

/// Scores rollouts until `shutdown` resolves or `--max-rollouts` are settled.
pub async fn run(
    settings: Settings,
    bus: BusHandle,
    store: Store,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<ScorerSummary, ScorerError> {
    settings.validate().map_err(ScorerError::Settings)?;
    let pinned = settings.pinned().map_err(|problem| ScorerError::Settings(vec![problem]))?;
    let registry = ModelRegistry::new(store);
    let mut summary = ScorerSummary::default();
    let mut policies = PolicyTokenizers::new(settings.policy_cache);
    tokio::pin!(shutdown);

    // Subscribe before looking up the newest version, so no announcement falls in between.
    let mut announcements = bus.subscribe(&bus.subjects().models()).await?;
    let mut reward = match &pinned {
        Some(model) => Some(RewardModel::load(&registry, model).await?),
        None => match latest_finished(&registry, &settings.reward_model).await? {
            Some(model) => Some(RewardModel::load(&registry, &model).await?),
            None => None,
        },
    };
    while reward.is_none() {
        tracing::info!(reward_model = %settings.reward_model, "no reward model yet; waiting for an announcement");
        tokio::select! {
            () = &mut shutdown => return Ok(summary),
            message = announcements.next() => {
                let Some(message) = message else { return Err(troupe_bus::BusError::Closed.into()) };
                if let Some(model) = announced(&settings, &message) {
                    reward = Some(RewardModel::load(&registry, &model).await?);
                }
            }
            () = tokio::time::sleep(NO_MODEL_POLL) => {
                if let Some(model) = latest_finished(&registry, &settings.reward_model).await? {
                    reward = Some(RewardModel::load(&registry, &model).await?);
                }
            }
        }
    }
    let Some(mut reward) = reward else { return Ok(summary) };
    summary.loads += 1;
    tracing::info!(reward_model = %reward.model_ref, "scoring with reward model");

    let mut config = QueueConfig::new(&settings.queue, &bus.subjects().rollouts());
    config.ack_wait = Duration::from_secs(settings.ack_wait_secs);
    config.max_in_flight = settings.max_in_flight;
    config.max_deliver = settings.max_deliver;
    let mut queue = bus.queue(config).await?;
    tracing::info!(queue = %settings.queue, rollouts = %bus.subjects().rollouts(), scored = %bus.subjects().scored(), "reward scorer started");

    loop {
        if settings.max_rollouts > 0 && summary.scored + summary.rejected >= settings.max_rollouts {
            break;
        }
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            message = announcements.next(), if pinned.is_none() => {
                let Some(message) = message else { return Err(troupe_bus::BusError::Closed.into()) };
                let Some(model) = announced(&settings, &message) else { continue };
                if model.version <= reward.model_ref.version {
                    continue;
                }
                match RewardModel::load(&registry, &model).await {
                    Ok(loaded) => {
                        tracing::info!(from = %reward.model_ref, to = %model, "reward model reloaded");
                        reward = loaded;
                        summary.loads += 1;
                    }
                    Err(error) => tracing::warn!(model = %model, %error, "failed to load the announced reward model; keeping the current one"),
                }
            }
            next = queue.next_message::<Rollout>() => {
                let (envelope, delivery) = next?;
                handle_rollout(&settings, &bus, &registry, &reward, &mut policies, envelope, delivery, &mut summary).await?;
            }
        }
    }
    tracing::info!(scored = summary.scored, rejected = summary.rejected, retokenized = summary.retokenized, "reward scorer stopped");
    Ok(summary)
}

/// The version an announcement names, when it is a reward model this scorer follows.
fn announced(settings: &Settings, message: &troupe_bus::Incoming) -> Option<ModelRef> {
    let envelope = match message.decode::<ModelAnnouncement>() {
        Ok(envelope) => envelope,
        Err(error) => {
            tracing::warn!(%error, message_id = message.id().unwrap_or("-"), "ignoring an announcement that does not decode");
            return None;
        }
    };
    let announcement = envelope.payload;
    (announcement.kind == ModelKind::Reward && announcement.model.name == settings.reward_model)
        .then(|| ModelRef::new(announcement.model.name, announcement.model.version))
}

#[allow(clippy::too_many_arguments)]
async fn handle_rollout(
    settings: &Settings,
    bus: &BusHandle,
    registry: &ModelRegistry,
    reward: &RewardModel,
    policies: &mut PolicyTokenizers,
    envelope: Envelope<Rollout>,
    delivery: Delivery,
    summary: &mut ScorerSummary,
) -> Result<(), ScorerError> {
    let rollout = envelope.payload;
    let span = tracing::info_span!("rollout", rollout_id = %rollout.rollout_id, policy = %format!("{}@{}", rollout.policy.name, rollout.policy.version), message_id = %envelope.id);
    let _entered = span.enter();

    let policy = ModelRef::new(rollout.policy.name.clone(), rollout.policy.version);
    let policy_sha = policies.get(registry, &policy).await;
    let rollout_id = rollout.rollout_id.clone();
    let (scored, tokenization) = match score_rollout(reward, rollout, policy_sha.as_deref()) {
        Ok(result) => result,
        Err(reason) => {
            delivery.reject(&format!("rollout {rollout_id}: {reason}")).await?;
            summary.rejected += 1;
            return Ok(());
        }
    };

    let run = bus.subjects().run().to_string();
    let subject = bus.subjects().scored();
    let envelope = Envelope::with_id(run, format!("scored-{rollout_id}"), troupe_wire::codec::now_ms(), scored);
    let published = match Outgoing::encode(&subject, &envelope, ContentType::MessagePack) {
        Ok(outgoing) => bus.publish_durable_raw(&subject, outgoing).await,
        Err(error) => Err(error),
    };
    match published {
        Ok(published) => {
            delivery.ack().await?;
            summary.scored += 1;
            summary.duplicates += u64::from(published.duplicate);
            summary.retokenized += u64::from(tokenization == Tokenization::Retokenized);
            summary.rollout_ids.push(rollout_id);
            metrics::counter!("troupe_scorer_rollouts_total", "outcome" => "scored").increment(1);
            tracing::debug!(raw_score = envelope.payload.raw_score, score = envelope.payload.score, ?tokenization, "rollout scored");
        }
        Err(error) => {
            tracing::warn!(%error, retry_in_ms = settings.retry_delay_ms, "publishing the scored rollout failed");
            delivery.nak(Duration::from_millis(settings.retry_delay_ms)).await?;
        }
    }
    Ok(())
}

/// SHA-256 of each policy version's stored tokenizer, from its manifest,
/// kept for up to `capacity` versions (the oldest is dropped first).
struct PolicyTokenizers {
    capacity: usize,
    known: BTreeMap<ModelRef, String>,
    order: VecDeque<ModelRef>,
}

impl PolicyTokenizers {
    fn new(capacity: usize) -> PolicyTokenizers {
        PolicyTokenizers { capacity, known: BTreeMap::new(), order: VecDeque::new() }
    }

    /// The checksum, or `None` when the version is not stored or the store
    /// cannot be read; then the rollout is retokenized, which is always correct.
    async fn get(&mut self, registry: &ModelRegistry, policy: &ModelRef) -> Option<String> {
        if let Some(sha) = self.known.get(policy) {
            return Some(sha.clone());
        }
        let sha = match registry.manifest(policy).await {
            Ok(manifest) => manifest.file(TOKENIZER_FILE).map(|entry| entry.sha256.clone())?,
            Err(StoreError::NotFound { .. }) => {
                tracing::debug!(policy = %policy, "policy version not in the registry; retokenizing");
                return None;
            }
            Err(error) => {
                tracing::warn!(policy = %policy, %error, "cannot read the policy manifest; retokenizing");
                return None;
            }
        };
        if self.order.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.known.remove(&oldest);
            }
        }
        self.order.push_back(policy.clone());
        self.known.insert(policy.clone(), sha.clone());
        Some(sha)
    }
}
