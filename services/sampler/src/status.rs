//! The state of one sampler, for `troupe status`, tests and operators.
//!
//! [`StatusHandle`] is shared between the running service and its readers.
//! In one process (`troupe up`, tests) callers read it with
//! [`StatusHandle::snapshot`]; a deployed sampler serves the same snapshot as
//! JSON at `GET /status` on its HTTP port ([`status_routes`]). The version
//! served is also the gauge `troupe_sampler_policy_version{policy="NAME"}`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use troupe_wire::ModelRef;

/// Batches kept in [`SamplerStatus::recent`]; older ones are dropped.
pub const RECENT_BATCHES: usize = 64;

/// A point-in-time view of one sampler.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SamplerStatus {
    /// The model whose newest version serves batches that name no policy.
    pub policy_name: String,
    /// The version of `policy_name` that batches naming no policy get now.
    pub serving: Option<ModelRef>,
    /// The newest version of `policy_name` announced; it differs from
    /// `serving` while it loads, or when it could not be loaded.
    pub announced: Option<ModelRef>,
    /// Versions in memory.
    pub loaded: Vec<ModelRef>,
    /// The batch being sampled now.
    pub in_progress: Option<String>,
    /// Batches sampled, published and acknowledged.
    pub batches_sampled: u64,
    /// Batches rejected to the dead-letter subject.
    pub batches_rejected: u64,
    /// Batches handed back to the queue to be tried again later.
    pub batches_retried: u64,
    /// Candidate sets and rollouts published.
    pub outputs_published: u64,
    /// Outputs the bus already had under the same id (from an earlier delivery).
    pub duplicate_outputs: u64,
    /// The last [`RECENT_BATCHES`] batches sampled, oldest first.
    pub recent: VecDeque<SampledBatch>,
}

/// One batch this sampler finished.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SampledBatch {
    pub batch_id: String,
    /// The version every output of the batch came from.
    pub policy: ModelRef,
    pub outputs: u64,
    /// How many times the queue had delivered the batch, this time included.
    pub delivered: u64,
}

/// Shared, cheaply cloned access to a sampler's [`SamplerStatus`].
#[derive(Clone, Debug, Default)]
pub struct StatusHandle {
    inner: Arc<Mutex<SamplerStatus>>,
}

impl StatusHandle {
    pub fn new() -> StatusHandle {
        StatusHandle::default()
    }

    /// Returns a copy of the current status.
    pub fn snapshot(&self) -> SamplerStatus {
        self.lock().clone()
    }

    /// Returns the version that batches without a policy get now.
    pub fn serving(&self) -> Option<ModelRef> {
        self.lock().serving.clone()
    }

    pub(crate) fn update(&self, change: impl FnOnce(&mut SamplerStatus)) {
        change(&mut self.lock());
    }

    pub(crate) fn record_sampled(&self, batch: SampledBatch, duplicates: u64) {
        self.update(|status| {
            status.in_progress = None;
            status.batches_sampled += 1;
            status.outputs_published += batch.outputs;
            status.duplicate_outputs += duplicates;
            if status.recent.len() == RECENT_BATCHES {
                status.recent.pop_front();
            }
            status.recent.push_back(batch);
        });
    }

    fn lock(&self) -> MutexGuard<'_, SamplerStatus> {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `GET /status`: the snapshot as JSON, to merge into the service's HTTP server.
pub fn status_routes(status: StatusHandle) -> Router {
    Router::new().route("/status", get(move || async move { Json(status.snapshot()) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_batches_are_bounded() {
        let status = StatusHandle::new();
        for index in 0..RECENT_BATCHES + 5 {
            let batch = SampledBatch {
                batch_id: format!("b{index}"),
                policy: ModelRef { name: "policy".into(), version: 1 },
                outputs: 2,
                delivered: 1,
            };
            status.record_sampled(batch, 1);
        }
        let snapshot = status.snapshot();
        assert_eq!(snapshot.recent.len(), RECENT_BATCHES);
        assert_eq!(snapshot.recent.front().map(|b| b.batch_id.as_str()), Some("b5"));
        assert_eq!(snapshot.batches_sampled, (RECENT_BATCHES + 5) as u64);
        assert_eq!(snapshot.outputs_published, 2 * (RECENT_BATCHES + 5) as u64);
        assert_eq!(snapshot.duplicate_outputs, (RECENT_BATCHES + 5) as u64);
    }
}
