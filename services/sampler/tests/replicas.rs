//! Sampler replicas sharing one prompts queue: they split the batches with
//! none lost or sampled twice, and the batch of a replica killed mid-batch
//! goes to the other one after `ack_wait`. Each case runs on the in-process
//! bus and on a real nats-server (started by `troupe-testkit`), where every
//! replica has its own connection as separate processes would.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use troupe_bus::memory::MemoryBus;
use troupe_bus::nats::NatsBus;
use troupe_bus::BusHandle;
use troupe_store::{ModelRegistry, Store};
use troupe_wire::{Rollout, RunId, SampleMode};

const BATCHES: usize = 10;
const PROMPTS_PER_BATCH: usize = 2;
const ROLLOUTS_PER_PROMPT: u32 = 2;

/// Bus handles for the test driver and two replicas, all on one run.
struct Buses {
    driver: BusHandle,
    first: BusHandle,
    second: BusHandle,
}

fn fresh_run() -> RunId {
    RunId::new(&format!("t{}", uuid::Uuid::new_v4().simple())).unwrap()
}

async fn memory_buses() -> Option<Buses> {
    let bus = BusHandle::new(MemoryBus::new(fresh_run()));
    Some(Buses { driver: bus.clone(), first: bus.clone(), second: bus })
}

async fn nats_buses() -> Option<Buses> {
    let url = troupe_testkit::nats_url()?;
    let run = fresh_run();
    let connect = || async { BusHandle::new(NatsBus::connect(&url, run.clone()).await.expect("connect to the test nats-server")) };
    Some(Buses { driver: connect().await, first: connect().await, second: connect().await })
}

/// Publishes a policy and the batches; returns the store and the batch ids.
async fn prepare(driver: &BusHandle, max_new_tokens: u32) -> (Store, Vec<String>) {
    let store = Store::memory();
    let registry = ModelRegistry::new(store.clone());
    let tokenizer = tokenizer();
    let version = publish_policy(&registry, &tokenizer, POLICY, 1).await;
    announce(driver, &version).await;
    let mut batch_ids = Vec::new();
    for index in 0..BATCHES {
        let batch_id = format!("batch-{index:02}");
        let mode = SampleMode::Rollouts { n: ROLLOUTS_PER_PROMPT };
        publish_batch(driver, batch(&batch_id, mode, None, PROMPTS_PER_BATCH, max_new_tokens)).await;
        batch_ids.push(batch_id);
    }
    (store, batch_ids)
}

/// Checks that every prompt got exactly its rollouts, each once.
fn check_rollouts(rollouts: &[Rollout], batch_ids: &[String]) {
    let ids: BTreeSet<&str> = rollouts.iter().map(|r| r.rollout_id.as_str()).collect();
    assert_eq!(ids.len(), rollouts.len(), "a rollout id arrived twice");
    let mut per_prompt: BTreeMap<&str, usize> = BTreeMap::new();
    for rollout in rollouts {
        *per_prompt.entry(rollout.prompt_id.as_str()).or_default() += 1;
        assert_eq!(rollout.policy.version, 1);
    }
    let expected: BTreeSet<String> = batch_ids
        .iter()
        .flat_map(|batch_id| (0..PROMPTS_PER_BATCH).map(move |index| format!("{batch_id}-p{index}")))
        .collect();
    let got: BTreeSet<String> = per_prompt.keys().map(|id| id.to_string()).collect();
    assert_eq!(got, expected, "prompts lost or unknown prompts sampled");
    assert_eq!(expected.len(), 20);
    for (prompt, count) in per_prompt {
        assert_eq!(count, ROLLOUTS_PER_PROMPT as usize, "prompt {prompt} has {count} rollouts");
    }
}

fn sampled_ids(status: &troupe_sampler::SamplerStatus) -> BTreeSet<String> {
    status.recent.iter().map(|batch| batch.batch_id.clone()).collect()
}

/// Checks that two replicas split 20 prompts: each batch is sampled by
/// exactly one of them, both get work, and every rollout arrives once.
async fn replicas_split_prompts(buses: Buses) {
    let (store, batch_ids) = prepare(&buses.driver, 12).await;
    let first = Replica::start(settings(), buses.first, store.clone());
    let second = Replica::start(settings(), buses.second, store);

    let expected = BATCHES * PROMPTS_PER_BATCH * ROLLOUTS_PER_PROMPT as usize;
    let rollouts = collect_rollouts(&buses.driver, expected).await;
    check_rollouts(&rollouts, &batch_ids);
    wait_until("both replicas acknowledged every batch", || {
        first.status.snapshot().batches_sampled + second.status.snapshot().batches_sampled == BATCHES as u64
    })
    .await;

    let (by_first, by_second) = (sampled_ids(&first.status.snapshot()), sampled_ids(&second.status.snapshot()));
    assert!(by_first.is_disjoint(&by_second), "a batch was sampled by both: {by_first:?} and {by_second:?}");
    let all: BTreeSet<String> = by_first.union(&by_second).cloned().collect();
    assert_eq!(all, batch_ids.iter().cloned().collect::<BTreeSet<_>>());
    assert!(!by_first.is_empty(), "the first replica got no work; the second sampled {by_second:?}");
    assert!(!by_second.is_empty(), "the second replica got no work; the first sampled {by_first:?}");
    nothing_more::<Rollout>(&buses.driver, buses.driver.subjects().rollouts(), ROLLOUT_OBSERVER, Duration::from_secs(3)).await;

    first.stop().await;
    second.stop().await;
}

/// Kills a replica mid-batch and checks that nothing is lost: its batch is
/// delivered again to the other replica after `ack_wait`, and every rollout
/// arrives once.
async fn killed_replica_loses_nothing(buses: Buses) {
    let (store, batch_ids) = prepare(&buses.driver, 48).await;
    let doomed = Replica::start(settings(), buses.first, store.clone());
    let survivor = Replica::start(settings(), buses.second, store);

    // Kill the first replica while it samples its second batch, so it has
    // shown it works and then dies with a batch unacknowledged.
    wait_for_status(&doomed.status, "the first replica is mid-batch after one batch", |status| {
        status.batches_sampled >= 1 && status.in_progress.is_some()
    })
    .await;
    let status = doomed.status.clone();
    doomed.kill();
    let killed_batch = status.snapshot().in_progress.expect("the killed replica had a batch in progress");

    let expected = BATCHES * PROMPTS_PER_BATCH * ROLLOUTS_PER_PROMPT as usize;
    let rollouts = collect_rollouts(&buses.driver, expected).await;
    check_rollouts(&rollouts, &batch_ids);
    wait_until("every batch acknowledged", || {
        status.snapshot().batches_sampled + survivor.status.snapshot().batches_sampled == BATCHES as u64
    })
    .await;

    let by_doomed = sampled_ids(&status.snapshot());
    let survivor_status = survivor.status.snapshot();
    assert!(!by_doomed.contains(&killed_batch), "the killed replica finished {killed_batch} after all");
    let redelivered = survivor_status.recent.iter().find(|batch| batch.batch_id == killed_batch);
    let redelivered = redelivered.unwrap_or_else(|| panic!("{killed_batch} was never sampled by the survivor"));
    assert!(redelivered.delivered >= 2, "{killed_batch} was delivered {} times", redelivered.delivered);
    assert!(by_doomed.is_disjoint(&sampled_ids(&survivor_status)), "a batch was sampled to completion twice");
    nothing_more::<Rollout>(&buses.driver, buses.driver.subjects().rollouts(), ROLLOUT_OBSERVER, Duration::from_secs(3)).await;

    survivor.stop().await;
}

macro_rules! on_both_buses {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::memory_buses().await.unwrap()).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(buses) = super::nats_buses().await else { return };
                    super::$case(buses).await;
                }
            )*
        }
    };
}

on_both_buses!(replicas_split_prompts, killed_replica_loses_nothing);
