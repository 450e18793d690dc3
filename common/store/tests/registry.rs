//! Model registry behaviour on every backend: round trip, invisible
//! unpublished versions, corruption detection, racing writers, latest
//! version and lineage.

mod common;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use troupe_store::{
    ModelKind, ModelRef, ModelRegistry, NewVersion, ObjectKey, Store, StoreError, CONFIG_FILE, MANIFEST_FILE,
    OPTIMIZER_FILE, TOKENIZER_FILE, WEIGHTS_FILE,
};

on_every_backend!(
    round_trip,
    large_file_from_disk,
    version_without_manifest_invisible,
    corrupt_weights_reported,
    racing_writers_one_wins,
    racing_next_version_writers,
    latest_and_lineage,
    create_only_put,
);

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn tiny_version(name: &str, kind: ModelKind, weights: &'static [u8]) -> NewVersion {
    NewVersion::new(name, kind, weights, &b"{\"hidden_size\": 8}"[..], &b"{\"model\": {}}"[..])
}

async fn round_trip(store: Store) {
    let registry = ModelRegistry::new(store);
    let metadata = serde_json::json!({"train_loss": 2.5, "config": {"lr": 0.001}});
    let new = tiny_version("tiny", ModelKind::Base, b"weights-v1")
        .with_optimizer_state(&b"adamw moments"[..])
        .with_file("extra/rng.bin", &b"rng state"[..])
        .with_metadata(metadata.clone());

    let published = registry.publish(new).await.unwrap();
    assert_eq!(published.model_ref(), ModelRef::new("tiny", 1));
    assert_eq!(published.kind, ModelKind::Base);
    assert_eq!(published.metadata, metadata);
    let weights_entry = published.file(WEIGHTS_FILE).unwrap();
    assert_eq!(weights_entry.size, 10);
    assert_eq!(weights_entry.sha256, sha256_hex(b"weights-v1"));

    assert_eq!(registry.list_models().await.unwrap(), vec!["tiny".to_string()]);
    assert_eq!(registry.list_versions("tiny").await.unwrap(), vec![1]);
    assert_eq!(registry.latest("tiny").await.unwrap().as_ref(), Some(&published));
    assert_eq!(registry.manifest(&ModelRef::new("tiny", 1)).await.unwrap(), published);

    let loaded = registry.load(&ModelRef::new("tiny", 1)).await.unwrap();
    assert_eq!(loaded.manifest, published);
    assert_eq!(loaded.weights(), &Bytes::from_static(b"weights-v1"));
    assert_eq!(loaded.config(), &Bytes::from_static(b"{\"hidden_size\": 8}"));
    assert_eq!(loaded.tokenizer(), &Bytes::from_static(b"{\"model\": {}}"));
    assert_eq!(loaded.file(OPTIMIZER_FILE), Some(&Bytes::from_static(b"adamw moments")));
    assert_eq!(loaded.file("extra/rng.bin"), Some(&Bytes::from_static(b"rng state")));
    assert_eq!(loaded.files().len(), 5);

    let config = registry.load_file(&ModelRef::new("tiny", 1), CONFIG_FILE).await.unwrap();
    assert_eq!(config, Bytes::from_static(b"{\"hidden_size\": 8}"));
    let missing = registry.load_file(&ModelRef::new("tiny", 1), "absent.bin").await.unwrap_err();
    assert!(missing.is_not_found(), "{missing}");

    let directory = tempfile::tempdir().unwrap();
    let downloaded = registry.download(&ModelRef::new("tiny", 1), directory.path()).await.unwrap();
    assert_eq!(downloaded, published);
    assert_eq!(std::fs::read(directory.path().join(WEIGHTS_FILE)).unwrap(), b"weights-v1");
    assert_eq!(std::fs::read(directory.path().join(TOKENIZER_FILE)).unwrap(), b"{\"model\": {}}");
    assert_eq!(std::fs::read(directory.path().join("extra/rng.bin")).unwrap(), b"rng state");
    let local_manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(directory.path().join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(local_manifest["version"], 1);
}

/// Uploads a file over the 16 MiB part size as a multipart upload and
/// streams it back to disk.
async fn large_file_from_disk(store: Store) {
    let registry = ModelRegistry::new(store);
    let directory = tempfile::tempdir().unwrap();
    let weights: Vec<u8> = (0..17 * 1024 * 1024 + 3).map(|i: u32| (i % 251) as u8).collect();
    let path = directory.path().join("weights.safetensors");
    std::fs::write(&path, &weights).unwrap();

    let new = NewVersion::new("big", ModelKind::Sft, path.as_path(), &b"{}"[..], &b"{}"[..]);
    let published = registry.publish(new).await.unwrap();
    let entry = published.file(WEIGHTS_FILE).unwrap();
    assert_eq!(entry.size, weights.len() as u64);
    assert_eq!(entry.sha256, sha256_hex(&weights));

    let output = directory.path().join("download");
    registry.download(&published.model_ref(), &output).await.unwrap();
    assert_eq!(std::fs::read(output.join(WEIGHTS_FILE)).unwrap(), weights);
}

async fn version_without_manifest_invisible(store: Store) {
    let registry = ModelRegistry::new(store.clone());
    registry.publish(tiny_version("half", ModelKind::Base, b"v1")).await.unwrap();

    // A publisher that crashed before its manifest left only its files.
    for file in [WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE] {
        let key = ObjectKey::new(format!("models/half/00000002/{}/{file}", uuid::Uuid::new_v4())).unwrap();
        store.put(&key, Bytes::from_static(b"unpublished")).await.unwrap();
    }
    let orphan_key = ObjectKey::new("models/orphan/00000001/upload/model.safetensors").unwrap();
    store.put(&orphan_key, Bytes::from_static(b"unpublished")).await.unwrap();

    assert_eq!(registry.list_versions("half").await.unwrap(), vec![1]);
    assert_eq!(registry.latest("half").await.unwrap().unwrap().version, 1);
    assert_eq!(registry.list_models().await.unwrap(), vec!["half".to_string()]);
    assert_eq!(registry.list_versions("orphan").await.unwrap(), Vec::<u64>::new());
    assert!(registry.latest("orphan").await.unwrap().is_none());

    let error = registry.load(&ModelRef::new("half", 2)).await.unwrap_err();
    match error {
        StoreError::NotFound { ref key, .. } => assert_eq!(key, "models/half/00000002/manifest.json"),
        other => panic!("expected NotFound, got {other}"),
    }
    let error = registry.load_file(&ModelRef::new("half", 2), WEIGHTS_FILE).await.unwrap_err();
    assert!(error.is_not_found(), "{error}");

    // The leftover upload does not block publishing that number.
    let next = registry.publish(tiny_version("half", ModelKind::Base, b"v2")).await.unwrap();
    assert_eq!(next.version, 2);
    let loaded = registry.load(&ModelRef::new("half", 2)).await.unwrap();
    assert_eq!(loaded.weights(), &Bytes::from_static(b"v2"));
}

async fn corrupt_weights_reported(store: Store) {
    let registry = ModelRegistry::new(store.clone());
    let published = registry.publish(tiny_version("flip", ModelKind::Base, b"0123456789")).await.unwrap();
    let model = published.model_ref();
    let weights_key =
        ObjectKey::new(format!("models/flip/00000001/{}", published.file(WEIGHTS_FILE).unwrap().path)).unwrap();

    let mut flipped = store.get(&weights_key).await.unwrap().to_vec();
    flipped[4] ^= 0x01;
    store.put(&weights_key, flipped.clone()).await.unwrap();

    let error = registry.load(&model).await.unwrap_err();
    match &error {
        StoreError::ChecksumMismatch { key, expected, actual } => {
            assert_eq!(key, weights_key.as_str());
            assert_eq!(expected, &sha256_hex(b"0123456789"));
            assert_eq!(actual, &sha256_hex(&flipped));
        }
        other => panic!("expected ChecksumMismatch, got {other}"),
    }
    assert!(error.to_string().contains(weights_key.as_str()), "{error}");

    let error = registry.load_file(&model, WEIGHTS_FILE).await.unwrap_err();
    assert!(matches!(error, StoreError::ChecksumMismatch { ref key, .. } if key == weights_key.as_str()), "{error}");
    // The other files are intact and still load.
    registry.load_file(&model, CONFIG_FILE).await.unwrap();

    let directory = tempfile::tempdir().unwrap();
    let error = registry.download(&model, directory.path()).await.unwrap_err();
    assert!(matches!(error, StoreError::ChecksumMismatch { ref key, .. } if key == weights_key.as_str()), "{error}");
    let left: Vec<_> = std::fs::read_dir(directory.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert!(!left.iter().any(|name| name.to_string_lossy().starts_with(WEIGHTS_FILE)), "left behind: {left:?}");

    store.put(&weights_key, Bytes::from_static(b"01234")).await.unwrap();
    let error = registry.load(&model).await.unwrap_err();
    match error {
        StoreError::SizeMismatch { key, expected, actual } => {
            assert_eq!(key, weights_key.as_str());
            assert_eq!((expected, actual), (10, 5));
        }
        other => panic!("expected SizeMismatch, got {other}"),
    }
}

async fn racing_writers_one_wins(store: Store) {
    let registry = ModelRegistry::new(store.clone());
    let writers: Vec<_> = (0..4u8)
        .map(|writer| {
            let registry = registry.clone();
            tokio::spawn(async move {
                let weights = vec![writer; 64];
                let new = NewVersion::new("race", ModelKind::Sft, weights, &b"{}"[..], &b"{}"[..]).with_version(1);
                (writer, registry.publish(new).await)
            })
        })
        .collect();

    let mut winners = Vec::new();
    for writer in writers {
        let (id, outcome) = writer.await.unwrap();
        match outcome {
            Ok(manifest) => winners.push((id, manifest)),
            Err(StoreError::AlreadyExists { key, .. }) => assert_eq!(key, "models/race/00000001/manifest.json"),
            Err(other) => panic!("writer {id}: unexpected error {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer may publish version 1");
    let (winner, manifest) = &winners[0];

    let loaded = registry.load(&ModelRef::new("race", 1)).await.unwrap();
    assert_eq!(&loaded.manifest, manifest);
    assert_eq!(loaded.weights().as_ref(), vec![*winner; 64].as_slice());

    // The losers deleted their uploads.
    let prefix = ObjectKey::new("models/race/00000001").unwrap();
    let keys: Vec<String> = store.list(Some(&prefix)).await.unwrap().into_iter().map(|o| o.key.to_string()).collect();
    let upload_dir = format!("models/race/00000001/{}/", manifest.upload_id);
    for key in &keys {
        assert!(key.ends_with(MANIFEST_FILE) || key.starts_with(&upload_dir), "stray object {key}");
    }
    assert_eq!(keys.len(), 4, "manifest and three files: {keys:?}");

    let again = registry.publish(tiny_version("race", ModelKind::Sft, b"late").with_version(1)).await.unwrap_err();
    assert!(matches!(again, StoreError::AlreadyExists { .. }), "{again}");
}

async fn racing_next_version_writers(store: Store) {
    let registry = ModelRegistry::new(store);
    let writers: Vec<_> = (0..4u8)
        .map(|writer| {
            let registry = registry.clone();
            tokio::spawn(async move {
                let new = NewVersion::new("queue", ModelKind::Policy, vec![writer; 8], &b"{}"[..], &b"{}"[..]);
                registry.publish(new).await
            })
        })
        .collect();
    let mut versions = Vec::new();
    for writer in writers {
        let manifest = writer.await.unwrap().unwrap();
        versions.push(manifest.version);
        let loaded = registry.load(&manifest.model_ref()).await.unwrap();
        assert_eq!(loaded.manifest, manifest);
    }
    versions.sort();
    assert_eq!(versions, vec![1, 2, 3, 4]);
    assert_eq!(registry.list_versions("queue").await.unwrap(), vec![1, 2, 3, 4]);
}

async fn latest_and_lineage(store: Store) {
    let registry = ModelRegistry::new(store);
    assert!(registry.latest("chat").await.unwrap().is_none());

    let base = registry.publish(tiny_version("base-model", ModelKind::Base, b"base")).await.unwrap();
    let sft =
        registry.publish(tiny_version("chat", ModelKind::Sft, b"sft").with_parent(base.model_ref())).await.unwrap();
    let policy =
        registry.publish(tiny_version("chat", ModelKind::Policy, b"ppo").with_parent(sft.model_ref())).await.unwrap();
    let explicit = registry
        .publish(tiny_version("chat", ModelKind::Policy, b"ppo-7").with_parent(policy.model_ref()).with_version(7))
        .await
        .unwrap();

    assert_eq!((sft.version, policy.version, explicit.version), (1, 2, 7));
    assert_eq!(registry.latest("chat").await.unwrap().unwrap(), explicit);
    assert_eq!(registry.list_versions("chat").await.unwrap(), vec![1, 2, 7]);
    assert_eq!(registry.next_version("chat").await.unwrap(), 8);
    assert_eq!(registry.list_models().await.unwrap(), vec!["base-model".to_string(), "chat".to_string()]);

    let lineage: Vec<ModelRef> =
        registry.lineage(&explicit.model_ref()).await.unwrap().iter().map(|m| m.model_ref()).collect();
    assert_eq!(
        lineage,
        vec![
            ModelRef::new("chat", 7),
            ModelRef::new("chat", 2),
            ModelRef::new("chat", 1),
            ModelRef::new("base-model", 1)
        ]
    );
    let root: Vec<_> = registry.lineage(&base.model_ref()).await.unwrap();
    assert_eq!(root, vec![base]);

    let orphan = tiny_version("chat", ModelKind::Policy, b"x").with_parent(ModelRef::new("missing", 1));
    let error = registry.publish(orphan).await.unwrap_err();
    assert!(
        matches!(error, StoreError::NotFound { ref key, .. } if key == "models/missing/00000001/manifest.json"),
        "{error}"
    );
    assert_eq!(registry.list_versions("chat").await.unwrap(), vec![1, 2, 7]);
}

/// Checks the primitive under manifests and dataset slots: of two
/// create-only writes of one key the second fails and the first's bytes stay.
async fn create_only_put(store: Store) {
    let key = ObjectKey::new("probe/create-only").unwrap();
    store.put_new(&key, Bytes::from_static(b"first")).await.unwrap();
    let error = store.put_new(&key, Bytes::from_static(b"second")).await.unwrap_err();
    assert!(matches!(error, StoreError::AlreadyExists { key: ref k, .. } if k == "probe/create-only"), "{error}");
    assert_eq!(store.get(&key).await.unwrap(), Bytes::from_static(b"first"));

    store.delete(&key).await.unwrap();
    assert!(!store.exists(&key).await.unwrap());
    store.delete(&key).await.unwrap();
}
