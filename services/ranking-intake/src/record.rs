//! What the intake writes to the store: one [`PreferenceRecord`] per
//! accepted ranking in the preference dataset, and every candidate set it
//! received in the candidate-set dataset, each segment one JSON object.
//!
//! A record keeps the pairs of one prompt together, so a reward-model
//! trainer can batch them as one example and split train from held-out by
//! prompt. Records carry the candidate texts, so the dataset needs no other
//! object to be read.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use troupe_wire::{CandidateSet, FinishReason, ModelRef, Ranking};

use crate::pairs::PairIds;

/// Version of the [`PreferenceRecord`] layout; bumped on any change that an
/// older reader would misread.
pub const RECORD_SCHEMA_VERSION: u16 = 1;

/// Longest segment id the store accepts, in bytes.
const MAX_SEGMENT_ID_BYTES: usize = 128;

/// Where a ranking came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The built-in web page.
    Web,
    /// The rankings subject on the bus (external tools, the scripted labeler).
    Bus,
    /// `troupe rank` in a terminal, or another caller of the library API.
    Cli,
    /// An offline JSONL file.
    Jsonl,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Web => "web",
            Source::Bus => "bus",
            Source::Cli => "cli",
            Source::Jsonl => "jsonl",
        }
    }
}

/// One candidate as stored with a record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordCandidate {
    pub candidate_id: String,
    pub text: String,
    pub finish_reason: FinishReason,
    pub token_count: u32,
}

/// One accepted ranking of one prompt's candidates: the training example of
/// the reward model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreferenceRecord {
    /// Equal to [`RECORD_SCHEMA_VERSION`] when written.
    pub schema: u16,
    pub ranking_id: String,
    pub set_id: String,
    pub prompt_id: String,
    pub prompt: String,
    pub reference: Option<String>,
    /// Every candidate of the set, ranked or not, in the set's order.
    pub candidates: Vec<RecordCandidate>,
    /// The ranking as submitted: groups best first, ties inside a group.
    pub order: Vec<Vec<String>>,
    /// Every ordered pair between different groups, better candidate first.
    pub pairs: Vec<PairIds>,
    pub labeler: String,
    pub note: Option<String>,
    /// The policy version every candidate came from.
    pub policy: ModelRef,
    pub source: Source,
    /// When the submitter made the ranking, in ms since the epoch (the
    /// envelope time for bus messages, the arrival time otherwise).
    pub ranked_at_ms: i64,
    /// When the intake stored the record, in ms since the epoch.
    pub stored_at_ms: i64,
}

impl PreferenceRecord {
    /// Builds the record of an accepted `ranking` of `set`.
    pub fn new(
        set: &CandidateSet,
        ranking: &Ranking,
        pairs: Vec<PairIds>,
        source: Source,
        ranked_at_ms: i64,
        stored_at_ms: i64,
    ) -> PreferenceRecord {
        PreferenceRecord {
            schema: RECORD_SCHEMA_VERSION,
            ranking_id: ranking.ranking_id.clone(),
            set_id: set.set_id.clone(),
            prompt_id: set.prompt_id.clone(),
            prompt: set.prompt.clone(),
            reference: set.reference.clone(),
            candidates: set
                .candidates
                .iter()
                .map(|candidate| RecordCandidate {
                    candidate_id: candidate.candidate_id.clone(),
                    text: candidate.text.clone(),
                    finish_reason: candidate.finish_reason,
                    token_count: candidate.token_count,
                })
                .collect(),
            order: ranking.order.clone(),
            pairs,
            labeler: ranking.labeler.clone(),
            note: ranking.note.clone(),
            policy: set.policy.clone(),
            source,
            ranked_at_ms,
            stored_at_ms,
        }
    }

    /// Returns the text of a candidate by id.
    pub fn candidate_text(&self, candidate_id: &str) -> Option<&str> {
        self.candidates.iter().find(|candidate| candidate.candidate_id == candidate_id).map(|c| c.text.as_str())
    }

    /// Returns each pair as (chosen text, rejected text).
    pub fn text_pairs(&self) -> Vec<(&str, &str)> {
        self.pairs
            .iter()
            .filter_map(|pair| Some((self.candidate_text(&pair.chosen)?, self.candidate_text(&pair.rejected)?)))
            .collect()
    }
}

/// Returns the segment id under which a ranking or set id is stored.
///
/// Ids that already follow the store's naming rules (ASCII letters, digits,
/// `-`, `_`, `.`, starting with a letter or digit, at most 128 bytes) are
/// used as they are. Any other id is replaced by `sha256-` and the hex
/// SHA-256 of its UTF-8 bytes, which is stable, so duplicate detection
/// works for every id an external tool may choose.
pub fn segment_id(id: &str) -> String {
    let usable = !id.is_empty()
        && id.len() <= MAX_SEGMENT_ID_BYTES
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if usable {
        return id.to_string();
    }
    format!("sha256-{}", hex::encode(Sha256::digest(id.as_bytes())))
}
