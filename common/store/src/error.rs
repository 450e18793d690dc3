//! The error type of every store operation.
//!
//! Each variant matches one thing a caller can do next. After
//! `AlreadyExists` or `DuplicateSegment` it picks another name or version,
//! or treats the work as done. After `ChecksumMismatch`, `SizeMismatch`,
//! `InvalidManifest` or `InvalidObject` it restores or republishes the
//! damaged object. After `InvalidKey`, `InvalidName`, `InvalidUrl` or
//! `InvalidConfig` it fixes its input. After `Contention`, or `Backend`
//! when the store was unreachable, it retries later.
//! Keys in messages are relative to the root of the store the caller opened.

use std::path::PathBuf;

use crate::config::ConfigError;

/// Result type of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An error from the object store, the model registry or a dataset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The object does not exist. For a model version this also covers a
    /// version whose publisher has not written its manifest yet.
    #[error("{resource} not found: object `{key}` does not exist")]
    NotFound {
        /// Object key that was looked up.
        key: String,
        /// Description of the requested resource, such as "model version tiny@3".
        resource: String,
    },

    /// A create-only write found the object already there, so another writer
    /// got there first.
    #[error(
        "{resource} already exists at `{key}`; another writer created it first, so load that one or choose another"
    )]
    AlreadyExists {
        /// Object key of the existing object.
        key: String,
        /// Description of the resource the caller tried to create.
        resource: String,
    },

    /// A dataset already contains a segment with this id, so the data of this
    /// append is stored already and the append can be treated as done.
    #[error("dataset `{dataset}` already holds segment `{id}` (appended as sequence number {seq}); the data is stored, so treat this append as done")]
    DuplicateSegment {
        /// Dataset name.
        dataset: String,
        /// Segment id given to `append`.
        id: String,
        /// Sequence number recorded for the earlier append of this id.
        seq: u64,
    },

    /// The object's SHA-256 differs from the one in its manifest.
    #[error("object `{key}` is corrupt: its sha256 is {actual} but the manifest records {expected}; restore the object or publish the version again under a new number")]
    ChecksumMismatch {
        /// Object key of the damaged file.
        key: String,
        /// Hex SHA-256 recorded in the manifest.
        expected: String,
        /// Hex SHA-256 of the bytes read.
        actual: String,
    },

    /// The object's size differs from the one in its manifest.
    #[error("object `{key}` is corrupt: it holds {actual} bytes but the manifest records {expected}; restore the object or publish the version again under a new number")]
    SizeMismatch {
        /// Object key of the damaged file.
        key: String,
        /// Size in bytes recorded in the manifest.
        expected: u64,
        /// Size in bytes read.
        actual: u64,
    },

    /// An object key broke the key rules (see [`crate::ObjectKey`]).
    #[error("invalid object key `{key}`: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// Rule it broke, and the fix.
        reason: String,
    },

    /// A model name, dataset name, segment id or file name broke the naming
    /// rules.
    #[error("invalid {kind} `{name}`: {reason}")]
    InvalidName {
        /// Kind of name, such as "model name".
        kind: &'static str,
        /// The name as given.
        name: String,
        /// Rule it broke, and the fix.
        reason: String,
    },

    /// A store URL could not be used.
    #[error("invalid store URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL with any embedded credentials redacted.
        url: String,
        /// Problem, and the fix.
        reason: String,
    },

    /// Store settings failed validation; every problem is listed.
    #[error("invalid store settings:{}", format_config_errors(.0))]
    InvalidConfig(Vec<ConfigError>),

    /// A manifest could not be decoded or does not describe the version it
    /// was found under.
    #[error("manifest `{key}` is invalid: {reason}")]
    InvalidManifest {
        /// Object key of the manifest.
        key: String,
        /// Problem found in it.
        reason: String,
    },

    /// An object troupe wrote contains content it cannot decode.
    #[error("object `{key}` holds invalid content: {reason}")]
    InvalidObject {
        /// Object key.
        key: String,
        /// Problem found in it.
        reason: String,
    },

    /// Other writers kept taking the slot this writer tried to claim.
    #[error("gave up claiming a slot under `{key}` after {attempts} attempts because other writers kept taking it first; retry later")]
    Contention {
        /// Key prefix of the contended slots.
        key: String,
        /// Attempts made before giving up.
        attempts: u32,
    },

    /// A local file could not be read or written.
    #[error("local file `{}` could not be {action}: {source}", path.display())]
    LocalIo {
        /// The local file.
        path: PathBuf,
        /// Attempted action: "read", "written" or "renamed".
        action: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },

    /// The object store rejected or failed a request on this key, for
    /// example because it was unreachable or the credentials were refused.
    #[error("object store request on `{key}` failed: {source}")]
    Backend {
        /// Object key, or key prefix for a listing.
        key: String,
        /// The error from the `object_store` crate.
        source: object_store::Error,
    },
}

fn format_config_errors(errors: &[ConfigError]) -> String {
    errors.iter().map(|error| format!("\n  - {error}")).collect()
}

impl StoreError {
    /// Converts an `object_store` error on `key` into the variant a caller
    /// can act on; `resource` describes the object for `NotFound` and
    /// `AlreadyExists`.
    pub(crate) fn from_backend(key: &str, resource: &str, error: object_store::Error) -> StoreError {
        match error {
            object_store::Error::NotFound { .. } => {
                StoreError::NotFound { key: key.to_string(), resource: resource.to_string() }
            }
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
                StoreError::AlreadyExists { key: key.to_string(), resource: resource.to_string() }
            }
            source => StoreError::Backend { key: key.to_string(), source },
        }
    }

    /// Returns whether the error is a missing object.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}
