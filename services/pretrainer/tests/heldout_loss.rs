//! Acceptance: on the shipped corpus the tiny preset's held-out loss falls
//! well below the unigram entropy of the tokens.
//!
//! One test on purpose, sized for CI's 2 cores (see docs/benchmarks.md for
//! its wall time).

use std::path::PathBuf;
use std::time::Instant;

use troupe_bus::memory::MemoryBus;
use troupe_bus::BusHandle;
use troupe_pretrainer::{pretrain, Settings};
use troupe_store::Store;
use troupe_wire::RunId;

fn shipped_corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/corpus")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_preset_beats_unigram_entropy() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut settings = Settings::from_args(&["pretrain".to_string()]).unwrap();
    settings.corpus = vec![shipped_corpus()];
    settings.steps = std::env::var("TROUPE_TEST_PRETRAIN_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    settings.warmup_steps = 20;
    settings.eval_every = 0;
    settings.checkpoint_every = 0;
    settings.eval_sequences = 64;

    let bus = BusHandle::new(MemoryBus::new(RunId::new("heldout").unwrap()));
    let started = Instant::now();
    let outcome = pretrain(&settings, &bus, &Store::memory(), std::future::pending())
        .await
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();

    println!(
        "tiny preset, {} steps of {}x{} tokens: held-out loss {:.4} nats, unigram entropy {:.4} nats, \
         {} train / {} validation tokens, {seconds:.1} s wall",
        settings.steps,
        settings.batch_size,
        settings.seq_len,
        outcome.heldout_loss,
        outcome.unigram_entropy,
        outcome.train_tokens,
        outcome.validation_tokens,
    );
    assert!(outcome.heldout_loss.is_finite());
    // "Well below": at least one nat under the unigram baseline, i.e. the model
    // assigns the held-out tokens e (2.7) times the unigram likelihood.
    assert!(
        outcome.heldout_loss < outcome.unigram_entropy - 1.0,
        "held-out loss {:.4} is not a nat below the unigram entropy {:.4}",
        outcome.heldout_loss,
        outcome.unigram_entropy
    );
}
