//! [`ReportError`]: every way a report can fail, each message naming the
//! object key or file involved and the fix.

use std::path::PathBuf;

use troupe_store::StoreError;

/// An error from reading a progress log or writing a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The run id is invalid.
    #[error("invalid run id `{run}`: {reason}")]
    InvalidRun {
        /// The run id as given.
        run: String,
        /// Rule it broke, and the fix.
        reason: String,
    },

    /// The store contains no progress log for the run.
    #[error("no progress log at {key} in {store}; run `troupe up --run {run}` first, or check --run and the store flags")]
    MissingLog {
        /// Object key of the expected log.
        key: String,
        /// Description of the store that was searched.
        store: String,
        /// The run id.
        run: String,
    },

    /// A line of the progress log is not a `JobProgress` in JSON.
    #[error("line {line} of {source_name} is not a valid JobProgress JSON object: {reason}; fix or delete that line")]
    MalformedLine {
        /// Object key or local path of the log.
        source_name: String,
        /// Line number, counted from 1.
        line: usize,
        /// The JSON parser's error message.
        reason: String,
    },

    /// The progress log contains no messages.
    #[error("progress log {source_name} contains no progress messages; wait until a trainer has reported a step, then render again")]
    EmptyLog {
        /// Object key or local path of the log.
        source_name: String,
    },

    /// A local file could not be read or written.
    #[error("local file {} could not be {action}: {source}", path.display())]
    LocalIo {
        /// The local file or folder.
        path: PathBuf,
        /// Attempted action: "read", "written" or "created".
        action: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },

    /// An object store request failed.
    #[error("could not {action} {key} in {store}: {source}")]
    Store {
        /// Attempted action: "read" or "write".
        action: &'static str,
        /// Object key involved.
        key: String,
        /// Description of the store.
        store: String,
        /// The store error, boxed because it is large.
        source: Box<StoreError>,
    },

    /// Plotting failed; this is a bug in the report code, not in the data.
    #[error("drawing plot {plot} failed: {reason}")]
    Draw {
        /// File name of the plot.
        plot: String,
        /// What plotters reported.
        reason: String,
    },
}
