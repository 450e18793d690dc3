//! Opens a fresh store on each backend for the integration tests: a
//! temporary directory, a private in-memory store, and a uuid key prefix
//! in the SeaweedFS bucket that `troupe_testkit::s3` provides.

#![allow(dead_code)]

use troupe_store::{Secret, Store, StoreArgs};

/// A store plus whatever must live as long as it.
pub struct TestStore {
    pub store: Store,
    _directory: Option<tempfile::TempDir>,
}

/// Opens a store in a new temporary directory through a `file://` URL.
pub fn file_store() -> TestStore {
    let directory = tempfile::tempdir().expect("create a temporary directory");
    let url = format!("file://{}", directory.path().display());
    let store = Store::from_url(&url).expect("open a file:// store");
    TestStore { store, _directory: Some(directory) }
}

/// Opens a new private in-memory store through a `memory://` URL.
pub fn memory_store() -> TestStore {
    TestStore { store: Store::from_url("memory://").expect("open a memory:// store"), _directory: None }
}

/// Settings for the shared SeaweedFS server under a new uuid prefix, or
/// `None` (after testkit's SKIPPED message) when SeaweedFS is missing.
pub fn s3_args() -> Option<StoreArgs> {
    let endpoint = troupe_testkit::s3()?;
    let mut args = StoreArgs::for_url(format!("s3://{}/{}", endpoint.bucket, uuid::Uuid::new_v4()));
    args.s3_endpoint = Some(endpoint.endpoint);
    // SeaweedFS without an identity configuration accepts any credentials.
    args.s3_access_key_id = Some(Secret::new("troupe-test-key"));
    args.s3_secret_access_key = Some(Secret::new("troupe-test-secret"));
    args.s3_path_style = Some(true);
    Some(args)
}

/// Opens a store on the shared SeaweedFS server under a new uuid prefix.
pub fn s3_store() -> Option<TestStore> {
    let args = s3_args()?;
    let config = args.validate().unwrap_or_else(|errors| panic!("test S3 settings rejected: {errors:?}"));
    Some(TestStore { store: Store::open(&config).expect("open the s3:// store"), _directory: None })
}

/// Defines one test per backend (`file`, `memory`, `s3`) in a module named
/// after `$check`, each calling `$check(store).await`.
#[macro_export]
macro_rules! on_every_backend {
    ($($check:ident),+ $(,)?) => {$(
        mod $check {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn file() {
                let test_store = $crate::common::file_store();
                super::$check(test_store.store.clone()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn memory() {
                let test_store = $crate::common::memory_store();
                super::$check(test_store.store.clone()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn s3() {
                let Some(test_store) = tokio::task::spawn_blocking($crate::common::s3_store).await.unwrap() else {
                    return;
                };
                super::$check(test_store.store.clone()).await;
            }
        }
    )+};
}
