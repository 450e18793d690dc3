//! Exact resume after a kill, the job queue path, and bad inputs that must
//! fail clearly without touching the store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use troupe_bus::memory::MemoryBus;
use troupe_bus::BusHandle;
use troupe_pretrainer::{pretrain, PretrainError, ServiceSettings, Settings};
use troupe_store::{ModelRegistry, Store};
use troupe_wire::{Envelope, JobRequest, ModelAnnouncement, RunId, Stage};

fn books() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/corpus/books")
}

/// Copies two short books into `dir` as a small corpus.
fn small_corpus(dir: &Path) -> PathBuf {
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    for name in ["fortunes_riddles.txt", "shakespeare_sonnets.txt"] {
        std::fs::copy(books().join(name), corpus.join(name)).unwrap();
    }
    corpus
}

/// Settings for a few fast steps of the tiny preset on `corpus`.
fn quick_settings(corpus: PathBuf, job_id: &str) -> Settings {
    let mut settings = Settings::from_args(&["pretrain".to_string()]).unwrap();
    settings.corpus = vec![corpus];
    settings.job_id = job_id.to_string();
    settings.vocab_size = Some(320);
    settings.seq_len = 32;
    settings.batch_size = 4;
    settings.grad_accum = 2;
    settings.steps = 8;
    settings.warmup_steps = 2;
    settings.eval_every = 4;
    settings.eval_sequences = 4;
    settings.checkpoint_every = 4;
    settings
}

fn bus(run: &str) -> BusHandle {
    BusHandle::new(MemoryBus::new(RunId::new(run).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let settings = quick_settings(small_corpus(dir.path()), "resume");

    // Uninterrupted reference run in its own store.
    let reference = pretrain(
        &settings,
        &bus("reference"),
        &Store::memory(),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(reference.step_losses.len(), 8);

    // The same job, aborted once its step-4 checkpoint is announced.
    let store = Store::from_url(dir.path().join("store").to_str().unwrap()).unwrap();
    let killed_bus = bus("killed");
    let mut announcements = killed_bus
        .subscribe(&killed_bus.subjects().models())
        .await
        .unwrap();
    let task = {
        let (settings, bus, store) = (settings.clone(), killed_bus.clone(), store.clone());
        tokio::spawn(async move { pretrain(&settings, &bus, &store, std::future::pending()).await })
    };
    let first = tokio::time::timeout(Duration::from_secs(120), announcements.next())
        .await
        .unwrap()
        .unwrap();
    let announced: Envelope<ModelAnnouncement> = first.decode().unwrap();
    task.abort();
    assert!(
        task.await.unwrap_err().is_cancelled(),
        "the run finished before it could be killed"
    );
    // The checkpoint is the one saved after step 4 of the same training.
    let checkpoint_loss = announced.payload.metrics["train_loss"];
    assert!((checkpoint_loss - reference.step_losses[3]).abs() <= 1e-5);

    // A fresh call with nothing kept in memory: a new bus, the same store.
    let resumed = pretrain(&settings, &bus("resumed"), &store, std::future::pending())
        .await
        .unwrap();
    assert_eq!(resumed.first_step, 4);
    assert_eq!(resumed.resumed_from.as_ref().map(|m| m.version), Some(1));
    // Tolerance: 1e-5 nats. In this test the losses agree bit for bit, but
    // the CPU kernels do not promise the same float rounding in every
    // process. A resume that lost the optimizer moments or the data position
    // moves the loss by more than 1e-3.
    for (i, loss) in resumed.step_losses.iter().enumerate() {
        let expected = reference.step_losses[4 + i];
        assert!(
            (loss - expected).abs() <= 1e-5,
            "loss of step {} is {loss} after resume, {expected} without",
            4 + i
        );
    }
    assert!((resumed.heldout_loss - reference.heldout_loss).abs() <= 1e-5);

    // Running the finished job again publishes nothing new.
    let again = pretrain(&settings, &bus("again"), &store, std::future::pending())
        .await
        .unwrap();
    assert!(again.step_losses.is_empty());
    let registry = ModelRegistry::new(store);
    assert_eq!(registry.list_versions("base").await.unwrap(), vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_from_queue_is_trained_and_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path());
    let bus = bus("jobs");
    let store = Store::memory();
    let mut announcements = bus.subscribe(&bus.subjects().models()).await.unwrap();

    let job = JobRequest {
        job_id: "job-1".into(),
        stage: Stage::Pretrain,
        base: None,
        output: "queued".into(),
        inputs: vec![corpus.display().to_string()],
        settings: [
            ("steps", "4"),
            ("seq-len", "32"),
            ("batch-size", "4"),
            ("vocab-size", "320"),
            ("checkpoint-every", "0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    };
    let bad_job = JobRequest {
        job_id: "job-2".into(),
        settings: [("steps".to_string(), "zero".to_string())].into(),
        ..job.clone()
    };
    let mut dead = bus.subscribe(&bus.subjects().dead()).await.unwrap();
    for job in [bad_job, job] {
        bus.publish_durable(&bus.subjects().jobs_for(troupe_wire::Stage::Pretrain), &Envelope::new("jobs", job))
            .await
            .unwrap();
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service_settings = ServiceSettings {
        queue: "pretrainer".into(),
        job_ack_wait_secs: 30,
        job_max_deliver: 3,
        job_retry_delay_secs: 1,
    };
    let service = tokio::spawn(troupe_pretrainer::run(
        service_settings,
        bus.clone(),
        store.clone(),
        async move {
            stop_rx.await.ok();
        },
    ));

    let letter = tokio::time::timeout(Duration::from_secs(60), dead.next())
        .await
        .unwrap()
        .unwrap();
    let letter: Envelope<troupe_wire::DeadLetter> = letter.decode().unwrap();
    assert!(
        letter.payload.reason.contains("job-2"),
        "{}",
        letter.payload.reason
    );
    assert!(
        letter.payload.reason.contains("steps"),
        "{}",
        letter.payload.reason
    );

    let message = tokio::time::timeout(Duration::from_secs(120), announcements.next())
        .await
        .unwrap()
        .unwrap();
    let announced: Envelope<ModelAnnouncement> = message.decode().unwrap();
    assert_eq!(announced.payload.model.name, "queued");
    assert_eq!(announced.payload.kind, troupe_wire::ModelKind::Base);
    stop_tx.send(()).unwrap();
    service.await.unwrap().unwrap();
    let manifest = ModelRegistry::new(store)
        .latest("queued")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(manifest.metadata["job_id"], "job-1");
    assert_eq!(manifest.metadata["finished"], true);
}

/// Runs `settings` against an empty local store and returns the error and
/// the number of objects in the store afterwards.
async fn fail(settings: &Settings) -> (PretrainError, usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::from_url(dir.path().to_str().unwrap()).unwrap();
    let error = pretrain(settings, &bus("bad"), &store, std::future::pending())
        .await
        .unwrap_err();
    let objects = store.list(None).await.unwrap().len();
    (error, objects)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_fail_and_leave_store_unchanged() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("no-such-corpus");
    let (error, objects) = fail(&quick_settings(missing.clone(), "missing")).await;
    assert!(
        matches!(
            error,
            PretrainError::Data(troupe_data::DataError::NotFound { .. })
        ),
        "{error}"
    );
    assert!(error.to_string().contains("no-such-corpus"), "{error}");
    assert_eq!(objects, 0);

    let latin1 = dir.path().join("latin1");
    std::fs::create_dir_all(&latin1).unwrap();
    std::fs::write(latin1.join("a.txt"), b"caf\xe9 au lait\n").unwrap();
    let (error, objects) = fail(&quick_settings(latin1, "latin1")).await;
    assert!(error.to_string().contains("invalid UTF-8"), "{error}");
    assert!(error.to_string().contains("a.txt:1"), "{error}");
    assert_eq!(objects, 0);

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("blank.txt"), "\n\n  \n").unwrap();
    let (error, objects) = fail(&quick_settings(empty, "empty")).await;
    assert!(error.to_string().contains("no documents"), "{error}");
    assert_eq!(objects, 0);

    let jsonl = dir.path().join("docs.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": \"fine\"}\n{\"body\": \"wrong field\"}\n",
    )
    .unwrap();
    let (error, objects) = fail(&quick_settings(jsonl, "jsonl")).await;
    assert!(error.to_string().contains("docs.jsonl:2"), "{error}");
    assert!(
        error.to_string().contains("missing field \"text\""),
        "{error}"
    );
    assert_eq!(objects, 0);

    let corpus = small_corpus(dir.path());
    let tokenizer_path = dir.path().join("tokenizer.json");
    let texts = ["the quick brown fox", "jumps over the lazy dog"];
    troupe_model::Tokenizer::train(texts.iter(), 300)
        .unwrap()
        .save(&tokenizer_path)
        .unwrap();
    let mut settings = quick_settings(corpus, "mismatch");
    settings.tokenizer = Some(tokenizer_path);
    settings.vocab_size = Some(2048);
    let (error, objects) = fail(&settings).await;
    assert!(matches!(error, PretrainError::VocabMismatch(_)), "{error}");
    assert!(error.to_string().contains("2048"), "{error}");
    assert_eq!(objects, 0);
}
