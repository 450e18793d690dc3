//! The labeler's preference: a score per candidate from a few weighted
//! rules, and the ranking those scores imply.
//!
//! Each rule adds its weight to a candidate's score when it holds:
//!
//! | rule | holds when |
//! | --- | --- |
//! | `eos` | generation stopped at the end-of-sequence token (`finish_reason` is `eos`) |
//! | `length` | the candidate has at most `max_tokens` tokens |
//! | `reference` | the candidate's text contains the prompt's reference answer, ignoring case |
//!
//! A rule with weight 0 is off. Candidates with equal scores are tied. These
//! functions are pure, so the PPO evaluation can measure a policy with the
//! same rule that labeled its reward model's data.

use serde::{Deserialize, Serialize};
use troupe_wire::{Candidate, CandidateSet, FinishReason};

/// Weights and limits of the scripted preference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preference {
    /// Added when generation stopped at the end-of-sequence token.
    pub eos_weight: f64,
    /// Added when the candidate has at most `max_tokens` tokens.
    pub length_weight: f64,
    /// Length limit of the `length` rule, in tokens.
    pub max_tokens: u32,
    /// Added when the text contains the reference answer, ignoring case.
    /// Prompts without a reference never earn it.
    pub reference_weight: f64,
}

impl Default for Preference {
    /// Reference answer first, then stopping at EOS, then brevity
    /// (at most 64 tokens).
    fn default() -> Preference {
        Preference { eos_weight: 1.0, length_weight: 0.5, max_tokens: 64, reference_weight: 2.0 }
    }
}

impl Preference {
    /// Returns every problem with the weights, so settings can report all at once.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, weight) in
            [("eos weight", self.eos_weight), ("length weight", self.length_weight), ("reference weight", self.reference_weight)]
        {
            if !weight.is_finite() || weight < 0.0 {
                problems.push(format!("{name} {weight} must be a finite number >= 0"));
            }
        }
        if self.eos_weight == 0.0 && self.length_weight == 0.0 && self.reference_weight == 0.0 {
            problems.push("every weight is 0, so every candidate would tie; set at least one above 0".to_string());
        }
        problems
    }
}

/// Scores one response under `preference`; higher is better.
///
/// `reference` is the prompt's known good answer, if any. An empty or
/// whitespace-only reference counts as none.
pub fn score_response(
    preference: &Preference,
    text: &str,
    finish_reason: FinishReason,
    token_count: u32,
    reference: Option<&str>,
) -> f64 {
    let mut score = 0.0;
    if finish_reason == FinishReason::Eos {
        score += preference.eos_weight;
    }
    if token_count <= preference.max_tokens {
        score += preference.length_weight;
    }
    if let Some(reference) = reference.map(str::trim).filter(|reference| !reference.is_empty()) {
        if text.to_lowercase().contains(&reference.to_lowercase()) {
            score += preference.reference_weight;
        }
    }
    score
}

/// Scores one candidate of a set; see [`score_response`].
pub fn score_candidate(preference: &Preference, candidate: &Candidate, reference: Option<&str>) -> f64 {
    score_response(preference, &candidate.text, candidate.finish_reason, candidate.token_count, reference)
}

/// Ranks the candidates of `set`: groups of candidate ids, best first, with
/// equal scores in one group (tied). Ids keep their order in the set inside
/// a group.
///
/// Returns `None` when every candidate has the same score, because such a
/// ranking holds no preference and would produce no pairs.
pub fn rank(preference: &Preference, set: &CandidateSet) -> Option<Vec<Vec<String>>> {
    let reference = set.reference.as_deref();
    let mut scored: Vec<(f64, &str)> = set
        .candidates
        .iter()
        .map(|candidate| (score_candidate(preference, candidate, reference), candidate.candidate_id.as_str()))
        .collect();
    // A stable sort keeps the set's order among equal scores.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));

    let mut order: Vec<Vec<String>> = Vec::new();
    let mut group_score = None;
    for (score, id) in scored {
        match order.last_mut() {
            Some(group) if group_score == Some(score) => group.push(id.to_string()),
            _ => {
                order.push(vec![id.to_string()]);
                group_score = Some(score);
            }
        }
    }
    if order.len() < 2 {
        return None;
    }
    Some(order)
}
