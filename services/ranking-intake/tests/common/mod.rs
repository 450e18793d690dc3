//! Helpers shared by the intake's integration tests.
#![allow(dead_code)]

use std::time::Duration;

use troupe_bus::memory::MemoryBus;
use troupe_bus::{BusHandle, QueueConfig};
use troupe_store::Store;
use troupe_wire::{Candidate, CandidateSet, DeadLetter, FinishReason, ModelRef, RunId, SamplingParams};

/// How long a test waits for something that should happen.
pub const ARRIVAL: Duration = Duration::from_secs(20);

pub fn fresh_run() -> RunId {
    RunId::new(&format!("t{}", uuid::Uuid::new_v4().simple())).unwrap()
}

pub fn memory_bus() -> BusHandle {
    BusHandle::new(MemoryBus::new(fresh_run()))
}

/// Builds a set whose candidates have the given ids; candidate `X` has text "answer X".
pub fn candidate_set(set_id: &str, ids: &[&str], expires_at_ms: Option<i64>) -> CandidateSet {
    CandidateSet {
        set_id: set_id.to_string(),
        prompt_id: format!("prompt-{set_id}"),
        prompt: format!("question of {set_id}"),
        reference: Some("42".to_string()),
        policy: ModelRef { name: "policy".to_string(), version: 3 },
        sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 32, seed: 7 },
        candidates: ids
            .iter()
            .map(|id| Candidate {
                candidate_id: id.to_string(),
                text: format!("answer {id}"),
                finish_reason: FinishReason::Eos,
                token_count: 3,
            })
            .collect(),
        expires_at_ms,
    }
}

/// Keys of every object in the store, to show that a rejection changed nothing.
pub async fn all_keys(store: &Store) -> Vec<String> {
    store.list(None).await.unwrap().into_iter().map(|object| object.key.to_string()).collect()
}

/// Reads the next dead letter, failing the test after [`ARRIVAL`].
pub async fn next_dead_letter(queue: &mut troupe_bus::Queue) -> DeadLetter {
    let next = tokio::time::timeout(ARRIVAL, queue.next_message::<DeadLetter>()).await;
    let (envelope, delivery) = next.expect("timed out waiting for a dead letter").unwrap();
    delivery.ack().await.unwrap();
    envelope.payload
}

pub async fn dead_letter_queue(bus: &BusHandle) -> troupe_bus::Queue {
    bus.queue(QueueConfig::new("test-operators", &bus.subjects().dead())).await.unwrap()
}
