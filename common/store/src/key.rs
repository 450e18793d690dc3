//! Validated object keys and names.
//!
//! Every key that reaches the object store passes through [`ObjectKey`], so
//! no caller can address an object outside the store's root or prefix, and
//! every backend (local directory, S3, memory) stores a key under the same
//! name without escaping it.

use std::fmt;

use crate::error::{Result, StoreError};

/// Maximum key length S3 accepts, in bytes.
const MAX_KEY_BYTES: usize = 1024;

/// Maximum length of a model name, dataset name or segment id, in bytes.
const MAX_NAME_BYTES: usize = 128;

/// A relative object key such as `models/tiny/00000003/manifest.json`.
///
/// Rules: non-empty, at most 1024 bytes, `/` separates segments, no leading
/// or trailing `/`, no empty segment, no `.` or `..` segment, and each
/// segment uses only ASCII letters, digits and `- _ . = + @ ,`. The
/// character set excludes what S3 advises against and what `object_store`
/// would percent-encode, and `#` because the local backend names its
/// temporary files `NAME#N`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Validates `key` against the key rules.
    pub fn new(key: impl Into<String>) -> Result<ObjectKey> {
        let key = key.into();
        match key_problem(&key) {
            None => Ok(ObjectKey(key)),
            Some(reason) => Err(StoreError::InvalidKey { key, reason }),
        }
    }

    /// Appends `relative` (one or more segments) to this key.
    pub fn join(&self, relative: &str) -> Result<ObjectKey> {
        ObjectKey::new(format!("{}/{relative}", self.0))
    }

    /// Returns the key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Returns the last segment.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// Returns the part after `prefix/`, if this key lies under `prefix`.
    pub fn strip_prefix(&self, prefix: &ObjectKey) -> Option<&str> {
        self.0.strip_prefix(prefix.as_str())?.strip_prefix('/')
    }

    pub(crate) fn to_path(&self) -> object_store::path::Path {
        // The key rules are stricter than `Path`'s, so every segment is kept
        // as written (no percent-encoding).
        object_store::path::Path::from_iter(self.0.split('/'))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectKey({:?})", self.0)
    }
}

impl AsRef<str> for ObjectKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Returns why `key` breaks the key rules, or `None` when it follows them.
fn key_problem(key: &str) -> Option<String> {
    if key.is_empty() {
        return Some("the key is empty; give a relative path such as `models/tiny`".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Some(format!("the key is {} bytes long, over the maximum of {MAX_KEY_BYTES}", key.len()));
    }
    if key.starts_with('/') {
        return Some("absolute keys are not allowed; remove the leading `/`".into());
    }
    if key.ends_with('/') {
        return Some("the key ends with `/`; remove the trailing `/`".into());
    }
    for segment in key.split('/') {
        if let Some(reason) = segment_problem(segment) {
            return Some(reason);
        }
    }
    None
}

fn segment_problem(segment: &str) -> Option<String> {
    if segment.is_empty() {
        return Some("the key has an empty segment (`//`); remove the doubled `/`".into());
    }
    if segment == "." || segment == ".." {
        return Some(format!("`{segment}` segments are not allowed because they could leave the store's prefix"));
    }
    if let Some(bad) = segment.chars().find(|&c| !is_key_char(c)) {
        return Some(format!("character {bad:?} is not allowed; use only ASCII letters, digits and `- _ . = + @ ,`"));
    }
    None
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | '+' | '@' | ',')
}

/// Checks a model name, dataset name or segment id: one key segment of at
/// most 128 bytes that starts with an ASCII letter or digit and continues
/// with letters, digits, `-`, `_` or `.`.
pub(crate) fn validate_name(kind: &'static str, name: &str) -> Result<()> {
    match name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(StoreError::InvalidName { kind, name: name.to_string(), reason }),
    }
}

fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("it is empty".to_string());
    }
    if name.len() > MAX_NAME_BYTES {
        return Some(format!("it is {} bytes long, over the maximum of {MAX_NAME_BYTES}", name.len()));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Some("it must start with an ASCII letter or digit".to_string());
    }
    let bad = name.chars().find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))?;
    Some(format!("character {bad:?} is not allowed; use only ASCII letters, digits, `-`, `_` and `.`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_accepts_nested_relative_path() {
        let key = ObjectKey::new("models/tiny/00000001/model.safetensors").unwrap();
        assert_eq!(key.file_name(), "model.safetensors");
        assert_eq!(key.to_path().as_ref(), "models/tiny/00000001/model.safetensors");
    }

    #[test]
    fn key_rejects_escapes_and_empty_segments() {
        for bad in ["", "/abs", "a//b", "a/", "../x", "a/../b", "a/./b", "a\\b", "a b", "a#1", "ü"] {
            let error = ObjectKey::new(bad).unwrap_err();
            assert!(matches!(error, StoreError::InvalidKey { ref key, .. } if key == bad), "{bad:?}: {error}");
        }
    }

    #[test]
    fn strip_prefix_requires_segment_boundary() {
        let prefix = ObjectKey::new("models/a").unwrap();
        let inside = ObjectKey::new("models/a/1").unwrap();
        let sibling = ObjectKey::new("models/ab/1").unwrap();
        assert_eq!(inside.strip_prefix(&prefix), Some("1"));
        assert_eq!(sibling.strip_prefix(&prefix), None);
    }

    #[test]
    fn name_rules() {
        assert!(validate_name("model name", "SmolLM2-135M.v1_x").is_ok());
        for bad in ["", ".hidden", "-x", "a/b", "a b", "..", &"x".repeat(129)] {
            assert!(validate_name("model name", bad).is_err(), "{bad:?}");
        }
    }
}
