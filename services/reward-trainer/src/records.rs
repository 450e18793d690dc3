//! Reads the preference records that the ranking intake appends to a
//! dataset, one JSON object per segment.
//!
//! Only the fields the trainer uses are declared; serde skips the rest, so
//! this reader keeps working when the intake adds fields. The layout is
//! `PreferenceRecord` in `troupe-ranking-intake` (record schema 1), and a
//! test in this crate writes records with that type and reads them here.

use serde::Deserialize;
use troupe_store::{Datasets, Store, DATASETS_PREFIX};
use troupe_wire::FinishReason;

use crate::RewardError;

/// Newest record schema this reader understands.
pub const MAX_RECORD_SCHEMA: u16 = 1;

/// One accepted ranking of one candidate set.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct StoredRecord {
    pub schema: u16,
    pub ranking_id: String,
    pub prompt: String,
    pub candidates: Vec<StoredCandidate>,
    /// Groups of candidate ids, best first; ids in one group are tied.
    pub order: Vec<Vec<String>>,
    /// Ordered pairs between different groups, better candidate first.
    pub pairs: Vec<StoredPair>,
}

/// One candidate of a record.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct StoredCandidate {
    pub candidate_id: String,
    pub text: String,
    pub finish_reason: FinishReason,
}

/// One preference between two candidate ids.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct StoredPair {
    pub chosen: String,
    pub rejected: String,
}

/// How much of a dataset a run read: enough to read exactly the same
/// records again, because datasets only grow.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct DatasetSnapshot {
    pub dataset: String,
    /// Records read.
    pub records: u64,
    /// Sequence number of the last segment read; 0 when the dataset is empty.
    pub last_seq: u64,
}

/// Reads the records of `dataset` up to segment `up_to_seq` (all of them
/// when `None`), with the snapshot that names what was read.
pub async fn read_records(
    store: &Store,
    dataset: &str,
    up_to_seq: Option<u64>,
) -> Result<(Vec<StoredRecord>, DatasetSnapshot), RewardError> {
    let datasets = Datasets::new(store.clone());
    let mut records = Vec::new();
    let mut last_seq = 0;
    for segment in datasets.read_all(dataset).await? {
        if up_to_seq.is_some_and(|limit| segment.seq > limit) {
            break;
        }
        let key = format!("{DATASETS_PREFIX}/{dataset}, segment {} (id {})", segment.seq, segment.id);
        let record: StoredRecord = serde_json::from_slice(&segment.data).map_err(|error| RewardError::Record {
            key: key.clone(),
            reason: format!("not a preference record: {error}"),
        })?;
        if record.schema > MAX_RECORD_SCHEMA {
            return Err(RewardError::Record {
                key,
                reason: format!(
                    "record schema {} is newer than this trainer reads ({MAX_RECORD_SCHEMA}); upgrade troupe",
                    record.schema
                ),
            });
        }
        last_seq = segment.seq;
        records.push(record);
    }
    let snapshot = DatasetSnapshot { dataset: dataset.to_string(), records: records.len() as u64, last_seq };
    Ok((records, snapshot))
}
