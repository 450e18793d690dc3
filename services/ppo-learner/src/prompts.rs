//! The prompt set and the prompt batch of each PPO step.
//!
//! Prompts are read once from JSONL files and put in an order fixed by the
//! seed. Step `s` asks for the `p` prompts at positions `s * p .. s * p + p`
//! of that order, wrapping around, so the batch of any step follows from the
//! step number alone and a resumed learner asks for the same prompts.

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use troupe_data::{read_demonstrations, Mode};
use troupe_wire::{ModelRef, Prompt, PromptBatch, SampleMode, SamplingParams};

use crate::PpoError;

/// The prompts in their seeded order.
#[derive(Clone, Debug)]
pub struct PromptSet {
    prompts: Vec<Prompt>,
}

impl PromptSet {
    /// Reads every file (strictly: a malformed line fails the load, naming
    /// file and line) and orders the prompts with `seed`. The last user turn
    /// is the prompt text and the demonstration's response is its reference.
    pub fn load(paths: &[PathBuf], seed: u64) -> Result<PromptSet, PpoError> {
        let mut prompts = Vec::new();
        for path in paths {
            let loaded = read_demonstrations(path, Mode::Strict)?;
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("prompts").to_string();
            for record in loaded.records {
                let demonstration = record.value;
                let Some(text) = demonstration.prompt().iter().rev().find(|t| t.role == troupe_data::Role::User) else {
                    continue;
                };
                prompts.push(Prompt {
                    prompt_id: format!("{stem}:{}", record.location.line),
                    text: text.content.clone(),
                    reference: Some(demonstration.response().to_string()),
                });
            }
        }
        Self::from_prompts(prompts, seed)
    }

    /// Orders `prompts` with `seed`.
    pub fn from_prompts(mut prompts: Vec<Prompt>, seed: u64) -> Result<PromptSet, PpoError> {
        if prompts.is_empty() {
            return Err(PpoError::Invalid("the prompt files hold no user prompt".into()));
        }
        prompts.shuffle(&mut StdRng::seed_from_u64(seed));
        Ok(PromptSet { prompts })
    }

    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// The `count` prompts of step `step`; a prompt appears once per batch
    /// even when `count` exceeds the set.
    pub fn for_step(&self, step: u64, count: usize) -> Vec<Prompt> {
        let n = self.prompts.len();
        let take = count.min(n);
        let start = (step as usize).wrapping_mul(count) % n;
        (0..take).map(|i| self.prompts[(start + i) % n].clone()).collect()
    }
}

/// The id of the prompt batch of `step` in job `job_id`: the same on every
/// publish, so the bus stores a batch republished after a restart once.
pub fn batch_id(job_id: &str, step: u64) -> String {
    format!("{job_id}-step-{step:06}")
}

/// What each prompt batch asks the samplers for.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchRequest {
    pub rollouts_per_prompt: u32,
    pub prompts_per_batch: usize,
    pub sampling: SamplingParams,
}

/// The prompt batch of `step`, to be sampled with `policy`.
pub fn prompt_batch(set: &PromptSet, job_id: &str, step: u64, policy: &ModelRef, request: &BatchRequest) -> PromptBatch {
    let mut sampling = request.sampling.clone();
    sampling.seed = request.sampling.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(step);
    PromptBatch {
        batch_id: batch_id(job_id, step),
        mode: SampleMode::Rollouts { n: request.rollouts_per_prompt },
        policy: Some(policy.clone()),
        sampling,
        prompts: set.for_step(step, request.prompts_per_batch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(id: &str) -> Prompt {
        Prompt { prompt_id: id.into(), text: format!("text {id}"), reference: None }
    }

    #[test]
    fn steps_walk_the_set_and_wrap() {
        let set = PromptSet::from_prompts((0..5).map(|i| prompt(&i.to_string())).collect(), 7).unwrap();
        let ids = |step| set.for_step(step, 2).into_iter().map(|p| p.prompt_id).collect::<Vec<_>>();
        assert_eq!(ids(0).len(), 2);
        assert_ne!(ids(0), ids(1));
        assert_eq!(ids(0), ids(0));
        let all: std::collections::BTreeSet<String> = (0..5).flat_map(ids).collect();
        assert_eq!(all.len(), 5);
        assert_eq!(set.for_step(3, 9).len(), 5);
    }

    #[test]
    fn empty_set_is_rejected() {
        assert!(PromptSet::from_prompts(vec![], 0).is_err());
    }

    #[test]
    fn shipped_prompts_load() {
        let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/sft/capitals.heldout.jsonl"));
        let set = PromptSet::load(&[path], 0).unwrap();
        assert_eq!(set.len(), 20);
        assert!(set.prompts.iter().all(|p| p.reference.is_some() && p.prompt_id.starts_with("capitals.heldout:")));
    }
}
