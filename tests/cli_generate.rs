//! `troupe generate` as a person runs it: the real binary against a store
//! folder holding a model version that the test publishes.

use std::process::Command;

use troupe_model::{Config, Heads, Model, Tokenizer};
use troupe_store::{ModelKind, ModelRegistry, NewVersion, Store};

/// Publishes a random tiny model with a tokenizer trained on shipped text.
async fn publish_tiny_model(store_dir: &std::path::Path) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/corpus/books/shakespeare_sonnets.txt"))
        .expect("read the shipped sonnets");
    let tokenizer = Tokenizer::train(text.lines(), 512).unwrap();
    let mut config = Config::tiny();
    config.vocab_size = tokenizer.vocab_size();
    let model = Model::new_random(&config, Heads::default(), 7, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let version = NewVersion::new(
        "tiny",
        ModelKind::Base,
        model.to_safetensors().unwrap(),
        config.to_json_string().into_bytes(),
        tokenizer.to_json().unwrap().into_bytes(),
    );
    let store = Store::from_url(store_dir.to_str().unwrap()).unwrap();
    ModelRegistry::new(store).publish(version).await.unwrap();
}

fn troupe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_troupe")).args(args).output().expect("run the troupe binary")
}

#[tokio::test]
async fn generate_samples_stored_model() {
    let dir = tempfile::tempdir().unwrap();
    publish_tiny_model(dir.path()).await;
    let store = dir.path().to_str().unwrap();

    let output = troupe(&["generate", "tiny", "Shall I compare thee", "--store", store, "--samples", "2", "--max-new-tokens", "12"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "generate failed: {stderr}");
    assert!(stdout.contains("--- sample 1"), "{stdout}");
    assert!(stdout.contains("--- sample 2"), "{stdout}");
    assert!(stderr.contains("model tiny@1"), "{stderr}");

    // Greedy decoding of the same version is reproducible.
    let greedy = ["generate", "tiny@1", "Shall I", "--store", store, "--temperature", "0", "--max-new-tokens", "8"];
    let first = troupe(&greedy);
    let second = troupe(&greedy);
    assert!(first.status.success());
    assert_eq!(first.stdout, second.stdout);
}

#[tokio::test]
async fn generate_reports_missing_model() {
    let dir = tempfile::tempdir().unwrap();
    let output = troupe(&["generate", "absent", "hello", "--store", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no stored version of model \"absent\""), "{stderr}");

    let output = troupe(&["generate", "absent@x", "hello", "--store", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("version after `@` must be a whole number"), "{stderr}");
}
