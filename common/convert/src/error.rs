//! The error type of every import and export.
//!
//! `Io`, `InvalidSource` and `Tensor` mean the source files need fixing (the
//! message names the file and, where there is one, the tensor). `Unsupported`
//! means the files are well formed but describe something troupe's Llama code
//! cannot run. `Store` and `StoredModel` come from the registry side, and
//! `Settings` lists every bad flag at once.

use std::path::{Path, PathBuf};

use troupe_store::StoreError;

/// Result type of this crate.
pub type Result<T, E = ConvertError> = std::result::Result<T, E>;

/// An error from reading, converting, publishing or exporting a model.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// A source file is malformed or inconsistent.
    #[error("{}: {reason}", path.display())]
    InvalidSource {
        /// The file at fault.
        path: PathBuf,
        /// The problem and its fix.
        reason: String,
    },

    /// One tensor of a source file has the wrong name, shape or dtype, or is missing.
    #[error("{}: tensor `{tensor}`: {reason}", path.display())]
    Tensor {
        /// The file the tensor is in, or was expected in.
        path: PathBuf,
        /// The tensor's name in that file.
        tensor: String,
        /// The problem.
        reason: String,
    },

    /// The source is well formed but uses a feature troupe's Llama model lacks.
    #[error("{}: unsupported model: {reason}", path.display())]
    Unsupported {
        /// The file at fault.
        path: PathBuf,
        /// The feature and the value that selects it.
        reason: String,
    },

    /// The model core rejected the converted config, weights or tokenizer.
    #[error("{}: {source}", path.display())]
    Model {
        /// The source file or directory being converted.
        path: PathBuf,
        /// The model core's error.
        source: troupe_model::Error,
    },

    /// A stored version's files do not load as a model.
    #[error("stored model version {model}: {source}")]
    StoredModel {
        /// The version, as `name@version`.
        model: String,
        /// The model core's error.
        source: troupe_model::Error,
    },

    /// The model registry failed.
    #[error(transparent)]
    Store(#[from] StoreError),

    /// Invalid flags or environment variables, all of them listed.
    #[error("invalid settings:\n  {}", .0.join("\n  "))]
    Settings(Vec<String>),

    /// The conversion task was cancelled before it finished, as happens when
    /// the runtime shuts down.
    #[error("the conversion of {} was cancelled before it finished", path.display())]
    Cancelled {
        /// The source or destination being converted.
        path: PathBuf,
    },
}

impl ConvertError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ConvertError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        ConvertError::InvalidSource {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(path: &Path, tensor: &str, reason: impl Into<String>) -> Self {
        ConvertError::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, reason: impl Into<String>) -> Self {
        ConvertError::Unsupported {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn model(path: &Path, source: troupe_model::Error) -> Self {
        ConvertError::Model {
            path: path.to_path_buf(),
            source,
        }
    }
}
