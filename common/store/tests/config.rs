//! Store URLs, settings validation, credential redaction and key checks, as
//! a user meets them through flags and the public API.

use clap::Parser;
use troupe_store::{
    ConfigError, Datasets, ModelKind, ModelRegistry, NewVersion, ObjectKey, Secret, Store, StoreArgs, StoreConfig,
    StoreError,
};

const SECRET: &str = "wJalrXUtnFEMI-not-a-real-secret";

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    store: StoreArgs,
}

fn s3_args(url: &str) -> StoreArgs {
    let mut args = StoreArgs::for_url(url);
    args.s3_endpoint = Some("http://127.0.0.1:9000".into());
    args.s3_access_key_id = Some(Secret::new("AKIDEXAMPLE"));
    args.s3_secret_access_key = Some(Secret::new(SECRET));
    args
}

fn store_error(url: &str) -> ConfigError {
    let errors = StoreArgs::for_url(url).validate().unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].setting, "--store (TROUPE_STORE)");
    errors[0].clone()
}

#[test]
fn s3_url_without_bucket() {
    for url in ["s3://", "s3:///prefix"] {
        let error = store_error(url);
        assert_eq!(error.value, url);
        assert!(error.problem.contains("no bucket"), "{error}");
        assert!(error.problem.contains("s3://BUCKET"), "{error}");
    }
}

#[test]
fn unknown_scheme_rejected() {
    let error = store_error("gs://bucket/models");
    assert!(error.problem.contains("unknown scheme `gs://`"), "{error}");
    assert!(error.problem.contains("s3://BUCKET/PREFIX"), "{error}");
}

#[test]
fn bad_urls_rejected() {
    let cases = [
        ("", "empty"),
        ("s3://bucket/../escape", "`..`"),
        ("s3://bucket/a//b", "empty segment"),
        ("s3://Bad_Bucket/x", "not a valid bucket name"),
        ("s3://key:secret@bucket/x", "credentials do not belong"),
        ("s3://bucket/x?versionId=1", "query"),
        ("file://relative/dir", "absolute path"),
        ("memory://bad/name", "memory store name"),
    ];
    for (url, expected) in cases {
        let error = store_error(url);
        assert!(error.problem.contains(expected), "{url}: {error}");
    }
}

#[test]
fn url_credentials_never_shown() {
    let error = store_error("s3://key:hunter2@bucket/x");
    assert_eq!(error.value, "s3://<redacted>@bucket/x");
    assert!(!error.to_string().contains("hunter2"));
}

#[test]
fn every_problem_reported_at_once() {
    let mut args = StoreArgs::for_url("s3://bucket/run-1");
    args.s3_endpoint = Some("http://minio:9000".into());
    args.s3_region = " ".into();
    let errors = args.validate().unwrap_err();
    let settings: Vec<&str> = errors.iter().map(|error| error.setting).collect();
    assert_eq!(
        settings,
        [
            "--s3-allow-http (TROUPE_S3_ALLOW_HTTP)",
            "--s3-region (TROUPE_S3_REGION)",
            "--s3-access-key-id (AWS_ACCESS_KEY_ID)",
            "--s3-secret-access-key (AWS_SECRET_ACCESS_KEY)",
        ]
    );
    assert!(errors[0].problem.contains("TROUPE_S3_ALLOW_HTTP=true"), "{}", errors[0]);

    let mut bad_both = StoreArgs::for_url("ftp://x");
    bad_both.s3_endpoint = Some("not a url".into());
    // Only the store URL is reported: S3 settings matter only for s3://.
    assert_eq!(bad_both.validate().unwrap_err().len(), 1);

    let error = StoreError::InvalidConfig(errors);
    let message = error.to_string();
    assert!(message.starts_with("invalid store settings:\n  - --s3-allow-http"), "{message}");
}

#[test]
fn endpoint_checked() {
    for (endpoint, expected) in [
        ("minio:9000", "scheme"),
        ("ftp://host", "scheme `ftp`"),
        ("http://user:pw@127.0.0.1:9000", "credentials do not belong"),
        ("not a url", "not a URL"),
    ] {
        let mut args = s3_args("s3://bucket");
        args.s3_endpoint = Some(endpoint.into());
        let errors = args.validate().unwrap_err();
        assert_eq!(errors.len(), 1, "{endpoint}: {errors:?}");
        assert_eq!(errors[0].setting, "--s3-endpoint (TROUPE_S3_ENDPOINT)");
        assert!(errors[0].problem.contains(expected), "{endpoint}: {}", errors[0]);
        assert!(!errors[0].value.contains("pw"), "{}", errors[0]);
    }
}

#[test]
fn plain_http_allowed_on_loopback_only() {
    let args = s3_args("s3://bucket/prefix");
    assert!(args.validate().is_ok());

    let mut remote = s3_args("s3://bucket/prefix");
    remote.s3_endpoint = Some("http://minio:9000".into());
    assert_eq!(remote.validate().unwrap_err()[0].setting, "--s3-allow-http (TROUPE_S3_ALLOW_HTTP)");
    remote.s3_allow_http = Some(true);
    let StoreConfig::S3(config) = remote.validate().unwrap() else { panic!("expected an S3 config") };
    assert!(config.allow_http);
    assert!(config.path_style, "an endpoint defaults to path-style addressing");

    let mut refused = s3_args("s3://bucket");
    refused.s3_allow_http = Some(false);
    assert!(refused.validate().is_err(), "an explicit false refuses even loopback");
}

#[test]
fn s3_config_resolved() {
    let mut args = s3_args("s3://models-bucket/runs/7/");
    args.s3_path_style = Some(false);
    args.s3_session_token = Some(Secret::new("session-token-value"));
    let StoreConfig::S3(config) = args.validate().unwrap() else { panic!("expected an S3 config") };
    assert_eq!(config.bucket, "models-bucket");
    assert_eq!(config.prefix.as_ref().map(ObjectKey::as_str), Some("runs/7"));
    assert_eq!(config.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
    assert_eq!(config.region, "us-east-1");
    assert!(!config.path_style);
    assert_eq!(config.secret_access_key.expose(), SECRET);
    assert_eq!(config.to_string(), "s3://models-bucket/runs/7 at http://127.0.0.1:9000 (us-east-1, virtual-hosted)");
    Store::open(&StoreConfig::S3(config)).unwrap();
}

#[test]
fn credentials_redacted_everywhere() {
    let mut args = s3_args("s3://bucket/prefix");
    args.s3_session_token = Some(Secret::new("session-token-value"));
    let config = args.validate().unwrap();
    let store = Store::open(&config).unwrap();
    let rendered = [
        format!("{args:?}"),
        format!("{config:?}"),
        format!("{config}"),
        format!("{store:?}"),
        format!("{store}"),
        format!("{:?}", Secret::new(SECRET)),
        format!("{}", Secret::new(SECRET)),
    ];
    for text in &rendered {
        assert!(!text.contains(SECRET), "secret leaked: {text}");
        assert!(!text.contains("AKIDEXAMPLE"), "access key id leaked: {text}");
        assert!(!text.contains("session-token-value"), "session token leaked: {text}");
    }
    assert!(rendered[0].contains("<redacted>"), "{}", rendered[0]);
}

#[test]
fn flags_parse_into_args() {
    let cli = Cli::try_parse_from([
        "troupe",
        "--store",
        "s3://bucket/p",
        "--s3-endpoint",
        "http://127.0.0.1:9000",
        "--s3-access-key-id",
        "id",
        "--s3-secret-access-key",
        SECRET,
        "--s3-path-style=false",
        "--s3-allow-http",
    ])
    .unwrap();
    assert_eq!(cli.store.store, "s3://bucket/p");
    assert_eq!(cli.store.s3_path_style, Some(false));
    assert_eq!(cli.store.s3_allow_http, Some(true));
    assert!(!format!("{cli:?}").contains(SECRET));
    assert!(cli.store.validate().is_ok());
}

#[test]
fn default_store_is_local_directory() {
    let args = StoreArgs::for_url(troupe_store::DEFAULT_STORE_URL);
    match args.validate().unwrap() {
        StoreConfig::Local { root } => assert_eq!(root, std::path::PathBuf::from("troupe-data")),
        other => panic!("expected a local store, got {other:?}"),
    }
}

#[tokio::test]
async fn relative_path_store_opens() {
    // Integration tests run in the crate directory; the directory is
    // created there and removed when the guard drops.
    let parent = tempfile::tempdir_in(".").unwrap();
    let relative = format!("{}/store", parent.path().file_name().unwrap().to_string_lossy());
    let store = Store::from_url(&relative).unwrap();
    let key = ObjectKey::new("a/b").unwrap();
    store.put(&key, "hello").await.unwrap();
    assert!(parent.path().join("store/a/b").is_file());
}

#[tokio::test]
async fn named_memory_stores_shared() {
    let name = format!("memory://shared-{}", uuid::Uuid::new_v4());
    let writer = Store::from_url(&name).unwrap();
    let reader = Store::from_url(&name).unwrap();
    let private = Store::from_url("memory://").unwrap();
    let key = ObjectKey::new("x").unwrap();
    writer.put(&key, "shared").await.unwrap();
    assert_eq!(reader.get(&key).await.unwrap(), "shared");
    assert!(!private.exists(&key).await.unwrap());
}

#[tokio::test]
async fn scoped_store_stays_under_prefix() {
    let root = Store::memory();
    let scoped = root.scoped(&ObjectKey::new("run-1").unwrap());
    scoped.put(&ObjectKey::new("a").unwrap(), "x").await.unwrap();
    let listed: Vec<String> = root.list(None).await.unwrap().into_iter().map(|o| o.key.to_string()).collect();
    assert_eq!(listed, ["run-1/a"]);
    let scoped_listing: Vec<String> = scoped.list(None).await.unwrap().into_iter().map(|o| o.key.to_string()).collect();
    assert_eq!(scoped_listing, ["a"]);
}

#[tokio::test]
async fn escaping_names_rejected() {
    let store = Store::memory();
    let registry = ModelRegistry::new(store.clone());
    let datasets = Datasets::new(store.clone());

    let error = ObjectKey::new("models/../../etc/passwd").unwrap_err();
    assert!(matches!(error, StoreError::InvalidKey { ref key, .. } if key == "models/../../etc/passwd"));
    assert!(error.to_string().contains("`models/../../etc/passwd`"), "{error}");

    let evil_file = NewVersion::new("m", ModelKind::Base, &b"w"[..], &b"c"[..], &b"t"[..]).with_file("../x", &b"x"[..]);
    let error = registry.publish(evil_file).await.unwrap_err();
    assert!(matches!(error, StoreError::InvalidName { kind: "file name", .. }), "{error}");

    let evil_model = NewVersion::new("../m", ModelKind::Base, &b"w"[..], &b"c"[..], &b"t"[..]);
    let error = registry.publish(evil_model).await.unwrap_err();
    assert!(matches!(error, StoreError::InvalidName { kind: "model name", .. }), "{error}");

    let error = datasets.append("pairs", "../x", "data").await.unwrap_err();
    assert!(matches!(error, StoreError::InvalidName { kind: "segment id", .. }), "{error}");
    let error = datasets.append("a/b", "x", "data").await.unwrap_err();
    assert!(matches!(error, StoreError::InvalidName { kind: "dataset name", .. }), "{error}");

    let error = registry
        .publish(NewVersion::new("m", ModelKind::Base, &b"w"[..], &b"c"[..], &b"t"[..]).with_version(0))
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::InvalidName { kind: "model version", .. }), "{error}");

    assert!(store.list(None).await.unwrap().is_empty(), "nothing may be written for rejected input");
}

#[test]
fn help_hides_secret_values() {
    // The only other test here that parses flags passes
    // --s3-secret-access-key, which takes precedence over this variable.
    std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
    let error = Cli::try_parse_from(["troupe", "--help"]).unwrap_err();
    let help = error.to_string();
    assert!(help.contains("AWS_SECRET_ACCESS_KEY"), "{help}");
    assert!(help.contains("TROUPE_STORE"), "{help}");
    assert!(!help.contains(SECRET), "{help}");
}
