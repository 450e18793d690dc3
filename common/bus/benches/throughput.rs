//! Bus throughput: durable publishes per second and queue deliveries
//! (fetch, decode-free, acknowledge) per second, for 1 KiB and 64 KiB
//! payloads, on the in-process bus and on NATS JetStream.
//!
//! Run with `cargo bench -p troupe-bus --bench throughput`. The NATS side
//! uses the server named by `TROUPE_TEST_NATS_URL`, or starts one on a free
//! loopback port (file storage in a temporary folder).

use std::time::{Duration, Instant};

use futures::StreamExt;
use troupe_bus::memory::MemoryBus;
use troupe_bus::nats::NatsBus;
use troupe_bus::{BusHandle, Outgoing, QueueConfig};
use troupe_wire::{ContentType, RunId};

/// Publishes awaited concurrently, as a producer pipelines them.
const PUBLISH_CONCURRENCY: usize = 64;

struct Row {
    bus: &'static str,
    payload: usize,
    messages: usize,
    publish_per_s: f64,
    consume_per_s: f64,
}

async fn measure(bus_name: &'static str, bus: BusHandle, payload: usize, messages: usize) -> Row {
    let subject = bus.subjects().rollouts();
    let body = bytes::Bytes::from(vec![0x5a; payload]);

    let started = Instant::now();
    let publishes = futures::stream::iter(0..messages).map(|index| {
        let message = Outgoing::new(&format!("m-{index}"), ContentType::MessagePack, body.clone());
        let bus = bus.clone();
        let subject = subject.clone();
        async move { bus.publish_durable_raw(&subject, message).await }
    });
    let results: Vec<_> = publishes.buffer_unordered(PUBLISH_CONCURRENCY).collect().await;
    let publish_elapsed = started.elapsed();
    let failed = results.iter().filter(|result| result.is_err()).count();
    assert_eq!(failed, 0, "{failed} publishes failed");

    let mut config = QueueConfig::new("bench", &subject);
    config.max_in_flight = 512;
    config.fetch_batch = 128;
    config.ack_wait = Duration::from_secs(60);
    let mut queue = bus.queue(config).await.expect("open the bench queue");
    let started = Instant::now();
    for _ in 0..messages {
        let delivery = queue.next().await.expect("receive");
        assert_eq!(delivery.message.payload.len(), payload);
        delivery.ack().await.expect("ack");
    }
    let consume_elapsed = started.elapsed();

    Row {
        bus: bus_name,
        payload,
        messages,
        publish_per_s: messages as f64 / publish_elapsed.as_secs_f64(),
        consume_per_s: messages as f64 / consume_elapsed.as_secs_f64(),
    }
}

fn run_id(tag: &str) -> RunId {
    RunId::new(&format!("bench-{tag}-{}", uuid::Uuid::new_v4().simple())).unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --benches` runs bench targets with `--bench` absent; only
    // measure when asked to.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let cases = [(1024usize, 20_000usize), (65_536, 2_000)];
    let mut rows = Vec::new();
    for (payload, messages) in cases {
        let memory = BusHandle::new(MemoryBus::new(run_id("mem")));
        rows.push(measure("in-process", memory, payload, messages).await);
    }
    match troupe_testkit::nats_url() {
        Some(url) => {
            for (payload, messages) in cases {
                let bus = NatsBus::connect(&url, run_id("nats")).await.expect("connect to nats-server");
                rows.push(measure("NATS JetStream", BusHandle::new(bus), payload, messages).await);
            }
        }
        None => eprintln!("nats-server not found: NATS rows skipped"),
    }

    println!("| bus | payload | messages | durable publish msg/s | consume + ack msg/s |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} KiB | {} | {:.0} | {:.0} |",
            row.bus,
            row.payload / 1024,
            row.messages,
            row.publish_per_s,
            row.consume_per_s
        );
    }
}
