//! The train/validation split shared by every reader.
//!
//! A record's side depends only on the SHA-256 digest of a key (a
//! document's text, an example's prompt), so it is the same on every run
//! and machine, whatever order the files are listed or read in. Records
//! with the same key always land on the same side, which keeps every
//! response to one prompt out of the held-out set or in it.
//!
//! The rule, to reproduce it in another language: read the first 8 bytes
//! of the digest as a big-endian `u64` and take it modulo 1,000,000. The
//! record is in validation when that bucket is below
//! `round(fraction * 1,000,000)`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::DataError;

/// Number of buckets the hash is reduced to, so fractions resolve to
/// one part per million.
pub const SPLIT_BUCKETS: u64 = 1_000_000;

/// The side of a train/validation split a record falls on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
}

impl Split {
    /// Hashes `key` with SHA-256 and assigns it a side.
    pub fn of_key(key: &[u8], fraction: ValidationFraction) -> Split {
        Split::of_digest(&Sha256::digest(key).into(), fraction)
    }

    /// Assigns a side from a SHA-256 digest that the caller already has.
    pub fn of_digest(digest: &[u8; 32], fraction: ValidationFraction) -> Split {
        if bucket_of_digest(digest) < fraction.threshold() {
            Split::Validation
        } else {
            Split::Train
        }
    }
}

/// Returns the bucket in `0..SPLIT_BUCKETS` that a digest falls into.
pub fn bucket_of_digest(digest: &[u8; 32]) -> u64 {
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(prefix) % SPLIT_BUCKETS
}

/// The share of records that go to validation, from 0 to 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationFraction {
    /// The fraction in parts per million, so comparisons stay exact.
    buckets: u64,
}

impl ValidationFraction {
    /// Every record goes to train.
    pub const NONE: ValidationFraction = ValidationFraction { buckets: 0 };

    /// Rejects values outside 0..=1 and NaN with [`DataError::InvalidFraction`].
    pub fn new(fraction: f64) -> Result<Self, DataError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(DataError::InvalidFraction { value: fraction });
        }
        let buckets = (fraction * SPLIT_BUCKETS as f64).round() as u64;
        Ok(ValidationFraction { buckets })
    }

    /// Returns the fraction as a number from 0 to 1.
    pub fn get(self) -> f64 {
        self.buckets as f64 / SPLIT_BUCKETS as f64
    }

    fn threshold(self) -> u64 {
        self.buckets
    }
}
