//! Readers for the data that troupe trains on, from local files.
//!
//! This crate turns files on disk into typed, validated records. It does no
//! tokenization, has no tensors and runs no async code, so every stage
//! (and the tests) can use it without a runtime.
//!
//! - [`corpus`]: pretraining documents from directories and JSONL files,
//!   validated as UTF-8, deduplicated by content hash and split into train
//!   and validation by that hash.
//! - [`demonstration`]: SFT examples, as `{"prompt","response"}` or
//!   `{"messages":[...]}` JSONL lines, into [`Demonstration`]s.
//! - [`preference`]: `{"prompt","chosen","rejected"}` JSONL lines into
//!   [`PreferencePair`]s.
//! - [`split`]: the hash-based train/validation split that all three use.
//! - [`error`]: [`DataError`], whose messages name the file, the line or
//!   byte offset, and the fix.
//!
//! Line-oriented readers run in [`Mode::Strict`] by default, where the first
//! malformed line fails the load. [`Mode::Lenient`] skips malformed lines
//! and returns them as errors next to the records that did load.

pub mod corpus;
pub mod demonstration;
pub mod error;
mod jsonl;
pub mod preference;
pub mod split;

pub use corpus::{
    load_corpus, Corpus, CorpusOptions, DirectorySource, Document, DocumentId, Duplicate,
    IngestReport, JsonlSource, Source, SourceReport,
};
pub use demonstration::{
    parse_demonstrations, read_demonstrations, Demonstration, DemonstrationError, Role, Turn,
};
pub use error::{DataError, Location};
pub use preference::{parse_preference_pairs, read_preference_pairs, PreferencePair};
pub use split::{Split, ValidationFraction};

/// The policy of a line-oriented reader for malformed records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The first malformed line or undecodable file fails the whole load.
    #[default]
    Strict,
    /// Malformed lines (and, for a corpus, undecodable files) are skipped and
    /// returned as errors next to the records that loaded. A missing path,
    /// an I/O failure or a load with no valid record still fails.
    Lenient,
}

/// Records read from one JSONL file, each with the line it came from.
#[derive(Debug)]
pub struct Loaded<T> {
    /// Valid records in file order.
    pub records: Vec<Located<T>>,
    /// Errors for the lines that were skipped; always empty in strict mode.
    pub skipped: Vec<DataError>,
}

impl<T> Loaded<T> {
    /// Drops the locations and returns the records in file order.
    pub fn into_values(self) -> Vec<T> {
        self.records
            .into_iter()
            .map(|record| record.value)
            .collect()
    }
}

/// A record together with the file and line it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub location: Location,
    pub value: T,
}
