//! The in-process bus: the same subjects, stream, queues, redelivery,
//! de-duplication and dead-letter behaviour as NATS JetStream, inside one
//! tokio process.
//!
//! All state sits behind one mutex; a `watch` counter wakes waiting
//! consumers whenever a message arrives or a delivery settles. The stream
//! keeps at most [`MAX_STREAM_BYTES`] and [`MAX_STREAM_MESSAGES`], dropping
//! the oldest messages past either limit, as a JetStream stream with
//! `discard: old` does; dropped messages are counted and logged.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use troupe_wire::subjects::subject_matches;
use troupe_wire::{RunId, Subjects};

use crate::message::{Incoming, Outgoing, Published, Subscription};
use crate::queue::{Acker, QueueConfig, QueueSource, RawDelivery};
use crate::{validate_name, Bus, BusError, DUPLICATE_WINDOW};

/// Bytes of payload the in-process stream keeps before dropping the oldest.
pub const MAX_STREAM_BYTES: usize = 1 << 30;
/// Messages the in-process stream keeps before dropping the oldest.
pub const MAX_STREAM_MESSAGES: usize = 1_000_000;
/// Messages a plain subscriber may fall behind by. Past it, new messages
/// for that subscriber are dropped, counted and logged, as NATS does for a
/// slow consumer.
pub const SUBSCRIBER_BUFFER: usize = 1024;

/// The in-process bus of one run. Clones share the same state.
#[derive(Clone)]
pub struct MemoryBus {
    subjects: Subjects,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change a waiting consumer may care about.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    log: VecDeque<Stored>,
    /// Sequence number the next stored message gets; the first is 1.
    next_sequence: u64,
    bytes: usize,
    /// Message id to (sequence, time stored), for de-duplication.
    seen_ids: HashMap<String, (u64, Instant)>,
    consumers: HashMap<String, Consumer>,
    subscribers: Vec<Subscriber>,
    discarded: u64,
}

struct Stored {
    sequence: u64,
    message: Incoming,
}

struct Consumer {
    subject: String,
    ack_wait: Duration,
    max_in_flight: usize,
    /// The lowest sequence not yet handed out for the first time.
    cursor: u64,
    /// Unsettled deliveries by sequence.
    pending: BTreeMap<u64, Pending>,
}

struct Pending {
    deadline: Instant,
    delivered: u64,
}

struct Subscriber {
    pattern: String,
    sender: mpsc::Sender<Incoming>,
    dropped: u64,
}

impl MemoryBus {
    pub fn new(run: RunId) -> MemoryBus {
        let (changed, _) = watch::channel(0);
        let state = State { next_sequence: 1, ..State::default() };
        MemoryBus { subjects: Subjects::new(run), shared: Arc::new(Shared { state: Mutex::new(state), changed }) }
    }

    fn store(&self, subject: &str, message: Outgoing) -> Published {
        let mut state = self.shared.lock();
        let now = Instant::now();
        if let Some(id) = message.id() {
            if let Some(&(sequence, stored_at)) = state.seen_ids.get(id) {
                if now.duration_since(stored_at) < DUPLICATE_WINDOW {
                    return Published { sequence, duplicate: true };
                }
            }
        }

        let sequence = state.next_sequence;
        state.next_sequence += 1;
        if let Some(id) = message.id() {
            state.seen_ids.insert(id.to_string(), (sequence, now));
        }
        if sequence.is_multiple_of(4096) {
            state.seen_ids.retain(|_, (_, stored_at)| now.duration_since(*stored_at) < DUPLICATE_WINDOW);
        }
        let incoming = Incoming { subject: subject.to_string(), headers: message.headers, payload: message.payload };
        state.bytes += incoming.payload.len();
        state.deliver_to_subscribers(&incoming);
        state.log.push_back(Stored { sequence, message: incoming });
        state.enforce_limits();
        drop(state);

        self.shared.changed.send_modify(|version| *version += 1);
        Published { sequence, duplicate: false }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind, never a
        // half-applied invariant that later readers would trip on, so the
        // poisoned state is still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|version| *version += 1);
    }
}

impl State {
    fn deliver_to_subscribers(&mut self, message: &Incoming) {
        self.subscribers.retain(|subscriber| !subscriber.sender.is_closed());
        for subscriber in &mut self.subscribers {
            if !subject_matches(&subscriber.pattern, &message.subject) {
                continue;
            }
            if subscriber.sender.try_send(message.clone()).is_err() {
                subscriber.dropped += 1;
                metrics::counter!("troupe_bus_subscriber_dropped_total").increment(1);
                if subscriber.dropped == 1 || subscriber.dropped % 1000 == 0 {
                    tracing::warn!(
                        pattern = %subscriber.pattern,
                        dropped = subscriber.dropped,
                        buffer = SUBSCRIBER_BUFFER,
                        "slow subscriber: message dropped"
                    );
                }
            }
        }
    }

    fn enforce_limits(&mut self) {
        while self.bytes > MAX_STREAM_BYTES || self.log.len() > MAX_STREAM_MESSAGES {
            let Some(oldest) = self.log.pop_front() else { break };
            self.bytes -= oldest.message.payload.len();
            self.discarded += 1;
            if self.discarded == 1 || self.discarded.is_multiple_of(10_000) {
                tracing::warn!(
                    discarded = self.discarded,
                    max_bytes = MAX_STREAM_BYTES,
                    max_messages = MAX_STREAM_MESSAGES,
                    "in-process stream full: oldest message discarded"
                );
            }
        }
    }

    fn find(&self, sequence: u64) -> Option<&Stored> {
        let first = self.log.front()?.sequence;
        let index = usize::try_from(sequence.checked_sub(first)?).ok()?;
        self.log.get(index)
    }

    /// Hands out the next delivery for `name`, or returns the instant at
    /// which waiting may end because a pending delivery expires.
    fn take_delivery(&mut self, name: &str, now: Instant) -> Result<(u64, u64, Incoming), Option<Instant>> {
        let first_stored = self.log.front().map_or(self.next_sequence, |stored| stored.sequence);
        let consumer = self.consumers.get_mut(name).expect("queue sources only exist for registered consumers");

        // Messages dropped by the stream limits can no longer be delivered.
        consumer.pending.retain(|sequence, _| *sequence >= first_stored);

        let expired = consumer.pending.iter().find(|(_, pending)| pending.deadline <= now).map(|(seq, _)| *seq);
        if let Some(sequence) = expired {
            let ack_wait = consumer.ack_wait;
            let pending = consumer.pending.get_mut(&sequence).expect("found above");
            pending.delivered += 1;
            pending.deadline = now + ack_wait;
            let delivered = pending.delivered;
            let message = self.find(sequence).expect("pending sequences are retained").message.clone();
            return Ok((sequence, delivered, message));
        }

        if consumer.pending.len() < consumer.max_in_flight {
            let start = consumer.cursor.max(first_stored);
            let offset = usize::try_from(start - first_stored).unwrap_or(usize::MAX);
            let next = self.log.iter().skip(offset).find(|stored| subject_matches(&consumer.subject, &stored.message.subject));
            match next {
                Some(stored) => {
                    consumer.cursor = stored.sequence + 1;
                    consumer.pending.insert(stored.sequence, Pending { deadline: now + consumer.ack_wait, delivered: 1 });
                    return Ok((stored.sequence, 1, stored.message.clone()));
                }
                None => consumer.cursor = self.next_sequence,
            }
        }

        Err(consumer.pending.values().map(|pending| pending.deadline).min())
    }
}

#[async_trait]
impl Bus for MemoryBus {
    fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    async fn publish(&self, subject: &str, message: Outgoing) -> Result<(), BusError> {
        self.store(subject, message);
        Ok(())
    }

    async fn publish_durable(&self, subject: &str, message: Outgoing) -> Result<Published, BusError> {
        Ok(self.store(subject, message))
    }

    async fn subscribe(&self, subject: &str) -> Result<Subscription, BusError> {
        let (sender, receiver) = mpsc::channel(SUBSCRIBER_BUFFER);
        self.shared.lock().subscribers.push(Subscriber { pattern: subject.to_string(), sender, dropped: 0 });
        let stream = futures::stream::unfold(receiver, |mut receiver| async move {
            let message = receiver.recv().await?;
            Some((message, receiver))
        });
        Ok(Subscription::new(stream))
    }

    async fn last(&self, subject: &str) -> Result<Option<Incoming>, BusError> {
        let state = self.shared.lock();
        Ok(state.log.iter().rev().find(|stored| stored.message.subject == subject).map(|stored| stored.message.clone()))
    }

    async fn open_queue(&self, config: &QueueConfig) -> Result<Box<dyn QueueSource>, BusError> {
        validate_name("queue name", &config.durable)?;
        let mut state = self.shared.lock();
        match state.consumers.get_mut(&config.durable) {
            Some(existing) if existing.subject != config.subject => {
                return Err(BusError::Setup {
                    what: format!("queue {}", config.durable),
                    reason: format!(
                        "it already consumes {} and cannot switch to {}; use another queue name",
                        existing.subject, config.subject
                    ),
                });
            }
            Some(existing) => {
                // Like a JetStream consumer update: the newest settings win.
                existing.ack_wait = config.ack_wait;
                existing.max_in_flight = config.max_in_flight;
            }
            None => {
                let consumer = Consumer {
                    subject: config.subject.clone(),
                    ack_wait: config.ack_wait,
                    max_in_flight: config.max_in_flight,
                    cursor: 1,
                    pending: BTreeMap::new(),
                };
                state.consumers.insert(config.durable.clone(), consumer);
            }
        }
        Ok(Box::new(MemoryQueue { name: config.durable.clone(), shared: self.shared.clone() }))
    }

    async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }
}

struct MemoryQueue {
    name: String,
    shared: Arc<Shared>,
}

#[async_trait]
impl QueueSource for MemoryQueue {
    async fn fetch(&mut self) -> Result<RawDelivery, BusError> {
        loop {
            // Subscribe before looking, so a change made after the look
            // still wakes this wait.
            let mut changes = self.shared.changed.subscribe();
            let taken = self.shared.lock().take_delivery(&self.name, Instant::now());
            let wake_at = match taken {
                Ok((sequence, delivered, message)) => {
                    let acker = MemoryAcker { name: self.name.clone(), sequence, shared: self.shared.clone() };
                    return Ok(RawDelivery { message, delivered, acker: Box::new(acker) });
                }
                Err(wake_at) => wake_at,
            };
            match wake_at {
                Some(deadline) => {
                    tokio::select! {
                        _ = changes.changed() => {}
                        _ = tokio::time::sleep_until(deadline) => {}
                    }
                }
                None => {
                    if changes.changed().await.is_err() {
                        return Err(BusError::Closed);
                    }
                }
            }
        }
    }
}

struct MemoryAcker {
    name: String,
    sequence: u64,
    shared: Arc<Shared>,
}

impl MemoryAcker {
    fn settle(&self, update: impl FnOnce(&mut BTreeMap<u64, Pending>, &Consumer)) {
        let mut state = self.shared.lock();
        if let Some(consumer) = state.consumers.get_mut(&self.name) {
            let mut pending = std::mem::take(&mut consumer.pending);
            update(&mut pending, consumer);
            consumer.pending = pending;
        }
        drop(state);
        self.shared.bump();
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.settle(|pending, _| {
            pending.remove(&self.sequence);
        });
        Ok(())
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.settle(|pending, _| {
            if let Some(entry) = pending.get_mut(&self.sequence) {
                entry.deadline = Instant::now() + delay;
            }
        });
        Ok(())
    }

    async fn term(&self) -> Result<(), BusError> {
        self.ack().await
    }

    async fn progress(&self) -> Result<(), BusError> {
        self.settle(|pending, consumer| {
            if let Some(entry) = pending.get_mut(&self.sequence) {
                entry.deadline = Instant::now() + consumer.ack_wait;
            }
        });
        Ok(())
    }
}
