//! Ranking validation and the conversion of a ranking into preference
//! pairs. Pure functions: no bus, no store.
//!
//! A ranking's `order` lists groups of candidate ids best first, and ids in
//! one group are tied. Every candidate in an earlier group is preferred over
//! every candidate in a later group, so the pairs are all ordered pairs
//! between different groups: C(k,2) for a full order of k candidates, fewer
//! when there are ties (tied candidates are never paired) or when the
//! ranking leaves candidates out.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use troupe_wire::{CandidateSet, Ranking};

/// One preference: `chosen` is better than `rejected` (candidate ids).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PairIds {
    pub chosen: String,
    pub rejected: String,
}

/// Why a ranking was rejected. The message is sent back to the submitter
/// and recorded on the dead-letter subject.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("missing ranking_id; every ranking needs a unique id, such as a UUID")]
    MissingRankingId,
    #[error("missing labeler; say who ranked (a person's id or a tool's name)")]
    MissingLabeler,
    #[error("missing set_id; name the candidate set that was ranked")]
    MissingSetId,
    #[error("order has {groups} group(s); a ranking needs at least two groups, best first, e.g. [[\"A\"], [\"B\"]]")]
    TooFewGroups { groups: usize },
    #[error("order has an empty group at position {position}; remove it")]
    EmptyGroup { position: usize },
    #[error("candidate id {id:?} appears twice in the order; list each candidate once")]
    DuplicateCandidate { id: String },
    #[error("unknown candidate set {set_id:?}; rank a set that was published on the candidates subject")]
    UnknownSet { set_id: String },
    #[error("candidate set {set_id:?} expired at {expires_at_ms} ms since the epoch and takes no more rankings")]
    ExpiredSet { set_id: String, expires_at_ms: i64 },
    #[error("candidate id {id:?} is not in set {set_id:?}, whose candidates are {known:?}")]
    UnknownCandidate { id: String, set_id: String, known: Vec<String> },
    #[error("the message is not a valid ranking: {reason}")]
    Malformed { reason: String },
}

impl Rejection {
    /// A short name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::MissingRankingId => "missing_ranking_id",
            Rejection::MissingLabeler => "missing_labeler",
            Rejection::MissingSetId => "missing_set_id",
            Rejection::TooFewGroups { .. } => "too_few_groups",
            Rejection::EmptyGroup { .. } => "empty_group",
            Rejection::DuplicateCandidate { .. } => "duplicate_candidate",
            Rejection::UnknownSet { .. } => "unknown_set",
            Rejection::ExpiredSet { .. } => "expired_set",
            Rejection::UnknownCandidate { .. } => "unknown_candidate",
            Rejection::Malformed { .. } => "malformed",
        }
    }
}

/// Checks the parts of a ranking that need no candidate set: ids present,
/// at least two non-empty groups, no candidate id twice.
pub fn check_shape(ranking: &Ranking) -> Result<(), Rejection> {
    if ranking.ranking_id.trim().is_empty() {
        return Err(Rejection::MissingRankingId);
    }
    if ranking.labeler.trim().is_empty() {
        return Err(Rejection::MissingLabeler);
    }
    if ranking.set_id.trim().is_empty() {
        return Err(Rejection::MissingSetId);
    }
    if ranking.order.len() < 2 {
        return Err(Rejection::TooFewGroups { groups: ranking.order.len() });
    }
    let mut seen = BTreeSet::new();
    for (position, group) in ranking.order.iter().enumerate() {
        if group.is_empty() {
            return Err(Rejection::EmptyGroup { position });
        }
        for id in group {
            if !seen.insert(id.as_str()) {
                return Err(Rejection::DuplicateCandidate { id: id.clone() });
            }
        }
    }
    Ok(())
}

/// Checks `ranking` against the set it ranks: the set has not expired at
/// `now_ms` and every id in the order is one of its candidates.
pub fn check_against_set(ranking: &Ranking, set: &CandidateSet, now_ms: i64) -> Result<(), Rejection> {
    if let Some(expires_at_ms) = set.expires_at_ms {
        if now_ms > expires_at_ms {
            return Err(Rejection::ExpiredSet { set_id: set.set_id.clone(), expires_at_ms });
        }
    }
    let known: BTreeSet<&str> = set.candidates.iter().map(|candidate| candidate.candidate_id.as_str()).collect();
    for id in ranking.order.iter().flatten() {
        if !known.contains(id.as_str()) {
            return Err(Rejection::UnknownCandidate {
                id: id.clone(),
                set_id: set.set_id.clone(),
                known: set.candidates.iter().map(|candidate| candidate.candidate_id.clone()).collect(),
            });
        }
    }
    Ok(())
}

/// Returns every ordered pair between different groups of `order`, better
/// candidate first, in group order. Tied candidates are not paired.
pub fn pairs_from_order(order: &[Vec<String>]) -> Vec<PairIds> {
    let mut pairs = Vec::new();
    for (position, better_group) in order.iter().enumerate() {
        for worse_group in &order[position + 1..] {
            for chosen in better_group {
                for rejected in worse_group {
                    pairs.push(PairIds { chosen: chosen.clone(), rejected: rejected.clone() });
                }
            }
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(groups: &[&[&str]]) -> Vec<Vec<String>> {
        groups.iter().map(|group| group.iter().map(|id| id.to_string()).collect()).collect()
    }

    #[test]
    fn tie_pairs_in_group_order() {
        let pairs = pairs_from_order(&order(&[&["D"], &["C", "A"], &["B"]]));
        let as_text: Vec<String> = pairs.iter().map(|pair| format!("{}>{}", pair.chosen, pair.rejected)).collect();
        assert_eq!(as_text, ["D>C", "D>A", "D>B", "C>B", "A>B"]);
    }
}
