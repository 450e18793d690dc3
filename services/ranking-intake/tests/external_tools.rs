//! External tools on a real nats-server: JSON and MessagePack rankings with
//! a reply subject, an undecodable message, and the Python example client
//! ranking sets end to end.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{candidate_set, dead_letter_queue, fresh_run, next_dead_letter, ARRIVAL};
use futures::StreamExt;
use troupe_bus::nats::NatsBus;
use troupe_bus::{BusHandle, Outgoing};
use troupe_ranking_intake::{read_preference_records, IntakeSettings, Running, REPLY_TO_HEADER};
use troupe_store::Store;
use troupe_wire::{CandidateSet, ContentType, Envelope, FinishReason, Ranking, RankingReceipt};

async fn nats_bus() -> Option<(BusHandle, String)> {
    let url = troupe_testkit::nats_url()?;
    let bus = NatsBus::connect(&url, fresh_run()).await.expect("connect to the test nats-server");
    Some((BusHandle::new(bus), url))
}

async fn start_intake(bus: &BusHandle, store: &Store) -> (Running, tokio::sync::oneshot::Sender<()>) {
    // A ranking may overtake its candidate set, so unknown sets are retried.
    let settings =
        IntakeSettings { unknown_set_retries: 10, retry_delay: Duration::from_millis(200), ..IntakeSettings::default() };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = troupe_ranking_intake::start(settings, bus.clone(), store.clone(), async move {
        stopped.await.ok();
    })
    .await
    .unwrap();
    (running, stop)
}

/// Builds a set whose candidates differ in finish reason and length, so every
/// rule-based labeler finds an order.
fn varied_set(set_id: &str) -> CandidateSet {
    let mut set = candidate_set(set_id, &["A", "B", "C"], None);
    set.candidates[0].finish_reason = FinishReason::Length;
    set.candidates[0].token_count = 32;
    set.candidates[1].token_count = 9;
    set.candidates[2].token_count = 4;
    set
}

fn ranking_message(bus: &BusHandle, ranking: Ranking, content_type: ContentType, reply_to: &str) -> Outgoing {
    let envelope = Envelope::new(bus.subjects().run().as_str(), ranking);
    Outgoing::encode(&bus.subjects().rankings(), &envelope, content_type).unwrap().with_header(REPLY_TO_HEADER, reply_to)
}

async fn receipt_on(client: &async_nats::Client, inbox: String, message: Outgoing, bus: &BusHandle) -> (RankingReceipt, Option<String>) {
    let mut replies = client.subscribe(inbox).await.unwrap();
    client.flush().await.unwrap();
    bus.publish_durable_raw(&bus.subjects().rankings(), message).await.unwrap();
    let reply = tokio::time::timeout(ARRIVAL, replies.next()).await.expect("no receipt on the reply subject").unwrap();
    let content_type = reply.headers.as_ref().and_then(|headers| headers.get("Content-Type")).map(|value| value.to_string());
    let kind = ContentType::from_header(content_type.as_deref()).unwrap();
    let envelope = troupe_wire::decode::<RankingReceipt>(&reply.payload, kind).unwrap();
    (envelope.payload, content_type)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_rankings_get_receipts() {
    let Some((bus, url)) = nats_bus().await else { return };
    let store = Store::memory();
    let (running, stop) = start_intake(&bus, &store).await;
    let mut dead = dead_letter_queue(&bus).await;
    let client = async_nats::connect(&url).await.unwrap();

    let set = Envelope::new(bus.subjects().run().as_str(), varied_set("s1"));
    bus.publish_durable(&bus.subjects().candidates(), &set).await.unwrap();

    let json = Ranking {
        ranking_id: "json-1".into(),
        set_id: "s1".into(),
        labeler: "tool".into(),
        order: vec![vec!["C".into()], vec!["B".into()], vec!["A".into()]],
        note: None,
    };
    let inbox = client.new_inbox();
    let (receipt, content_type) =
        receipt_on(&client, inbox.clone(), ranking_message(&bus, json.clone(), ContentType::Json, &inbox), &bus).await;
    assert!(receipt.accepted, "{receipt:?}");
    assert_eq!(receipt.pairs, 3);
    assert_eq!(content_type.as_deref(), Some("application/json"), "a JSON ranking got a non-JSON receipt");

    let msgpack = Ranking { ranking_id: "msgpack-1".into(), order: vec![vec!["A".into()], vec!["B".into()]], ..json.clone() };
    let inbox = client.new_inbox();
    let (receipt, content_type) =
        receipt_on(&client, inbox.clone(), ranking_message(&bus, msgpack, ContentType::MessagePack, &inbox), &bus).await;
    assert!(receipt.accepted, "{receipt:?}");
    assert_eq!(receipt.pairs, 1);
    assert_eq!(content_type.as_deref(), Some("application/msgpack"));

    let invalid = Ranking { ranking_id: "bad-1".into(), order: vec![vec!["A".into()], vec!["nope".into()]], ..json.clone() };
    let inbox = client.new_inbox();
    let (receipt, _) = receipt_on(&client, inbox.clone(), ranking_message(&bus, invalid, ContentType::Json, &inbox), &bus).await;
    assert!(!receipt.accepted);
    assert!(receipt.reason.as_deref().unwrap_or_default().contains("\"nope\" is not in set"), "{receipt:?}");

    let inbox = client.new_inbox();
    let garbage = Outgoing::new("garbage-1", ContentType::Json, br#"{"schema": 1, "kind": "ranking", "payload": {"ranking_id": "g-1"}}"#.to_vec())
        .with_header(REPLY_TO_HEADER, &inbox);
    let (receipt, _) = receipt_on(&client, inbox, garbage, &bus).await;
    assert!(!receipt.accepted);
    assert_eq!(receipt.ranking_id, "g-1");
    assert!(receipt.reason.as_deref().unwrap_or_default().contains("cannot decode as ranking"), "{receipt:?}");

    let mut reasons = Vec::new();
    for _ in 0..2 {
        reasons.push(next_dead_letter(&mut dead).await.reason);
    }
    assert!(reasons.iter().any(|reason| reason.contains("\"nope\"")), "{reasons:?}");
    assert!(reasons.iter().any(|reason| reason.contains("cannot decode")), "{reasons:?}");

    let records = read_preference_records(&store, "preferences").await.unwrap();
    assert_eq!(records.len(), 2);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running.wait()).await.expect("the service did not stop").unwrap();
}

/// Returns whether python3 can import the client's packages. Without them the
/// test is skipped loudly, except under `CI=true`, where it fails.
fn python_ready() -> bool {
    let probe = std::process::Command::new("python3").args(["-c", "import nats, msgpack"]).output();
    let ready = probe.as_ref().is_ok_and(|output| output.status.success());
    if !ready {
        let why = match probe {
            Ok(output) => String::from_utf8_lossy(&output.stderr).into_owned(),
            Err(err) => format!("python3 not runnable: {err}"),
        };
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("python3 lacks nats-py or msgpack under CI=true: {why}; pip install nats-py msgpack");
        }
        eprintln!("SKIPPED python_client_ranks_sets: python3 lacks nats-py or msgpack ({why}); pip install nats-py msgpack");
    }
    ready
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_ranks_sets() {
    if !python_ready() {
        return;
    }
    let Some((bus, url)) = nats_bus().await else { return };
    let store = Store::memory();
    let (running, stop) = start_intake(&bus, &store).await;

    // Two sets in MessagePack, as the sampler publishes them, one in JSON.
    let candidates = bus.subjects().candidates();
    for set_id in ["p1", "p2"] {
        let envelope = Envelope::new(bus.subjects().run().as_str(), varied_set(set_id));
        bus.publish_durable(&candidates, &envelope).await.unwrap();
    }
    let envelope = Envelope::new(bus.subjects().run().as_str(), varied_set("p3"));
    bus.publish_durable_raw(&candidates, Outgoing::encode(&candidates, &envelope, ContentType::Json).unwrap()).await.unwrap();

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let child = tokio::process::Command::new("python3")
        .arg(root.join("examples/labeling_client.py"))
        .args(["--nats", &url, "--run", bus.subjects().run().as_str(), "--labeler", "py-tool"])
        .args(["--max-sets", "3", "--idle-timeout", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start python3");
    let output = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("the Python client did not finish within 90 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "client failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    assert_eq!(stdout.matches(": accepted, pairs 3").count(), 3, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("ranked 3 sets"), "stdout:\n{stdout}");

    let records = read_preference_records(&store, "preferences").await.unwrap();
    let mut sets: Vec<&str> = records.iter().map(|record| record.set_id.as_str()).collect();
    sets.sort();
    assert_eq!(sets, ["p1", "p2", "p3"]);
    for record in &records {
        assert_eq!(record.labeler, "py-tool");
        // The client prefers EOS, then fewer tokens: C (4) > B (9) > A (length).
        assert_eq!(record.order, vec![vec!["C".to_string()], vec!["B".to_string()], vec!["A".to_string()]]);
    }

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running.wait()).await.expect("the service did not stop").unwrap();
}
