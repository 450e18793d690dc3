//! Turning one rollout into the reward model's token ids and a score.

use troupe_reward_trainer::reward_model::keep_last;
use troupe_reward_trainer::RewardModel;
use troupe_wire::{FinishReason, ModelRef, Rollout, ScoredRollout};

/// The source of a rollout's scored tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tokenization {
    /// The policy and the reward model share a tokenizer: the rollout's ids as they are.
    Reused,
    /// The text rendered again with the reward model's tokenizer and template.
    Retokenized,
}

/// Returns the ids the reward model scores for `rollout`. `policy_tokenizer_sha256`
/// is the SHA-256 of the policy's stored `tokenizer.json`, or `None` when the
/// policy version is unknown. An `Err` is the reason to reject the rollout.
pub fn rollout_ids(
    reward: &RewardModel,
    rollout: &Rollout,
    policy_tokenizer_sha256: Option<&str>,
) -> Result<(Vec<u32>, Tokenization), String> {
    if policy_tokenizer_sha256 == Some(reward.tokenizer_sha256.as_str()) {
        let vocab = reward.model.config().vocab_size;
        let ids: Vec<u32> = rollout.prompt_tokens.iter().chain(&rollout.response_tokens).copied().collect();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(format!("token id {bad} is outside the vocabulary of {} tokens", vocab));
        }
        return Ok((keep_last(ids, reward.max_tokens), Tokenization::Reused));
    }
    let ends_with_eos = rollout.finish_reason == FinishReason::Eos;
    let ids = reward
        .render(&rollout.prompt, &rollout.response, ends_with_eos)
        .map_err(|error| format!("cannot render the rollout with the reward model's tokenizer: {error}"))?;
    Ok((ids, Tokenization::Retokenized))
}

/// Scores `rollout`; an `Err` is the reason to reject it.
pub fn score_rollout(
    reward: &RewardModel,
    rollout: Rollout,
    policy_tokenizer_sha256: Option<&str>,
) -> Result<(ScoredRollout, Tokenization), String> {
    let (ids, tokenization) = rollout_ids(reward, &rollout, policy_tokenizer_sha256)?;
    let raw = reward.score_ids(&[ids]).map_err(|error| format!("scoring failed: {error}"))?[0];
    if !raw.is_finite() {
        return Err(format!("the reward model returned the non-finite score {raw}"));
    }
    let reward_model = ModelRef { name: reward.model_ref.name.clone(), version: reward.model_ref.version };
    let scored = ScoredRollout { rollout, raw_score: raw, score: reward.normalization.apply(raw), reward_model };
    Ok((scored, tokenization))
}
