//! Shared fixtures: a tokenizer trained on a shipped text, tiny random
//! policies published to a registry, prompt batches, and a sampler replica
//! that a test can stop or kill.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device};
use troupe_bus::{BusHandle, QueueConfig};
use troupe_model::{Config, Heads, Model, Tokenizer};
use troupe_sampler::{SamplerSettings, SamplerStatus, StatusHandle};
use troupe_service::shutdown::Shutdown;
use troupe_store::{ModelKind, ModelRegistry, NewVersion, Store};
use troupe_wire::{
    CandidateSet, Envelope, ModelAnnouncement, ModelRef, Prompt, PromptBatch, Rollout, SampleMode, SamplingParams,
};

/// How long a test waits for something that should happen.
pub const ARRIVAL: Duration = Duration::from_secs(60);

/// Queue names under which tests read the outputs.
pub const ROLLOUT_OBSERVER: &str = "rollout-observer";
pub const CANDIDATE_OBSERVER: &str = "candidate-observer";

/// The name tests publish policies under.
pub const POLICY: &str = "policy";

/// Trains a byte-level BPE on a small shipped text file (20 KB of riddles).
pub fn tokenizer() -> Tokenizer {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/corpus/books/fortunes_riddles.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    Tokenizer::train(text.lines().filter(|line| !line.trim().is_empty()), 384).expect("train the tokenizer")
}

/// Returns the `tiny` preset sized to the tokenizer.
pub fn tiny_config(tokenizer: &Tokenizer) -> Config {
    let mut config = Config::tiny();
    config.vocab_size = tokenizer.vocab_size();
    config.pad_token_id = tokenizer.pad_id();
    config.eos_token_id = tokenizer.eos_id().into_iter().collect();
    config.bos_token_id = tokenizer.bos_id();
    config
}

/// Builds a tiny model with weights drawn from `seed`.
pub fn random_model(tokenizer: &Tokenizer, seed: u64) -> Model {
    Model::new_random(&tiny_config(tokenizer), Heads::default(), seed, DType::F32, &Device::Cpu).expect("build a random model")
}

/// Publishes a tiny random model as the next version of `name` and returns it.
pub async fn publish_policy(registry: &ModelRegistry, tokenizer: &Tokenizer, name: &str, seed: u64) -> ModelRef {
    let model = random_model(tokenizer, seed);
    let weights = model.to_safetensors().expect("serialize weights");
    let config = model.config().to_json_string().into_bytes();
    let tokenizer_json = tokenizer.to_json().expect("serialize the tokenizer").into_bytes();
    let new = NewVersion::new(name, ModelKind::Policy, weights, config, tokenizer_json)
        .with_metadata(serde_json::json!({ "seed": seed }));
    let manifest = registry.publish(new).await.expect("publish the policy");
    ModelRef { name: manifest.model, version: manifest.version }
}

/// Announces `model` on the models subject, as a trainer does after publishing.
pub async fn announce(bus: &BusHandle, model: &ModelRef) {
    let announcement = ModelAnnouncement {
        model: model.clone(),
        kind: troupe_wire::ModelKind::Policy,
        parent: None,
        manifest_key: format!("models/{}/{:08}/manifest.json", model.name, model.version),
        metrics: BTreeMap::new(),
    };
    let envelope = Envelope::new(bus.subjects().run().as_str(), announcement);
    bus.publish_durable(&bus.subjects().models(), &envelope).await.expect("announce the policy");
}

/// Sampling settings small enough for a CPU test.
pub fn sampling(seed: u64, max_new_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.8, top_k: 0, top_p: 1.0, max_new_tokens, seed }
}

/// Builds a batch of `prompts` prompts with ids `<batch_id>-p<i>`.
pub fn batch(batch_id: &str, mode: SampleMode, policy: Option<ModelRef>, prompts: usize, max_new_tokens: u32) -> PromptBatch {
    PromptBatch {
        batch_id: batch_id.to_string(),
        mode,
        policy,
        sampling: sampling(batch_id.len() as u64 * 31 + 7, max_new_tokens),
        prompts: (0..prompts)
            .map(|index| Prompt {
                prompt_id: format!("{batch_id}-p{index}"),
                text: format!("What is riddle number {index}?"),
                reference: None,
            })
            .collect(),
    }
}

/// Publishes a batch on the prompts subject under its batch id.
pub async fn publish_batch(bus: &BusHandle, batch: PromptBatch) {
    let envelope = Envelope::with_id(bus.subjects().run().as_str(), batch.batch_id.clone(), troupe_wire::codec::now_ms(), batch);
    bus.publish_durable(&bus.subjects().prompts(), &envelope).await.expect("publish the batch");
}

/// A sampler replica running in the background.
pub struct Replica {
    pub status: StatusHandle,
    shutdown: Option<Shutdown>,
    task: tokio::task::JoinHandle<Result<(), troupe_sampler::SamplerError>>,
}

impl Replica {
    pub fn start(settings: SamplerSettings, bus: BusHandle, store: Store) -> Replica {
        let status = StatusHandle::new();
        let shutdown = Shutdown::new();
        let stop = shutdown.listener().into_recv();
        let task = tokio::spawn(troupe_sampler::run_with_status(settings, bus, store, status.clone(), stop));
        Replica { status, shutdown: Some(shutdown), task }
    }

    /// Stops the replica between batches, as SIGTERM does.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            shutdown.trigger();
        }
        let result = tokio::time::timeout(ARRIVAL, &mut self.task).await.expect("the sampler stops");
        result.expect("the sampler task does not panic").expect("the sampler ends without error");
    }

    /// Ends the replica at once, mid-batch or not, as a crash would.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// Waits until `condition` holds for the replica's status.
pub async fn wait_for_status(status: &StatusHandle, goal: &str, condition: impl Fn(&SamplerStatus) -> bool) {
    wait_until(goal, || condition(&status.snapshot())).await;
}

/// Polls `condition` every 5 ms until it holds, failing the test after [`ARRIVAL`].
pub async fn wait_until(goal: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {goal}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads `count` messages from a fresh queue on `subject`, acknowledging each.
async fn collect<T: troupe_wire::Message>(bus: &BusHandle, subject: String, durable: &str, count: usize) -> Vec<Envelope<T>> {
    let mut config = QueueConfig::new(durable, &subject);
    config.max_in_flight = 64;
    let mut queue = bus.queue(config).await.expect("open the observer queue");
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let next = within(&format!("output {} of {count} on {subject}", out.len() + 1), queue.next_message::<T>()).await;
        let (envelope, delivery) = next.expect("read an output");
        delivery.ack().await.expect("ack an output");
        out.push(envelope);
    }
    out
}

pub async fn collect_rollouts(bus: &BusHandle, count: usize) -> Vec<Rollout> {
    collect::<Rollout>(bus, bus.subjects().rollouts(), ROLLOUT_OBSERVER, count).await.into_iter().map(|e| e.payload).collect()
}

pub async fn collect_candidate_sets(bus: &BusHandle, count: usize) -> Vec<CandidateSet> {
    collect::<CandidateSet>(bus, bus.subjects().candidates(), CANDIDATE_OBSERVER, count)
        .await
        .into_iter()
        .map(|e| e.payload)
        .collect()
}

/// Waits for a future that should finish soon.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(ARRIVAL, future).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Asserts that nothing more arrives on a queue within `silence`.
pub async fn nothing_more<T: troupe_wire::Message>(bus: &BusHandle, subject: String, durable: &str, silence: Duration) {
    let mut queue = bus.queue(QueueConfig::new(durable, &subject)).await.expect("open the observer queue");
    let extra = tokio::time::timeout(silence, queue.next_message::<T>()).await;
    if let Ok(Ok((envelope, _))) = extra {
        panic!("an unexpected extra message {} arrived on {subject}", envelope.id);
    }
}

/// Loads version `model` fresh from the registry, as stored.
pub async fn load_model(registry: &ModelRegistry, model: &ModelRef) -> (Model, Tokenizer) {
    let store_ref = troupe_store::ModelRef::new(model.name.clone(), model.version);
    let loaded = registry.load(&store_ref).await.expect("load the version");
    let config = Config::from_json_str(std::str::from_utf8(loaded.config()).unwrap()).unwrap();
    let weights = Model::from_safetensors_bytes(&config, loaded.weights(), &Device::Cpu).unwrap();
    (weights, Tokenizer::from_bytes(loaded.tokenizer()).unwrap())
}

/// Settings for tests: a short ack wait so a dead replica's batch comes back fast.
pub fn settings() -> SamplerSettings {
    let mut settings = SamplerSettings::new(POLICY);
    settings.ack_wait = Duration::from_secs(2);
    settings.limits.max_new_tokens = 64;
    settings
}
