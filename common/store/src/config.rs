//! Store settings: the `clap` arguments every service flattens into its
//! command line, their validation, and the validated [`StoreConfig`].
//!
//! Credentials live in [`Secret`], whose `Debug` and `Display` print
//! `<redacted>`, so neither settings nor errors can log them.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::builder::BoolishValueParser;

use crate::key::{validate_name, ObjectKey};

/// Store URL used when neither `--store` nor `TROUPE_STORE` is set.
pub const DEFAULT_STORE_URL: &str = "troupe-data";

/// Region sent to S3 when none is configured; S3-compatible servers such as
/// MinIO and SeaweedFS accept it.
pub const DEFAULT_S3_REGION: &str = "us-east-1";

const STORE_SETTING: &str = "--store (TROUPE_STORE)";
const ENDPOINT_SETTING: &str = "--s3-endpoint (TROUPE_S3_ENDPOINT)";
const REGION_SETTING: &str = "--s3-region (TROUPE_S3_REGION)";
const ACCESS_KEY_SETTING: &str = "--s3-access-key-id (AWS_ACCESS_KEY_ID)";
const SECRET_KEY_SETTING: &str = "--s3-secret-access-key (AWS_SECRET_ACCESS_KEY)";
const ALLOW_HTTP_SETTING: &str = "--s3-allow-http (TROUPE_S3_ALLOW_HTTP)";

/// Object store settings, read from flags or environment variables.
///
/// Flatten it into a service's arguments with `#[command(flatten)]`, then
/// call [`StoreArgs::validate`] before connecting to anything.
#[derive(Clone, clap::Args)]
pub struct StoreArgs {
    /// Object store URL: a directory path (relative paths allowed),
    /// `file:///ABS/DIR`, `s3://BUCKET/PREFIX`, or `memory://[NAME]` for a
    /// store that lives only as long as this process.
    #[arg(long = "store", env = "TROUPE_STORE", value_name = "URL", default_value = DEFAULT_STORE_URL)]
    pub store: String,

    /// S3 endpoint URL for S3-compatible servers, such as `http://minio:9000`.
    /// Leave unset for AWS S3 in the configured region.
    #[arg(long, env = "TROUPE_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,

    /// S3 region used to sign requests.
    #[arg(long, env = "TROUPE_S3_REGION", value_name = "REGION", default_value = DEFAULT_S3_REGION)]
    pub s3_region: String,

    /// S3 access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", value_name = "ID", hide_env_values = true)]
    pub s3_access_key_id: Option<Secret>,

    /// S3 secret access key.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", value_name = "KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<Secret>,

    /// S3 session token, for temporary credentials only.
    #[arg(long, env = "AWS_SESSION_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub s3_session_token: Option<Secret>,

    /// Address buckets path-style (`ENDPOINT/BUCKET/KEY`, needed by MinIO and
    /// SeaweedFS) instead of virtual-hosted style (`BUCKET.ENDPOINT/KEY`).
    /// Defaults to true when an endpoint is set and false otherwise.
    #[arg(long, env = "TROUPE_S3_PATH_STYLE", value_name = "BOOL", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub s3_path_style: Option<bool>,

    /// Allow a plain-HTTP S3 endpoint. Loopback endpoints are allowed
    /// without it; any other `http://` endpoint needs it set to true.
    #[arg(long, env = "TROUPE_S3_ALLOW_HTTP", value_name = "BOOL", value_parser = BoolishValueParser::new(), num_args = 0..=1, default_missing_value = "true")]
    pub s3_allow_http: Option<bool>,
}

impl StoreArgs {
    /// Returns settings for `url` with every other setting at its default
    /// and no credentials, ignoring the environment.
    pub fn for_url(url: impl Into<String>) -> StoreArgs {
        StoreArgs {
            store: url.into(),
            s3_endpoint: None,
            s3_region: DEFAULT_S3_REGION.to_string(),
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_session_token: None,
            s3_path_style: None,
            s3_allow_http: None,
        }
    }

    /// Checks every setting and returns the validated configuration, or
    /// every problem found, each naming its flag and environment variable.
    pub fn validate(&self) -> Result<StoreConfig, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let location = match parse_store_url(&self.store) {
            Ok(location) => Some(location),
            Err(problem) => {
                errors.push(ConfigError::new(STORE_SETTING, redact_userinfo(&self.store), problem));
                None
            }
        };

        // S3 settings are checked only for an `s3://` store, because the AWS
        // variables may be set in the environment for unrelated tools.
        let config = match location {
            Some(Location::Local(root)) => Some(StoreConfig::Local { root }),
            Some(Location::Memory(name)) => Some(StoreConfig::Memory { name }),
            Some(Location::S3 { bucket, prefix }) => self.validate_s3(bucket, prefix, &mut errors).map(StoreConfig::S3),
            None => None,
        };

        match config {
            Some(config) if errors.is_empty() => Ok(config),
            _ => Err(errors),
        }
    }

    fn validate_s3(
        &self,
        bucket: String,
        prefix: Option<ObjectKey>,
        errors: &mut Vec<ConfigError>,
    ) -> Option<S3Config> {
        let first_new_error = errors.len();
        let allow_http = self.s3_allow_http.unwrap_or(false);
        let mut http_endpoint = false;

        let endpoint = self.s3_endpoint.as_deref().map(str::trim).filter(|value| !value.is_empty());
        if let Some(endpoint) = endpoint {
            match check_endpoint(endpoint) {
                Err(problem) => errors.push(ConfigError::new(ENDPOINT_SETTING, redact_userinfo(endpoint), problem)),
                Ok(EndpointKind::Https) => {}
                Ok(EndpointKind::Http { loopback }) => {
                    http_endpoint = true;
                    let rejected = self.s3_allow_http == Some(false) || (!loopback && !allow_http);
                    if rejected {
                        errors.push(ConfigError::new(
                            ALLOW_HTTP_SETTING,
                            format!("{:?}", self.s3_allow_http),
                            format!(
                                "endpoint {endpoint} uses plain HTTP, which sends requests unencrypted; \
                                 use an https:// endpoint, or set TROUPE_S3_ALLOW_HTTP=true on a trusted network"
                            ),
                        ));
                    }
                }
            }
        }

        if self.s3_region.trim().is_empty() {
            errors.push(ConfigError::new(
                REGION_SETTING,
                String::new(),
                format!("the region is empty; set it, for example to {DEFAULT_S3_REGION}"),
            ));
        }

        let access_key_id = self.s3_access_key_id.clone().filter(|secret| !secret.expose().is_empty());
        let secret_access_key = self.s3_secret_access_key.clone().filter(|secret| !secret.expose().is_empty());
        // Without explicit keys `object_store` would ask the cloud instance
        // metadata service, which does not exist on a laptop or in
        // docker-compose, so missing keys are a configuration error instead.
        if access_key_id.is_none() {
            errors.push(ConfigError::new(
                ACCESS_KEY_SETTING,
                "unset".into(),
                "an s3:// store needs credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
            ));
        }
        if secret_access_key.is_none() {
            errors.push(ConfigError::new(
                SECRET_KEY_SETTING,
                "unset".into(),
                "an s3:// store needs credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
            ));
        }

        if errors.len() > first_new_error {
            return None;
        }
        Some(S3Config {
            bucket,
            prefix,
            endpoint: endpoint.map(|value| value.trim_end_matches('/').to_string()),
            region: self.s3_region.trim().to_string(),
            path_style: self.s3_path_style.unwrap_or(endpoint.is_some()),
            allow_http: http_endpoint,
            access_key_id: access_key_id?,
            secret_access_key: secret_access_key?,
            session_token: self.s3_session_token.clone().filter(|secret| !secret.expose().is_empty()),
        })
    }
}

impl fmt::Debug for StoreArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreArgs")
            .field("store", &redact_userinfo(&self.store))
            .field("s3_endpoint", &self.s3_endpoint.as_deref().map(redact_userinfo))
            .field("s3_region", &self.s3_region)
            .field("s3_access_key_id", &self.s3_access_key_id)
            .field("s3_secret_access_key", &self.s3_secret_access_key)
            .field("s3_session_token", &self.s3_session_token)
            .field("s3_path_style", &self.s3_path_style)
            .field("s3_allow_http", &self.s3_allow_http)
            .finish()
    }
}

/// One invalid setting: which flag and variable, its value (secrets
/// redacted), and what is wrong with how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The flag and its environment variable, such as `--store (TROUPE_STORE)`.
    pub setting: &'static str,
    /// The value as given, with credentials redacted.
    pub value: String,
    /// The problem and the fix.
    pub problem: String,
}

impl ConfigError {
    fn new(setting: &'static str, value: String, problem: String) -> ConfigError {
        ConfigError { setting, value, problem }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {:?}: {}", self.setting, self.value, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// A credential whose `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// Returns the credential itself, for handing to the S3 client only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(value.to_string()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A validated store location; open it with [`crate::Store::open`].
#[derive(Clone, Debug)]
pub enum StoreConfig {
    /// A directory on the local file system, created on open if missing.
    Local {
        /// The directory, as given (relative to the working directory if
        /// relative).
        root: PathBuf,
    },
    /// An in-memory store. Stores opened with the same name share objects
    /// within one process; an unnamed one is private to its handle.
    Memory {
        /// The name after `memory://`, if any.
        name: Option<String>,
    },
    /// An S3 bucket, optionally under a key prefix.
    S3(S3Config),
}

impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Local { root } => write!(f, "{}", root.display()),
            StoreConfig::Memory { name } => write!(f, "memory://{}", name.as_deref().unwrap_or("")),
            StoreConfig::S3(s3) => write!(f, "{s3}"),
        }
    }
}

/// Validated S3 settings. Credentials are [`Secret`]s, so `Debug` and
/// `Display` never show them.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket under which every object lives.
    pub prefix: Option<ObjectKey>,
    /// Endpoint URL without a trailing `/`; `None` means AWS S3.
    pub endpoint: Option<String>,
    /// Signing region.
    pub region: String,
    /// Path-style (`ENDPOINT/BUCKET`) rather than virtual-hosted addressing.
    pub path_style: bool,
    /// Whether the endpoint is plain HTTP (validated as allowed).
    pub allow_http: bool,
    /// Access key id.
    pub access_key_id: Secret,
    /// Secret access key.
    pub secret_access_key: Secret,
    /// Session token for temporary credentials.
    pub session_token: Option<Secret>,
}

impl fmt::Display for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if let Some(prefix) = &self.prefix {
            write!(f, "/{prefix}")?;
        }
        let style = if self.path_style { "path-style" } else { "virtual-hosted" };
        match &self.endpoint {
            Some(endpoint) => write!(f, " at {endpoint} ({}, {style})", self.region),
            None => write!(f, " on AWS ({}, {style})", self.region),
        }
    }
}

/// Kind and location of a parsed store URL, before S3 settings are checked.
enum Location {
    Local(PathBuf),
    Memory(Option<String>),
    S3 { bucket: String, prefix: Option<ObjectKey> },
}

const SUPPORTED_URLS: &str = "a directory path, file:///ABS/DIR, s3://BUCKET/PREFIX or memory://";

/// Parses a store URL; the error is the problem with its fix.
fn parse_store_url(url: &str) -> Result<Location, String> {
    let url = url.trim();
    if url.is_empty() {
        return Err(format!("the store URL is empty; give {SUPPORTED_URLS}"));
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(Location::Local(PathBuf::from(url)));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "file" => parse_file_url(rest),
        "memory" => parse_memory_url(rest),
        "s3" => parse_s3_url(rest),
        other => Err(format!("unknown scheme `{other}://`; give {SUPPORTED_URLS}")),
    }
}

fn parse_file_url(rest: &str) -> Result<Location, String> {
    let path = rest.strip_prefix("localhost").unwrap_or(rest);
    if !path.starts_with('/') {
        return Err("a file:// URL needs an absolute path after `file://`, as in file:///data/troupe; \
             for a relative directory give the plain path instead"
            .into());
    }
    if path.contains(['?', '#']) {
        return Err("a file:// URL cannot carry a query or fragment; remove the `?` or `#` part".into());
    }
    Ok(Location::Local(PathBuf::from(path)))
}

fn parse_memory_url(rest: &str) -> Result<Location, String> {
    let name = rest.trim_end_matches('/');
    if name.is_empty() {
        return Ok(Location::Memory(None));
    }
    match validate_name("memory store name", name) {
        Ok(()) => Ok(Location::Memory(Some(name.to_string()))),
        Err(error) => Err(format!("{error}; write memory:// or memory://NAME")),
    }
}

fn parse_s3_url(rest: &str) -> Result<Location, String> {
    if rest.contains('@') {
        return Err("credentials do not belong in the URL; remove the `user:password@` part and set \
                    AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead"
            .into());
    }
    if rest.contains(['?', '#']) {
        return Err("an s3:// URL cannot carry a query or fragment; remove the `?` or `#` part".into());
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err("the s3:// URL has no bucket; write s3://BUCKET or s3://BUCKET/PREFIX".into());
    }
    check_bucket_name(bucket)?;
    let prefix = prefix.trim_end_matches('/');
    let prefix = if prefix.is_empty() {
        None
    } else {
        Some(ObjectKey::new(prefix).map_err(|error| format!("the key prefix is not usable: {error}"))?)
    };
    Ok(Location::S3 { bucket: bucket.to_string(), prefix })
}

/// Applies the S3 bucket naming rules: 3 to 63 characters of lowercase
/// letters, digits, `.` and `-`, starting and ending with a letter or digit.
fn check_bucket_name(bucket: &str) -> Result<(), String> {
    let allowed = bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    let edges_ok = bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if (3..=63).contains(&bucket.len()) && allowed && edges_ok {
        Ok(())
    } else {
        Err(format!(
            "`{bucket}` is not a valid bucket name; use 3 to 63 lowercase letters, digits, `.` or `-`, \
             starting and ending with a letter or digit"
        ))
    }
}

enum EndpointKind {
    Https,
    Http { loopback: bool },
}

fn check_endpoint(endpoint: &str) -> Result<EndpointKind, String> {
    let parsed = url::Url::parse(endpoint)
        .map_err(|error| format!("not a URL ({error}); write it as http://HOST:PORT or https://HOST"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("credentials do not belong in the endpoint; set AWS_ACCESS_KEY_ID and \
                    AWS_SECRET_ACCESS_KEY instead"
            .into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("the endpoint cannot carry a query or fragment; remove the `?` or `#` part".into());
    }
    let https = match parsed.scheme() {
        "https" => true,
        "http" => false,
        other => {
            return Err(format!("scheme `{other}` is not supported; write it as http://HOST:PORT or https://HOST"))
        }
    };
    let Some(host) = parsed.host_str() else {
        return Err("the endpoint has no host; write it as http://HOST:PORT or https://HOST".into());
    };
    match https {
        true => Ok(EndpointKind::Https),
        false => Ok(EndpointKind::Http { loopback: is_loopback(host) }),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Replaces any `user:password@` in a URL with `<redacted>@`.
pub(crate) fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(redact_userinfo("s3://key:secret@bucket/p"), "s3://<redacted>@bucket/p");
        assert_eq!(redact_userinfo("http://a:b@host:9000"), "http://<redacted>@host:9000");
        assert_eq!(redact_userinfo("s3://bucket/p@x"), "s3://bucket/p@x");
    }

    #[test]
    fn loopback_hosts() {
        for host in ["localhost", "127.0.0.1", "127.1.2.3", "[::1]"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["minio", "10.0.0.1", "example.com"] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
