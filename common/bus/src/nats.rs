//! The bus on NATS with JetStream.
//!
//! At connect time the run's stream `TROUPE_<run>` is created if absent
//! (file storage, subjects `troupe.<run>.>`, `discard: old`, messages kept
//! for [`STREAM_MAX_AGE`], de-duplication over [`DUPLICATE_WINDOW`]). Each
//! work queue is a durable pull consumer with explicit acknowledgement,
//! `ack_wait` and `max_ack_pending` from its [`QueueConfig`], created or
//! updated idempotently, so every replica may open it at start. Messages are
//! pulled only when the service requests the next one, so none waits in a
//! client buffer while its `ack_wait` runs out (see `fetch_batch`).
//!
//! The client reconnects by itself after a lost connection, with an
//! exponential backoff capped at [`MAX_RECONNECT_DELAY`] and a log line per
//! attempt. Publishes made meanwhile wait in the client's buffer.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::{ConnectOptions, HeaderMap};
use async_trait::async_trait;
use futures::StreamExt;
use troupe_wire::{RunId, Subjects};

use crate::message::{Incoming, Outgoing, Published, Subscription};
use crate::queue::{Acker, QueueConfig, QueueSource, RawDelivery};
use crate::{validate_name, Bus, BusError, DUPLICATE_WINDOW};

/// How long the run's stream keeps a message.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Maximum wait between two reconnect attempts.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);
/// Attempts of the first connection before giving up.
pub const INITIAL_CONNECT_ATTEMPTS: u32 = 6;
/// How long one pull request waits on the server for a message.
const PULL_EXPIRY: Duration = Duration::from_secs(5);

/// The bus of one run on a NATS server.
pub struct NatsBus {
    subjects: Subjects,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    stream: stream::Stream,
}

impl NatsBus {
    /// Connects to `url`, retrying the first connection a few times, and
    /// creates the run's stream if it is absent.
    pub async fn connect(url: &str, run: RunId) -> Result<NatsBus, BusError> {
        NatsBus::connect_with_attempts(url, run, INITIAL_CONNECT_ATTEMPTS).await
    }

    /// Like [`NatsBus::connect`], with `attempts` tries of the first connection.
    pub async fn connect_with_attempts(url: &str, run: RunId, attempts: u32) -> Result<NatsBus, BusError> {
        let client = connect_with_retries(url, attempts.max(1)).await?;
        let jetstream = jetstream::new(client.clone());
        let subjects = Subjects::new(run);
        let stream_name = stream_name(subjects.run());
        let config = stream::Config {
            name: stream_name.clone(),
            subjects: vec![subjects.wildcard()],
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            max_age: STREAM_MAX_AGE,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        let stream = jetstream.get_or_create_stream(config).await.map_err(|err| BusError::Setup {
            what: format!("stream {stream_name}"),
            reason: err.to_string(),
        })?;
        tracing::info!(url, stream = %stream_name, subjects = %subjects.wildcard(), "connected to nats");
        Ok(NatsBus { subjects, client, jetstream, stream })
    }

    /// Returns the underlying client, for tests that inspect the server.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

/// Returns the name of the JetStream stream that captures a run's subjects.
pub fn stream_name(run: &RunId) -> String {
    format!("TROUPE_{run}")
}

async fn connect_with_retries(url: &str, attempts: u32) -> Result<async_nats::Client, BusError> {
    let mut delay = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match connect_options().connect(url).await {
            Ok(client) => return Ok(client),
            Err(err) if attempt < attempts => {
                tracing::warn!(url, attempt, retry_in_ms = delay.as_millis() as u64, error = %err, "nats connect failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                attempt += 1;
            }
            Err(err) => return Err(BusError::Connect { url: url.to_string(), reason: err.to_string() }),
        }
    }
}

fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .name("troupe")
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            // async-nats requests a delay before every connection attempt,
            // the first one included (attempts = 1), so that one connects at
            // once and only later attempts back off and log.
            if attempts <= 1 {
                return Duration::ZERO;
            }
            let exponent = u32::try_from(attempts.min(16)).unwrap_or(16);
            let delay = (Duration::from_millis(100) * 2u32.pow(exponent)).min(MAX_RECONNECT_DELAY);
            tracing::warn!(attempt = attempts, delay_ms = delay.as_millis() as u64, "reconnecting to nats");
            delay
        })
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("nats connection established"),
                async_nats::Event::Disconnected => tracing::warn!("nats connection lost"),
                async_nats::Event::SlowConsumer(sid) => {
                    metrics::counter!("troupe_bus_subscriber_dropped_total").increment(1);
                    tracing::warn!(subscription = sid, "slow subscriber: nats dropped messages")
                }
                other => tracing::info!(event = %other, "nats event"),
            }
        })
}

fn to_header_map(headers: &BTreeMap<String, String>) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(name.as_str(), value.as_str());
    }
    map
}

fn from_header_map(headers: Option<&HeaderMap>) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    if let Some(headers) = headers {
        for (name, values) in headers.iter() {
            if let Some(value) = values.first() {
                map.insert(name.to_string(), value.as_str().to_string());
            }
        }
    }
    map
}

fn incoming(message: &async_nats::Message) -> Incoming {
    Incoming {
        subject: message.subject.to_string(),
        headers: from_header_map(message.headers.as_ref()),
        payload: message.payload.clone(),
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    async fn publish(&self, subject: &str, message: Outgoing) -> Result<(), BusError> {
        let headers = to_header_map(&message.headers);
        self.client
            .publish_with_headers(subject.to_string(), headers, message.payload)
            .await
            .map_err(|err| BusError::Publish { subject: subject.to_string(), reason: err.to_string() })
    }

    async fn publish_durable(&self, subject: &str, message: Outgoing) -> Result<Published, BusError> {
        let failed = |reason: String| BusError::Publish { subject: subject.to_string(), reason };
        let headers = to_header_map(&message.headers);
        let ack = self
            .jetstream
            .publish_with_headers(subject.to_string(), headers, message.payload)
            .await
            .map_err(|err| failed(err.to_string()))?
            .await
            .map_err(|err| failed(err.to_string()))?;
        Ok(Published { sequence: ack.sequence, duplicate: ack.duplicate })
    }

    async fn subscribe(&self, subject: &str) -> Result<Subscription, BusError> {
        let subscriber = self
            .client
            .subscribe(subject.to_string())
            .await
            .map_err(|err| BusError::Receive { subject: subject.to_string(), reason: err.to_string() })?;
        Ok(Subscription::new(subscriber.map(|message| incoming(&message))))
    }

    async fn last(&self, subject: &str) -> Result<Option<Incoming>, BusError> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(Some(Incoming {
                subject: message.subject.to_string(),
                headers: from_header_map(Some(&message.headers)),
                payload: message.payload,
            })),
            Err(err) if err.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(BusError::Receive { subject: subject.to_string(), reason: err.to_string() }),
        }
    }

    async fn open_queue(&self, config: &QueueConfig) -> Result<Box<dyn QueueSource>, BusError> {
        validate_name("queue name", &config.durable)?;
        let consumer_config = consumer::pull::Config {
            durable_name: Some(config.durable.clone()),
            filter_subject: config.subject.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            // The queue enforces the delivery limit itself so that it can
            // dead-letter the message with a reason; the server never gives up.
            max_deliver: -1,
            max_ack_pending: i64::try_from(config.max_in_flight).unwrap_or(i64::MAX),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        };
        let setup_error = |err: String| BusError::Setup { what: format!("queue {}", config.durable), reason: err };
        // The server lets an update move a consumer to another subject, which
        // would silently skip what the old subject still had unread. The
        // in-process bus forbids that, and so does this one.
        if let Ok(existing) = self.stream.consumer_info(&config.durable).await {
            if existing.config.filter_subject != config.subject {
                return Err(setup_error(format!(
                    "it already consumes {} and cannot switch to {}; use another queue name",
                    existing.config.filter_subject, config.subject
                )));
            }
        }
        let consumer = match self.stream.create_consumer(consumer_config.clone()).await {
            Ok(consumer) => consumer,
            // A consumer of that name with other settings exists: a new
            // deployment changed them, so update it in place.
            Err(_) => self
                .stream
                .update_consumer(consumer_config)
                .await
                .map_err(|err| setup_error(err.to_string()))?,
        };
        Ok(Box::new(NatsQueue {
            consumer,
            subject: config.subject.clone(),
            fetch_batch: config.fetch_batch,
            buffer: VecDeque::new(),
        }))
    }

    async fn flush(&self) -> Result<(), BusError> {
        self.client
            .flush()
            .await
            .map_err(|err| BusError::Publish { subject: "(flush)".to_string(), reason: err.to_string() })
    }
}

struct NatsQueue {
    consumer: consumer::PullConsumer,
    subject: String,
    fetch_batch: usize,
    buffer: VecDeque<jetstream::Message>,
}

impl NatsQueue {
    async fn pull(&mut self) -> Result<(), String> {
        let mut batch = self
            .consumer
            .batch()
            .max_messages(self.fetch_batch)
            .expires(PULL_EXPIRY)
            .messages()
            .await
            .map_err(|err| err.to_string())?;
        while let Some(message) = batch.next().await {
            self.buffer.push_back(message.map_err(|err| err.to_string())?);
        }
        Ok(())
    }
}

#[async_trait]
impl QueueSource for NatsQueue {
    async fn fetch(&mut self) -> Result<RawDelivery, BusError> {
        let mut failures = 0u32;
        while self.buffer.is_empty() {
            if let Err(reason) = self.pull().await {
                // The client reconnects by itself, so pull again and log each failure.
                failures += 1;
                let delay = (Duration::from_millis(200) * 2u32.pow(failures.min(6))).min(MAX_RECONNECT_DELAY);
                tracing::warn!(subject = %self.subject, failures, retry_in_ms = delay.as_millis() as u64, reason, "pull from queue failed");
                tokio::time::sleep(delay).await;
            }
        }
        let message = self.buffer.pop_front().expect("loop above fills the buffer");
        let delivered = message
            .info()
            .map(|info| u64::try_from(info.delivered).unwrap_or(1))
            .map_err(|err| BusError::Receive { subject: self.subject.clone(), reason: err.to_string() })?;
        let (message, acker) = message.split();
        let acker = NatsAcker { acker, subject: message.subject.to_string() };
        Ok(RawDelivery { message: incoming(&message), delivered, acker: Box::new(acker) })
    }
}

struct NatsAcker {
    acker: jetstream::message::Acker,
    subject: String,
}

impl NatsAcker {
    async fn send(&self, kind: AckKind) -> Result<(), BusError> {
        let result = match kind {
            // Wait for the server to confirm an ack, so "acknowledged" means
            // it will not be delivered again.
            AckKind::Ack => self.acker.double_ack().await,
            other => self.acker.ack_with(other).await,
        };
        result.map_err(|err| BusError::Ack { subject: self.subject.clone(), reason: err.to_string() })
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.send(AckKind::Ack).await
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.send(AckKind::Nak(Some(delay))).await
    }

    async fn term(&self) -> Result<(), BusError> {
        self.send(AckKind::Term).await
    }

    async fn progress(&self) -> Result<(), BusError> {
        self.send(AckKind::Progress).await
    }
}
