//! troupe's message bus: one [`Bus`] trait with two implementations that
//! keep the same semantics, so every service runs unchanged in one process
//! or across machines.
//!
//! - [`nats`]: NATS with JetStream, for deployments.
//! - [`memory`]: an in-process twin on tokio, for `troupe up` and fast tests.
//! - [`queue`]: durable work queues shared by replicas, with explicit
//!   acknowledgement, redelivery, a delivery limit and the dead-letter subject.
//! - [`message`]: the raw messages both implementations carry.
//! - [`settings`]: the `--nats` and `--run` flags and [`connect`].
//!
//! # Semantics both implementations provide
//!
//! Every subject of a run (`troupe.<run>.>`) is captured by one stream, so a
//! message published before its consumer exists is kept for it. A durable
//! work queue is named; replicas that open a queue with the same name share
//! it, and each message goes to one of them. A delivery that is not
//! acknowledged within `ack_wait` is delivered again, to any replica. Each
//! queue has at most `max_in_flight` unacknowledged deliveries; past that,
//! [`Queue::next`] waits. A message id published twice within the
//! de-duplication window is stored once. A message delivered more than
//! `max_deliver` times, or rejected by its consumer, is published on the
//! dead-letter subject with the reason. Plain subscriptions see live
//! messages only, and a subscriber that falls behind loses messages, which
//! are counted and logged.

pub mod memory;
pub mod message;
pub mod nats;
pub mod queue;
pub mod settings;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use troupe_wire::{encode, ContentType, Envelope, Message, Subjects, WireError};

pub use message::{Incoming, Outgoing, Published, Subscription};
pub use queue::{Delivery, Queue, QueueConfig};
pub use settings::{connect, NatsArgs};

/// How long a message id is remembered for de-duplication; the JetStream
/// default.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Errors of bus operations.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {reason}; check that nats-server runs there with JetStream enabled (-js)")]
    Connect { url: String, reason: String },
    #[error("cannot set up {what}: {reason}")]
    Setup { what: String, reason: String },
    #[error("publish on {subject} failed: {reason}")]
    Publish { subject: String, reason: String },
    #[error("receive on {subject} failed: {reason}")]
    Receive { subject: String, reason: String },
    #[error("acknowledgement on {subject} failed: {reason}")]
    Ack { subject: String, reason: String },
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid { what: &'static str, value: String, reason: String },
    #[error("encoding a message for {subject} failed: {source}")]
    Encode { subject: String, source: WireError },
    #[error("the bus is closed")]
    Closed,
}

/// The operations every bus implementation provides.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Returns the subjects of the run this bus serves.
    fn subjects(&self) -> &Subjects;

    /// Publishes without waiting for storage: for notices whose loss a
    /// reader survives. The run's stream still records the message.
    async fn publish(&self, subject: &str, message: Outgoing) -> Result<(), BusError>;

    /// Publishes and waits until the stream has stored the message.
    /// A message id seen within [`DUPLICATE_WINDOW`] is not stored again, and
    /// the result marks it `duplicate`.
    async fn publish_durable(&self, subject: &str, message: Outgoing) -> Result<Published, BusError>;

    /// Subscribes to live messages on `subject`, which may hold `*` and `>`.
    async fn subscribe(&self, subject: &str) -> Result<Subscription, BusError>;

    /// Returns the newest stored message on `subject`, if any, so a late
    /// reader learns the current model version.
    async fn last(&self, subject: &str) -> Result<Option<Incoming>, BusError>;

    /// Opens (creating it when absent) the durable queue `config.durable`.
    async fn open_queue(&self, config: &QueueConfig) -> Result<Box<dyn queue::QueueSource>, BusError>;

    /// Waits until every publish so far has left this process.
    async fn flush(&self) -> Result<(), BusError>;
}

/// A shared handle to a bus, with typed helpers on top of [`Bus`].
#[derive(Clone)]
pub struct BusHandle {
    inner: Arc<dyn Bus>,
}

impl BusHandle {
    pub fn new(bus: impl Bus) -> BusHandle {
        BusHandle { inner: Arc::new(bus) }
    }

    pub fn subjects(&self) -> &Subjects {
        self.inner.subjects()
    }

    pub fn bus(&self) -> &dyn Bus {
        self.inner.as_ref()
    }

    /// Encodes and publishes an envelope as a notice (see [`Bus::publish`]).
    pub async fn publish<T: Message>(&self, subject: &str, envelope: &Envelope<T>) -> Result<(), BusError> {
        let message = Outgoing::encode(subject, envelope, ContentType::MessagePack)?;
        self.inner.publish(subject, message).await
    }

    /// Encodes and publishes an envelope durably (see [`Bus::publish_durable`]).
    pub async fn publish_durable<T: Message>(
        &self,
        subject: &str,
        envelope: &Envelope<T>,
    ) -> Result<Published, BusError> {
        let message = Outgoing::encode(subject, envelope, ContentType::MessagePack)?;
        self.inner.publish_durable(subject, message).await
    }

    pub async fn publish_raw(&self, subject: &str, message: Outgoing) -> Result<(), BusError> {
        self.inner.publish(subject, message).await
    }

    pub async fn publish_durable_raw(&self, subject: &str, message: Outgoing) -> Result<Published, BusError> {
        self.inner.publish_durable(subject, message).await
    }

    pub async fn subscribe(&self, subject: &str) -> Result<Subscription, BusError> {
        self.inner.subscribe(subject).await
    }

    pub async fn last(&self, subject: &str) -> Result<Option<Incoming>, BusError> {
        self.inner.last(subject).await
    }

    /// Opens a durable work queue; see [`Queue`].
    pub async fn queue(&self, config: QueueConfig) -> Result<Queue, BusError> {
        config.validate()?;
        let source = self.inner.open_queue(&config).await?;
        Ok(Queue::new(source, self.clone(), config))
    }

    pub async fn flush(&self) -> Result<(), BusError> {
        self.inner.flush().await
    }
}

pub(crate) fn encode_error(subject: &str, source: WireError) -> BusError {
    BusError::Encode { subject: subject.to_string(), source }
}

/// Encodes `envelope` once, for callers that publish the same bytes twice.
pub fn encode_envelope<T: Message>(
    subject: &str,
    envelope: &Envelope<T>,
    content_type: ContentType,
) -> Result<Vec<u8>, BusError> {
    encode(envelope, content_type).map_err(|err| encode_error(subject, err))
}

/// Checks a name that becomes part of a JetStream stream or consumer name.
pub(crate) fn validate_name(what: &'static str, value: &str) -> Result<(), BusError> {
    let valid = !value.is_empty()
        && value.len() <= 64
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(BusError::Invalid {
            what,
            value: value.to_string(),
            reason: "use 1 to 64 ASCII letters, digits, '-' or '_'".to_string(),
        })
    }
}
