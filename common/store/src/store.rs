//! [`Store`]: an opened object store (local directory, S3 or memory) with
//! validated keys, create-only writes, and uploads and downloads that
//! compute each file's size and SHA-256 as the bytes pass.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{S3Config, StoreArgs, StoreConfig};
use crate::error::{Result, StoreError};
use crate::key::ObjectKey;

/// Objects up to this size are written with one PUT; larger ones as a
/// multipart upload in parts of this size. S3 needs parts of at least 5 MiB
/// and allows 10,000 parts, so one object may hold up to about 156 GiB.
const PART_SIZE: usize = 16 * 1024 * 1024;

/// Parts of one multipart upload in flight at once; each buffers
/// `PART_SIZE` bytes of memory.
const MAX_PARTS_IN_FLIGHT: usize = 4;

/// An opened object store. Cloning is cheap and clones share connections.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    description: String,
}

/// An object found by [`Store::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the store root.
    pub key: ObjectKey,
    /// Size in bytes.
    pub size: u64,
    /// When the object was last written.
    pub last_modified: DateTime<Utc>,
}

/// Size and SHA-256 of a file's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDigest {
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

/// Source of the bytes of a file to upload.
#[derive(Clone, Debug)]
pub enum FileSource {
    /// Bytes already in memory.
    Bytes(Bytes),
    /// A local file, streamed without loading it whole.
    Path(PathBuf),
}

impl From<Bytes> for FileSource {
    fn from(bytes: Bytes) -> FileSource {
        FileSource::Bytes(bytes)
    }
}

impl From<Vec<u8>> for FileSource {
    fn from(bytes: Vec<u8>) -> FileSource {
        FileSource::Bytes(Bytes::from(bytes))
    }
}

impl From<&'static [u8]> for FileSource {
    fn from(bytes: &'static [u8]) -> FileSource {
        FileSource::Bytes(Bytes::from_static(bytes))
    }
}

impl From<PathBuf> for FileSource {
    fn from(path: PathBuf) -> FileSource {
        FileSource::Path(path)
    }
}

impl From<&Path> for FileSource {
    fn from(path: &Path) -> FileSource {
        FileSource::Path(path.to_path_buf())
    }
}

impl Store {
    /// Opens the store a validated configuration points at. A local
    /// directory is created if missing. Nothing is sent over the network
    /// until the first request.
    pub fn open(config: &StoreConfig) -> Result<Store> {
        let description = config.to_string();
        let inner: Arc<dyn ObjectStore> = match config {
            StoreConfig::Local { root } => Arc::new(open_local(root)?),
            StoreConfig::Memory { name: None } => Arc::new(InMemory::new()),
            StoreConfig::Memory { name: Some(name) } => shared_memory_store(name),
            StoreConfig::S3(s3) => open_s3(s3)?,
        };
        Ok(Store { inner, description })
    }

    /// Opens a store from a URL with default settings and no S3
    /// credentials, so it suits local directories and `memory://`; use
    /// [`StoreArgs`] for S3.
    pub fn from_url(url: &str) -> Result<Store> {
        let config = StoreArgs::for_url(url).validate().map_err(StoreError::InvalidConfig)?;
        Store::open(&config)
    }

    /// Returns a new private in-memory store.
    pub fn memory() -> Store {
        Store { inner: Arc::new(InMemory::new()), description: "memory://".to_string() }
    }

    /// Returns a view of this store in which every key lives under `prefix`.
    pub fn scoped(&self, prefix: &ObjectKey) -> Store {
        Store {
            inner: Arc::new(PrefixStore::new(Arc::clone(&self.inner), prefix.to_path())),
            description: format!("{} under {prefix}", self.description),
        }
    }

    /// Writes `bytes` to `key`, replacing any object there.
    pub async fn put(&self, key: &ObjectKey, bytes: impl Into<Bytes>) -> Result<()> {
        let bytes = bytes.into();
        if bytes.len() <= PART_SIZE {
            self.inner
                .put(&key.to_path(), PutPayload::from(bytes))
                .await
                .map_err(|error| StoreError::from_backend(key.as_str(), "object", error))?;
            return Ok(());
        }
        let mut writer = self.start_multipart(key).await?;
        writer.put(bytes);
        finish_multipart(key, writer).await
    }

    /// Writes `bytes` to `key` only if no object exists there, atomically:
    /// of two concurrent creators exactly one succeeds, and the other gets
    /// [`StoreError::AlreadyExists`]. On S3 this sends `If-None-Match: *`.
    pub async fn put_new(&self, key: &ObjectKey, bytes: impl Into<Bytes>) -> Result<()> {
        let options = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
        self.inner
            .put_opts(&key.to_path(), PutPayload::from(bytes.into()), options)
            .await
            .map_err(|error| StoreError::from_backend(key.as_str(), "object", error))?;
        Ok(())
    }

    /// Reads the whole object at `key`.
    pub async fn get(&self, key: &ObjectKey) -> Result<Bytes> {
        let result = self
            .inner
            .get(&key.to_path())
            .await
            .map_err(|error| StoreError::from_backend(key.as_str(), "object", error))?;
        result.bytes().await.map_err(|error| StoreError::from_backend(key.as_str(), "object", error))
    }

    /// Returns whether an object exists at `key`.
    pub async fn exists(&self, key: &ObjectKey) -> Result<bool> {
        match self.inner.head(&key.to_path()).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(StoreError::from_backend(key.as_str(), "object", error)),
        }
    }

    /// Deletes the object at `key`; deleting a missing object succeeds.
    pub async fn delete(&self, key: &ObjectKey) -> Result<()> {
        match self.inner.delete(&key.to_path()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(StoreError::from_backend(key.as_str(), "object", error)),
        }
    }

    /// Lists every object under `prefix` (or the whole store), sorted by key.
    ///
    /// Objects whose keys break the key rules were not written by troupe;
    /// they are skipped with a warning.
    pub async fn list(&self, prefix: Option<&ObjectKey>) -> Result<Vec<ObjectInfo>> {
        let prefix_path = prefix.map(ObjectKey::to_path);
        let listing_key = prefix.map_or("", ObjectKey::as_str);
        let metas: Vec<_> = self
            .inner
            .list(prefix_path.as_ref())
            .try_collect()
            .await
            .map_err(|error| StoreError::from_backend(listing_key, "listing", error))?;

        let mut objects = Vec::with_capacity(metas.len());
        for meta in metas {
            match ObjectKey::new(meta.location.as_ref()) {
                Ok(key) => objects.push(ObjectInfo { key, size: meta.size, last_modified: meta.last_modified }),
                Err(error) => tracing::warn!(%error, store = %self.description, "skipping object with a foreign key"),
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    /// Uploads `source` to `key`, replacing any object there, and returns
    /// the size and SHA-256 of the bytes uploaded.
    pub async fn upload(&self, key: &ObjectKey, source: &FileSource) -> Result<FileDigest> {
        match source {
            FileSource::Bytes(bytes) => {
                let digest = digest_bytes(bytes.clone()).await;
                self.put(key, bytes.clone()).await?;
                Ok(digest)
            }
            FileSource::Path(path) => self.upload_file(key, path).await,
        }
    }

    async fn upload_file(&self, key: &ObjectKey, path: &Path) -> Result<FileDigest> {
        let read_error = |source| StoreError::LocalIo { path: path.to_path_buf(), action: "read", source };
        let changed_error = |expected: u64, read: u64| StoreError::LocalIo {
            path: path.to_path_buf(),
            action: "read",
            source: std::io::Error::other(format!(
                "the file changed while it was uploaded ({expected} bytes at the start, {read} read)"
            )),
        };
        let mut file = tokio::fs::File::open(path).await.map_err(read_error)?;
        let expected_size = file.metadata().await.map_err(read_error)?.len();

        // A file that fits in one part goes up as one PUT.
        if expected_size <= PART_SIZE as u64 {
            let bytes = read_chunk(&mut file, PART_SIZE + 1).await.map_err(read_error)?;
            if bytes.len() as u64 != expected_size {
                return Err(changed_error(expected_size, bytes.len() as u64));
            }
            let bytes = Bytes::from(bytes);
            let digest = digest_bytes(bytes.clone()).await;
            self.put(key, bytes).await?;
            return Ok(digest);
        }

        let mut writer = self.start_multipart(key).await?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let outcome = loop {
            let chunk = match read_chunk(&mut file, PART_SIZE).await {
                Ok(chunk) => Bytes::from(chunk),
                Err(source) => break Err(read_error(source)),
            };
            if chunk.is_empty() {
                break Ok(());
            }
            size += chunk.len() as u64;
            hasher = hash_off_thread(hasher, chunk.clone()).await;
            if let Err(error) = writer.wait_for_capacity(MAX_PARTS_IN_FLIGHT).await {
                break Err(StoreError::from_backend(key.as_str(), "object", error));
            }
            writer.put(chunk);
        };
        let outcome = outcome.and_then(|()| match size == expected_size {
            true => Ok(()),
            false => Err(changed_error(expected_size, size)),
        });

        if let Err(error) = outcome {
            if let Err(abort_error) = writer.abort().await {
                tracing::warn!(key = %key, error = %abort_error, "failed to abort multipart upload");
            }
            return Err(error);
        }
        finish_multipart(key, writer).await?;
        Ok(FileDigest { size, sha256: hex::encode(hasher.finalize()) })
    }

    /// Streams the object at `key` into the local file `destination`,
    /// replacing it, and returns the size and SHA-256 of the bytes written.
    /// The bytes go to a temporary file next to it that is renamed into
    /// place only after `accept` approves the digest.
    pub async fn download(
        &self,
        key: &ObjectKey,
        destination: &Path,
        accept: impl FnOnce(&FileDigest) -> Result<()>,
    ) -> Result<FileDigest> {
        let write_error = |source| StoreError::LocalIo { path: destination.to_path_buf(), action: "written", source };
        if let Some(parent) = destination.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(write_error)?;
        }
        let partial = partial_path(destination);
        let result = self.stream_to_file(key, &partial).await.and_then(|digest| {
            accept(&digest)?;
            Ok(digest)
        });
        let digest = match result {
            Ok(digest) => digest,
            Err(error) => {
                if let Err(cleanup) = tokio::fs::remove_file(&partial).await {
                    tracing::warn!(path = %partial.display(), error = %cleanup, "failed to remove partial download");
                }
                return Err(error);
            }
        };
        tokio::fs::rename(&partial, destination).await.map_err(|source| StoreError::LocalIo {
            path: destination.to_path_buf(),
            action: "renamed",
            source,
        })?;
        Ok(digest)
    }

    async fn stream_to_file(&self, key: &ObjectKey, path: &Path) -> Result<FileDigest> {
        let backend_error = |error| StoreError::from_backend(key.as_str(), "object", error);
        let write_error = |source| StoreError::LocalIo { path: path.to_path_buf(), action: "written", source };
        let mut stream = self.inner.get(&key.to_path()).await.map_err(backend_error)?.into_stream();
        let mut file = tokio::fs::File::create(path).await.map_err(write_error)?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.try_next().await.map_err(backend_error)? {
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(write_error)?;
        }
        file.sync_all().await.map_err(write_error)?;
        Ok(FileDigest { size, sha256: hex::encode(hasher.finalize()) })
    }

    async fn start_multipart(&self, key: &ObjectKey) -> Result<WriteMultipart> {
        let upload = self
            .inner
            .put_multipart(&key.to_path())
            .await
            .map_err(|error| StoreError::from_backend(key.as_str(), "object", error))?;
        Ok(WriteMultipart::new_with_chunk_size(upload, PART_SIZE))
    }
}

impl fmt::Display for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Store({})", self.description)
    }
}

/// Computes the size and SHA-256 of `bytes` on the blocking pool, because
/// hashing a model's weights takes seconds.
pub(crate) async fn digest_bytes(bytes: Bytes) -> FileDigest {
    let size = bytes.len() as u64;
    let hasher = hash_off_thread(Sha256::new(), bytes).await;
    FileDigest { size, sha256: hex::encode(hasher.finalize()) }
}

async fn hash_off_thread(mut hasher: Sha256, bytes: Bytes) -> Sha256 {
    let task = tokio::task::spawn_blocking(move || {
        hasher.update(&bytes);
        hasher
    });
    match task.await {
        Ok(hasher) => hasher,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

async fn finish_multipart(key: &ObjectKey, writer: WriteMultipart) -> Result<()> {
    // `finish` aborts the upload itself when a part or the completion fails.
    writer.finish().await.map_err(|error| StoreError::from_backend(key.as_str(), "object", error))?;
    Ok(())
}

/// Reads up to `limit` bytes, fewer only at the end of the file.
async fn read_chunk(file: &mut tokio::fs::File, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut chunk = Vec::with_capacity(limit);
    while chunk.len() < limit {
        let read = (&mut *file).take((limit - chunk.len()) as u64).read_to_end(&mut chunk).await?;
        if read == 0 {
            break;
        }
    }
    Ok(chunk)
}

fn partial_path(destination: &Path) -> PathBuf {
    let mut name = destination.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{}", uuid::Uuid::new_v4()));
    destination.with_file_name(name)
}

fn open_local(root: &Path) -> Result<LocalFileSystem> {
    std::fs::create_dir_all(root).map_err(|source| StoreError::LocalIo {
        path: root.to_path_buf(),
        action: "written",
        source,
    })?;
    let store = LocalFileSystem::new_with_prefix(root).map_err(|error| StoreError::InvalidUrl {
        url: root.display().to_string(),
        reason: format!("the directory cannot be used as a store: {error}"),
    })?;
    // fsync makes a manifest durable only after the files it lists, as a
    // remote store would; empty directories left by deletes are removed.
    Ok(store.with_fsync(true).with_automatic_cleanup(true))
}

/// Returns the process-wide in-memory store called `name`, creating it on
/// first use, so actors in one process can share a store by URL.
fn shared_memory_store(name: &str) -> Arc<dyn ObjectStore> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    let stores = STORES.get_or_init(Default::default);
    // A poisoned lock only means another thread panicked while inserting;
    // the map itself is still consistent.
    let mut stores = stores.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let store = stores.entry(name.to_string()).or_insert_with(|| Arc::new(InMemory::new()));
    Arc::clone(store) as Arc<dyn ObjectStore>
}

fn open_s3(config: &S3Config) -> Result<Arc<dyn ObjectStore>> {
    // `AmazonS3Builder::new` reads no environment, so only the validated
    // settings apply. Conditional put keeps its default (`If-None-Match`),
    // which `put_new` relies on.
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&config.bucket)
        .with_region(&config.region)
        .with_access_key_id(config.access_key_id.expose())
        .with_secret_access_key(config.secret_access_key.expose())
        .with_virtual_hosted_style_request(!config.path_style)
        .with_allow_http(config.allow_http);
    if let Some(token) = &config.session_token {
        builder = builder.with_token(token.expose());
    }
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(bucket_endpoint(endpoint, &config.bucket, config.path_style));
    }
    let s3 = builder.build().map_err(|error| StoreError::InvalidUrl {
        url: config.to_string(),
        reason: format!("the S3 client could not be built: {error}"),
    })?;
    Ok(match &config.prefix {
        Some(prefix) => Arc::new(PrefixStore::new(s3, prefix.to_path())),
        None => Arc::new(s3),
    })
}

/// With virtual-hosted addressing `object_store` uses a custom endpoint as
/// given, so the bucket has to be put in front of the host here.
fn bucket_endpoint(endpoint: &str, bucket: &str, path_style: bool) -> String {
    if path_style {
        return endpoint.to_string();
    }
    match endpoint.split_once("://") {
        Some((scheme, host)) => format!("{scheme}://{bucket}.{host}"),
        None => endpoint.to_string(),
    }
}
