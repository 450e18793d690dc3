//! The two bus consumers: candidate sets into the store, and rankings from
//! external tools through [`Intake::decide`].
//!
//! Each message is acknowledged only after its result is stored. A store or
//! bus failure requests redelivery after the retry delay. A message that
//! cannot be used is rejected to the dead-letter subject with the
//! reason, and the worker goes on.

use serde::Deserialize;
use tokio::sync::watch;
use tracing::Instrument;
use troupe_bus::{BusError, BusHandle, Delivery, Outgoing, QueueConfig};
use troupe_wire::{CandidateSet, ContentType, Envelope, Ranking, RankingReceipt};

use crate::intake::Intake;
use crate::pairs::Rejection;
use crate::record::Source;
use crate::settings::IntakeSettings;

/// Header in which an external tool names the subject that should receive
/// the receipt of its ranking.
pub const REPLY_TO_HEADER: &str = "Troupe-Reply-To";

/// Waits until the shutdown flag is set. A closed channel counts as set,
/// because no notice can come after its sender is gone.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    shutdown.wait_for(|stop| *stop).await.map(|_| ()).unwrap_or(())
}

/// Consumes the candidates subject until shutdown.
pub async fn consume_candidates(
    intake: Intake,
    settings: IntakeSettings,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BusError> {
    let bus = intake.bus().clone();
    let subject = bus.subjects().candidates();
    let mut queue = bus.queue(QueueConfig::new(&settings.candidates_queue, &subject)).await?;
    tracing::info!(%subject, queue = %settings.candidates_queue, "consuming candidate sets");
    loop {
        let (envelope, delivery) = tokio::select! {
            () = stopped(&mut shutdown) => return Ok(()),
            next = queue.next_message::<CandidateSet>() => next?,
        };
        let set = envelope.payload;
        let set_id = set.set_id.clone();
        match intake.add_candidate_set(set).await {
            Ok(added) => {
                tracing::info!(%set_id, added, "candidate set stored");
                delivery.ack().await?;
            }
            Err(err) => {
                tracing::warn!(%set_id, error = %err, retry_in_ms = settings.retry_delay.as_millis() as u64, "storing a candidate set failed");
                delivery.nak(settings.retry_delay).await?;
            }
        }
    }
}

/// Consumes the rankings subject until shutdown.
pub async fn consume_rankings(
    intake: Intake,
    settings: IntakeSettings,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BusError> {
    let bus = intake.bus().clone();
    let subject = bus.subjects().rankings();
    let mut queue = bus.queue(QueueConfig::new(&settings.rankings_queue, &subject)).await?;
    tracing::info!(%subject, queue = %settings.rankings_queue, reply_header = REPLY_TO_HEADER, "consuming rankings");
    loop {
        let delivery = tokio::select! {
            () = stopped(&mut shutdown) => return Ok(()),
            next = queue.next() => next?,
        };
        handle_ranking(&intake, &settings, &bus, delivery).await?;
    }
}

async fn handle_ranking(
    intake: &Intake,
    settings: &IntakeSettings,
    bus: &BusHandle,
    delivery: Delivery,
) -> Result<(), BusError> {
    let reply_to = delivery.message.headers.get(REPLY_TO_HEADER).cloned();
    let envelope = match delivery.decode::<Ranking>() {
        Ok(envelope) => envelope,
        Err(err) => {
            let reason = format!("cannot decode as {}: {err}", <Ranking as troupe_wire::Message>::KIND);
            let (ranking_id, set_id) = loose_ids(&delivery);
            let receipt = RankingReceipt { ranking_id, set_id, accepted: false, reason: Some(reason.clone()), pairs: 0, duplicate: false };
            intake.publish_receipt(&receipt).await;
            reply(bus, reply_to.as_deref(), reply_content_type(&delivery), &receipt).await;
            return delivery.reject(&reason).await;
        }
    };

    let span = tracing::info_span!("ranking", ranking_id = %envelope.payload.ranking_id, set_id = %envelope.payload.set_id);
    let decided = intake.decide(envelope.payload, Source::Bus, envelope.time_ms).instrument(span).await;
    let verdict = match decided {
        Ok(verdict) => verdict,
        Err(err) => {
            tracing::warn!(error = %err, retry_in_ms = settings.retry_delay.as_millis() as u64, "storing a ranking failed");
            return delivery.nak(settings.retry_delay).await;
        }
    };

    if let Some(Rejection::UnknownSet { .. }) = verdict.rejection {
        if delivery.delivered <= settings.unknown_set_retries {
            tracing::info!(delivered = delivery.delivered, retries = settings.unknown_set_retries, "set not seen yet, ranking retried later");
            return delivery.nak(settings.retry_delay).await;
        }
    }

    intake.publish_receipt(&verdict.receipt).await;
    reply(bus, reply_to.as_deref(), reply_content_type(&delivery), &verdict.receipt).await;
    match &verdict.rejection {
        Some(rejection) => delivery.reject(&rejection.to_string()).await,
        None => delivery.ack().await,
    }
}

/// Sends `receipt` to the subject the submitter named, in the encoding it
/// used. Nothing is sent without a reply subject; an invalid one is logged.
async fn reply(bus: &BusHandle, reply_to: Option<&str>, content_type: ContentType, receipt: &RankingReceipt) {
    let Some(subject) = reply_to.map(str::trim).filter(|subject| !subject.is_empty()) else {
        return;
    };
    let valid = !subject.contains(char::is_whitespace)
        && subject.split('.').all(|token| !token.is_empty() && token != "*" && token != ">");
    if !valid {
        metrics::counter!("troupe_ranking_intake_publish_failures_total", "subject" => "reply").increment(1);
        tracing::warn!(reply_to = subject, "invalid reply subject, receipt not sent there");
        return;
    }
    let envelope = Envelope::new(bus.subjects().run().as_str(), receipt.clone());
    let sent = match Outgoing::encode(subject, &envelope, content_type) {
        Ok(outgoing) => bus.publish_raw(subject, outgoing).await,
        Err(err) => Err(err),
    };
    if let Err(err) = sent {
        metrics::counter!("troupe_ranking_intake_publish_failures_total", "subject" => "reply").increment(1);
        tracing::warn!(reply_to = subject, error = %err, "sending a receipt to the reply subject failed");
    }
}

/// JSON for a JSON request or one with an unknown content type, otherwise
/// MessagePack.
fn reply_content_type(delivery: &Delivery) -> ContentType {
    ContentType::from_header(delivery.message.content_type_header()).unwrap_or(ContentType::Json)
}

#[derive(Deserialize)]
struct LooseEnvelope {
    #[serde(default)]
    payload: Option<LoosePayload>,
}

#[derive(Deserialize)]
struct LoosePayload {
    #[serde(default)]
    ranking_id: Option<String>,
    #[serde(default)]
    set_id: Option<String>,
}

/// Reads the ranking and set ids of a message that failed to decode as a
/// ranking, so its receipt can name them. Ids that cannot be read are empty.
fn loose_ids(delivery: &Delivery) -> (String, String) {
    let bytes = &delivery.message.payload;
    let envelope: Option<LooseEnvelope> = match reply_content_type(delivery) {
        ContentType::Json => serde_json::from_slice(bytes).ok(),
        ContentType::MessagePack => rmp_serde::from_slice(bytes).ok(),
    };
    let payload = envelope.and_then(|envelope| envelope.payload);
    let ranking_id = payload.as_ref().and_then(|payload| payload.ranking_id.clone()).unwrap_or_default();
    let set_id = payload.and_then(|payload| payload.set_id).unwrap_or_default();
    (ranking_id, set_id)
}
