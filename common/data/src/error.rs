//! The error type of every reader in this crate.
//!
//! Each message names where the problem is (a path, `path:line`, or a byte
//! offset) and what to do about it, so it can be shown to a person as is.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// A line in a file; lines are numbered from 1.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub path: PathBuf,
    pub line: usize,
}

impl Location {
    pub fn new(path: impl Into<PathBuf>, line: usize) -> Self {
        Self {
            path: path.into(),
            line,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// The reason a corpus, demonstration or preference file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "{}: not found; check the path (a relative path is resolved against the working directory)",
        path.display()
    )]
    NotFound { path: PathBuf },

    #[error("{}: failed to read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{}:{line}: invalid UTF-8 at byte offset {byte_offset}; convert the file to UTF-8 \
         (for example with iconv) or leave it out of the source",
        path.display()
    )]
    InvalidUtf8 {
        path: PathBuf,
        /// Line that contains the first invalid byte, counted from 1.
        line: usize,
        /// Offset of the first invalid byte from the start of the file.
        byte_offset: u64,
    },

    #[error(
        "{}: no documents after filtering ({filter}); check the path and the extension \
         list, and that the files are not empty",
        path.display()
    )]
    EmptyCorpus {
        /// The corpus source that produced no document.
        path: PathBuf,
        /// The filter that was applied, in words.
        filter: String,
    },

    #[error("no corpus sources given; add at least one directory or JSONL file")]
    NoSources,

    #[error("{}: invalid corpus source: {reason}", path.display())]
    InvalidSource { path: PathBuf, reason: String },

    #[error("{location}: invalid JSON: {source}; each line must be one JSON object")]
    InvalidJson {
        location: Location,
        #[source]
        source: serde_json::Error,
    },

    #[error("{location}: missing field \"{field}\"; expected {expected}")]
    MissingField {
        location: Location,
        field: String,
        /// The record shape the reader expects, for the message.
        expected: &'static str,
    },

    #[error("{location}: field \"{field}\" is {found}, expected {expected}")]
    WrongType {
        location: Location,
        field: String,
        expected: &'static str,
        /// The JSON type that was found: null, a boolean, a number, ...
        found: &'static str,
    },

    #[error("{location}: {reason}")]
    InvalidRecord { location: Location, reason: String },

    #[error(
        "{}: no valid records (malformed lines skipped: {skipped}); the file needs at \
         least one well-formed line",
        path.display()
    )]
    NoValidRecords { path: PathBuf, skipped: usize },

    #[error("validation fraction {value} is invalid; expected a number from 0 to 1")]
    InvalidFraction { value: f64 },
}

impl DataError {
    /// Returns the file and line the error points at, where it has one.
    pub fn location(&self) -> Option<Location> {
        match self {
            DataError::InvalidUtf8 { path, line, .. } => Some(Location::new(path, *line)),
            DataError::InvalidJson { location, .. }
            | DataError::MissingField { location, .. }
            | DataError::WrongType { location, .. }
            | DataError::InvalidRecord { location, .. } => Some(location.clone()),
            _ => None,
        }
    }

    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::NotFound {
            DataError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}
