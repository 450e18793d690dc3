//! Durable work queues shared by service replicas.
//!
//! A [`Queue`] hands out one [`Delivery`] at a time. The consumer stores the
//! result of its work and only then calls [`Delivery::ack`]; a consumer that
//! dies before that has its message delivered again after `ack_wait`. A
//! message the consumer cannot use is passed to [`Delivery::reject`], which
//! records it on the dead-letter subject with the reason and never delivers
//! it again. The queue itself dead-letters a message whose delivery count
//! passes `max_deliver`, so one poison message cannot stall a service.

use std::time::Duration;

use async_trait::async_trait;
use troupe_wire::{ContentType, DeadLetter, Envelope, Message, WireError};

use crate::message::{Incoming, Outgoing};
use crate::{validate_name, BusError, BusHandle};

/// Settings of one durable queue. Replicas that open a queue with the same
/// `durable` name share it.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// Consumer name shared by all replicas; ASCII letters, digits, `-`, `_`.
    pub durable: String,
    /// The subject to consume, such as `troupe.<run>.prompts`.
    pub subject: String,
    /// How long a delivery may stay unacknowledged before it is delivered
    /// again. Long work should call [`Delivery::progress`] within it.
    pub ack_wait: Duration,
    /// Unacknowledged deliveries allowed at once across all replicas; past
    /// it, [`Queue::next`] waits. This bounds the work and memory in flight.
    pub max_in_flight: usize,
    /// Deliveries of one message before it goes to the dead-letter subject.
    pub max_deliver: u64,
    /// Messages fetched from the server per request. Fetched messages wait
    /// in this process and their `ack_wait` already runs, so keep it 1 unless
    /// each message is handled quickly.
    pub fetch_batch: usize,
}

impl QueueConfig {
    /// Creates a queue configuration with defaults suited to model work: 60 s to acknowledge,
    /// 16 messages in flight, 5 deliveries, one message per fetch.
    pub fn new(durable: &str, subject: &str) -> QueueConfig {
        QueueConfig {
            durable: durable.to_string(),
            subject: subject.to_string(),
            ack_wait: Duration::from_secs(60),
            max_in_flight: 16,
            max_deliver: 5,
            fetch_batch: 1,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), BusError> {
        validate_name("queue name", &self.durable)?;
        let invalid = |what: &'static str, value: String, reason: &str| BusError::Invalid {
            what,
            value,
            reason: reason.to_string(),
        };
        if self.subject.is_empty() || self.subject.contains(char::is_whitespace) {
            return Err(invalid("queue subject", self.subject.clone(), "a subject is dot-separated tokens without spaces"));
        }
        if self.ack_wait < Duration::from_millis(100) {
            return Err(invalid("ack_wait", format!("{:?}", self.ack_wait), "use at least 100 ms"));
        }
        if self.max_in_flight == 0 {
            return Err(invalid("max_in_flight", "0".into(), "use at least 1"));
        }
        if self.max_deliver == 0 {
            return Err(invalid("max_deliver", "0".into(), "use at least 1"));
        }
        if self.fetch_batch == 0 || self.fetch_batch > self.max_in_flight {
            return Err(invalid(
                "fetch_batch",
                self.fetch_batch.to_string(),
                "use at least 1 and at most max_in_flight",
            ));
        }
        Ok(())
    }
}

/// One delivery as an implementation returns it.
pub struct RawDelivery {
    pub message: Incoming,
    /// 1 on first delivery, 2 on the first redelivery, and so on.
    pub delivered: u64,
    pub acker: Box<dyn Acker>,
}

/// The implementation side of a queue.
#[async_trait]
pub trait QueueSource: Send {
    /// Waits for the next delivery.
    async fn fetch(&mut self) -> Result<RawDelivery, BusError>;
}

/// Settles one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Marks the work done and stored, so the message is never delivered again.
    async fn ack(&self) -> Result<(), BusError>;
    /// Deliver it again after `delay`.
    async fn nak(&self, delay: Duration) -> Result<(), BusError>;
    /// Never deliver it again, without success.
    async fn term(&self) -> Result<(), BusError>;
    /// Restarts the `ack_wait` clock while the work goes on.
    async fn progress(&self) -> Result<(), BusError>;
}

/// A durable work queue; see the module documentation.
pub struct Queue {
    source: Box<dyn QueueSource>,
    bus: BusHandle,
    config: QueueConfig,
}

impl Queue {
    pub(crate) fn new(source: Box<dyn QueueSource>, bus: BusHandle, config: QueueConfig) -> Queue {
        Queue { source, bus, config }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Waits for the next delivery, dead-lettering on the way any message
    /// delivered more than `max_deliver` times.
    pub async fn next(&mut self) -> Result<Delivery, BusError> {
        loop {
            let raw = self.source.fetch().await?;
            let delivery = Delivery {
                message: raw.message,
                delivered: raw.delivered,
                acker: raw.acker,
                bus: self.bus.clone(),
                consumer: self.config.durable.clone(),
            };
            if delivery.delivered > self.config.max_deliver {
                let reason = format!(
                    "delivered {} times without acknowledgement (max_deliver {}); the consumer failed or timed out each time",
                    delivery.delivered, self.config.max_deliver
                );
                delivery.reject(&reason).await?;
                continue;
            }
            return Ok(delivery);
        }
    }

    /// Waits for the next message that decodes as `T`. Messages that do not
    /// decode or fail validation go to the dead-letter subject with the
    /// error, and the wait goes on.
    pub async fn next_message<T: Message>(&mut self) -> Result<(Envelope<T>, Delivery), BusError> {
        loop {
            let delivery = self.next().await?;
            match delivery.message.decode::<T>() {
                Ok(envelope) => return Ok((envelope, delivery)),
                Err(err) => {
                    let reason = format!("cannot decode as {}: {err}", T::KIND);
                    delivery.reject(&reason).await?;
                }
            }
        }
    }
}

/// One delivery of a queued message; settle it with exactly one of
/// [`ack`](Delivery::ack), [`nak`](Delivery::nak) or
/// [`reject`](Delivery::reject). Dropping it unsettled leaves the message to
/// be delivered again after `ack_wait`, as a crash would.
pub struct Delivery {
    pub message: Incoming,
    /// 1 on first delivery, 2 on the first redelivery, and so on.
    pub delivered: u64,
    acker: Box<dyn Acker>,
    bus: BusHandle,
    consumer: String,
}

impl Delivery {
    /// Decodes the payload as `T`.
    pub fn decode<T: Message>(&self) -> Result<Envelope<T>, WireError> {
        self.message.decode()
    }

    /// Marks the work done. Call it only after the result is stored.
    pub async fn ack(self) -> Result<(), BusError> {
        self.acker.ack().await
    }

    /// Asks for the message again after `delay`, for a transient failure.
    pub async fn nak(self, delay: Duration) -> Result<(), BusError> {
        self.acker.nak(delay).await
    }

    /// Restarts the `ack_wait` clock while long work goes on.
    pub async fn progress(&self) -> Result<(), BusError> {
        self.acker.progress().await
    }

    /// Records the message on the dead-letter subject with `reason`, then
    /// settles it so it is never delivered again.
    pub async fn reject(self, reason: &str) -> Result<(), BusError> {
        let message_id = self.message.id().map(str::to_string);
        tracing::warn!(
            subject = %self.message.subject,
            message_id = message_id.as_deref().unwrap_or("-"),
            consumer = %self.consumer,
            delivered = self.delivered,
            reason,
            "message rejected to the dead-letter subject"
        );
        metrics::counter!("troupe_bus_dead_letters_total", "consumer" => self.consumer.clone()).increment(1);

        let letter = DeadLetter {
            subject: self.message.subject.clone(),
            message_id: message_id.clone(),
            consumer: self.consumer.clone(),
            reason: reason.to_string(),
            delivered: self.delivered,
            content_type: self.message.content_type_header().map(str::to_string),
            payload: self.message.payload.to_vec(),
        };
        // A dead letter's id derives from the original's, so rejecting the
        // same delivery twice (after a crash in between) records it once.
        let letter_id = match &message_id {
            Some(id) => format!("dead-{}-{id}", self.consumer),
            None => format!("dead-{}-{}", self.consumer, uuid::Uuid::now_v7()),
        };
        let run = self.bus.subjects().run().to_string();
        let envelope = Envelope::with_id(run, letter_id, troupe_wire::codec::now_ms(), letter);
        let dead_subject = self.bus.subjects().dead();
        let outgoing = Outgoing::encode(&dead_subject, &envelope, ContentType::MessagePack)?;
        self.bus.publish_durable_raw(&dead_subject, outgoing).await?;
        self.acker.term().await
    }
}
