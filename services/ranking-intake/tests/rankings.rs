//! Rankings to pairs, validation, duplicates and offline import, through
//! the library API on the in-process bus and an in-memory store.

mod common;

use std::time::Duration;

use common::{all_keys, candidate_set, dead_letter_queue, memory_bus, next_dead_letter};
use troupe_bus::{BusHandle, Outgoing};
use troupe_ranking_intake::{
    import_jsonl, parse_order_text, read_preference_records, DatasetNames, Intake, IntakeSettings, Source,
};
use troupe_store::Store;
use troupe_wire::codec::now_ms;
use troupe_wire::{ContentType, Envelope, PreferenceUpdate, Ranking, RankingReceipt};

fn order(groups: &[&[&str]]) -> Vec<Vec<String>> {
    groups.iter().map(|group| group.iter().map(|id| id.to_string()).collect()).collect()
}

fn ranking(ranking_id: &str, set_id: &str, labeler: &str, groups: &[&[&str]]) -> Ranking {
    Ranking {
        ranking_id: ranking_id.to_string(),
        set_id: set_id.to_string(),
        labeler: labeler.to_string(),
        order: order(groups),
        note: None,
    }
}

async fn intake_with_sets(bus: &BusHandle, store: &Store) -> Intake {
    let intake = Intake::open(bus.clone(), store.clone(), DatasetNames::default()).await.unwrap();
    intake.add_candidate_set(candidate_set("s1", &["A", "B", "C", "D"], None)).await.unwrap();
    intake.add_candidate_set(candidate_set("old", &["A", "B"], Some(now_ms() - 1000))).await.unwrap();
    intake
}

#[tokio::test]
async fn full_order_of_four_gives_six_pairs() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = intake_with_sets(&bus, &store).await;
    let receipt = intake.submit(ranking("r1", "s1", "ann", &[&["D"], &["C"], &["A"], &["B"]]), Source::Cli).await.unwrap();
    assert!(receipt.accepted, "{receipt:?}");
    assert_eq!(receipt.pairs, 6);

    let records = read_preference_records(&store, "preferences").await.unwrap();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.pairs.len(), 6);
    assert_eq!(record.prompt, "question of s1");
    assert_eq!(record.candidates.len(), 4);
    assert_eq!(record.labeler, "ann");
    assert_eq!(record.policy.version, 3);
    let texts = record.text_pairs();
    assert_eq!(texts[0], ("answer D", "answer C"));
    assert!(texts.contains(&("answer A", "answer B")));
}

#[tokio::test]
async fn ties_give_five_pairs() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = intake_with_sets(&bus, &store).await;
    let receipt = intake.submit(ranking("r1", "s1", "ann", &[&["D"], &["C", "A"], &["B"]]), Source::Cli).await.unwrap();
    assert!(receipt.accepted, "{receipt:?}");
    assert_eq!(receipt.pairs, 5);
    let record = &read_preference_records(&store, "preferences").await.unwrap()[0];
    let tied = record.pairs.iter().any(|pair| {
        (pair.chosen == "C" && pair.rejected == "A") || (pair.chosen == "A" && pair.rejected == "C")
    });
    assert!(!tied, "tied candidates were paired: {:?}", record.pairs);
}

#[tokio::test]
async fn pairwise_choice_gives_one_pair() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = intake_with_sets(&bus, &store).await;
    let receipt = intake.submit(ranking("r1", "s1", "ann", &[&["B"], &["C"]]), Source::Cli).await.unwrap();
    assert!(receipt.accepted, "{receipt:?}");
    assert_eq!(receipt.pairs, 1);
    let record = &read_preference_records(&store, "preferences").await.unwrap()[0];
    assert_eq!((record.pairs[0].chosen.as_str(), record.pairs[0].rejected.as_str()), ("B", "C"));
}

#[tokio::test]
async fn invalid_rankings_leave_store_unchanged() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = intake_with_sets(&bus, &store).await;
    let mut dead = dead_letter_queue(&bus).await;
    let before = all_keys(&store).await;

    let cases = [
        ("unknown candidate", ranking("bad-1", "s1", "ann", &[&["D"], &["Z"]]), "\"Z\" is not in set \"s1\""),
        ("id twice", ranking("bad-2", "s1", "ann", &[&["D"], &["C", "D"]]), "\"D\" appears twice"),
        ("unknown set", ranking("bad-3", "nope", "ann", &[&["A"], &["B"]]), "unknown candidate set \"nope\""),
        ("expired set", ranking("bad-4", "old", "ann", &[&["A"], &["B"]]), "\"old\" expired"),
        ("missing labeler", ranking("bad-5", "s1", " ", &[&["A"], &["B"]]), "missing labeler"),
        ("one group", ranking("bad-6", "s1", "ann", &[&["A", "B"]]), "at least two groups"),
    ];
    for (case, ranking, expected_reason) in cases {
        let ranking_id = ranking.ranking_id.clone();
        let receipt = intake.submit(ranking, Source::Cli).await.unwrap();
        assert!(!receipt.accepted, "{case}: accepted");
        assert_eq!(receipt.pairs, 0, "{case}");
        let reason = receipt.reason.unwrap_or_default();
        assert!(reason.contains(expected_reason), "{case}: reason {reason:?} lacks {expected_reason:?}");

        let letter = next_dead_letter(&mut dead).await;
        assert_eq!(letter.message_id.as_deref(), Some(ranking_id.as_str()), "{case}");
        assert_eq!(letter.reason, reason, "{case}");
        assert_eq!(letter.consumer, "ranking-intake-cli", "{case}");
    }

    assert_eq!(all_keys(&store).await, before, "a rejected ranking changed the store");
    let progress = intake.progress().await.unwrap();
    assert_eq!(progress.records, 0);
    assert_eq!(progress.pairs, 0);
}

#[tokio::test]
async fn duplicate_delivery_stores_one_record() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = intake_with_sets(&bus, &store).await;
    let first = intake.submit(ranking("r1", "s1", "ann", &[&["A"], &["B"]]), Source::Cli).await.unwrap();
    let second = intake.submit(ranking("r1", "s1", "ann", &[&["A"], &["B"]]), Source::Web).await.unwrap();
    assert!(first.accepted, "{first:?}");
    assert!(!first.duplicate, "{first:?}");
    assert!(second.accepted, "{second:?}");
    assert!(second.duplicate, "{second:?}");
    assert_eq!(read_preference_records(&store, "preferences").await.unwrap().len(), 1);
    assert_eq!(intake.progress().await.unwrap().records, 1);
}

#[tokio::test]
async fn second_labeler_gets_own_record() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = intake_with_sets(&bus, &store).await;
    let ann = intake.submit(ranking("r-ann", "s1", "ann", &[&["A"], &["B"]]), Source::Cli).await.unwrap();
    let bob = intake.submit(ranking("r-bob", "s1", "bob", &[&["B"], &["A"]]), Source::Cli).await.unwrap();
    assert!(ann.accepted, "{ann:?}");
    assert!(bob.accepted, "{bob:?}");
    let records = read_preference_records(&store, "preferences").await.unwrap();
    let labelers: Vec<&str> = records.iter().map(|record| record.labeler.as_str()).collect();
    assert_eq!(labelers, ["ann", "bob"]);
    let progress = intake.progress().await.unwrap();
    assert_eq!(progress.records, 2);
    assert_eq!(progress.sets_ranked, 1);
    assert_eq!(progress.records_by_labeler.get("bob"), Some(&1));
}

#[tokio::test]
async fn progress_counts_set_states() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = intake_with_sets(&bus, &store).await;
    intake.add_candidate_set(candidate_set("s2", &["A", "B", "C"], None)).await.unwrap();
    intake.submit(ranking("r1", "s1", "ann", &[&["D"], &["C"], &["A"], &["B"]]), Source::Cli).await.unwrap();

    let progress = intake.progress().await.unwrap();
    assert_eq!(progress.sets_total, 3);
    assert_eq!(progress.sets_pending, 1);
    assert_eq!(progress.sets_ranked, 1);
    assert_eq!(progress.sets_expired, 1);
    assert_eq!(progress.pairs, 6);
    let pending: Vec<String> = intake.pending(10).await.unwrap().into_iter().map(|set| set.set_id).collect();
    assert_eq!(pending, ["s2"]);
}

#[tokio::test]
async fn reopened_intake_rebuilds_index() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = intake_with_sets(&bus, &store).await;
    intake.submit(ranking("r1", "s1", "ann", &[&["D"], &["C", "A"], &["B"]]), Source::Cli).await.unwrap();
    let before = intake.progress().await.unwrap();
    drop(intake);

    let reopened = Intake::open(bus.clone(), store.clone(), DatasetNames::default()).await.unwrap();
    assert_eq!(reopened.progress().await.unwrap(), before);
    let again = reopened.submit(ranking("r1", "s1", "ann", &[&["D"], &["C", "A"], &["B"]]), Source::Cli).await.unwrap();
    assert!(again.duplicate, "a ranking stored before the restart was stored again");
}

#[tokio::test]
async fn accepted_ranking_announces_update() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = intake_with_sets(&bus, &store).await;
    let mut updates = bus.subscribe(&bus.subjects().preferences()).await.unwrap();
    let mut receipts = bus.subscribe(&bus.subjects().receipts()).await.unwrap();
    intake.submit(ranking("r1", "s1", "ann", &[&["D"], &["C"], &["A"], &["B"]]), Source::Cli).await.unwrap();

    let update = tokio::time::timeout(common::ARRIVAL, updates.next()).await.unwrap().unwrap();
    let update = update.decode::<PreferenceUpdate>().unwrap().payload;
    assert_eq!(update.record_id, "r1");
    assert_eq!(update.pairs, 6);
    assert_eq!(update.total_records, 1);
    assert_eq!(update.total_pairs, 6);
    let receipt = tokio::time::timeout(common::ARRIVAL, receipts.next()).await.unwrap().unwrap();
    assert!(receipt.decode::<RankingReceipt>().unwrap().payload.accepted);
}

#[tokio::test]
async fn odd_ranking_ids_are_stored_once() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = intake_with_sets(&bus, &store).await;
    let id = "labelstudio:task/17 #3";
    let first = intake.submit(ranking(id, "s1", "ann", &[&["A"], &["B"]]), Source::Cli).await.unwrap();
    let second = intake.submit(ranking(id, "s1", "ann", &[&["A"], &["B"]]), Source::Cli).await.unwrap();
    assert!(first.accepted, "{first:?}");
    assert!(!first.duplicate, "{first:?}");
    assert!(second.duplicate, "{second:?}");
    let records = read_preference_records(&store, "preferences").await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].ranking_id, id);
}

/// Rankings published on the bus by a tool go through the service's worker:
/// a duplicate delivery (same ranking id, new message id) is stored once,
/// and an invalid one is dead-lettered with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_rankings_through_service() {
    let (bus, store) = (memory_bus(), Store::memory());
    let settings = IntakeSettings { unknown_set_retries: 0, ..IntakeSettings::default() };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = troupe_ranking_intake::start(settings, bus.clone(), store.clone(), async move {
        stopped.await.ok();
    })
    .await
    .unwrap();
    let intake = running.intake.clone();
    let mut dead = dead_letter_queue(&bus).await;

    let candidates = bus.subjects().candidates();
    let set = Envelope::new(bus.subjects().run().as_str(), candidate_set("s1", &["A", "B", "C"], None));
    bus.publish_durable(&candidates, &set).await.unwrap();

    let rankings = bus.subjects().rankings();
    let good = ranking("tool-1", "s1", "tool", &[&["C"], &["A", "B"]]);
    for copy in 0..2 {
        let envelope = Envelope::with_id(bus.subjects().run().as_str(), format!("message-{copy}"), now_ms(), good.clone());
        let outgoing = Outgoing::encode(&rankings, &envelope, ContentType::Json).unwrap();
        bus.publish_durable_raw(&rankings, outgoing).await.unwrap();
    }
    let bad = ranking("tool-2", "s1", "tool", &[&["C"], &["X"]]);
    let envelope = Envelope::new(bus.subjects().run().as_str(), bad);
    bus.publish_durable(&rankings, &envelope).await.unwrap();

    let letter = next_dead_letter(&mut dead).await;
    assert!(letter.reason.contains("\"X\" is not in set"), "{}", letter.reason);
    assert_eq!(letter.consumer, "ranking-intake");

    let records = read_preference_records(&store, "preferences").await.unwrap();
    assert_eq!(records.len(), 1, "the duplicate delivery was stored twice");
    assert_eq!(records[0].pairs.len(), 2);
    assert_eq!(records[0].source, Source::Bus);
    assert_eq!(intake.progress().await.unwrap().records, 1);

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running.wait()).await.expect("the service did not stop").unwrap();
}

#[tokio::test]
async fn jsonl_import_reports_each_line() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = intake_with_sets(&bus, &store).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.jsonl");
    let lines = [
        r#"{"ranking_id": "j1", "set_id": "s1", "labeler": "ann", "order": [["D"], ["C", "A"], ["B"]], "ranked_at_ms": 1767225600000}"#,
        "",
        r#"{"ranking_id": "j1", "set_id": "s1", "labeler": "ann", "order": [["D"], ["C", "A"], ["B"]]}"#,
        r#"{"ranking_id": "j2", "set_id": "s1", "labeler": "ann", "order": [["D"], ["Q"]]}"#,
        r#"not json"#,
        r#"{"ranking_id": "j3", "set_id": "s1", "labeler": "bob", "order": [["A"], ["B"]], "note": "close call"}"#,
    ];
    std::fs::write(&path, lines.join("\n")).unwrap();

    let report = import_jsonl(&intake, &path).await.unwrap();
    assert_eq!(report.lines, 5);
    assert_eq!(report.accepted, 2);
    assert_eq!(report.duplicates, 1);
    assert_eq!(report.pairs, 6);
    let rejected_lines: Vec<u64> = report.rejected.iter().map(|(line, _)| *line).collect();
    assert_eq!(rejected_lines, [4, 5]);
    assert!(report.rejected[1].1.contains("labels.jsonl:5"), "{}", report.rejected[1].1);

    let records = read_preference_records(&store, "preferences").await.unwrap();
    assert_eq!(records[0].ranked_at_ms, 1_767_225_600_000);
    assert_eq!(records[0].source, Source::Jsonl);
    assert_eq!(records[1].note.as_deref(), Some("close call"));

    let again = import_jsonl(&intake, &path).await.unwrap();
    assert_eq!(again.accepted, 0, "a second import stored rankings again");
    assert_eq!(again.duplicates, 3);
}

#[tokio::test]
async fn terminal_order_syntax() {
    let set = common::candidate_set("s1", &["A", "B", "C", "D"], None);
    assert_eq!(parse_order_text("D > C = A > B", &set).unwrap(), order(&[&["D"], &["C", "A"], &["B"]]));
    assert_eq!(parse_order_text("4>3=1>2", &set).unwrap(), order(&[&["D"], &["C", "A"], &["B"]]));
    assert_eq!(parse_order_text("B > 9", &set).unwrap(), order(&[&["B"], &["9"]]));
    assert!(parse_order_text("A >> B", &set).is_err());
    assert!(parse_order_text("A > = B", &set).is_err());
}

#[tokio::test]
async fn candidate_set_stored_once() {
    let (bus, store) = (memory_bus(), Store::memory());
    let intake = Intake::open(bus.clone(), store.clone(), DatasetNames::default()).await.unwrap();
    assert!(intake.add_candidate_set(candidate_set("s1", &["A", "B"], None)).await.unwrap());
    assert!(!intake.add_candidate_set(candidate_set("s1", &["A", "B"], None)).await.unwrap());
    assert_eq!(intake.progress().await.unwrap().sets_total, 1);
}
