//! NATS-only behaviour: surviving a server restart, and a clear error when
//! no server listens.

use std::time::Duration;

use troupe_bus::nats::NatsBus;
use troupe_bus::{BusError, BusHandle, Outgoing, QueueConfig};
use troupe_testkit::NatsServer;
use troupe_wire::{ContentType, Envelope, JobProgress, JobState, RunId, Stage};

fn progress(step: u64) -> JobProgress {
    JobProgress {
        job_id: "job".into(),
        stage: Stage::Sft,
        state: JobState::Running,
        step,
        total_steps: 10,
        metrics: Default::default(),
        message: None,
    }
}

async fn publish_step(bus: &BusHandle, step: u64) -> Result<(), BusError> {
    let subject = bus.subjects().jobs();
    let envelope = Envelope::with_id(bus.subjects().run().as_str(), format!("step-{step}"), 0, progress(step));
    let message = Outgoing::encode(&subject, &envelope, ContentType::MessagePack)?;
    bus.publish_durable_raw(&subject, message).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_stream_and_reconnects() {
    let Some(mut server) = NatsServer::start() else { return };
    let run = RunId::new("restart").unwrap();
    let bus = BusHandle::new(NatsBus::connect(&server.url, run).await.unwrap());
    publish_step(&bus, 1).await.unwrap();

    server.kill();
    server.restart();

    // The client reconnects on its own; publishes fail until it has.
    let mut published = false;
    for _ in 0..100 {
        if publish_step(&bus, 2).await.is_ok() {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(published, "no publish succeeded within 20 s of the restart");

    let mut queue = bus.queue(QueueConfig::new("trainers", &bus.subjects().jobs())).await.unwrap();
    for expected in [1, 2] {
        let next = tokio::time::timeout(Duration::from_secs(10), queue.next_message::<JobProgress>()).await;
        let (envelope, delivery) = next.expect("timed out").unwrap();
        assert_eq!(envelope.payload.step, expected, "the stream lost a message across the restart");
        delivery.ack().await.unwrap();
    }
}

#[tokio::test]
async fn no_server_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("nats://127.0.0.1:{port}");
    let result = NatsBus::connect_with_attempts(&url, RunId::new("none").unwrap(), 2).await;
    let err = result.err().expect("connecting to a closed port succeeded");
    let message = err.to_string();
    assert!(matches!(err, BusError::Connect { .. }), "{message}");
    assert!(message.contains(&url), "{message}");
    assert!(message.contains("check that nats-server runs there"), "{message}");
}
