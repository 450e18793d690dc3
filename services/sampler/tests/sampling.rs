//! One sampler on the in-process bus: hot reload of announced versions with
//! no batch mixing versions, log-probs and seeds that reproduce under the
//! recorded version, and bad batches on the dead-letter subject while the
//! sampler keeps serving.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use candle_core::Tensor;
use common::*;
use troupe_bus::memory::MemoryBus;
use troupe_bus::{BusHandle, Outgoing, QueueConfig};
use troupe_model::{generate, token_logprobs, GenerateOptions, Model};
use troupe_sampler::batch::{candidate_id, candidate_set_id, model_params, output_seed, rollout_id};
use troupe_store::{ModelRegistry, Store};
use troupe_wire::{
    ContentType, DeadLetter, Envelope, FinishReason, ModelRef, Rollout, RunId, SampleMode, SamplingParams,
};

/// Largest difference allowed between a log-prob recorded while sampling
/// (KV-cache path) and the same one from a full teacher-forced forward pass,
/// both in f32. Differences seen on this tiny model are around 1e-6.
const LOGPROB_TOLERANCE: f32 = 1e-4;

fn memory_bus() -> BusHandle {
    BusHandle::new(MemoryBus::new(RunId::new(&format!("t{}", uuid::Uuid::new_v4().simple())).unwrap()))
}

/// Log-probs of `response` after `prompt` under `model` at `temperature`,
/// from one forward pass over the whole sequence.
fn teacher_forced(model: &Model, prompt: &[u32], response: &[u32], temperature: f32) -> Vec<f32> {
    let ids: Vec<u32> = prompt.iter().chain(response).copied().collect();
    let input = Tensor::from_vec(ids.clone(), (1, ids.len()), model.device()).unwrap();
    let logits = model.forward(&input, None).unwrap();
    let all = token_logprobs(&logits, &input, f64::from(temperature)).unwrap();
    let all: Vec<f32> = all.squeeze(0).unwrap().to_vec1().unwrap();
    all[prompt.len()..].to_vec()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn versions_by_batch(rollouts: &[Rollout]) -> BTreeMap<String, BTreeSet<u64>> {
    let mut versions: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for rollout in rollouts {
        versions.entry(rollout.batch_id.clone()).or_default().insert(rollout.policy.version);
    }
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_version_is_hot_reloaded() {
    let bus = memory_bus();
    let store = Store::memory();
    let registry = ModelRegistry::new(store.clone());
    let tokenizer = tokenizer();
    let v1 = publish_policy(&registry, &tokenizer, POLICY, 1).await;
    announce(&bus, &v1).await;
    let replica = Replica::start(settings(), bus.clone(), store);
    wait_for_status(&replica.status, "version 1 is served", |s| s.serving.as_ref() == Some(&v1)).await;

    // Before the announcement: version 1.
    publish_batch(&bus, batch("before", SampleMode::Rollouts { n: 2 }, None, 2, 8)).await;
    let before = collect_rollouts(&bus, 4).await;
    assert!(before.iter().all(|r| r.policy == v1), "{:?}", before.iter().map(|r| &r.policy).collect::<Vec<_>>());

    // After version 2 is announced and loaded: version 2.
    let v2 = publish_policy(&registry, &tokenizer, POLICY, 2).await;
    announce(&bus, &v2).await;
    wait_for_status(&replica.status, "version 2 is served", |s| s.serving.as_ref() == Some(&v2)).await;
    publish_batch(&bus, batch("after", SampleMode::Rollouts { n: 2 }, None, 2, 8)).await;
    let after = collect_rollouts(&bus, 4).await;
    assert!(after.iter().all(|r| r.policy == v2), "{:?}", after.iter().map(|r| &r.policy).collect::<Vec<_>>());

    // A batch that names the older version still gets it.
    publish_batch(&bus, batch("named", SampleMode::Rollouts { n: 2 }, Some(v1.clone()), 2, 8)).await;
    let named = collect_rollouts(&bus, 4).await;
    assert!(named.iter().all(|r| r.policy == v1));

    // Version 3 is announced while a stream of batches is being sampled:
    // every batch uses one version, and versions never go back.
    let stream: Vec<String> = (0..6).map(|i| format!("stream-{i}")).collect();
    for batch_id in &stream {
        publish_batch(&bus, batch(batch_id, SampleMode::Rollouts { n: 4 }, None, 2, 24)).await;
    }
    let sampled_before = replica.status.snapshot().batches_sampled;
    wait_for_status(&replica.status, "the first stream batch is sampled", |s| s.batches_sampled > sampled_before).await;
    let v3 = publish_policy(&registry, &tokenizer, POLICY, 3).await;
    announce(&bus, &v3).await;
    let streamed = collect_rollouts(&bus, stream.len() * 2 * 4).await;
    let versions = versions_by_batch(&streamed);
    assert_eq!(versions.len(), stream.len());
    for (batch_id, used) in &versions {
        assert_eq!(used.len(), 1, "batch {batch_id} mixes versions {used:?}");
    }
    let in_order: Vec<u64> = stream.iter().map(|id| *versions[id].iter().next().unwrap()).collect();
    assert!(in_order.windows(2).all(|pair| pair[0] <= pair[1]), "versions went back: {in_order:?}");
    assert_eq!(in_order[0], 2, "the batch sampled before the announcement changed version");

    wait_for_status(&replica.status, "version 3 is served", |s| s.serving.as_ref() == Some(&v3)).await;
    publish_batch(&bus, batch("last", SampleMode::Rollouts { n: 1 }, None, 1, 8)).await;
    let last = collect_rollouts(&bus, 1).await;
    assert_eq!(last[0].policy, v3);

    let status = replica.status.snapshot();
    assert_eq!(status.announced, Some(v3.clone()));
    assert!(status.loaded.len() <= 2, "more versions in memory than --max-loaded-versions: {:?}", status.loaded);
    assert!(status.loaded.contains(&v3));
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_and_seeds_reproduce() {
    let bus = memory_bus();
    let store = Store::memory();
    let registry = ModelRegistry::new(store.clone());
    let tokenizer = tokenizer();
    let v1 = publish_policy(&registry, &tokenizer, POLICY, 11).await;
    let v2 = publish_policy(&registry, &tokenizer, POLICY, 12).await;
    announce(&bus, &v2).await;

    // One sequence at a time, so a local replay batches rows the same way.
    let mut settings = settings();
    settings.limits.max_rows = 1;
    let replica = Replica::start(settings, bus.clone(), store);

    let sampling = SamplingParams { temperature: 0.7, top_k: 40, top_p: 0.9, max_new_tokens: 24, seed: 2024 };
    let mut rollouts_batch = batch("rollouts", SampleMode::Rollouts { n: 3 }, Some(v1.clone()), 3, 24);
    rollouts_batch.sampling = sampling.clone();
    publish_batch(&bus, rollouts_batch).await;
    let rollouts = collect_rollouts(&bus, 9).await;

    let (model_v1, tokenizer_v1) = load_model(&registry, &v1).await;
    let (model_v2, _) = load_model(&registry, &v2).await;
    let eos = tokenizer_v1.eos_id().unwrap();
    for rollout in &rollouts {
        assert_eq!(rollout.policy, v1);
        assert_eq!(rollout.sampling.temperature, sampling.temperature);
        assert_eq!(rollout.sampling.top_k, 40);
        assert_eq!(rollout.prompt_tokens, tokenizer_v1.render_prompt(&rollout.prompt).unwrap());
        assert_eq!(rollout.logprobs.len(), rollout.response_tokens.len());
        assert!(!rollout.response_tokens.is_empty(), "{}: empty response", rollout.rollout_id);
        assert!(rollout.response_tokens.len() <= 24, "{}: longer than max_new_tokens", rollout.rollout_id);
        match rollout.finish_reason {
            FinishReason::Eos => assert_eq!(rollout.response_tokens.last(), Some(&eos)),
            FinishReason::Length => {
                assert_eq!(rollout.response_tokens.len(), 24);
                assert!(!rollout.response_tokens.contains(&eos));
            }
        }

        let same = teacher_forced(&model_v1, &rollout.prompt_tokens, &rollout.response_tokens, sampling.temperature);
        let difference = max_difference(&same, &rollout.logprobs);
        assert!(difference <= LOGPROB_TOLERANCE, "{}: log-probs differ by {difference}", rollout.rollout_id);
        let other = teacher_forced(&model_v2, &rollout.prompt_tokens, &rollout.response_tokens, sampling.temperature);
        assert!(max_difference(&other, &rollout.logprobs) > 1e-2, "version 2 gives the same log-probs as version 1");

        // The recorded seed replays the same tokens.
        let params = model_params(&rollout.sampling, rollout.sampling.seed);
        let replay = generate(&model_v1, &tokenizer_v1, std::slice::from_ref(&rollout.prompt_tokens), &[params], &GenerateOptions::default())
            .unwrap()
            .remove(0);
        assert_eq!(replay.tokens, rollout.response_tokens, "{}: the recorded seed does not replay", rollout.rollout_id);
    }
    let ids: BTreeSet<String> = rollouts.iter().map(|r| r.rollout_id.clone()).collect();
    for prompt in 0..3 {
        for output in 0..3 {
            assert!(ids.contains(&rollout_id("rollouts", &format!("rollouts-p{prompt}"), output)));
        }
    }
    let seeds: BTreeSet<u64> = rollouts.iter().map(|r| r.sampling.seed).collect();
    assert_eq!(seeds.len(), 9, "two rollouts share a seed");

    // Candidate sets: k candidates from the newest version, each replayable
    // from the set's seed and its index.
    publish_batch(&bus, batch("candidates", SampleMode::Candidates { k: 3 }, None, 2, 16)).await;
    let sets = collect_candidate_sets(&bus, 2).await;
    for set in &sets {
        assert_eq!(set.policy, v2);
        assert_eq!(set.set_id, candidate_set_id("candidates", &set.prompt_id));
        let ids: Vec<&str> = set.candidates.iter().map(|c| c.candidate_id.as_str()).collect();
        assert_eq!(ids, ["A", "B", "C"]);
        let prompt = tokenizer_v1.render_prompt(&set.prompt).unwrap();
        for (index, candidate) in set.candidates.iter().enumerate() {
            assert_eq!(candidate.candidate_id, candidate_id(index));
            let params = model_params(&set.sampling, output_seed(set.sampling.seed, index));
            let replay = generate(&model_v2, &tokenizer_v1, std::slice::from_ref(&prompt), &[params], &GenerateOptions::default())
                .unwrap()
                .remove(0);
            assert_eq!(replay.text, candidate.text, "candidate {} of {} does not replay", candidate.candidate_id, set.set_id);
            assert_eq!(replay.tokens.len() as u32, candidate.token_count);
        }
    }
    replica.stop().await;
}

/// Reads dead letters until `count` have arrived, by message id.
async fn dead_letters(bus: &BusHandle, count: usize) -> BTreeMap<String, DeadLetter> {
    let mut queue = bus.queue(QueueConfig::new("operators", &bus.subjects().dead())).await.unwrap();
    let mut letters = BTreeMap::new();
    while letters.len() < count {
        let (envelope, delivery) = within("a dead letter", queue.next_message::<DeadLetter>()).await.unwrap();
        delivery.ack().await.unwrap();
        let id = envelope.payload.message_id.clone().unwrap_or_default();
        letters.insert(id, envelope.payload);
    }
    letters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_dead_lettered() {
    let bus = memory_bus();
    let store = Store::memory();
    let registry = ModelRegistry::new(store.clone());
    let tokenizer = tokenizer();
    let v1 = publish_policy(&registry, &tokenizer, POLICY, 1).await;
    announce(&bus, &v1).await;
    let mut settings = settings();
    settings.limits.max_prompts = 4;
    settings.limits.max_new_tokens = 300;
    let replica = Replica::start(settings, bus.clone(), store);
    let run = bus.subjects().run().to_string();
    let prompts = bus.subjects().prompts();

    // k = 0, written by hand as an external tool might send it.
    let hand_written = format!(
        r#"{{"schema":1,"kind":"prompt_batch","id":"k-zero","run":"{run}","time_ms":0,"payload":{{
            "batch_id":"k-zero","mode":{{"candidates":{{"k":0}}}},"policy":null,
            "sampling":{{"temperature":1.0,"top_k":0,"top_p":1.0,"max_new_tokens":8,"seed":1}},
            "prompts":[{{"prompt_id":"p","text":"hi","reference":null}}]}}}}"#
    );
    bus.publish_durable_raw(&prompts, Outgoing::new("k-zero", ContentType::Json, hand_written.into_bytes())).await.unwrap();
    bus.publish_durable_raw(&prompts, Outgoing::new("garbage", ContentType::MessagePack, vec![0xc1, 0x00])).await.unwrap();
    let unknown = ModelRef { name: "no-such-model".into(), version: 1 };
    publish_batch(&bus, batch("unknown-model", SampleMode::Candidates { k: 2 }, Some(unknown), 1, 8)).await;
    let missing = ModelRef { name: POLICY.into(), version: 99 };
    publish_batch(&bus, batch("missing-version", SampleMode::Candidates { k: 2 }, Some(missing), 1, 8)).await;
    publish_batch(&bus, batch("too-many-prompts", SampleMode::Candidates { k: 2 }, None, 5, 8)).await;
    publish_batch(&bus, batch("too-long", SampleMode::Rollouts { n: 1 }, None, 1, 250)).await;
    let mut twice = batch("same-prompt-twice", SampleMode::Rollouts { n: 1 }, None, 2, 8);
    twice.prompts[1].prompt_id = twice.prompts[0].prompt_id.clone();
    publish_batch(&bus, twice).await;
    let mut over_cap = batch("over-cap", SampleMode::Rollouts { n: 1 }, None, 1, 8);
    over_cap.sampling.max_new_tokens = 301;
    publish_batch(&bus, over_cap).await;

    // The sampler keeps serving: a good batch after the bad ones is sampled.
    publish_batch(&bus, batch("good", SampleMode::Candidates { k: 2 }, None, 2, 8)).await;
    let sets = collect_candidate_sets(&bus, 2).await;
    assert!(sets.iter().all(|set| set.policy == v1 && set.candidates.len() == 2));

    let letters = dead_letters(&bus, 8).await;
    let expect = |id: &str, words: &[&str]| {
        let letter = letters.get(id).unwrap_or_else(|| panic!("no dead letter for {id}: {:?}", letters.keys()));
        assert_eq!(letter.subject, prompts);
        assert_eq!(letter.consumer, "sampler");
        for word in words {
            assert!(letter.reason.contains(word), "{id}: reason {:?} lacks {word:?}", letter.reason);
        }
    };
    expect("k-zero", &["cannot decode as prompt_batch", "at least one output per prompt"]);
    expect("garbage", &["cannot decode as prompt_batch"]);
    expect("unknown-model", &["no-such-model@1", "not found"]);
    expect("missing-version", &["policy@99", "not found"]);
    expect("too-many-prompts", &["5 prompts", "--max-prompts"]);
    expect("too-long", &["too-long-p0", "256 positions"]);
    expect("same-prompt-twice", &["same-prompt-twice-p0", "more than once"]);
    expect("over-cap", &["301", "--max-new-tokens"]);

    let status = replica.status.snapshot();
    assert_eq!(status.batches_rejected, 6, "batches the sampler itself rejected");
    assert_eq!(status.batches_sampled, 1);
    nothing_more::<troupe_wire::CandidateSet>(&bus, bus.subjects().candidates(), CANDIDATE_OBSERVER, Duration::from_millis(500)).await;
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_waits_for_first_version() {
    let bus = memory_bus();
    let store = Store::memory();
    let registry = ModelRegistry::new(store.clone());
    let tokenizer = tokenizer();
    let replica = Replica::start(settings(), bus.clone(), store);

    // No version exists yet: the batch is handed back, not rejected.
    publish_batch(&bus, batch("early", SampleMode::Rollouts { n: 1 }, None, 1, 8)).await;
    wait_for_status(&replica.status, "the batch is handed back", |s| s.batches_retried >= 1).await;
    assert_eq!(replica.status.snapshot().batches_rejected, 0);

    let v1 = publish_policy(&registry, &tokenizer, POLICY, 1).await;
    announce(&bus, &v1).await;
    let rollouts = collect_rollouts(&bus, 1).await;
    assert_eq!(rollouts[0].policy, v1);
    assert_eq!(rollouts[0].batch_id, "early");
    replica.stop().await;
}

#[test]
fn hand_written_json_batch_decodes() {
    // The hand-written k = 0 batch above must be rejected by validation, not
    // by a typo in the JSON: the same text with k = 2 decodes.
    let text = r#"{"schema":1,"kind":"prompt_batch","id":"x","run":"r","time_ms":0,"payload":{
        "batch_id":"x","mode":{"candidates":{"k":2}},"policy":null,
        "sampling":{"temperature":1.0,"top_k":0,"top_p":1.0,"max_new_tokens":8,"seed":1},
        "prompts":[{"prompt_id":"p","text":"hi","reference":null}]}}"#;
    let decoded: Envelope<troupe_wire::PromptBatch> = troupe_wire::decode(text.as_bytes(), ContentType::Json).unwrap();
    assert_eq!(decoded.payload.mode, SampleMode::Candidates { k: 2 });
}

/// Prints sampling throughput of the tiny preset for the record; asserts
/// nothing about time. Run it with
/// `cargo test -p troupe-sampler --test sampling throughput -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn tiny_sampling_throughput() {
    let tokenizer = tokenizer();
    let model_ref = ModelRef { name: POLICY.into(), version: 1 };
    let policy = troupe_sampler::LoadedPolicy::new(model_ref, random_model(&tokenizer, 1), tokenizer).unwrap();
    for max_rows in [1, 8, 32] {
        let limits = troupe_sampler::Limits { max_rows, ..troupe_sampler::Limits::default() };
        let batch = batch("throughput", SampleMode::Rollouts { n: 4 }, None, 8, 64);
        let started = std::time::Instant::now();
        let outputs = troupe_sampler::sample_batch(&policy, &batch, &limits, |_, _| {}).unwrap();
        let seconds = started.elapsed().as_secs_f64();
        let tokens = outputs.generated_tokens();
        println!("max_rows {max_rows:>2}: {tokens} tokens in {seconds:.2} s, {:.0} tokens/s", tokens as f64 / seconds);
    }
}
