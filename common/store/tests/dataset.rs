//! Append-only datasets on every backend: order, positions, duplicate ids,
//! a crash between the segment and its id marker, and racing appenders.

mod common;

use std::collections::HashSet;

use bytes::Bytes;
use troupe_store::{Datasets, ObjectKey, Store, StoreError};

on_every_backend!(
    append_then_read_in_order,
    duplicate_id_rejected,
    crash_before_marker_counted_once,
    racing_appenders_keep_all,
    racing_same_id_counted_once,
);

async fn append_then_read_in_order(store: Store) {
    let datasets = Datasets::new(store);
    assert!(datasets.read_all("pairs").await.unwrap().is_empty());

    for index in 0..5u64 {
        let info = datasets.append("pairs", &format!("batch-{index}"), format!("data {index}")).await.unwrap();
        assert_eq!(info.seq, index);
        assert_eq!(info.size, 6);
    }
    datasets.append("other", "batch-0", "elsewhere").await.unwrap();

    let listed = datasets.list("pairs").await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|segment| segment.id.as_str()).collect();
    assert_eq!(ids, ["batch-0", "batch-1", "batch-2", "batch-3", "batch-4"]);
    assert!(listed.windows(2).all(|pair| pair[0].seq < pair[1].seq));

    let all = datasets.read_all("pairs").await.unwrap();
    let data: Vec<Bytes> = all.iter().map(|segment| segment.data.clone()).collect();
    assert_eq!(data, (0..5).map(|index| Bytes::from(format!("data {index}"))).collect::<Vec<_>>());

    let tail = datasets.read_from("pairs", 3).await.unwrap();
    assert_eq!(tail.iter().map(|segment| segment.seq).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(tail[0].data, Bytes::from_static(b"data 3"));
    assert!(datasets.read_from("pairs", 5).await.unwrap().is_empty());

    // A second handle (no cached sequence number) continues the numbering.
    let other_handle = Datasets::new(datasets.store().clone());
    assert_eq!(other_handle.append("pairs", "batch-5", "data 5").await.unwrap().seq, 5);
    assert_eq!(datasets.list_datasets().await.unwrap(), ["other", "pairs"]);
}

async fn duplicate_id_rejected(store: Store) {
    let datasets = Datasets::new(store);
    datasets.append("ranks", "a", "first").await.unwrap();
    datasets.append("ranks", "b", "second").await.unwrap();

    let error = datasets.append("ranks", "a", "first again").await.unwrap_err();
    match &error {
        StoreError::DuplicateSegment { dataset, id, seq } => {
            assert_eq!((dataset.as_str(), id.as_str(), *seq), ("ranks", "a", 0));
        }
        other => panic!("expected DuplicateSegment, got {other}"),
    }
    assert!(error.to_string().contains("`a`"), "{error}");

    assert_eq!(datasets.find("ranks", "a").await.unwrap(), Some(0));
    assert_eq!(datasets.find("ranks", "zzz").await.unwrap(), None);
    let all = datasets.read_all("ranks").await.unwrap();
    assert_eq!(all.iter().map(|segment| segment.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(all[0].data, Bytes::from_static(b"first"));
}

/// Simulates an appender that wrote segment `x` and crashed before its id
/// marker: the redelivered append writes `x` again, and readers count it once.
async fn crash_before_marker_counted_once(store: Store) {
    let datasets = Datasets::new(store.clone());
    datasets.append("shards", "a", "a").await.unwrap();
    let slot = ObjectKey::new("datasets/shards/slots/00000000000000000001").unwrap();
    let segment = ObjectKey::new("datasets/shards/segments/00000000000000000001-x").unwrap();
    store.put_new(&slot, "x").await.unwrap();
    store.put(&segment, Bytes::from_static(b"x payload")).await.unwrap();

    let retried = Datasets::new(store.clone()).append("shards", "x", "x payload").await.unwrap();
    assert_eq!(retried.seq, 2);
    datasets.append("shards", "c", "c").await.unwrap();

    let all = datasets.read_all("shards").await.unwrap();
    let seen: Vec<(u64, &str)> = all.iter().map(|segment| (segment.seq, segment.id.as_str())).collect();
    assert_eq!(seen, [(0, "a"), (1, "x"), (3, "c")]);
    // A reader starting past the first copy does not count the repeat.
    let tail = datasets.read_from("shards", 2).await.unwrap();
    assert_eq!(tail.iter().map(|segment| segment.id.as_str()).collect::<Vec<_>>(), ["c"]);

    let again = datasets.append("shards", "x", "x payload").await.unwrap_err();
    assert!(matches!(again, StoreError::DuplicateSegment { .. }), "{again}");
}

async fn racing_appenders_keep_all(store: Store) {
    const APPENDERS: usize = 6;
    const PER_APPENDER: usize = 5;
    let tasks: Vec<_> = (0..APPENDERS)
        .map(|appender| {
            // Separate handles share no sequence-number cache, as separate
            // processes would not.
            let datasets = Datasets::new(store.clone());
            tokio::spawn(async move {
                for index in 0..PER_APPENDER {
                    let id = format!("w{appender}-{index}");
                    datasets.append("rollouts", &id, id.clone()).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }

    let all = Datasets::new(store).read_all("rollouts").await.unwrap();
    assert_eq!(all.len(), APPENDERS * PER_APPENDER);
    let seqs: HashSet<u64> = all.iter().map(|segment| segment.seq).collect();
    assert_eq!(seqs.len(), all.len(), "sequence numbers must be unique");
    for segment in &all {
        assert_eq!(segment.data, Bytes::from(segment.id.clone()), "segment {} was overwritten", segment.seq);
    }
    // Each appender's own segments appear in the order it appended them.
    for appender in 0..APPENDERS {
        let prefix = format!("w{appender}-");
        let own: Vec<&str> = all.iter().map(|s| s.id.as_str()).filter(|id| id.starts_with(&prefix)).collect();
        let expected: Vec<String> = (0..PER_APPENDER).map(|index| format!("{prefix}{index}")).collect();
        assert_eq!(own, expected);
    }
}

async fn racing_same_id_counted_once(store: Store) {
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let datasets = Datasets::new(store.clone());
            tokio::spawn(async move { datasets.append("labels", "ranking-17", "same payload").await })
        })
        .collect();
    let mut successes = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => successes += 1,
            Err(StoreError::DuplicateSegment { id, .. }) => assert_eq!(id, "ranking-17"),
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert_eq!(successes, 1, "exactly one append of an id may succeed");
    let all = Datasets::new(store).read_all("labels").await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].data, Bytes::from_static(b"same payload"));
}
