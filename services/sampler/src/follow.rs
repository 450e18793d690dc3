//! Following policy announcements: the hot reload.
//!
//! The follower reads every [`ModelAnnouncement`] on the `models` subject.
//! When one names a newer version of the followed policy, it loads that
//! version into the [`PolicyCache`] and only then makes it the version that
//! batches without a policy get, logs `serving policy` and sets the gauge
//! `troupe_sampler_policy_version`. A batch already being sampled keeps the
//! version it started with. A version that fails to load is logged, and the
//! sampler keeps serving the one it had.
//!
//! Announcements are live messages: one sent while the sampler was down is
//! not replayed, so at start [`newest_version`] reads the newest stored
//! announcement and the registry's newest version instead.

use std::sync::Arc;

use troupe_bus::{BusHandle, Subscription};
use troupe_store::{ModelRegistry, StoreError};
use troupe_wire::{ModelAnnouncement, ModelRef};

use crate::policy::{versioned_name, PolicyCache};
use crate::status::StatusHandle;

/// Returns the newest version of `policy` known at start: the higher of the
/// last announcement on the `models` subject (when it names `policy`) and the
/// registry's newest published version.
pub async fn newest_version(
    bus: &BusHandle,
    registry: &ModelRegistry,
    policy: &str,
) -> Result<Option<ModelRef>, StoreError> {
    let mut newest = None;
    match bus.last(&bus.subjects().models()).await {
        Ok(Some(message)) => match message.decode::<ModelAnnouncement>() {
            Ok(envelope) if envelope.payload.model.name == policy => newest = Some(envelope.payload.model),
            Ok(_) => {}
            Err(error) => tracing::warn!(error = %error, "the last message on the models subject does not decode"),
        },
        Ok(None) => {}
        Err(error) => tracing::warn!(error = %error, "cannot read the last model announcement"),
    }
    if let Some(manifest) = registry.latest(policy).await? {
        if newest.as_ref().is_none_or(|known: &ModelRef| manifest.version > known.version) {
            newest = Some(ModelRef { name: policy.to_string(), version: manifest.version });
        }
    }
    Ok(newest)
}

/// The task that follows announcements of one policy.
pub(crate) struct Follower {
    policy: String,
    cache: Arc<PolicyCache>,
    status: StatusHandle,
}

impl Follower {
    pub(crate) fn new(policy: String, cache: Arc<PolicyCache>, status: StatusHandle) -> Follower {
        Follower { policy, cache, status }
    }

    /// Reads announcements until the subscription ends.
    pub(crate) async fn run(self, mut announcements: Subscription) {
        while let Some(message) = announcements.next().await {
            let announcement = match message.decode::<ModelAnnouncement>() {
                Ok(envelope) => envelope.payload,
                Err(error) => {
                    metrics::counter!("troupe_sampler_bad_announcements_total").increment(1);
                    tracing::warn!(
                        subject = %message.subject,
                        message_id = message.id().unwrap_or("-"),
                        error = %error,
                        "ignoring an announcement that does not decode"
                    );
                    continue;
                }
            };
            if announcement.model.name == self.policy {
                self.switch_to(announcement.model).await;
            }
        }
        tracing::warn!(policy = %self.policy, "the models subscription ended; no more hot reloads");
    }

    /// Loads `model` and serves it, when it is newer than the version announced so far.
    pub(crate) async fn switch_to(&self, model: ModelRef) {
        let announced = self.status.snapshot().announced;
        if announced.as_ref().is_some_and(|known| known.version >= model.version) {
            tracing::debug!(policy = %versioned_name(&model), "announcement of a version no newer than the known one");
            return;
        }
        self.status.update(|status| status.announced = Some(model.clone()));
        tracing::info!(policy = %versioned_name(&model), "new policy version announced");

        match self.cache.get(&model).await {
            Ok(_) => {
                self.cache.set_current(&model);
                self.status.update(|status| {
                    status.serving = Some(model.clone());
                    status.loaded = self.cache.loaded();
                });
                metrics::gauge!("troupe_sampler_policy_version", "policy" => self.policy.clone()).set(model.version as f64);
                tracing::info!(policy = %versioned_name(&model), "serving policy");
            }
            Err(error) => {
                let serving = self.status.serving();
                tracing::error!(
                    policy = %versioned_name(&model),
                    serving = serving.as_ref().map(versioned_name).as_deref().unwrap_or("-"),
                    error = %error,
                    "cannot load the announced policy version; still serving the previous one"
                );
            }
        }
    }
}
