//! Stage 1 into stage 2 over the bus: a briefly pretrained base, then an SFT
//! job from the `jobs` queue that fine-tunes it and is acknowledged.

use std::path::PathBuf;
use std::time::Duration;

use troupe_bus::memory::MemoryBus;
use troupe_bus::BusHandle;
use troupe_sft_trainer::ServiceSettings;
use troupe_store::{ModelKind, ModelRegistry, Store};
use troupe_wire::{Envelope, JobRequest, ModelAnnouncement, RunId, Stage};

fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sft_job_fine_tunes_pretrained_base() {
    let bus = BusHandle::new(MemoryBus::new(RunId::new("stages").unwrap()));
    let store = Store::memory();

    let mut pretrain = troupe_pretrainer::Settings::from_args(&["pretrain".to_string()]).unwrap();
    pretrain.corpus = vec![repo_path("data/corpus/books/fortunes_riddles.txt")];
    pretrain.vocab_size = Some(400);
    pretrain.seq_len = 32;
    pretrain.batch_size = 4;
    pretrain.steps = 4;
    pretrain.checkpoint_every = 0;
    pretrain.eval_sequences = 4;
    let base = troupe_pretrainer::pretrain(&pretrain, &bus, &store, std::future::pending())
        .await
        .unwrap()
        .model;

    let mut announcements = bus.subscribe(&bus.subjects().models()).await.unwrap();
    let job = JobRequest {
        job_id: "sft-1".into(),
        stage: Stage::Sft,
        base: Some(troupe_wire::ModelRef {
            name: base.name.clone(),
            version: base.version,
        }),
        output: "assistant".into(),
        inputs: vec![repo_path("data/sft/capitals.train.jsonl")
            .display()
            .to_string()],
        settings: [
            ("steps", "6"),
            (
                "heldout",
                &repo_path("data/sft/capitals.heldout.jsonl")
                    .display()
                    .to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    };
    bus.publish_durable(&bus.subjects().jobs_for(troupe_wire::Stage::Sft), &Envelope::new("stages", job))
        .await
        .unwrap();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let settings = ServiceSettings {
        queue: "sft-trainer".into(),
        job_ack_wait_secs: 30,
        job_max_deliver: 3,
        job_retry_delay_secs: 1,
    };
    let service = tokio::spawn(troupe_sft_trainer::run(
        settings,
        bus.clone(),
        store.clone(),
        async move {
            stop_rx.await.ok();
        },
    ));

    let message = tokio::time::timeout(Duration::from_secs(120), announcements.next())
        .await
        .unwrap()
        .unwrap();
    let announced: Envelope<ModelAnnouncement> = message.decode().unwrap();
    assert_eq!(announced.payload.model.name, "assistant");
    assert_eq!(announced.payload.kind, troupe_wire::ModelKind::Sft);
    assert_eq!(
        announced.payload.parent.as_ref().map(|p| p.version),
        Some(base.version)
    );
    assert!(announced.payload.metrics.contains_key("eos_rate"));
    stop_tx.send(()).unwrap();
    service.await.unwrap().unwrap();

    let manifest = ModelRegistry::new(store)
        .latest("assistant")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(manifest.kind, ModelKind::Sft);
    assert_eq!(manifest.parent, Some(base));
    assert_eq!(manifest.metadata["job_id"], "sft-1");
}
