//! The scripted labeler: ranks every candidate set it reads by a
//! configurable rule and publishes the ranking on the rankings subject in
//! JSON, exactly as an external labeling tool would. Demos and tests use it
//! in place of people.
//!
//! - [`rule`]: the preference (weighted rules), candidate scores and the
//!   ranking they imply; pure functions that the PPO evaluation reuses.
//! - [`settings`]: flags and environment variables, checked all at once.
//! - [`run`]: the service loop on the bus.
//!
//! Not here: validation and storage of rankings (the ranking intake does
//! that for every source alike).

pub mod rule;
pub mod settings;

use std::future::Future;
use std::time::Duration;

use tracing::Instrument;
use troupe_bus::{BusError, BusHandle, Delivery, Outgoing, QueueConfig};
use troupe_wire::{CandidateSet, ContentType, Envelope, Ranking};

pub use rule::{rank, score_candidate, score_response, Preference};
pub use settings::{Cli, LabelerArgs, LabelerSettings};

/// How long a candidate set whose ranking could not be published waits
/// before it is delivered again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Counts of the sets one [`run`] handled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelerSummary {
    /// Rankings published.
    pub ranked: u64,
    /// Sets skipped because every candidate scored the same.
    pub all_tied: u64,
    /// Sets skipped because they had expired.
    pub expired: u64,
}

/// Errors that stop the labeler.
#[derive(Debug, thiserror::Error)]
pub enum LabelerError {
    #[error("bus failure: {0}")]
    Bus(#[from] BusError),
}

/// Returns the id of the ranking `labeler` gives `set_id`. It is the same on
/// every delivery of the set, so a redelivery is stored once.
pub fn ranking_id(labeler: &str, set_id: &str) -> String {
    format!("{labeler}-{set_id}")
}

/// Ranks `set` under `settings`, or returns `None` when every candidate
/// scored the same.
pub fn ranking_for(settings: &LabelerSettings, set: &CandidateSet) -> Option<Ranking> {
    let order = rank(&settings.preference, set)?;
    Some(Ranking {
        ranking_id: ranking_id(&settings.labeler_id, &set.set_id),
        set_id: set.set_id.clone(),
        labeler: settings.labeler_id.clone(),
        order,
        note: Some("scripted labeler".to_string()),
    })
}

/// Reads candidate sets from the durable queue `settings.queue` and
/// publishes a ranking for each, until `shutdown` resolves or
/// `settings.max_sets` sets are handled.
pub async fn run(
    settings: LabelerSettings,
    bus: BusHandle,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<LabelerSummary, LabelerError> {
    let candidates = bus.subjects().candidates();
    let rankings = bus.subjects().rankings();
    let mut queue = bus.queue(QueueConfig::new(&settings.queue, &candidates)).await?;
    tracing::info!(labeler = %settings.labeler_id, queue = %settings.queue, %candidates, %rankings, preference = ?settings.preference, "labeler started");

    let mut summary = LabelerSummary::default();
    tokio::pin!(shutdown);
    loop {
        if settings.max_sets > 0 && summary.ranked + summary.all_tied + summary.expired >= settings.max_sets {
            break;
        }
        let (envelope, delivery) = tokio::select! {
            () = &mut shutdown => break,
            next = queue.next_message::<CandidateSet>() => next?,
        };
        let set = envelope.payload;
        let span = tracing::info_span!("candidate_set", set_id = %set.set_id, prompt_id = %set.prompt_id);
        handle_set(&settings, &bus, &rankings, set, delivery, &mut summary).instrument(span).await?;
    }
    tracing::info!(ranked = summary.ranked, all_tied = summary.all_tied, expired = summary.expired, "labeler stopped");
    Ok(summary)
}

/// Ranks one set, publishes the ranking and settles the delivery.
async fn handle_set(
    settings: &LabelerSettings,
    bus: &BusHandle,
    rankings: &str,
    set: CandidateSet,
    delivery: Delivery,
    summary: &mut LabelerSummary,
) -> Result<(), LabelerError> {
    if set.expires_at_ms.is_some_and(|expires| expires < troupe_wire::codec::now_ms()) {
        tracing::info!("set expired, not ranked");
        summary.expired += 1;
        delivery.ack().await?;
        return Ok(());
    }
    let Some(ranking) = ranking_for(settings, &set) else {
        tracing::info!(candidates = set.candidates.len(), "every candidate scored the same, not ranked");
        metrics::counter!("troupe_labeler_sets_total", "outcome" => "all_tied").increment(1);
        summary.all_tied += 1;
        delivery.ack().await?;
        return Ok(());
    };

    let envelope = Envelope::with_id(bus.subjects().run().as_str(), ranking.ranking_id.clone(), troupe_wire::codec::now_ms(), ranking);
    let outgoing = Outgoing::encode(rankings, &envelope, ContentType::Json)?;
    match bus.publish_durable_raw(rankings, outgoing).await {
        Ok(_) => {
            tracing::info!(ranking_id = %envelope.payload.ranking_id, groups = envelope.payload.order.len(), "ranking published");
            metrics::counter!("troupe_labeler_sets_total", "outcome" => "ranked").increment(1);
            summary.ranked += 1;
            delivery.ack().await?;
        }
        Err(err) => {
            tracing::warn!(error = %err, retry_in_ms = RETRY_DELAY.as_millis() as u64, "publishing the ranking failed");
            delivery.nak(RETRY_DELAY).await?;
        }
    }
    Ok(())
}
