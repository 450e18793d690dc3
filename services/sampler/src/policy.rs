//! Policy versions in memory: loading one from the model registry, and a
//! bounded cache of loaded versions.
//!
//! A version is read whole with [`ModelRegistry::load`], which checks every
//! file against the SHA-256 in its manifest, and is then parsed on a blocking
//! thread. The cache keeps at most `capacity` versions (`--max-loaded-versions`,
//! 2 by default: the version the sampler follows plus one older version that a
//! batch named explicitly). When a new version would go past the limit, the
//! least recently used version is dropped, never the followed one unless the
//! capacity is 1. A batch in progress keeps its version alive through an `Arc`, so
//! memory peaks at `capacity + 1` versions while such a batch finishes after
//! its version was dropped.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Device;
use tokio::sync::OnceCell;
use troupe_model::{Config, Model, Tokenizer};
use troupe_store::{ModelRegistry, StoreError};
use troupe_wire::ModelRef;

/// One policy version, ready to sample.
pub struct LoadedPolicy {
    pub model_ref: ModelRef,
    pub model: Model,
    pub tokenizer: Tokenizer,
}

impl LoadedPolicy {
    /// Wraps a model already in memory, for tests and in-process callers.
    pub fn new(model_ref: ModelRef, model: Model, tokenizer: Tokenizer) -> Result<LoadedPolicy, LoadError> {
        check_tokenizer(&model_ref, &model, &tokenizer)?;
        Ok(LoadedPolicy { model_ref, model, tokenizer })
    }

    /// The version as `name@version`.
    pub fn model_ref_string(&self) -> String {
        versioned_name(&self.model_ref)
    }
}

impl std::fmt::Debug for LoadedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPolicy").field("model_ref", &self.model_ref).field("model", &self.model).finish()
    }
}

/// Formats a wire model reference as `name@version`.
pub fn versioned_name(model: &ModelRef) -> String {
    format!("{}@{}", model.name, model.version)
}

/// A failure to load a version.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The registry has no such version; a batch naming it is rejected.
    #[error("model version {model} not found in the registry: {source}; name a published version")]
    NotFound { model: String, source: StoreError },
    /// The version exists but cannot be used: a corrupt file, an invalid
    /// manifest, weights that do not match the config, or a tokenizer without
    /// the chat template. Loading it again fails again.
    #[error("model version {model} cannot be used: {reason}")]
    Invalid { model: String, reason: String },
    /// The store could not be read now; a later attempt may succeed.
    #[error("model version {model} could not be read from the store: {source}; retrying later")]
    Unavailable { model: String, source: StoreError },
}

impl LoadError {
    /// Whether loading the same version again would fail the same way.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, LoadError::Unavailable { .. })
    }
}

/// Reads `model` from the registry (checksums verified) and builds it on the CPU.
pub async fn load_policy(registry: &ModelRegistry, model: &ModelRef) -> Result<LoadedPolicy, LoadError> {
    let name = versioned_name(model);
    let store_ref = troupe_store::ModelRef::new(model.name.clone(), model.version);
    let loaded = registry.load(&store_ref).await.map_err(|source| classify(&name, source))?;

    let model_ref = model.clone();
    let build = tokio::task::spawn_blocking(move || {
        let invalid = |reason: String| LoadError::Invalid { model: versioned_name(&model_ref), reason };
        let config_text = std::str::from_utf8(loaded.config())
            .map_err(|error| invalid(format!("config.json is not UTF-8: {error}")))?;
        let config = Config::from_json_str(config_text).map_err(|error| invalid(format!("config.json: {error}")))?;
        let model = Model::from_safetensors_bytes(&config, loaded.weights(), &Device::Cpu)
            .map_err(|error| invalid(format!("model.safetensors: {error}")))?;
        let tokenizer =
            Tokenizer::from_bytes(loaded.tokenizer()).map_err(|error| invalid(format!("tokenizer.json: {error}")))?;
        LoadedPolicy::new(model_ref.clone(), model, tokenizer)
    });
    build.await.map_err(|error| LoadError::Invalid { model: name, reason: format!("building the model panicked: {error}") })?
}

/// Checks that the tokenizer can render chats and fits the model's vocabulary.
fn check_tokenizer(model_ref: &ModelRef, model: &Model, tokenizer: &Tokenizer) -> Result<(), LoadError> {
    let invalid = |reason: String| LoadError::Invalid { model: versioned_name(model_ref), reason };
    if tokenizer.eos_id().is_none() {
        return Err(invalid(
            "tokenizer.json has neither troupe's nor ChatML's chat tokens, so prompts cannot be rendered; \
             publish the version with a chat tokenizer"
                .into(),
        ));
    }
    let vocab = model.config().vocab_size;
    if tokenizer.vocab_size() > vocab {
        return Err(invalid(format!(
            "tokenizer.json has {} tokens but the model's vocab_size is {vocab}",
            tokenizer.vocab_size()
        )));
    }
    Ok(())
}

fn classify(model: &str, source: StoreError) -> LoadError {
    let model = model.to_string();
    match source {
        StoreError::NotFound { .. } | StoreError::InvalidName { .. } => LoadError::NotFound { model, source },
        StoreError::ChecksumMismatch { .. }
        | StoreError::SizeMismatch { .. }
        | StoreError::InvalidManifest { .. }
        | StoreError::InvalidObject { .. }
        | StoreError::InvalidKey { .. } => LoadError::Invalid { model, reason: source.to_string() },
        other => LoadError::Unavailable { model, source: other },
    }
}

/// Loaded versions, at most `capacity` of them; see the module documentation.
pub struct PolicyCache {
    registry: ModelRegistry,
    capacity: usize,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    slots: Vec<Slot>,
    /// The followed version, kept over older ones when the cache is full.
    current: Option<ModelRef>,
    /// Counts uses, for least-recently-used eviction.
    clock: u64,
}

struct Slot {
    model: ModelRef,
    /// Filled once by whichever caller loads it first; other callers of the
    /// same version wait for that load instead of starting their own.
    cell: Arc<OnceCell<Arc<LoadedPolicy>>>,
    last_used: u64,
}

impl PolicyCache {
    /// Creates an empty cache over `registry`. A `capacity` of 0 is taken as 1.
    pub fn new(registry: ModelRegistry, capacity: usize) -> PolicyCache {
        PolicyCache { registry, capacity: capacity.max(1), state: Mutex::new(CacheState::default()) }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Returns version `model`, loading it when it is not in memory.
    pub async fn get(&self, model: &ModelRef) -> Result<Arc<LoadedPolicy>, LoadError> {
        let cell = self.slot(model);
        let loaded = cell
            .get_or_try_init(|| async {
                tracing::info!(policy = %versioned_name(model), "loading policy version");
                let started = std::time::Instant::now();
                let policy = load_policy(&self.registry, model).await?;
                tracing::info!(
                    policy = %versioned_name(model),
                    parameters = policy.model.num_parameters(),
                    seconds = started.elapsed().as_secs_f64(),
                    "policy version loaded"
                );
                Ok::<_, LoadError>(Arc::new(policy))
            })
            .await;
        match loaded {
            Ok(policy) => Ok(policy.clone()),
            Err(error) => {
                self.forget_unloaded(model);
                Err(error)
            }
        }
    }

    /// Marks `model` as the followed version, which eviction keeps.
    pub fn set_current(&self, model: &ModelRef) {
        self.lock().current = Some(model.clone());
    }

    /// Returns the versions in memory, lowest version number first.
    pub fn loaded(&self) -> Vec<ModelRef> {
        let state = self.lock();
        let mut loaded: Vec<ModelRef> =
            state.slots.iter().filter(|slot| slot.cell.initialized()).map(|slot| slot.model.clone()).collect();
        loaded.sort();
        loaded
    }

    /// Finds or adds the slot of `model`, evicting others past the capacity.
    fn slot(&self, model: &ModelRef) -> Arc<OnceCell<Arc<LoadedPolicy>>> {
        let mut state = self.lock();
        state.clock += 1;
        let now = state.clock;
        if let Some(slot) = state.slots.iter_mut().find(|slot| &slot.model == model) {
            slot.last_used = now;
            return slot.cell.clone();
        }
        let cell = Arc::new(OnceCell::new());
        state.slots.push(Slot { model: model.clone(), cell: cell.clone(), last_used: now });
        while state.slots.len() > self.capacity {
            let Some(victim) = state.eviction_victim(model) else { break };
            let evicted = state.slots.swap_remove(victim);
            tracing::info!(policy = %versioned_name(&evicted.model), capacity = self.capacity, "policy version dropped from memory");
        }
        cell
    }

    fn forget_unloaded(&self, model: &ModelRef) {
        self.lock().slots.retain(|slot| &slot.model != model || slot.cell.initialized());
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // The state is plain data that every method leaves consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl CacheState {
    /// Returns the least recently used slot other than `keep`, preferring one
    /// that is not the followed version.
    fn eviction_victim(&self, keep: &ModelRef) -> Option<usize> {
        let candidates = || self.slots.iter().enumerate().filter(|(_, slot)| &slot.model != keep);
        let oldest = |iter: &mut dyn Iterator<Item = (usize, &Slot)>| iter.min_by_key(|(_, slot)| slot.last_used).map(|(i, _)| i);
        let mut not_current = candidates().filter(|(_, slot)| Some(&slot.model) != self.current.as_ref());
        oldest(&mut not_current).or_else(|| oldest(&mut candidates()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(v: u64) -> ModelRef {
        ModelRef { name: "policy".into(), version: v }
    }

    fn state(versions: &[(u64, u64)], current: Option<u64>) -> CacheState {
        CacheState {
            slots: versions
                .iter()
                .map(|&(v, used)| Slot { model: version(v), cell: Arc::new(OnceCell::new()), last_used: used })
                .collect(),
            current: current.map(version),
            clock: 100,
        }
    }

    #[test]
    fn eviction_keeps_current_and_requested() {
        // Version 1 is least recently used but followed; version 2 goes.
        let cache = state(&[(1, 1), (2, 2), (3, 3)], Some(1));
        assert_eq!(cache.eviction_victim(&version(3)), Some(1));
        // Without a followed version the least recently used goes.
        let cache = state(&[(1, 1), (2, 2), (3, 3)], None);
        assert_eq!(cache.eviction_victim(&version(3)), Some(0));
        // With only the followed version and the requested one, the followed one goes.
        let cache = state(&[(1, 1), (3, 3)], Some(1));
        assert_eq!(cache.eviction_victim(&version(3)), Some(0));
        let cache = state(&[(3, 3)], Some(1));
        assert_eq!(cache.eviction_victim(&version(3)), None);
    }

    #[tokio::test]
    async fn unknown_version_is_permanent_not_found() {
        let cache = PolicyCache::new(ModelRegistry::new(troupe_store::Store::memory()), 2);
        let error = cache.get(&version(9)).await.unwrap_err();
        assert!(matches!(error, LoadError::NotFound { .. }), "{error}");
        assert!(error.is_permanent());
        assert!(error.to_string().contains("policy@9"), "{error}");
        assert!(cache.loaded().is_empty());
        assert!(cache.lock().slots.is_empty(), "a failed load left a slot behind");
    }
}
