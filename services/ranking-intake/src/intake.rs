//! [`Intake`]: the state every ranking source shares, and the one path by
//! which a ranking is validated, converted to pairs and stored.
//!
//! The store is the source of truth. The in-memory index (candidate sets,
//! how often each was ranked, dataset totals) is rebuilt from the two
//! datasets when the intake opens. It is topped up from them when a lookup
//! misses or progress is requested, so replicas sharing one store agree.
//!
//! NOTE: the index keeps every candidate set it has seen in memory, texts
//! included; a run with hundreds of thousands of sets needs memory to match.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use troupe_bus::{BusError, BusHandle, Outgoing};
use troupe_store::{Datasets, Store, StoreError};
use troupe_wire::codec::now_ms;
use troupe_wire::{CandidateSet, ContentType, DeadLetter, Envelope, PreferenceUpdate, Ranking, RankingReceipt};

use crate::pairs::{check_against_set, check_shape, pairs_from_order, Rejection};
use crate::record::{segment_id, PreferenceRecord, Source};

/// Default name of the preference dataset in the store.
pub const DEFAULT_PREFERENCE_DATASET: &str = "preferences";
/// Default name of the dataset that keeps every received candidate set.
pub const DEFAULT_CANDIDATE_DATASET: &str = "candidate-sets";

/// Dataset names the intake writes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatasetNames {
    pub preferences: String,
    pub candidate_sets: String,
}

impl Default for DatasetNames {
    fn default() -> DatasetNames {
        DatasetNames {
            preferences: DEFAULT_PREFERENCE_DATASET.to_string(),
            candidate_sets: DEFAULT_CANDIDATE_DATASET.to_string(),
        }
    }
}

/// Errors a caller may retry: the ranking or set itself was fine, but the
/// store or the bus failed.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("store failure: {0}")]
    Store(#[from] StoreError),
    #[error("bus failure: {0}")]
    Bus(#[from] BusError),
    #[error("cannot encode {what} as JSON: {reason}")]
    Encode { what: String, reason: String },
}

/// State of a candidate set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetState {
    /// Not ranked yet and still open.
    Pending,
    /// Ranked at least once; it still takes rankings from other labelers
    /// until it expires.
    Ranked,
    /// Not ranked before its expiry time.
    Expired,
}

/// Counts for `troupe status` and the progress endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub sets_total: u64,
    pub sets_pending: u64,
    pub sets_ranked: u64,
    pub sets_expired: u64,
    /// Records (accepted rankings) in the preference dataset.
    pub records: u64,
    /// Preference pairs in those records.
    pub pairs: u64,
    /// Records per labeler id.
    pub records_by_labeler: BTreeMap<String, u64>,
}

/// A candidate set with its state, as listed for labelers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetView {
    pub state: SetState,
    /// Accepted rankings of this set so far.
    pub rankings: u32,
    pub set: CandidateSet,
}

/// The result of validating and storing one ranking.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The receipt sent to the submitter.
    pub receipt: RankingReceipt,
    /// Reason for the rejection; `None` when the ranking was accepted.
    pub rejection: Option<Rejection>,
}

struct SetEntry {
    set: Arc<CandidateSet>,
    rankings: u32,
}

#[derive(Default)]
struct Index {
    sets: HashMap<String, SetEntry>,
    /// Set ids in the order the intake first saw them.
    arrival: Vec<String>,
    /// Segment ids of candidate sets already read from the store.
    known_set_segments: HashSet<String>,
    /// Segment ids of preference records already read or written.
    known_records: HashSet<String>,
    records: u64,
    pairs: u64,
    records_by_labeler: BTreeMap<String, u64>,
}

impl Index {
    fn insert_set(&mut self, set: CandidateSet) {
        if self.sets.contains_key(&set.set_id) {
            return;
        }
        self.arrival.push(set.set_id.clone());
        self.sets.insert(set.set_id.clone(), SetEntry { set: Arc::new(set), rankings: 0 });
    }

    fn count_record(&mut self, set_id: &str, labeler: &str, pairs: usize) {
        self.records += 1;
        self.pairs += pairs as u64;
        *self.records_by_labeler.entry(labeler.to_string()).or_default() += 1;
        if let Some(entry) = self.sets.get_mut(set_id) {
            entry.rankings += 1;
        }
    }

    fn state(entry: &SetEntry, now_ms: i64) -> SetState {
        if entry.rankings > 0 {
            SetState::Ranked
        } else if entry.set.expires_at_ms.is_some_and(|expires| now_ms > expires) {
            SetState::Expired
        } else {
            SetState::Pending
        }
    }
}

/// The ranking intake's shared state. Clones share it.
#[derive(Clone)]
pub struct Intake {
    inner: Arc<Inner>,
}

struct Inner {
    bus: BusHandle,
    datasets: Datasets,
    names: DatasetNames,
    /// Held across each store append, so counts and duplicate checks of one
    /// process never interleave. Rankings arrive at human speed, so one
    /// writer at a time is not a bottleneck.
    index: Mutex<Index>,
}

impl Intake {
    /// Opens the intake on `store` and rebuilds its index from the datasets there.
    pub async fn open(bus: BusHandle, store: Store, names: DatasetNames) -> Result<Intake, IntakeError> {
        let intake = Intake {
            inner: Arc::new(Inner { bus, datasets: Datasets::new(store), names, index: Mutex::new(Index::default()) }),
        };
        {
            let mut index = intake.inner.index.lock().await;
            intake.sync(&mut index).await?;
            tracing::info!(
                sets = index.sets.len(),
                records = index.records,
                pairs = index.pairs,
                preferences = %intake.inner.names.preferences,
                candidate_sets = %intake.inner.names.candidate_sets,
                "intake index loaded from the store"
            );
        }
        Ok(intake)
    }

    /// Returns the bus that receives receipts, updates and dead letters.
    pub fn bus(&self) -> &BusHandle {
        &self.inner.bus
    }

    /// Dataset names in the store.
    pub fn dataset_names(&self) -> &DatasetNames {
        &self.inner.names
    }

    /// Stores a candidate set and starts tracking it. Returns false when a
    /// set with this id was stored before; the first one stays.
    pub async fn add_candidate_set(&self, set: CandidateSet) -> Result<bool, IntakeError> {
        let mut index = self.inner.index.lock().await;
        let segment = segment_id(&set.set_id);
        let bytes = serde_json::to_vec(&set)
            .map_err(|err| IntakeError::Encode { what: format!("candidate set {}", set.set_id), reason: err.to_string() })?;
        let added = match self.inner.datasets.append(&self.inner.names.candidate_sets, &segment, bytes).await {
            Ok(_) => true,
            Err(StoreError::DuplicateSegment { .. }) => false,
            Err(err) => return Err(err.into()),
        };
        index.known_set_segments.insert(segment);
        if added {
            index.insert_set(set);
        } else if !index.sets.contains_key(&set.set_id) {
            // Stored by another replica or an earlier run; read the stored copy.
            self.sync(&mut index).await?;
        }
        Ok(added)
    }

    /// Returns a set and its state, reading the store when the index misses it.
    pub async fn set(&self, set_id: &str) -> Result<Option<SetView>, IntakeError> {
        let mut index = self.inner.index.lock().await;
        if !index.sets.contains_key(set_id) {
            self.sync(&mut index).await?;
        }
        let now = now_ms();
        Ok(index.sets.get(set_id).map(|entry| SetView {
            state: Index::state(entry, now),
            rankings: entry.rankings,
            set: entry.set.as_ref().clone(),
        }))
    }

    /// Lists up to `limit` pending sets, oldest first, for `troupe rank` and the web page.
    pub async fn pending(&self, limit: usize) -> Result<Vec<CandidateSet>, IntakeError> {
        let mut index = self.inner.index.lock().await;
        self.sync(&mut index).await?;
        let now = now_ms();
        Ok(index
            .arrival
            .iter()
            .filter_map(|set_id| index.sets.get(set_id))
            .filter(|entry| Index::state(entry, now) == SetState::Pending)
            .take(limit)
            .map(|entry| entry.set.as_ref().clone())
            .collect())
    }

    /// Counts sets by state and the preference dataset's records and pairs.
    pub async fn progress(&self) -> Result<Progress, IntakeError> {
        let mut index = self.inner.index.lock().await;
        self.sync(&mut index).await?;
        let now = now_ms();
        let mut progress = Progress {
            sets_total: index.sets.len() as u64,
            records: index.records,
            pairs: index.pairs,
            records_by_labeler: index.records_by_labeler.clone(),
            ..Progress::default()
        };
        for entry in index.sets.values() {
            match Index::state(entry, now) {
                SetState::Pending => progress.sets_pending += 1,
                SetState::Ranked => progress.sets_ranked += 1,
                SetState::Expired => progress.sets_expired += 1,
            }
        }
        Ok(progress)
    }

    /// Validates `ranking`, stores it and announces it, then publishes the
    /// receipt on the receipts subject. A rejection is also recorded on the
    /// dead-letter subject. The caller returns the
    /// receipt to the submitter (HTTP body, terminal).
    ///
    /// For rankings that arrive on the bus, the bus worker uses
    /// [`Intake::decide`] and settles the delivery itself.
    pub async fn submit(&self, ranking: Ranking, source: Source) -> Result<RankingReceipt, IntakeError> {
        self.submit_at(ranking, source, now_ms()).await
    }

    /// Like [`Intake::submit`], for a ranking made at `ranked_at_ms` (ms since
    /// the epoch), such as an offline label with its own time.
    pub async fn submit_at(&self, ranking: Ranking, source: Source, ranked_at_ms: i64) -> Result<RankingReceipt, IntakeError> {
        let payload = serde_json::to_vec(&ranking)
            .map_err(|err| IntakeError::Encode { what: format!("ranking {}", ranking.ranking_id), reason: err.to_string() })?;
        let verdict = self.decide(ranking, source, ranked_at_ms).await?;
        self.publish_receipt(&verdict.receipt).await;
        if let Some(rejection) = &verdict.rejection {
            let message_id = Some(verdict.receipt.ranking_id.clone()).filter(|id| !id.is_empty());
            self.publish_dead_letter(source, message_id, &rejection.to_string(), payload).await;
        }
        Ok(verdict.receipt)
    }

    /// Records input that did not even parse as a ranking (a bad HTTP body,
    /// a JSONL line that is not JSON) on the dead-letter subject.
    pub(crate) async fn reject_unparsed(&self, source: Source, reason: &str, payload: Vec<u8>) {
        metrics::counter!("troupe_ranking_intake_rankings_total", "outcome" => "rejected", "reason" => "malformed", "source" => source.as_str()).increment(1);
        tracing::info!(source = source.as_str(), reason, "input rejected, not a ranking");
        self.publish_dead_letter(source, None, reason, payload).await;
    }

    /// Validates `ranking` and, if it is valid and new, appends its record
    /// to the preference dataset and publishes a [`PreferenceUpdate`].
    ///
    /// A ranking id stored before is reported as an accepted duplicate and
    /// not stored again, even when the set has expired since. A rejected
    /// ranking leaves the store unchanged.
    pub async fn decide(&self, ranking: Ranking, source: Source, ranked_at_ms: i64) -> Result<Verdict, IntakeError> {
        let mut receipt = RankingReceipt {
            ranking_id: ranking.ranking_id.clone(),
            set_id: ranking.set_id.clone(),
            accepted: false,
            reason: None,
            pairs: 0,
            duplicate: false,
        };
        let rejected = |mut receipt: RankingReceipt, rejection: Rejection| {
            metrics::counter!("troupe_ranking_intake_rankings_total", "outcome" => "rejected", "reason" => rejection.kind(), "source" => source.as_str()).increment(1);
            tracing::info!(ranking_id = %receipt.ranking_id, set_id = %receipt.set_id, source = source.as_str(), reason = %rejection, "ranking rejected");
            receipt.reason = Some(rejection.to_string());
            Ok(Verdict { receipt, rejection: Some(rejection) })
        };
        if let Err(rejection) = check_shape(&ranking) {
            return rejected(receipt, rejection);
        }
        let pairs = pairs_from_order(&ranking.order);
        let pair_count = u32::try_from(pairs.len()).unwrap_or(u32::MAX);

        let mut index = self.inner.index.lock().await;
        let segment = segment_id(&ranking.ranking_id);
        let duplicate = index.known_records.contains(&segment)
            || self.inner.datasets.find(&self.inner.names.preferences, &segment).await?.is_some();
        if duplicate {
            return Ok(self.duplicate(receipt, pair_count, source));
        }

        if !index.sets.contains_key(&ranking.set_id) {
            self.sync(&mut index).await?;
        }
        let Some(entry) = index.sets.get(&ranking.set_id) else {
            return rejected(receipt, Rejection::UnknownSet { set_id: ranking.set_id.clone() });
        };
        let set = Arc::clone(&entry.set);
        if let Err(rejection) = check_against_set(&ranking, &set, now_ms()) {
            return rejected(receipt, rejection);
        }

        let record = PreferenceRecord::new(&set, &ranking, pairs, source, ranked_at_ms, now_ms());
        let bytes = serde_json::to_vec(&record)
            .map_err(|err| IntakeError::Encode { what: format!("record {}", record.ranking_id), reason: err.to_string() })?;
        match self.inner.datasets.append(&self.inner.names.preferences, &segment, bytes).await {
            Ok(_) => {}
            Err(StoreError::DuplicateSegment { .. }) => {
                index.known_records.insert(segment);
                return Ok(self.duplicate(receipt, pair_count, source));
            }
            Err(err) => return Err(err.into()),
        }
        index.known_records.insert(segment);
        index.count_record(&ranking.set_id, &ranking.labeler, record.pairs.len());
        let update = PreferenceUpdate {
            dataset: self.inner.names.preferences.clone(),
            record_id: ranking.ranking_id.clone(),
            set_id: ranking.set_id.clone(),
            labeler: ranking.labeler.clone(),
            pairs: pair_count,
            total_records: index.records,
            total_pairs: index.pairs,
        };
        drop(index);

        metrics::counter!("troupe_ranking_intake_rankings_total", "outcome" => "accepted", "reason" => "", "source" => source.as_str()).increment(1);
        metrics::counter!("troupe_ranking_intake_pairs_total").increment(u64::from(pair_count));
        tracing::info!(ranking_id = %ranking.ranking_id, set_id = %ranking.set_id, labeler = %ranking.labeler, source = source.as_str(), pairs = pair_count, "ranking stored");
        self.publish_update(update).await;

        receipt.accepted = true;
        receipt.pairs = pair_count;
        Ok(Verdict { receipt, rejection: None })
    }

    fn duplicate(&self, mut receipt: RankingReceipt, pairs: u32, source: Source) -> Verdict {
        metrics::counter!("troupe_ranking_intake_rankings_total", "outcome" => "duplicate", "reason" => "", "source" => source.as_str()).increment(1);
        tracing::info!(ranking_id = %receipt.ranking_id, set_id = %receipt.set_id, source = source.as_str(), "ranking already stored, not stored again");
        receipt.accepted = true;
        receipt.duplicate = true;
        receipt.pairs = pairs;
        Verdict { receipt, rejection: None }
    }

    /// Publishes a receipt on the receipts subject. A failure is logged and
    /// counted: the receipt is a notice, and the ranking's fate is already
    /// settled in the store.
    pub(crate) async fn publish_receipt(&self, receipt: &RankingReceipt) {
        let bus = &self.inner.bus;
        let subject = bus.subjects().receipts();
        let envelope = Envelope::new(bus.subjects().run().as_str(), receipt.clone());
        if let Err(err) = bus.publish(&subject, &envelope).await {
            metrics::counter!("troupe_ranking_intake_publish_failures_total", "subject" => "receipts").increment(1);
            tracing::warn!(error = %err, ranking_id = %receipt.ranking_id, %subject, "publishing a receipt failed");
        }
    }

    async fn publish_update(&self, update: PreferenceUpdate) {
        let bus = &self.inner.bus;
        let subject = bus.subjects().preferences();
        let id = format!("preference-{}", segment_id(&update.record_id));
        let envelope = Envelope::with_id(bus.subjects().run().as_str(), id, now_ms(), update);
        if let Err(err) = bus.publish(&subject, &envelope).await {
            // Trainers list the dataset itself, so a lost notice delays them
            // until the next one and loses no data.
            metrics::counter!("troupe_ranking_intake_publish_failures_total", "subject" => "preferences").increment(1);
            tracing::warn!(error = %err, record_id = %envelope.payload.record_id, %subject, "publishing a preference update failed");
        }
    }

    /// Records a ranking rejected outside the bus on the dead-letter
    /// subject, as a bus consumer's rejection would be.
    async fn publish_dead_letter(&self, source: Source, message_id: Option<String>, reason: &str, payload: Vec<u8>) {
        let bus = &self.inner.bus;
        let subject = bus.subjects().dead();
        let letter = DeadLetter {
            subject: bus.subjects().rankings(),
            message_id: message_id.clone(),
            consumer: format!("ranking-intake-{}", source.as_str()),
            reason: reason.to_string(),
            delivered: 1,
            content_type: Some(ContentType::Json.as_header().to_string()),
            payload,
        };
        let envelope = Envelope::new(bus.subjects().run().as_str(), letter);
        let published = match Outgoing::encode(&subject, &envelope, ContentType::MessagePack) {
            Ok(outgoing) => bus.publish_durable_raw(&subject, outgoing).await.map(|_| ()),
            Err(err) => Err(err),
        };
        if let Err(err) = published {
            metrics::counter!("troupe_ranking_intake_publish_failures_total", "subject" => "dead").increment(1);
            tracing::warn!(error = %err, message_id = message_id.as_deref().unwrap_or("-"), %subject, "publishing a dead letter failed");
        }
    }

    /// Reads the segments of both datasets that the index has not seen.
    /// Undecodable segments are logged, counted and skipped.
    async fn sync(&self, index: &mut Index) -> Result<(), IntakeError> {
        let datasets = &self.inner.datasets;
        let names = &self.inner.names;
        for info in datasets.list(&names.candidate_sets).await? {
            if index.known_set_segments.contains(&info.id) {
                continue;
            }
            let bytes = datasets.read(&info).await?;
            match serde_json::from_slice::<CandidateSet>(&bytes) {
                Ok(set) => index.insert_set(set),
                Err(err) => warn_undecodable(info.key.as_ref(), &err.to_string()),
            }
            index.known_set_segments.insert(info.id);
        }
        for info in datasets.list(&names.preferences).await? {
            if index.known_records.contains(&info.id) {
                continue;
            }
            let bytes = datasets.read(&info).await?;
            match serde_json::from_slice::<PreferenceRecord>(&bytes) {
                Ok(record) => index.count_record(&record.set_id, &record.labeler, record.pairs.len()),
                Err(err) => warn_undecodable(info.key.as_ref(), &err.to_string()),
            }
            index.known_records.insert(info.id);
        }
        Ok(())
    }
}

fn warn_undecodable(key: &str, reason: &str) {
    metrics::counter!("troupe_ranking_intake_undecodable_segments_total").increment(1);
    tracing::warn!(key, reason, "stored segment does not decode, skipped");
}

/// Reads every record of a preference dataset in append order, for
/// reward-model trainers and reports.
pub async fn read_preference_records(store: &Store, dataset: &str) -> Result<Vec<PreferenceRecord>, IntakeError> {
    let datasets = Datasets::new(store.clone());
    let mut records = Vec::new();
    for segment in datasets.read_all(dataset).await? {
        let record = serde_json::from_slice::<PreferenceRecord>(&segment.data).map_err(|err| {
            StoreError::InvalidObject { key: format!("datasets/{dataset}/segments/{}", segment.id), reason: err.to_string() }
        })?;
        records.push(record);
    }
    Ok(records)
}
