//! The model registry: numbered, immutable versions of a named model.
//!
//! A version is its files (weights, `config.json`, `tokenizer.json`,
//! optional optimizer state and extras) plus `manifest.json`, which lists
//! each file with its size and SHA-256 and carries the version's metadata.
//! Layout under the store root:
//!
//! ```text
//! models/<name>/<version, 8 digits>/manifest.json
//! models/<name>/<version, 8 digits>/<upload id>/<file name>
//! ```
//!
//! Publishing uploads the files under a fresh upload id, then creates the
//! manifest with a create-only write. The manifest is the commit point:
//! readers see only versions whose manifest exists, so a half-published
//! version is invisible, and of two writers racing for one version number
//! exactly one creates the manifest. The other deletes its uploads and gets
//! [`StoreError::AlreadyExists`], or, when it asked for "the next version",
//! uploads again under the next number. Readers check every file's size and
//! SHA-256 against the manifest.
//!
//! Not handled here: uploads left by a publisher that crashed before its
//! manifest stay in the store, invisible, until someone deletes them.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Result, StoreError};
use crate::key::{validate_name, ObjectKey};
use crate::store::{digest_bytes, FileDigest, FileSource, Store};

/// Key prefix of every model.
pub const MODELS_PREFIX: &str = "models";
/// Name of the manifest inside a version.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the weights file (safetensors).
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the model configuration (Hugging Face `config.json` layout).
pub const CONFIG_FILE: &str = "config.json";
/// Name of the tokenizer (Hugging Face `tokenizer.json`).
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Name of the optimizer state, when a version carries one.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Manifest schema written by this build; newer manifests are rejected.
pub const MANIFEST_SCHEMA_VERSION: u32 = 1;

/// Width of the zero-padded version directory name, so that a plain listing
/// sorts versions up to 99,999,999 in order.
const VERSION_DIGITS: usize = 8;
/// Times a "next version" publish moves to a higher number after losing a
/// race before it reports [`StoreError::Contention`].
const MAX_PUBLISH_ATTEMPTS: u32 = 8;
/// Maximum length of the parent chain [`ModelRegistry::lineage`] walks.
const MAX_LINEAGE_DEPTH: usize = 10_000;

/// The training stage a version came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Pretrained or imported base model.
    Base,
    /// Instruction-tuned by supervised fine-tuning.
    Sft,
    /// Reward model with a scalar head.
    Reward,
    /// Policy trained by PPO.
    Policy,
}

impl ModelKind {
    /// Returns the lowercase name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Base => "base",
            ModelKind::Sft => "sft",
            ModelKind::Reward => "reward",
            ModelKind::Policy => "policy",
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ModelKind {
    type Err = StoreError;

    fn from_str(value: &str) -> Result<ModelKind> {
        match value {
            "base" => Ok(ModelKind::Base),
            "sft" => Ok(ModelKind::Sft),
            "reward" => Ok(ModelKind::Reward),
            "policy" => Ok(ModelKind::Policy),
            _ => Err(StoreError::InvalidName {
                kind: "model kind",
                name: value.to_string(),
                reason: "use base, sft, reward or policy".into(),
            }),
        }
    }
}

/// One model version, written `name@version` (for example `tiny@3`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModelRef {
    /// Model name.
    pub name: String,
    /// Version number, starting at 1.
    pub version: u64,
}

impl ModelRef {
    /// Returns a reference to `name@version`.
    pub fn new(name: impl Into<String>, version: u64) -> ModelRef {
        ModelRef { name: name.into(), version }
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

impl FromStr for ModelRef {
    type Err = StoreError;

    fn from_str(value: &str) -> Result<ModelRef> {
        let invalid = |reason: &str| StoreError::InvalidName {
            kind: "model reference",
            name: value.to_string(),
            reason: reason.to_string(),
        };
        let (name, version) = value.split_once('@').ok_or_else(|| invalid("write it as NAME@VERSION, as in tiny@3"))?;
        validate_name("model name", name)?;
        let version = version.parse().map_err(|_| invalid("the version after `@` must be a whole number"))?;
        check_version(version)?;
        Ok(ModelRef::new(name, version))
    }
}

/// One file of a version, as listed in its manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the version, such as `model.safetensors`.
    pub name: String,
    /// Object key relative to the version directory.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

/// The manifest of a published version: its files and metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest schema version ([`MANIFEST_SCHEMA_VERSION`] when written).
    pub schema_version: u32,
    /// Model name.
    pub model: String,
    /// Version number.
    pub version: u64,
    /// Training stage that produced it.
    pub kind: ModelKind,
    /// The version it was trained or derived from, possibly of another model.
    pub parent: Option<ModelRef>,
    /// When the publisher wrote the manifest.
    pub created_at: DateTime<Utc>,
    /// Id of the upload that contains the files.
    pub upload_id: Uuid,
    /// Every file of the version, sorted by name.
    pub files: Vec<FileEntry>,
    /// Free-form metadata, such as metrics or the resolved training config.
    pub metadata: serde_json::Value,
}

impl Manifest {
    /// Returns this version as `name@version`.
    pub fn model_ref(&self) -> ModelRef {
        ModelRef::new(self.model.clone(), self.version)
    }

    /// Returns the entry for the file called `name`.
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|entry| entry.name == name)
    }

    /// Returns the total size of the files in bytes.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|entry| entry.size).sum()
    }
}

/// A version to publish; build it with [`NewVersion::new`] and the `with_`
/// methods, then pass it to [`ModelRegistry::publish`].
#[derive(Clone, Debug)]
pub struct NewVersion {
    name: String,
    kind: ModelKind,
    version: Option<u64>,
    parent: Option<ModelRef>,
    metadata: serde_json::Value,
    files: Vec<(String, FileSource)>,
}

impl NewVersion {
    /// Starts a version of model `name` with its three required files. It
    /// takes the next free version number unless [`Self::with_version`]
    /// sets one.
    pub fn new(
        name: impl Into<String>,
        kind: ModelKind,
        weights: impl Into<FileSource>,
        config: impl Into<FileSource>,
        tokenizer: impl Into<FileSource>,
    ) -> NewVersion {
        NewVersion {
            name: name.into(),
            kind,
            version: None,
            parent: None,
            metadata: serde_json::Value::Object(Default::default()),
            files: vec![
                (WEIGHTS_FILE.to_string(), weights.into()),
                (CONFIG_FILE.to_string(), config.into()),
                (TOKENIZER_FILE.to_string(), tokenizer.into()),
            ],
        }
    }

    /// Publishes as exactly this version number, failing with
    /// [`StoreError::AlreadyExists`] if it is taken.
    pub fn with_version(mut self, version: u64) -> NewVersion {
        self.version = Some(version);
        self
    }

    /// Records the version this one was trained or derived from.
    pub fn with_parent(mut self, parent: ModelRef) -> NewVersion {
        self.parent = Some(parent);
        self
    }

    /// Sets the free-form metadata stored in the manifest.
    pub fn with_metadata(mut self, metadata: serde_json::Value) -> NewVersion {
        self.metadata = metadata;
        self
    }

    /// Adds optimizer state as [`OPTIMIZER_FILE`].
    pub fn with_optimizer_state(self, state: impl Into<FileSource>) -> NewVersion {
        self.with_file(OPTIMIZER_FILE, state)
    }

    /// Adds another file; `name` may contain `/` to nest it and follows the
    /// object key rules.
    pub fn with_file(mut self, name: impl Into<String>, source: impl Into<FileSource>) -> NewVersion {
        self.files.push((name.into(), source.into()));
        self
    }
}

/// A version read whole, with every file checked against its manifest.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    /// The version's manifest.
    pub manifest: Manifest,
    files: BTreeMap<String, Bytes>,
}

impl LoadedModel {
    /// Returns the bytes of the file called `name`.
    pub fn file(&self, name: &str) -> Option<&Bytes> {
        self.files.get(name)
    }

    /// Returns every file by name.
    pub fn files(&self) -> &BTreeMap<String, Bytes> {
        &self.files
    }

    /// Returns the weights (`model.safetensors`).
    pub fn weights(&self) -> &Bytes {
        self.required(WEIGHTS_FILE)
    }

    /// Returns the model configuration (`config.json`).
    pub fn config(&self) -> &Bytes {
        self.required(CONFIG_FILE)
    }

    /// Returns the tokenizer (`tokenizer.json`).
    pub fn tokenizer(&self) -> &Bytes {
        self.required(TOKENIZER_FILE)
    }

    fn required(&self, name: &str) -> &Bytes {
        // `check_manifest` rejects manifests without the required files, and
        // `load` reads every file the manifest lists.
        self.files.get(name).unwrap_or_else(|| panic!("a loaded model always holds {name}"))
    }
}

/// Publishes and reads model versions in a [`Store`].
#[derive(Clone, Debug)]
pub struct ModelRegistry {
    store: Store,
}

impl ModelRegistry {
    /// Returns a registry kept in `store`.
    pub fn new(store: Store) -> ModelRegistry {
        ModelRegistry { store }
    }

    /// Returns the store the registry is kept in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Uploads the files of `new`, then creates its manifest, and returns
    /// the manifest.
    ///
    /// With a given version number a lost race returns
    /// [`StoreError::AlreadyExists`]; without one the publish moves on to
    /// the next free number, up to 8 times. A parent must already exist.
    pub async fn publish(&self, new: NewVersion) -> Result<Manifest> {
        validate_name("model name", &new.name)?;
        check_file_names(&new.files)?;
        if let Some(version) = new.version {
            check_version(version)?;
        }
        if let Some(parent) = &new.parent {
            self.manifest(parent).await?;
        }

        let mut highest_taken = 0;
        for attempt in 1..=MAX_PUBLISH_ATTEMPTS {
            let version = match new.version {
                Some(version) => version,
                None => self.next_version(&new.name).await?.max(highest_taken + 1),
            };
            let manifest_key = manifest_key(&new.name, version)?;
            if self.store.exists(&manifest_key).await? {
                if new.version.is_some() {
                    return Err(version_exists(&new.name, version, &manifest_key));
                }
                highest_taken = version;
                continue;
            }

            match self.publish_as(&new, version).await {
                Err(StoreError::AlreadyExists { .. }) if new.version.is_none() => {
                    tracing::info!(model = %new.name, version, attempt, "version taken by another writer, trying the next one");
                    highest_taken = version;
                }
                outcome => return outcome,
            }
        }
        Err(StoreError::Contention { key: models_key(&new.name)?.to_string(), attempts: MAX_PUBLISH_ATTEMPTS })
    }

    /// One attempt to publish `new` as `version`, cleaning up its uploads
    /// when the version was not created.
    async fn publish_as(&self, new: &NewVersion, version: u64) -> Result<Manifest> {
        let upload_id = Uuid::new_v4();
        let version_dir = version_dir(&new.name, version)?;
        let manifest_key = version_dir.join(MANIFEST_FILE)?;
        let mut uploaded = Vec::new();

        let mut files = Vec::with_capacity(new.files.len());
        for (name, source) in &new.files {
            let path = format!("{upload_id}/{name}");
            let key = version_dir.join(&path)?;
            let digest = match self.store.upload(&key, source).await {
                Ok(digest) => digest,
                Err(error) => {
                    self.delete_uploads(&uploaded).await;
                    return Err(error);
                }
            };
            uploaded.push(key);
            files.push(FileEntry { name: name.clone(), path, size: digest.size, sha256: digest.sha256 });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));

        let manifest = Manifest {
            schema_version: MANIFEST_SCHEMA_VERSION,
            model: new.name.clone(),
            version,
            kind: new.kind,
            parent: new.parent.clone(),
            created_at: Utc::now(),
            upload_id,
            files,
            metadata: new.metadata.clone(),
        };
        let encoded = serde_json::to_vec_pretty(&manifest).map_err(|error| StoreError::InvalidManifest {
            key: manifest_key.to_string(),
            reason: format!("the metadata cannot be encoded as JSON: {error}"),
        })?;

        let Err(write_error) = self.store.put_new(&manifest_key, encoded).await else {
            tracing::info!(
                model = %manifest.model,
                version,
                kind = %manifest.kind,
                files = manifest.files.len(),
                bytes = manifest.total_size(),
                "published model version"
            );
            return Ok(manifest);
        };

        // The write may have failed after the store applied it (a timeout,
        // or a retried request that found the first attempt's manifest), so
        // the manifest decides whose version this is.
        match self.manifest(&ModelRef::new(new.name.clone(), version)).await {
            Ok(stored) if stored.upload_id == upload_id => Ok(stored),
            Ok(_) => {
                self.delete_uploads(&uploaded).await;
                Err(version_exists(&new.name, version, &manifest_key))
            }
            Err(StoreError::NotFound { .. }) => {
                self.delete_uploads(&uploaded).await;
                Err(write_error)
            }
            Err(read_error) => {
                // Deleting now could break a manifest that was written after
                // all, so the uploads stay.
                tracing::warn!(model = %new.name, version, error = %read_error, "cannot tell whether the manifest was written; keeping its uploads");
                Err(write_error)
            }
        }
    }

    async fn delete_uploads(&self, keys: &[ObjectKey]) {
        for key in keys {
            if let Err(error) = self.store.delete(key).await {
                tracing::warn!(%key, %error, "failed to delete an upload of an unpublished version");
            }
        }
    }

    /// Lists the names of models with at least one published version.
    pub async fn list_models(&self) -> Result<Vec<String>> {
        let prefix = ObjectKey::new(MODELS_PREFIX)?;
        let mut names = BTreeSet::new();
        for object in self.store.list(Some(&prefix)).await? {
            let Some(rest) = object.key.strip_prefix(&prefix) else { continue };
            if let [name, version, MANIFEST_FILE] = rest.split('/').collect::<Vec<_>>()[..] {
                if parse_version_dir(version).is_some() {
                    names.insert(name.to_string());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Lists the published versions of `name` in increasing order; a
    /// version whose manifest is not written yet is left out.
    pub async fn list_versions(&self, name: &str) -> Result<Vec<u64>> {
        validate_name("model name", name)?;
        let prefix = models_key(name)?;
        let mut versions = BTreeSet::new();
        for object in self.store.list(Some(&prefix)).await? {
            let Some(rest) = object.key.strip_prefix(&prefix) else { continue };
            if let Some((version, MANIFEST_FILE)) = rest.split_once('/') {
                versions.extend(parse_version_dir(version));
            }
        }
        Ok(versions.into_iter().collect())
    }

    /// Returns the manifest of the highest published version of `name`, or
    /// `None` when there is none.
    pub async fn latest(&self, name: &str) -> Result<Option<Manifest>> {
        match self.list_versions(name).await?.last() {
            Some(&version) => Ok(Some(self.manifest(&ModelRef::new(name, version)).await?)),
            None => Ok(None),
        }
    }

    /// Returns the number the next "next version" publish of `name` would
    /// try: one above the highest published version.
    pub async fn next_version(&self, name: &str) -> Result<u64> {
        Ok(self.list_versions(name).await?.last().map_or(1, |latest| latest + 1))
    }

    /// Reads and checks the manifest of `model`.
    pub async fn manifest(&self, model: &ModelRef) -> Result<Manifest> {
        validate_name("model name", &model.name)?;
        check_version(model.version)?;
        let key = manifest_key(&model.name, model.version)?;
        let bytes = self.store.get(&key).await.map_err(|error| match error {
            StoreError::NotFound { key, .. } => {
                StoreError::NotFound { key, resource: format!("model version {model}") }
            }
            other => other,
        })?;
        decode_manifest(&key, &bytes, model)
    }

    /// Reads every file of `model`, each checked against the manifest.
    pub async fn load(&self, model: &ModelRef) -> Result<LoadedModel> {
        let manifest = self.manifest(model).await?;
        let version_dir = version_dir(&model.name, model.version)?;
        let mut files = BTreeMap::new();
        for entry in &manifest.files {
            let bytes = self.read_checked(&version_dir, entry).await?;
            files.insert(entry.name.clone(), bytes);
        }
        Ok(LoadedModel { manifest, files })
    }

    /// Reads the file called `file_name` of `model`, checked against the
    /// manifest.
    pub async fn load_file(&self, model: &ModelRef, file_name: &str) -> Result<Bytes> {
        let manifest = self.manifest(model).await?;
        let version_dir = version_dir(&model.name, model.version)?;
        let Some(entry) = manifest.file(file_name) else {
            let listed: Vec<&str> = manifest.files.iter().map(|entry| entry.name.as_str()).collect();
            return Err(StoreError::NotFound {
                key: manifest_key(&model.name, model.version)?.to_string(),
                resource: format!(
                    "file `{file_name}` of model version {model} (the manifest lists {})",
                    listed.join(", ")
                ),
            });
        };
        self.read_checked(&version_dir, entry).await
    }

    /// Streams every file of `model` into `directory` under its name,
    /// checking each against the manifest, and writes `manifest.json` there
    /// last. Existing files of the same names are replaced.
    pub async fn download(&self, model: &ModelRef, directory: &Path) -> Result<Manifest> {
        let manifest = self.manifest(model).await?;
        let version_dir = version_dir(&model.name, model.version)?;
        for entry in &manifest.files {
            let key = version_dir.join(&entry.path)?;
            let destination = directory.join(&entry.name);
            self.store.download(&key, &destination, |digest| check_digest(&key, entry, digest)).await?;
        }

        let manifest_path = directory.join(MANIFEST_FILE);
        let manifest_key = version_dir.join(MANIFEST_FILE)?;
        let encoded = serde_json::to_vec_pretty(&manifest).map_err(|error| StoreError::InvalidManifest {
            key: manifest_key.to_string(),
            reason: format!("the manifest cannot be encoded as JSON: {error}"),
        })?;
        tokio::fs::write(&manifest_path, encoded).await.map_err(|source| StoreError::LocalIo {
            path: manifest_path,
            action: "written",
            source,
        })?;
        Ok(manifest)
    }

    /// Returns the manifests from `model` back through its parents to the
    /// first version without one, `model` first.
    pub async fn lineage(&self, model: &ModelRef) -> Result<Vec<Manifest>> {
        let mut chain = vec![self.manifest(model).await?];
        let mut seen = HashSet::from([model.clone()]);
        while let Some(parent) = chain.last().and_then(|manifest| manifest.parent.clone()) {
            let child = chain.last().map(Manifest::model_ref).unwrap_or_else(|| model.clone());
            if !seen.insert(parent.clone()) || chain.len() >= MAX_LINEAGE_DEPTH {
                return Err(StoreError::InvalidManifest {
                    key: manifest_key(&child.name, child.version)?.to_string(),
                    reason: format!("its parent {parent} leads back into the lineage of {model} or past {MAX_LINEAGE_DEPTH} ancestors"),
                });
            }
            let manifest = self.manifest(&parent).await.map_err(|error| match error {
                StoreError::NotFound { key, .. } => {
                    StoreError::NotFound { key, resource: format!("parent {parent} of model version {child}") }
                }
                other => other,
            })?;
            chain.push(manifest);
        }
        Ok(chain)
    }

    async fn read_checked(&self, version_dir: &ObjectKey, entry: &FileEntry) -> Result<Bytes> {
        let key = version_dir.join(&entry.path)?;
        let bytes = self.store.get(&key).await?;
        let digest = digest_bytes(bytes.clone()).await;
        check_digest(&key, entry, &digest)?;
        Ok(bytes)
    }
}

fn check_digest(key: &ObjectKey, entry: &FileEntry, digest: &FileDigest) -> Result<()> {
    if digest.size != entry.size {
        return Err(StoreError::SizeMismatch { key: key.to_string(), expected: entry.size, actual: digest.size });
    }
    if digest.sha256 != entry.sha256 {
        return Err(StoreError::ChecksumMismatch {
            key: key.to_string(),
            expected: entry.sha256.clone(),
            actual: digest.sha256.clone(),
        });
    }
    Ok(())
}

fn check_version(version: u64) -> Result<()> {
    if version == 0 {
        return Err(StoreError::InvalidName {
            kind: "model version",
            name: "0".into(),
            reason: "version numbers start at 1".into(),
        });
    }
    Ok(())
}

fn check_file_names(files: &[(String, FileSource)]) -> Result<()> {
    let mut seen = HashSet::new();
    for (name, _) in files {
        let invalid = |reason: String| StoreError::InvalidName { kind: "file name", name: name.clone(), reason };
        ObjectKey::new(name.as_str()).map_err(|error| invalid(error.to_string()))?;
        if name == MANIFEST_FILE {
            return Err(invalid("the registry writes manifest.json itself; rename the file".into()));
        }
        if !seen.insert(name.as_str()) {
            return Err(invalid("the version already has a file of this name".into()));
        }
    }
    Ok(())
}

/// Decodes a manifest and checks that it describes `model`, lists the
/// required files, and keeps every file inside its version directory.
fn decode_manifest(key: &ObjectKey, bytes: &[u8], model: &ModelRef) -> Result<Manifest> {
    let invalid = |reason: String| StoreError::InvalidManifest { key: key.to_string(), reason };
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|error| invalid(format!("it is not a manifest: {error}")))?;
    if manifest.schema_version > MANIFEST_SCHEMA_VERSION {
        return Err(invalid(format!(
            "it uses schema version {}, but this build reads up to {MANIFEST_SCHEMA_VERSION}; upgrade troupe",
            manifest.schema_version
        )));
    }
    if manifest.model != model.name || manifest.version != model.version {
        return Err(invalid(format!("it describes {} but is stored as {model}", manifest.model_ref())));
    }
    let mut names = HashSet::new();
    for entry in &manifest.files {
        if ObjectKey::new(entry.path.as_str()).is_err() || ObjectKey::new(entry.name.as_str()).is_err() {
            return Err(invalid(format!("file `{}` has an invalid name or path `{}`", entry.name, entry.path)));
        }
        if !names.insert(entry.name.as_str()) {
            return Err(invalid(format!("file `{}` is listed twice", entry.name)));
        }
    }
    for required in [WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE] {
        if !names.contains(required) {
            return Err(invalid(format!("it does not list the required file `{required}`")));
        }
    }
    Ok(manifest)
}

fn version_exists(name: &str, version: u64, key: &ObjectKey) -> StoreError {
    StoreError::AlreadyExists { key: key.to_string(), resource: format!("model version {name}@{version}") }
}

fn models_key(name: &str) -> Result<ObjectKey> {
    ObjectKey::new(format!("{MODELS_PREFIX}/{name}"))
}

fn version_dir(name: &str, version: u64) -> Result<ObjectKey> {
    ObjectKey::new(format!("{MODELS_PREFIX}/{name}/{version:0width$}", width = VERSION_DIGITS))
}

fn manifest_key(name: &str, version: u64) -> Result<ObjectKey> {
    version_dir(name, version)?.join(MANIFEST_FILE)
}

/// Parses a version directory name; only the canonical zero-padded form
/// counts, so `3` and `00000003` can never both claim version 3.
fn parse_version_dir(segment: &str) -> Option<u64> {
    let version: u64 = segment.parse().ok()?;
    (version > 0 && segment == format!("{version:0width$}", width = VERSION_DIGITS)).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_dir_is_canonical() {
        assert_eq!(version_dir("tiny", 3).unwrap().as_str(), "models/tiny/00000003");
        assert_eq!(parse_version_dir("00000003"), Some(3));
        assert_eq!(parse_version_dir("3"), None);
        assert_eq!(parse_version_dir("00000000"), None);
        assert_eq!(parse_version_dir("123456789"), Some(123_456_789));
    }

    #[test]
    fn model_ref_parses() {
        assert_eq!("tiny@3".parse::<ModelRef>().unwrap(), ModelRef::new("tiny", 3));
        for bad in ["tiny", "tiny@", "tiny@0", "tiny@x", "@3", "a/b@1"] {
            assert!(bad.parse::<ModelRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn file_names_checked() {
        let source = FileSource::from(Vec::new());
        let files = |name: &str| vec![(WEIGHTS_FILE.to_string(), source.clone()), (name.to_string(), source.clone())];
        assert!(check_file_names(&files("extra/rng.bin")).is_ok());
        for bad in [MANIFEST_FILE, WEIGHTS_FILE, "../x", "/abs", "a//b"] {
            assert!(check_file_names(&files(bad)).is_err(), "{bad}");
        }
    }
}
