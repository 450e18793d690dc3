//! Object storage for troupe: model versions and datasets in a local
//! directory, an S3-compatible bucket, or memory.
//!
//! Services open a [`Store`] from [`StoreArgs`] (flags and environment),
//! then publish and load models through [`ModelRegistry`] and append and
//! read segments through [`Datasets`]. Only this crate talks to the object
//! store; the bus carries announcements, never weights.
//!
//! - `config`: [`StoreArgs`] for `clap`, their validation into a
//!   [`StoreConfig`], and [`Secret`] for credentials that must not be logged.
//! - `key`: [`ObjectKey`], the validated relative key every request uses.
//! - `store`: [`Store`], the opened backend with create-only writes and
//!   streaming, checksummed uploads and downloads.
//! - `registry`: [`ModelRegistry`], numbered model versions committed by a
//!   manifest written last and verified on read.
//! - `dataset`: [`Datasets`], append-only segment logs with exactly-once ids.
//! - `error`: [`StoreError`], one variant per thing a caller can do about it.
//!
//! Not here: message schemas and bus subjects (`troupe-wire`), tensors and
//! safetensors parsing (`troupe-model`).

mod config;
mod dataset;
mod error;
mod key;
mod registry;
mod store;

pub use config::{ConfigError, S3Config, Secret, StoreArgs, StoreConfig, DEFAULT_S3_REGION, DEFAULT_STORE_URL};
pub use dataset::{Datasets, Segment, SegmentInfo, DATASETS_PREFIX};
pub use error::{Result, StoreError};
pub use key::ObjectKey;
pub use registry::{
    FileEntry, LoadedModel, Manifest, ModelKind, ModelRef, ModelRegistry, NewVersion, CONFIG_FILE, MANIFEST_FILE,
    MANIFEST_SCHEMA_VERSION, MODELS_PREFIX, OPTIMIZER_FILE, TOKENIZER_FILE, WEIGHTS_FILE,
};
pub use store::{FileDigest, FileSource, ObjectInfo, Store};
