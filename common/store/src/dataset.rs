//! Append-only datasets: ordered segments of bytes (preference pairs, token
//! shards, rollouts), each with a caller-chosen id.
//!
//! Layout of dataset `<name>` under the store root, with sequence numbers
//! zero-padded to 20 digits so that keys sort in append order:
//!
//! ```text
//! datasets/<name>/slots/<seq>          claim of a sequence number; contains the segment id
//! datasets/<name>/segments/<seq>-<id>  the segment's bytes
//! datasets/<name>/ids/<id>             id marker; contains the sequence number it was appended at
//! ```
//!
//! An append first checks the id marker, then claims the next free sequence
//! number with a create-only write of its slot (moving up one number when
//! another appender holds it), writes the segment, and finally creates the
//! id marker, also create-only. Concurrent appenders therefore never share a
//! sequence number or overwrite each other's data.
//!
//! Readers list `segments/` and, when an id occurs more than once, keep only
//! its lowest sequence number. An id can occur twice in two ways: an
//! appender crashed after writing its segment but before its marker and the
//! append was retried, or two appenders raced with the same id. Either way
//! each id is read exactly once. A claimed slot whose segment was never
//! written leaves a gap in the numbering, which readers skip.
//!
//! NOTE: a reader that lists while a slow append is in flight can see a
//! higher sequence number before a lower one appears, so resuming "after
//! the last sequence number read" can miss that segment. A reader that must
//! not miss one keeps the ids it has read and lists from the start again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::error::{Result, StoreError};
use crate::key::{validate_name, ObjectKey};
use crate::store::Store;

/// Key prefix of every dataset.
pub const DATASETS_PREFIX: &str = "datasets";

/// Width of a zero-padded sequence number; `u64::MAX` has 20 digits.
const SEQ_DIGITS: usize = 20;
/// Slots an append tries to claim before it reports
/// [`StoreError::Contention`]; after each lost claim it re-lists the slots.
const MAX_APPEND_ATTEMPTS: u32 = 32;
/// Segment reads in flight at once while reading a dataset.
const MAX_READS_IN_FLIGHT: usize = 8;

/// A segment found by listing a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Sequence number, starting at 0; gaps are possible.
    pub seq: u64,
    /// The id given to `append`.
    pub id: String,
    /// Object key of the segment's bytes.
    pub key: ObjectKey,
    /// Size in bytes.
    pub size: u64,
}

/// A segment with its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Sequence number.
    pub seq: u64,
    /// The id given to `append`.
    pub id: String,
    /// The bytes given to `append`.
    pub data: Bytes,
}

/// Appends to and reads datasets in a [`Store`]. Clones share the cache of
/// next sequence numbers.
#[derive(Clone, Debug)]
pub struct Datasets {
    store: Store,
    /// Next sequence number to try per dataset, so that a busy appender does
    /// not list the slots before every append. A stale hint costs one lost
    /// claim and a listing.
    next_seq: Arc<Mutex<HashMap<String, u64>>>,
}

impl Datasets {
    /// Returns datasets kept in `store`.
    pub fn new(store: Store) -> Datasets {
        Datasets { store, next_seq: Arc::default() }
    }

    /// Returns the store the datasets are kept in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Appends `data` to `dataset` as segment `id` and returns where it went.
    ///
    /// Returns [`StoreError::DuplicateSegment`] when the dataset already
    /// contains `id`, so a redelivered message can be acknowledged without
    /// being counted twice. If two appends of one id race, one of them gets
    /// that error and readers still see the id once.
    pub async fn append(&self, dataset: &str, id: &str, data: impl Into<Bytes>) -> Result<SegmentInfo> {
        validate_name("dataset name", dataset)?;
        validate_name("segment id", id)?;
        let data = data.into();
        let marker = dataset_key(dataset, &format!("ids/{id}"))?;
        if let Some(seq) = self.read_marker(&marker).await? {
            return Err(StoreError::DuplicateSegment { dataset: dataset.to_string(), id: id.to_string(), seq });
        }

        let seq = self.claim_slot(dataset, id).await?;
        let key = segment_key(dataset, seq, id)?;
        let size = data.len() as u64;
        self.store.put(&key, data).await?;

        match self.store.put_new(&marker, seq.to_string()).await {
            Ok(()) => {}
            Err(StoreError::AlreadyExists { .. }) => {
                // Either a concurrent append of the same id created the
                // marker first, or the store applied this write before a
                // retry of it failed.
                let recorded = self.read_marker(&marker).await?.unwrap_or(seq);
                if recorded != seq {
                    tracing::info!(
                        dataset,
                        id,
                        seq,
                        recorded,
                        "segment id appended concurrently; readers keep the lower sequence number"
                    );
                    return Err(StoreError::DuplicateSegment {
                        dataset: dataset.to_string(),
                        id: id.to_string(),
                        seq: recorded,
                    });
                }
            }
            Err(error) => return Err(error),
        }
        tracing::debug!(dataset, id, seq, size, "appended segment");
        Ok(SegmentInfo { seq, id: id.to_string(), key, size })
    }

    /// Returns the sequence number at which `id` was appended to `dataset`,
    /// or `None` if it was not.
    pub async fn find(&self, dataset: &str, id: &str) -> Result<Option<u64>> {
        validate_name("dataset name", dataset)?;
        validate_name("segment id", id)?;
        self.read_marker(&dataset_key(dataset, &format!("ids/{id}"))?).await
    }

    /// Lists the names of datasets that hold at least one segment.
    pub async fn list_datasets(&self) -> Result<Vec<String>> {
        let prefix = ObjectKey::new(DATASETS_PREFIX)?;
        let mut names = BTreeSet::new();
        for object in self.store.list(Some(&prefix)).await? {
            let Some(rest) = object.key.strip_prefix(&prefix) else { continue };
            if let [name, "segments", segment] = rest.split('/').collect::<Vec<_>>()[..] {
                if parse_segment_name(segment).is_some() {
                    names.insert(name.to_string());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Lists the segments of `dataset` in sequence order, each id once (at
    /// its lowest sequence number). A dataset never appended to is empty.
    pub async fn list(&self, dataset: &str) -> Result<Vec<SegmentInfo>> {
        validate_name("dataset name", dataset)?;
        let prefix = dataset_key(dataset, "segments")?;
        let mut segments: Vec<SegmentInfo> = Vec::new();
        for object in self.store.list(Some(&prefix)).await? {
            let Some(name) = object.key.strip_prefix(&prefix) else { continue };
            if let Some((seq, id)) = parse_segment_name(name) {
                segments.push(SegmentInfo { seq, id: id.to_string(), key: object.key.clone(), size: object.size });
            }
        }
        // Keys sort by sequence number because it is zero-padded.
        segments.sort_by(|a, b| a.key.cmp(&b.key));

        let mut seen = HashSet::new();
        let before = segments.len();
        segments.retain(|segment| seen.insert(segment.id.clone()));
        if segments.len() < before {
            tracing::debug!(dataset, repeats = before - segments.len(), "skipped repeated segment ids");
        }
        Ok(segments)
    }

    /// Lists the segments of `dataset` with sequence numbers of at least
    /// `from_seq`, in order; an id already present below `from_seq` is not
    /// listed again.
    pub async fn list_from(&self, dataset: &str, from_seq: u64) -> Result<Vec<SegmentInfo>> {
        let mut segments = self.list(dataset).await?;
        segments.retain(|segment| segment.seq >= from_seq);
        Ok(segments)
    }

    /// Reads the bytes of one listed segment.
    pub async fn read(&self, segment: &SegmentInfo) -> Result<Bytes> {
        self.store.get(&segment.key).await
    }

    /// Reads every segment of `dataset` in order.
    pub async fn read_all(&self, dataset: &str) -> Result<Vec<Segment>> {
        self.read_from(dataset, 0).await
    }

    /// Reads the segments of `dataset` with sequence numbers of at least
    /// `from_seq`, in order (see [`Self::list_from`]).
    pub async fn read_from(&self, dataset: &str, from_seq: u64) -> Result<Vec<Segment>> {
        let listed = self.list_from(dataset, from_seq).await?;
        futures::stream::iter(listed)
            .map(|info| async move {
                let data = self.read(&info).await?;
                Ok(Segment { seq: info.seq, id: info.id, data })
            })
            .buffered(MAX_READS_IN_FLIGHT)
            .try_collect()
            .await
    }

    /// Claims the lowest free slot at or above the cached hint and returns
    /// its sequence number.
    async fn claim_slot(&self, dataset: &str, id: &str) -> Result<u64> {
        let hint = self.lock_hints().get(dataset).copied();
        let mut seq = match hint {
            Some(seq) => seq,
            None => self.next_free_slot(dataset).await?,
        };
        for _ in 0..MAX_APPEND_ATTEMPTS {
            match self.store.put_new(&slot_key(dataset, seq)?, id.to_string()).await {
                Ok(()) => {
                    self.lock_hints().insert(dataset.to_string(), seq + 1);
                    return Ok(seq);
                }
                Err(StoreError::AlreadyExists { .. }) => {
                    seq = self.next_free_slot(dataset).await?.max(seq + 1);
                }
                Err(error) => return Err(error),
            }
        }
        Err(StoreError::Contention { key: dataset_key(dataset, "slots")?.to_string(), attempts: MAX_APPEND_ATTEMPTS })
    }

    /// Returns one above the highest claimed slot, or 0 for a new dataset.
    async fn next_free_slot(&self, dataset: &str) -> Result<u64> {
        let prefix = dataset_key(dataset, "slots")?;
        let highest = self
            .store
            .list(Some(&prefix))
            .await?
            .iter()
            .filter_map(|object| parse_seq(object.key.strip_prefix(&prefix)?))
            .max();
        Ok(highest.map_or(0, |seq| seq + 1))
    }

    async fn read_marker(&self, marker: &ObjectKey) -> Result<Option<u64>> {
        let bytes = match self.store.get(marker).await {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(error),
        };
        let seq = std::str::from_utf8(&bytes).ok().and_then(|text| text.trim().parse().ok());
        match seq {
            Some(seq) => Ok(Some(seq)),
            None => Err(StoreError::InvalidObject {
                key: marker.to_string(),
                reason: "a segment id marker must hold a decimal sequence number".into(),
            }),
        }
    }

    fn lock_hints(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        // The map contains hints only, so one left by a panicking thread is
        // still usable.
        self.next_seq.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn dataset_key(dataset: &str, rest: &str) -> Result<ObjectKey> {
    ObjectKey::new(format!("{DATASETS_PREFIX}/{dataset}/{rest}"))
}

fn slot_key(dataset: &str, seq: u64) -> Result<ObjectKey> {
    dataset_key(dataset, &format!("slots/{seq:0width$}", width = SEQ_DIGITS))
}

fn segment_key(dataset: &str, seq: u64, id: &str) -> Result<ObjectKey> {
    dataset_key(dataset, &format!("segments/{seq:0width$}-{id}", width = SEQ_DIGITS))
}

/// Parses a canonical 20-digit sequence number.
fn parse_seq(text: &str) -> Option<u64> {
    if text.len() != SEQ_DIGITS || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Splits a segment object name `<seq>-<id>`.
fn parse_segment_name(name: &str) -> Option<(u64, &str)> {
    let (seq, id) = name.split_at_checked(SEQ_DIGITS)?;
    let id = id.strip_prefix('-')?;
    validate_name("segment id", id).ok()?;
    Some((parse_seq(seq)?, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        let key = segment_key("pairs", 42, "batch-7").unwrap();
        let name = key.file_name();
        assert_eq!(name, "00000000000000000042-batch-7");
        assert_eq!(parse_segment_name(name), Some((42, "batch-7")));
    }

    #[test]
    fn foreign_segment_names_ignored() {
        for name in [
            "42-x",
            "0000000000000000004x-y",
            "00000000000000000042",
            "00000000000000000042-",
            "00000000000000000042_x",
        ] {
            assert_eq!(parse_segment_name(name), None, "{name}");
        }
    }
}
