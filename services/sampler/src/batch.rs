//! Sampling one prompt batch with one loaded policy version.
//!
//! This module checks a batch against the sampler's limits, derives the seed
//! and the id of every output, runs the model crate's batched, KV-cached
//! [`generate`] and turns its generations into wire messages. It is
//! synchronous and touches neither the bus nor the store, so tests and other
//! tools can call [`sample_batch`] directly. The service runs it on a
//! blocking thread.
//!
//! # Seeds
//!
//! Every output is reproducible from what it records. Prompt `i` of a batch
//! gets [`prompt_seed`]`(batch seed, i)`, and output `j` of that prompt gets
//! [`output_seed`]`(prompt seed, j)`. A [`Rollout`] records its own output
//! seed in `sampling.seed`. A [`CandidateSet`] records the prompt seed there,
//! and candidate `j` of the set was drawn with `output_seed(sampling.seed, j)`.
//! Replaying an output with that seed, the same version and the same
//! `max_rows` gives the same tokens; a different `max_rows` groups rows into
//! other matrix products, which can change the last bits of a log-prob.
//!
//! # Ids
//!
//! A candidate set id and a rollout id are hashes of the batch id, the prompt
//! id and the output index, so a redelivered batch that is sampled again
//! publishes messages with the same ids, and the bus stores them once.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};
use troupe_model::{generate, GenerateOptions, Generation};
use troupe_wire::{
    Candidate, CandidateSet, FinishReason, ModelRef, Prompt, PromptBatch, Rollout, SampleMode, SamplingParams,
};

use crate::policy::LoadedPolicy;

/// Bounds on the work one batch may ask for. A batch over a bound is rejected
/// as a whole ([`BatchError`]), except for `max_rows`, which only splits the
/// work into chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Prompts in one batch.
    pub max_prompts: usize,
    /// Candidates (`k`) or rollouts (`n`) per prompt.
    pub max_outputs_per_prompt: u32,
    /// The `max_new_tokens` a batch may request.
    pub max_new_tokens: u32,
    /// Sequences decoded together, which bounds the KV cache in memory. A batch
    /// with more rows (prompts times outputs) is sampled in chunks of this size.
    pub max_rows: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_prompts: 64, max_outputs_per_prompt: 16, max_new_tokens: 256, max_rows: 32 }
    }
}

/// A reason a batch cannot be sampled. Every case is a property of the batch and
/// the version it asked for, so sampling it again would fail again: the
/// service rejects it to the dead-letter subject with this message.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("the batch has {count} prompts, over the limit of {max} (--max-prompts); split it into smaller batches")]
    TooManyPrompts { count: usize, max: usize },
    #[error("the batch asks for {requested} outputs per prompt, over the limit of {max} (--max-outputs-per-prompt); ask for fewer")]
    TooManyOutputs { requested: u32, max: u32 },
    #[error("the batch asks for max_new_tokens {requested}, over the limit of {max} (--max-new-tokens); ask for fewer")]
    TooManyNewTokens { requested: u32, max: u32 },
    #[error("prompt id {0:?} appears more than once in the batch; output ids derive from it, so give every prompt its own id")]
    DuplicatePromptId(String),
    #[error(
        "prompt {prompt_id:?} renders to {prompt_tokens} tokens; with max_new_tokens {max_new_tokens} that exceeds \
         the {context} positions of {policy}; shorten the prompt or lower max_new_tokens"
    )]
    PromptTooLong { prompt_id: String, prompt_tokens: usize, max_new_tokens: u32, context: usize, policy: String },
    #[error("prompt {prompt_id:?} cannot be rendered with the chat template of {policy}: {reason}")]
    Render { prompt_id: String, policy: String, reason: String },
    #[error("sampling with {policy} failed: {reason}")]
    Generate { policy: String, reason: String },
}

/// The messages one batch produces.
#[derive(Clone, Debug, PartialEq)]
pub enum Outputs {
    /// One set per prompt, for [`SampleMode::Candidates`].
    Candidates(Vec<CandidateSet>),
    /// `n` per prompt, prompt by prompt, for [`SampleMode::Rollouts`].
    Rollouts(Vec<Rollout>),
}

impl Outputs {
    /// Number of messages to publish.
    pub fn len(&self) -> usize {
        match self {
            Outputs::Candidates(sets) => sets.len(),
            Outputs::Rollouts(rollouts) => rollouts.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Generated tokens over all outputs, EOS included.
    pub fn generated_tokens(&self) -> u64 {
        match self {
            Outputs::Candidates(sets) => {
                sets.iter().flat_map(|set| &set.candidates).map(|candidate| u64::from(candidate.token_count)).sum()
            }
            Outputs::Rollouts(rollouts) => rollouts.iter().map(|rollout| rollout.response_tokens.len() as u64).sum(),
        }
    }
}

/// Outputs requested per prompt: `k` or `n`.
pub fn outputs_per_prompt(mode: &SampleMode) -> u32 {
    match *mode {
        SampleMode::Candidates { k } => k,
        SampleMode::Rollouts { n } => n,
    }
}

/// Checks a batch against `limits` before any model is loaded.
pub fn check_limits(batch: &PromptBatch, limits: &Limits) -> Result<(), BatchError> {
    if batch.prompts.len() > limits.max_prompts {
        return Err(BatchError::TooManyPrompts { count: batch.prompts.len(), max: limits.max_prompts });
    }
    let requested = outputs_per_prompt(&batch.mode);
    if requested > limits.max_outputs_per_prompt {
        return Err(BatchError::TooManyOutputs { requested, max: limits.max_outputs_per_prompt });
    }
    if batch.sampling.max_new_tokens > limits.max_new_tokens {
        return Err(BatchError::TooManyNewTokens { requested: batch.sampling.max_new_tokens, max: limits.max_new_tokens });
    }
    let mut seen = BTreeSet::new();
    for prompt in &batch.prompts {
        if !seen.insert(prompt.prompt_id.as_str()) {
            return Err(BatchError::DuplicatePromptId(prompt.prompt_id.clone()));
        }
    }
    Ok(())
}

/// Samples every prompt of `batch` with `policy` and returns the messages to
/// publish. `after_chunk(done, total)` is called after each chunk of at most
/// `limits.max_rows` sequences, with counts of sequences.
pub fn sample_batch(
    policy: &LoadedPolicy,
    batch: &PromptBatch,
    limits: &Limits,
    mut after_chunk: impl FnMut(usize, usize),
) -> Result<Outputs, BatchError> {
    check_limits(batch, limits)?;
    let per_prompt = outputs_per_prompt(&batch.mode) as usize;
    let rendered = render_prompts(policy, batch)?;

    // One row per output: prompt i's j-th output is row i * per_prompt + j.
    let mut row_prompts = Vec::with_capacity(rendered.len() * per_prompt);
    let mut row_params = Vec::with_capacity(rendered.len() * per_prompt);
    for (index, ids) in rendered.iter().enumerate() {
        let seed = prompt_seed(batch.sampling.seed, index);
        for output in 0..per_prompt {
            row_prompts.push(ids.clone());
            row_params.push(model_params(&batch.sampling, output_seed(seed, output)));
        }
    }

    let total = row_prompts.len();
    let chunk_rows = limits.max_rows.max(1);
    let mut generations = Vec::with_capacity(total);
    for (prompts, params) in row_prompts.chunks(chunk_rows).zip(row_params.chunks(chunk_rows)) {
        let chunk = generate(&policy.model, &policy.tokenizer, prompts, params, &GenerateOptions::default())
            .map_err(|error| BatchError::Generate { policy: policy.model_ref_string(), reason: error.to_string() })?;
        generations.extend(chunk);
        after_chunk(generations.len(), total);
    }

    let mut rows = generations.into_iter();
    Ok(match batch.mode {
        SampleMode::Candidates { .. } => {
            let mut sets = Vec::with_capacity(batch.prompts.len());
            for (index, prompt) in batch.prompts.iter().enumerate() {
                let group: Vec<Generation> = rows.by_ref().take(per_prompt).collect();
                sets.push(candidate_set(&policy.model_ref, batch, index, prompt, group));
            }
            Outputs::Candidates(sets)
        }
        SampleMode::Rollouts { .. } => {
            let mut rollouts = Vec::with_capacity(total);
            for (index, (prompt, prompt_tokens)) in batch.prompts.iter().zip(&rendered).enumerate() {
                let seed = prompt_seed(batch.sampling.seed, index);
                for (output, generation) in rows.by_ref().take(per_prompt).enumerate() {
                    let mut sampling = batch.sampling.clone();
                    sampling.seed = output_seed(seed, output);
                    rollouts.push(rollout(&policy.model_ref, batch, prompt, prompt_tokens, output, sampling, generation));
                }
            }
            Outputs::Rollouts(rollouts)
        }
    })
}

/// Renders every prompt as a user turn plus the opening of the assistant
/// turn, and checks that each fits the model's context with the new tokens.
fn render_prompts(policy: &LoadedPolicy, batch: &PromptBatch) -> Result<Vec<Vec<u32>>, BatchError> {
    let context = policy.model.config().max_position_embeddings;
    let max_new_tokens = batch.sampling.max_new_tokens;
    let mut rendered = Vec::with_capacity(batch.prompts.len());
    for prompt in &batch.prompts {
        let ids = policy.tokenizer.render_prompt(&prompt.text).map_err(|error| BatchError::Render {
            prompt_id: prompt.prompt_id.clone(),
            policy: policy.model_ref_string(),
            reason: error.to_string(),
        })?;
        if ids.len() + max_new_tokens as usize > context {
            return Err(BatchError::PromptTooLong {
                prompt_id: prompt.prompt_id.clone(),
                prompt_tokens: ids.len(),
                max_new_tokens,
                context,
                policy: policy.model_ref_string(),
            });
        }
        rendered.push(ids);
    }
    Ok(rendered)
}

fn candidate_set(policy: &ModelRef, batch: &PromptBatch, index: usize, prompt: &Prompt, group: Vec<Generation>) -> CandidateSet {
    let mut sampling = batch.sampling.clone();
    sampling.seed = prompt_seed(batch.sampling.seed, index);
    let candidates = group
        .into_iter()
        .enumerate()
        .map(|(output, generation)| Candidate {
            candidate_id: candidate_id(output),
            token_count: u32::try_from(generation.tokens.len()).unwrap_or(u32::MAX),
            finish_reason: finish_reason(generation.finish_reason),
            text: generation.text,
        })
        .collect();
    CandidateSet {
        set_id: candidate_set_id(&batch.batch_id, &prompt.prompt_id),
        prompt_id: prompt.prompt_id.clone(),
        prompt: prompt.text.clone(),
        reference: prompt.reference.clone(),
        policy: policy.clone(),
        sampling,
        candidates,
        expires_at_ms: None,
    }
}

fn rollout(
    policy: &ModelRef,
    batch: &PromptBatch,
    prompt: &Prompt,
    prompt_tokens: &[u32],
    output: usize,
    sampling: SamplingParams,
    generation: Generation,
) -> Rollout {
    Rollout {
        rollout_id: rollout_id(&batch.batch_id, &prompt.prompt_id, output),
        batch_id: batch.batch_id.clone(),
        prompt_id: prompt.prompt_id.clone(),
        prompt: prompt.text.clone(),
        prompt_tokens: prompt_tokens.to_vec(),
        response: generation.text,
        response_tokens: generation.tokens,
        logprobs: generation.logprobs,
        finish_reason: finish_reason(generation.finish_reason),
        policy: policy.clone(),
        sampling,
    }
}

/// Converts the wire's sampling settings to the model crate's, with `seed`
/// in place of the batch seed. On the wire `top_k` 0 and `top_p` 1 turn the
/// filters off, where the model crate takes `None`.
pub fn model_params(sampling: &SamplingParams, seed: u64) -> troupe_model::SamplingParams {
    troupe_model::SamplingParams {
        temperature: f64::from(sampling.temperature),
        top_k: (sampling.top_k > 0).then_some(sampling.top_k as usize),
        top_p: (sampling.top_p < 1.0).then_some(f64::from(sampling.top_p)),
        max_new_tokens: sampling.max_new_tokens as usize,
        seed,
    }
}

pub fn finish_reason(reason: troupe_model::FinishReason) -> FinishReason {
    match reason {
        troupe_model::FinishReason::Eos => FinishReason::Eos,
        troupe_model::FinishReason::Length => FinishReason::Length,
    }
}

/// Seed of prompt `index` of a batch seeded with `batch_seed`.
pub fn prompt_seed(batch_seed: u64, index: usize) -> u64 {
    mix(batch_seed, index as u64)
}

/// Seed of output `index` of a prompt seeded with `prompt_seed`.
pub fn output_seed(prompt_seed: u64, index: usize) -> u64 {
    mix(prompt_seed, index as u64)
}

/// Combines two numbers into a well-spread seed with SplitMix64's finalizer
/// (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
/// 2014), so neighbouring indices give unrelated generator states.
fn mix(seed: u64, index: u64) -> u64 {
    fn finalize(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
    finalize(seed ^ finalize(index.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)))
}

/// Id of the candidate set of prompt `prompt_id` in batch `batch_id`.
pub fn candidate_set_id(batch_id: &str, prompt_id: &str) -> String {
    format!("set-{}", id_hash(&[batch_id, prompt_id, "candidates"]))
}

/// Id of rollout `index` of prompt `prompt_id` in batch `batch_id`.
pub fn rollout_id(batch_id: &str, prompt_id: &str, index: usize) -> String {
    format!("rollout-{}", id_hash(&[batch_id, prompt_id, &index.to_string()]))
}

/// First 128 bits of SHA-256 over the parts, each prefixed by its length so
/// that `("a-b", "c")` and `("a", "b-c")` hash differently.
fn id_hash(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(&hasher.finalize()[..16])
}

/// Candidate id of output `index` within its set: `A` to `Z`, then `AA`, `AB`,
/// and so on, as spreadsheet columns are named, so people rank `D > C > A > B`.
pub fn candidate_id(index: usize) -> String {
    let mut letters = Vec::new();
    let mut rest = index + 1;
    while rest > 0 {
        let digit = (rest - 1) % 26;
        letters.push(b'A' + digit as u8);
        rest = (rest - 1) / 26;
    }
    letters.reverse();
    String::from_utf8(letters).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(mode: SampleMode, prompts: &[&str]) -> PromptBatch {
        PromptBatch {
            batch_id: "b1".into(),
            mode,
            policy: None,
            sampling: SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, max_new_tokens: 8, seed: 7 },
            prompts: prompts
                .iter()
                .map(|id| Prompt { prompt_id: id.to_string(), text: format!("text of {id}"), reference: None })
                .collect(),
        }
    }

    #[test]
    fn candidate_ids_count_like_columns() {
        let ids: Vec<String> = [0, 1, 25, 26, 27, 51, 52, 701, 702].iter().map(|&i| candidate_id(i)).collect();
        assert_eq!(ids, ["A", "B", "Z", "AA", "AB", "AZ", "BA", "ZZ", "AAA"]);
    }

    #[test]
    fn output_ids_are_unambiguous() {
        assert_ne!(rollout_id("a-b", "c", 0), rollout_id("a", "b-c", 0));
        assert_ne!(rollout_id("b", "p", 0), rollout_id("b", "p", 1));
        assert_ne!(candidate_set_id("b", "p"), candidate_set_id("b", "q"));
        assert_eq!(rollout_id("b", "p", 3), rollout_id("b", "p", 3));
        assert!(rollout_id("b", "p", 3).starts_with("rollout-"));
        assert_eq!(candidate_set_id("b", "p").len(), "set-".len() + 32);
    }

    #[test]
    fn seeds_are_deterministic_and_distinct() {
        assert_eq!(prompt_seed(42, 3), prompt_seed(42, 3));
        let mut seen = BTreeSet::new();
        for batch_seed in [0, 1, 42] {
            for prompt in 0..20 {
                let seed = prompt_seed(batch_seed, prompt);
                for output in 0..20 {
                    assert!(seen.insert(output_seed(seed, output)), "seed collision at {batch_seed}/{prompt}/{output}");
                }
            }
        }
    }

    #[test]
    fn limits_reject_oversized_batches() {
        let limits = Limits { max_prompts: 2, max_outputs_per_prompt: 4, max_new_tokens: 8, max_rows: 4 };
        assert!(check_limits(&batch(SampleMode::Rollouts { n: 4 }, &["a", "b"]), &limits).is_ok());
        let too_many = check_limits(&batch(SampleMode::Rollouts { n: 1 }, &["a", "b", "c"]), &limits);
        assert!(matches!(too_many, Err(BatchError::TooManyPrompts { count: 3, max: 2 })), "{too_many:?}");
        let too_wide = check_limits(&batch(SampleMode::Candidates { k: 5 }, &["a"]), &limits);
        assert!(matches!(too_wide, Err(BatchError::TooManyOutputs { requested: 5, max: 4 })), "{too_wide:?}");
        let mut long = batch(SampleMode::Rollouts { n: 1 }, &["a"]);
        long.sampling.max_new_tokens = 9;
        let too_long = check_limits(&long, &limits);
        assert!(matches!(too_long, Err(BatchError::TooManyNewTokens { requested: 9, max: 8 })), "{too_long:?}");
        let twice = check_limits(&batch(SampleMode::Rollouts { n: 1 }, &["a", "a"]), &limits);
        assert!(matches!(twice, Err(BatchError::DuplicatePromptId(ref id)) if id == "a"), "{twice:?}");
    }

    #[test]
    fn wire_params_convert_filters() {
        let sampling = SamplingParams { temperature: 0.5, top_k: 0, top_p: 1.0, max_new_tokens: 8, seed: 1 };
        let params = model_params(&sampling, 99);
        assert_eq!(params.top_k, None);
        assert_eq!(params.top_p, None);
        assert_eq!(params.seed, 99);
        assert_eq!(params.temperature, 0.5);
        let filtered = SamplingParams { top_k: 40, top_p: 0.9, ..sampling };
        let params = model_params(&filtered, 1);
        assert_eq!(params.top_k, Some(40));
        assert_eq!(params.top_p, Some(f64::from(0.9f32)));
    }

    #[test]
    fn rollout_keeps_eos_and_finish_reason() {
        let policy = ModelRef { name: "policy".into(), version: 3 };
        let batch = batch(SampleMode::Rollouts { n: 1 }, &["a"]);
        let generation = Generation {
            tokens: vec![40, 41, 2],
            text: "hi".into(),
            logprobs: vec![-0.5, -1.0, -0.25],
            finish_reason: troupe_model::FinishReason::Eos,
        };
        let sampling = SamplingParams { seed: 5, ..batch.sampling.clone() };
        let out = rollout(&policy, &batch, &batch.prompts[0], &[1, 4, 9, 6, 5], 0, sampling, generation);
        assert_eq!(out.response_tokens, vec![40, 41, 2]);
        assert_eq!(out.logprobs.len(), out.response_tokens.len());
        assert_eq!(out.finish_reason, FinishReason::Eos);
        assert_eq!(out.prompt_tokens, vec![1, 4, 9, 6, 5]);
        assert_eq!(out.policy, policy);
        assert_eq!(out.sampling.seed, 5);
        assert_eq!(out.rollout_id, rollout_id("b1", "a", 0));
    }
}
