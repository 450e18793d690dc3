//! One conformance suite, run against both bus implementations: the
//! in-process bus and NATS JetStream on a real nats-server (started by
//! `troupe-testkit`, or the one `.ci/run` names). Each case gets a fresh run
//! id, so the NATS cases can share one server.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use troupe_bus::memory::MemoryBus;
use troupe_bus::nats::NatsBus;
use troupe_bus::{BusHandle, Outgoing, QueueConfig};
use troupe_wire::{ContentType, DeadLetter, Envelope, JobProgress, JobState, ModelAnnouncement, ModelKind, ModelRef, RunId, Stage};

/// How long a case waits for a message that should arrive.
const ARRIVAL: Duration = Duration::from_secs(10);
/// How long a case waits to be sure that a message does not arrive.
const SILENCE: Duration = Duration::from_millis(1500);

fn fresh_run() -> RunId {
    RunId::new(&format!("t{}", uuid::Uuid::new_v4().simple())).unwrap()
}

async fn memory_bus() -> Option<BusHandle> {
    Some(BusHandle::new(MemoryBus::new(fresh_run())))
}

async fn nats_bus() -> Option<BusHandle> {
    let url = troupe_testkit::nats_url()?;
    Some(BusHandle::new(NatsBus::connect(&url, fresh_run()).await.expect("connect to the test nats-server")))
}

fn progress(step: u64) -> JobProgress {
    JobProgress {
        job_id: "job".into(),
        stage: Stage::Pretrain,
        state: JobState::Running,
        step,
        total_steps: 1000,
        metrics: Default::default(),
        message: None,
    }
}

/// Encodes a job-progress message with a fresh id for publishing.
fn outgoing(bus: &BusHandle, subject: &str, step: u64) -> Outgoing {
    let envelope = Envelope::new(bus.subjects().run().as_str(), progress(step));
    Outgoing::encode(subject, &envelope, ContentType::MessagePack).unwrap()
}

fn queue(durable: &str, subject: &str) -> QueueConfig {
    let mut config = QueueConfig::new(durable, subject);
    config.ack_wait = Duration::from_secs(1);
    config
}

/// Waits for a queue operation that should succeed soon.
async fn within<T>(what: &str, future: impl Future<Output = Result<T, troupe_bus::BusError>>) -> T {
    let result = tokio::time::timeout(ARRIVAL, future).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    result.unwrap_or_else(|err| panic!("{what}: {err}"))
}

/// Waits for a live message that should arrive soon.
async fn arrives(what: &str, subscription: &mut troupe_bus::Subscription) -> troupe_bus::Incoming {
    let message = tokio::time::timeout(ARRIVAL, subscription.next()).await;
    message.unwrap_or_else(|_| panic!("timed out waiting for {what}")).expect("the subscription ended")
}

/// Two replicas of one queue split the messages: each message is handled by
/// exactly one of them, none is lost, and both get work.
async fn replicas_split_work(bus: BusHandle) {
    let subject = bus.subjects().jobs();
    let total = 60u64;
    for step in 0..total {
        bus.publish_durable_raw(&subject, outgoing(&bus, &subject, step)).await.unwrap();
    }

    let mut replicas = Vec::new();
    for _ in 0..2 {
        let mut queue = bus.queue(queue("trainers", &subject)).await.unwrap();
        replicas.push(tokio::spawn(async move {
            let mut steps = Vec::new();
            loop {
                let next = tokio::time::timeout(SILENCE, queue.next_message::<JobProgress>()).await;
                let Ok(result) = next else { return steps };
                let (envelope, delivery) = result.unwrap();
                // Simulated work, so the other replica gets a turn.
                tokio::time::sleep(Duration::from_millis(5)).await;
                steps.push(envelope.payload.step);
                delivery.ack().await.unwrap();
            }
        }));
    }

    let mut per_replica = Vec::new();
    for replica in replicas {
        per_replica.push(replica.await.unwrap());
    }
    let all: Vec<u64> = per_replica.iter().flatten().copied().collect();
    let unique: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len(), total as usize, "a message was lost or handled twice: {per_replica:?}");
    assert_eq!(unique, (0..total).collect(), "the replicas handled other messages than were published");
    assert!(per_replica.iter().all(|steps| !steps.is_empty()), "one replica got no work: {per_replica:?}");
}

/// A consumer that dies before acknowledging has its message delivered
/// again, to the other replica, after `ack_wait`.
async fn unacked_message_is_redelivered(bus: BusHandle) {
    let subject = bus.subjects().jobs();
    bus.publish_durable_raw(&subject, outgoing(&bus, &subject, 7)).await.unwrap();

    let mut doomed = bus.queue(queue("trainers", &subject)).await.unwrap();
    let mut survivor = bus.queue(queue("trainers", &subject)).await.unwrap();
    let (first, delivery) = within("the first delivery", doomed.next_message::<JobProgress>()).await;
    assert_eq!(delivery.delivered, 1);
    // The consumer dies: its delivery and queue vanish unacknowledged.
    drop(delivery);
    drop(doomed);

    let (again, delivery) = within("the redelivery", survivor.next_message::<JobProgress>()).await;
    assert_eq!(again.id, first.id);
    assert_eq!(again.payload.step, 7);
    assert_eq!(delivery.delivered, 2);
    delivery.ack().await.unwrap();

    let after_ack = tokio::time::timeout(SILENCE * 2, survivor.next()).await;
    assert!(after_ack.is_err(), "an acknowledged message was delivered again");
}

/// The same message id published twice is stored and delivered once.
async fn duplicate_id_delivers_once(bus: BusHandle) {
    let subject = bus.subjects().jobs();
    let message = outgoing(&bus, &subject, 1);
    let first = bus.publish_durable_raw(&subject, message.clone()).await.unwrap();
    let second = bus.publish_durable_raw(&subject, message).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate, "the second publish of one id was not detected");
    assert_eq!(second.sequence, first.sequence);

    let mut queue = bus.queue(queue("trainers", &subject)).await.unwrap();
    let (_, delivery) = within("the message", queue.next_message::<JobProgress>()).await;
    delivery.ack().await.unwrap();
    let extra = tokio::time::timeout(SILENCE, queue.next()).await;
    assert!(extra.is_err(), "a duplicate was delivered");
}

/// A payload that does not decode goes to the dead-letter subject with its
/// reason and bytes, and the consumer goes on to the next message.
async fn undecodable_payload_is_dead_lettered(bus: BusHandle) {
    let subject = bus.subjects().jobs();
    let garbage = Outgoing::new("garbage-1", ContentType::MessagePack, vec![0xc1, 0xff, 0x00]);
    bus.publish_durable_raw(&subject, garbage).await.unwrap();
    bus.publish_durable_raw(&subject, outgoing(&bus, &subject, 2)).await.unwrap();

    let mut queue = bus.queue(queue("trainers", &subject)).await.unwrap();
    let (good, delivery) = within("the valid message", queue.next_message::<JobProgress>()).await;
    assert_eq!(good.payload.step, 2, "the consumer did not go on past the bad message");
    delivery.ack().await.unwrap();

    let mut dead = bus.queue(queue_config_for_dead(&bus)).await.unwrap();
    let (letter, delivery) = within("the dead letter", dead.next_message::<DeadLetter>()).await;
    delivery.ack().await.unwrap();
    assert_eq!(letter.payload.subject, subject);
    assert_eq!(letter.payload.message_id.as_deref(), Some("garbage-1"));
    assert_eq!(letter.payload.consumer, "trainers");
    assert_eq!(letter.payload.payload, vec![0xc1, 0xff, 0x00]);
    assert!(letter.payload.reason.contains("cannot decode as job_progress"), "{}", letter.payload.reason);
    assert!(letter.payload.reason.contains("MessagePack"), "{}", letter.payload.reason);
}

/// A message that keeps failing is dead-lettered after `max_deliver`
/// deliveries instead of stalling the queue.
async fn poison_message_stops_at_max_deliver(bus: BusHandle) {
    let subject = bus.subjects().jobs();
    bus.publish_durable_raw(&subject, outgoing(&bus, &subject, 9)).await.unwrap();
    let mut config = queue("trainers", &subject);
    config.max_deliver = 3;
    let mut queue = bus.queue(config).await.unwrap();
    for attempt in 1..=3 {
        let delivery = within("a delivery", queue.next()).await;
        assert_eq!(delivery.delivered, attempt);
        delivery.nak(Duration::ZERO).await.unwrap();
    }
    let beyond = tokio::time::timeout(SILENCE, queue.next()).await;
    assert!(beyond.is_err(), "the message was handed out past max_deliver");

    let mut dead = bus.queue(queue_config_for_dead(&bus)).await.unwrap();
    let (letter, delivery) = within("the dead letter", dead.next_message::<DeadLetter>()).await;
    delivery.ack().await.unwrap();
    assert_eq!(letter.payload.delivered, 4);
    assert!(letter.payload.reason.contains("max_deliver 3"), "{}", letter.payload.reason);
}

fn queue_config_for_dead(bus: &BusHandle) -> QueueConfig {
    queue("operators", &bus.subjects().dead())
}

/// A consumer explicitly rejects a message it cannot use; it is recorded
/// once with the reason and never delivered again.
async fn rejected_message_is_recorded(bus: BusHandle) {
    let subject = bus.subjects().jobs();
    bus.publish_durable_raw(&subject, outgoing(&bus, &subject, 3)).await.unwrap();
    let mut queue = bus.queue(queue("trainers", &subject)).await.unwrap();
    let delivery = within("the message", queue.next()).await;
    delivery.reject("step 3 names an unknown model").await.unwrap();
    let again = tokio::time::timeout(SILENCE * 2, queue.next()).await;
    assert!(again.is_err(), "a rejected message was delivered again");

    let mut dead = bus.queue(queue_config_for_dead(&bus)).await.unwrap();
    let (letter, _) = within("the dead letter", dead.next_message::<DeadLetter>()).await;
    assert_eq!(letter.payload.reason, "step 3 names an unknown model");
}

/// No more than `max_in_flight` deliveries are unacknowledged at once.
async fn in_flight_is_bounded(bus: BusHandle) {
    let subject = bus.subjects().jobs();
    for step in 0..5 {
        bus.publish_durable_raw(&subject, outgoing(&bus, &subject, step)).await.unwrap();
    }
    let mut config = queue("trainers", &subject);
    config.max_in_flight = 2;
    config.ack_wait = Duration::from_secs(30);
    let mut queue = bus.queue(config).await.unwrap();
    let first = within("delivery 1", queue.next()).await;
    let _second = within("delivery 2", queue.next()).await;
    let third = tokio::time::timeout(SILENCE, queue.next()).await;
    assert!(third.is_err(), "a third delivery came while two were in flight");
    first.ack().await.unwrap();
    let third = within("delivery 3 after an ack", queue.next()).await;
    third.ack().await.unwrap();
}

/// A delivery refused with a delay comes back after that delay.
async fn nak_redelivers_after_delay(bus: BusHandle) {
    let subject = bus.subjects().jobs();
    bus.publish_durable_raw(&subject, outgoing(&bus, &subject, 4)).await.unwrap();
    let mut config = queue("trainers", &subject);
    config.ack_wait = Duration::from_secs(30);
    let mut queue = bus.queue(config).await.unwrap();
    let delivery = within("the message", queue.next()).await;
    let refused_at = tokio::time::Instant::now();
    delivery.nak(Duration::from_millis(500)).await.unwrap();
    let again = within("the redelivery", queue.next()).await;
    assert!(refused_at.elapsed() >= Duration::from_millis(400), "redelivered before the delay");
    assert_eq!(again.delivered, 2);
    again.ack().await.unwrap();
}

/// Plain subscribers see live messages on matching subjects, in order.
async fn subscribers_see_live_messages(bus: BusHandle) {
    let models = bus.subjects().models();
    let mut exact = bus.subscribe(&models).await.unwrap();
    let mut wildcard = bus.subscribe(&bus.subjects().wildcard()).await.unwrap();
    bus.flush().await.unwrap();
    for step in 0..3 {
        bus.publish_raw(&models, outgoing(&bus, &models, step)).await.unwrap();
    }
    bus.flush().await.unwrap();
    for step in 0..3 {
        let message = arrives("a live message", &mut exact).await;
        assert_eq!(message.decode::<JobProgress>().unwrap().payload.step, step);
        let message = arrives("a live message", &mut wildcard).await;
        assert_eq!(message.subject, models);
    }
}

/// A late reader finds the newest message on a subject.
async fn last_message_is_kept(bus: BusHandle) {
    let models = bus.subjects().models();
    assert!(bus.last(&models).await.unwrap().is_none());
    for version in 1..=2 {
        let announcement = ModelAnnouncement {
            model: ModelRef { name: "policy".into(), version },
            kind: ModelKind::Policy,
            parent: None,
            manifest_key: format!("models/policy/{version}/manifest.json"),
            metrics: Default::default(),
        };
        let envelope = Envelope::new(bus.subjects().run().as_str(), announcement);
        bus.publish(&models, &envelope).await.unwrap();
    }
    bus.flush().await.unwrap();
    let mut last = None;
    for _ in 0..50 {
        last = bus.last(&models).await.unwrap();
        if last.as_ref().is_some_and(|m| m.decode::<ModelAnnouncement>().unwrap().payload.model.version == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = last.expect("no message kept").decode::<ModelAnnouncement>().unwrap();
    assert_eq!(last.payload.model.version, 2);
}

/// JSON from an external tool and MessagePack decode to the same message.
async fn json_and_msgpack_both_arrive(bus: BusHandle) {
    let subject = bus.subjects().jobs();
    let envelope = Envelope::new(bus.subjects().run().as_str(), progress(5));
    let json = Outgoing::encode(&subject, &envelope, ContentType::Json).unwrap();
    bus.publish_durable_raw(&subject, json).await.unwrap();
    let mut copy = envelope.clone();
    copy.id = format!("{}-msgpack", envelope.id);
    let msgpack = Outgoing::encode(&subject, &copy, ContentType::MessagePack).unwrap();
    bus.publish_durable_raw(&subject, msgpack).await.unwrap();

    let mut queue = bus.queue(queue("trainers", &subject)).await.unwrap();
    let (from_json, delivery) = within("the JSON message", queue.next_message::<JobProgress>()).await;
    assert_eq!(delivery.message.content_type_header(), Some("application/json"));
    delivery.ack().await.unwrap();
    let (from_msgpack, delivery) = within("the MessagePack message", queue.next_message::<JobProgress>()).await;
    delivery.ack().await.unwrap();
    assert_eq!(from_json, envelope);
    assert_eq!(from_msgpack.payload, from_json.payload);
}

/// A queue name cannot be reused for another subject.
async fn queue_name_is_bound_to_subject(bus: BusHandle) {
    let _queue = bus.queue(queue("trainers", &bus.subjects().jobs())).await.unwrap();
    let other = bus.queue(queue("trainers", &bus.subjects().rollouts())).await;
    assert!(other.is_err(), "one queue name consumed two subjects");
    let invalid = bus.queue(queue("has.dots", &bus.subjects().jobs())).await;
    assert!(invalid.is_err(), "a queue name with dots was accepted");
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::memory_bus().await.unwrap()).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(bus) = super::nats_bus().await else { return };
                    super::$case(bus).await;
                }
            )*
        }
    };
}

conformance!(
    replicas_split_work,
    unacked_message_is_redelivered,
    duplicate_id_delivers_once,
    undecodable_payload_is_dead_lettered,
    poison_message_stops_at_max_deliver,
    rejected_message_is_recorded,
    in_flight_is_bounded,
    nak_redelivers_after_delay,
    subscribers_see_live_messages,
    last_message_is_kept,
    json_and_msgpack_both_arrive,
    queue_name_is_bound_to_subject,
);
