//! The scorer on a bus: retokenization across tokenizers, token-id reuse,
//! empty responses, unknown policies, malformed rollouts, and two replicas
//! on a real nats-server splitting one queue.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use candle_core::{DType, Device};
use troupe_bus::memory::MemoryBus;
use troupe_bus::nats::NatsBus;
use troupe_bus::{BusHandle, Outgoing, QueueConfig};
use troupe_model::{AdamW, AdamWConfig, Config, Heads, Model, Tokenizer};
use troupe_reward_scorer::{run, Settings};
use troupe_reward_trainer::reward_model::{publish_reward_version, Normalization, RewardInfo, RewardVersion};
use troupe_reward_trainer::RewardModel;
use troupe_store::{ModelKind, ModelRef, ModelRegistry, NewVersion, Store};
use troupe_train::TrainState;
use troupe_wire::{ContentType, DeadLetter, Envelope, FinishReason, Rollout, RunId, SamplingParams, ScoredRollout};

fn tokenizer(file: &str, vocab: usize) -> Tokenizer {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sft").join(file);
    let text = std::fs::read_to_string(path).unwrap();
    let texts: Vec<String> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .flat_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            [value["prompt"].as_str().unwrap().to_string(), value["response"].as_str().unwrap().to_string()]
        })
        .collect();
    Tokenizer::train(texts.into_iter(), vocab).unwrap()
}

fn model(tokenizer: &Tokenizer, heads: Heads) -> Model {
    let mut config = Config::tiny();
    config.vocab_size = tokenizer.vocab_size();
    config.eos_token_id = tokenizer.eos_id().into_iter().collect();
    config.pad_token_id = tokenizer.pad_id();
    Model::new_random(&config, heads, 3, DType::F32, &Device::Cpu).unwrap()
}

/// A policy version with tokenizer `policy_tokens` and a reward version
/// (normalization mean 0.5, std 2) with tokenizer `reward_tokens`.
async fn setup(registry: &ModelRegistry, policy_tokens: &Tokenizer, reward_tokens: &Tokenizer) -> ModelRef {
    let policy = model(policy_tokens, Heads::default());
    let version = NewVersion::new(
        "policy",
        ModelKind::Policy,
        Bytes::from(policy.to_safetensors().unwrap()),
        Bytes::from(policy.config().to_json_string()),
        Bytes::from(policy_tokens.to_json().unwrap()),
    );
    registry.publish(version).await.unwrap();

    let reward = model(reward_tokens, Heads { score: true, value: false });
    let optimizer = AdamW::new(reward.named_vars(), AdamWConfig::default()).unwrap();
    let state = TrainState {
        job_id: "test".into(),
        step: 0,
        total_steps: 0,
        data_position: serde_json::Value::Null,
        rng: serde_json::Value::Null,
        finished: true,
        metrics: Default::default(),
    };
    let info = RewardInfo {
        normalization: Normalization { mean: 0.5, std: 2.0, reference: "test".into(), count: 1 },
        datasets: vec![],
        jsonl: vec![],
        train_examples: 0,
        heldout_examples: 0,
        heldout_pairs: 0,
        heldout_accuracy: 0.0,
        heldout_loss: 0.0,
        best_step: 0,
        stopped_early: false,
        max_tokens: 256,
    };
    let version = RewardVersion {
        name: "reward",
        parent: None,
        model: &reward,
        optimizer: &optimizer,
        tokenizer: reward_tokens,
        state: &state,
        settings: serde_json::Value::Null,
        info: &info,
    };
    publish_reward_version(registry, version).await.unwrap().model_ref()
}

fn rollout(id: &str, policy_tokens: &Tokenizer, policy_version: u64, prompt: &str, response: &str) -> Rollout {
    let mut response_tokens = policy_tokens.encode(response).unwrap();
    response_tokens.push(policy_tokens.eos_id().unwrap());
    Rollout {
        rollout_id: id.into(),
        batch_id: "batch".into(),
        prompt_id: format!("prompt-{id}"),
        prompt: prompt.into(),
        prompt_tokens: policy_tokens.render_prompt(prompt).unwrap(),
        response: response.into(),
        logprobs: vec![-0.5; response_tokens.len()],
        response_tokens,
        finish_reason: FinishReason::Eos,
        policy: troupe_wire::ModelRef { name: "policy".into(), version: policy_version },
        sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 32, seed: 0 },
    }
}

async fn publish(bus: &BusHandle, rollout: Rollout) {
    let envelope = Envelope::new(bus.subjects().run().as_str(), rollout);
    bus.publish_durable(&bus.subjects().rollouts(), &envelope).await.unwrap();
}

async fn collect_scored(bus: &BusHandle, count: usize) -> Vec<ScoredRollout> {
    let mut queue = bus.queue(QueueConfig::new("ppo", &bus.subjects().scored())).await.unwrap();
    let mut scored = Vec::new();
    while scored.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(20), queue.next_message::<ScoredRollout>()).await;
        let (envelope, delivery) = next.expect("timed out waiting for a scored rollout").unwrap();
        delivery.ack().await.unwrap();
        scored.push(envelope.payload);
    }
    scored
}

#[tokio::test]
async fn scores_across_tokenizers() {
    let policy_tokens = tokenizer("capitals.train.jsonl", 300);
    let reward_tokens = tokenizer("chatterbot_english.train.jsonl", 420);
    let store = Store::memory();
    let registry = ModelRegistry::new(store.clone());
    let reward_ref = setup(&registry, &policy_tokens, &reward_tokens).await;
    let reward = RewardModel::load(&registry, &reward_ref).await.unwrap();
    let bus = BusHandle::new(MemoryBus::new(RunId::new("scorer-tokenizers").unwrap()));

    let cases = [
        ("r1", 1, "What is the capital of Peru?", "Lima"),
        ("r2", 1, "Tell me a joke", ""),
        ("r3", 9, "What is the capital of Chad?", "N'Djamena"),
    ];
    // Malformed, and first in the queue: one log-prob for two response tokens.
    let mut bad = rollout("bad", &policy_tokens, 1, "Hi", "there");
    bad.logprobs.truncate(1);
    let envelope = Envelope::new(bus.subjects().run().as_str(), bad);
    let outgoing = Outgoing::encode(&bus.subjects().rollouts(), &envelope, ContentType::MessagePack).unwrap();
    bus.publish_durable_raw(&bus.subjects().rollouts(), outgoing).await.unwrap();
    for (id, version, prompt, response) in cases {
        publish(&bus, rollout(id, &policy_tokens, version, prompt, response)).await;
    }

    let mut settings = Settings::new("reward");
    settings.max_rollouts = 3;
    let summary = run(settings, bus.clone(), store, std::future::pending()).await.unwrap();
    assert_eq!(summary.scored, 3);
    assert_eq!(summary.retokenized, 3, "the policy's tokenizer differs, or the policy is unknown");

    let scored = collect_scored(&bus, 3).await;
    for result in &scored {
        let rollout = &result.rollout;
        let expected = reward.score_text(&rollout.prompt, &rollout.response, true).unwrap();
        assert!((result.raw_score - expected.0).abs() < 1e-5, "{}: {} vs {}", rollout.rollout_id, result.raw_score, expected.0);
        assert!((result.score - (result.raw_score - 0.5) / 2.0).abs() < 1e-5);
        assert_eq!(result.reward_model.version, reward_ref.version);
        // The policy's ids are not the reward model's: reusing them would score something else.
        let policy_ids: Vec<u32> = rollout.prompt_tokens.iter().chain(&rollout.response_tokens).copied().collect();
        assert_ne!(policy_ids, reward.render(&rollout.prompt, &rollout.response, true).unwrap());
    }
    let ids: BTreeSet<&str> = scored.iter().map(|s| s.rollout.rollout_id.as_str()).collect();
    assert_eq!(ids, BTreeSet::from(["r1", "r2", "r3"]), "the empty response r2 and the unknown policy r3 are scored");

    let mut dead = bus.queue(QueueConfig::new("operators", &bus.subjects().dead())).await.unwrap();
    let (letter, delivery) = tokio::time::timeout(Duration::from_secs(5), dead.next_message::<DeadLetter>()).await.unwrap().unwrap();
    delivery.ack().await.unwrap();
    assert_eq!(letter.payload.consumer, "reward-scorer");
    assert!(letter.payload.reason.contains("logprobs"), "{}", letter.payload.reason);
}

#[tokio::test]
async fn same_tokenizer_reuses_ids() {
    let shared = tokenizer("capitals.train.jsonl", 300);
    let store = Store::memory();
    let registry = ModelRegistry::new(store.clone());
    let reward_ref = setup(&registry, &shared, &shared).await;
    let reward = RewardModel::load(&registry, &reward_ref).await.unwrap();
    let bus = BusHandle::new(MemoryBus::new(RunId::new("scorer-reuse").unwrap()));
    let sample = rollout("same", &shared, 1, "What is the capital of Peru?", "Lima");
    let ids: Vec<u32> = sample.prompt_tokens.iter().chain(&sample.response_tokens).copied().collect();
    publish(&bus, sample).await;
    let mut out_of_vocab = rollout("oov", &shared, 1, "Hi", "x");
    out_of_vocab.response_tokens[0] = 60_000;
    publish(&bus, out_of_vocab).await;

    let mut settings = Settings::new("reward");
    settings.max_rollouts = 2;
    let summary = run(settings, bus.clone(), store, std::future::pending()).await.unwrap();
    assert_eq!((summary.scored, summary.rejected, summary.retokenized), (1, 1, 0));
    let scored = collect_scored(&bus, 1).await;
    let expected = reward.score_ids(&[ids]).unwrap()[0];
    assert!((scored[0].raw_score - expected).abs() < 1e-6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_split_the_queue() {
    let Some(url) = troupe_testkit::nats_url() else { return };
    let shared = tokenizer("capitals.train.jsonl", 300);
    let store = Store::memory();
    let registry = ModelRegistry::new(store.clone());
    setup(&registry, &shared, &shared).await;
    let run_id = RunId::new(&format!("t{}", uuid::Uuid::new_v4().simple())).unwrap();
    let publisher = BusHandle::new(NatsBus::connect(&url, run_id.clone()).await.unwrap());
    let total = 40;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let bus = BusHandle::new(NatsBus::connect(&url, run_id.clone()).await.unwrap());
        let mut stop = stop_rx.clone();
        let store = store.clone();
        replicas.push(tokio::spawn(async move {
            let shutdown = async move {
                stop.wait_for(|stopped| *stopped).await.ok();
            };
            run(Settings::new("reward"), bus, store, shutdown).await.unwrap()
        }));
    }
    // Both replicas are waiting on the queue before the work arrives.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for index in 0..total {
        publish(&publisher, rollout(&format!("r{index}"), &shared, 1, &format!("Question {index}?"), "An answer")).await;
    }
    let scored = collect_scored(&publisher, total).await;
    stop_tx.send(true).unwrap();
    let mut summaries = Vec::new();
    for replica in replicas {
        summaries.push(replica.await.unwrap());
    }

    let unique: BTreeSet<String> = scored.iter().map(|s| s.rollout.rollout_id.clone()).collect();
    assert_eq!(unique.len(), total, "a rollout was lost");
    let scored_by_replicas: u64 = summaries.iter().map(|s| s.scored).sum();
    assert_eq!(scored_by_replicas, total as u64, "a rollout was scored twice: {summaries:?}");
    let mut all: Vec<&String> = summaries.iter().flat_map(|s| &s.rollout_ids).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), total);
    assert!(summaries.iter().all(|s| s.duplicates == 0));
    assert!(summaries.iter().all(|s| s.scored > 0), "one replica got no work: {summaries:?}");
}
