//! Envelopes and their two encodings.
//!
//! MessagePack is written with field names (`rmp_serde::to_vec_named`), so a
//! message is a map on the wire and decodes to the same value as its JSON
//! form. Fields are never reordered or renamed within a schema version. A
//! change to any encoding must bump [`SCHEMA_VERSION`], and the golden-bytes
//! test in `tests/golden.rs` fails until the pinned bytes are rewritten.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The schema version this build writes. Decoders accept this version and
/// every older one; a newer one is rejected with [`WireError::UnsupportedSchema`].
pub const SCHEMA_VERSION: u16 = 1;

/// Header that names a message's encoding.
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";

/// Header that carries the message id; NATS JetStream de-duplicates on it.
pub const MESSAGE_ID_HEADER: &str = "Nats-Msg-Id";

/// A payload type that travels on the bus.
pub trait Message: Serialize + DeserializeOwned {
    /// The `kind` written in every envelope of this type, checked on decode
    /// so a message published on the wrong subject is rejected by name.
    const KIND: &'static str;

    /// Checks the invariants that serde cannot express (matching lengths,
    /// non-empty ids). [`decode`] calls it, so a decoded message is valid.
    fn validate(&self) -> Result<(), WireError> {
        Ok(())
    }
}

/// The frame around every message on the bus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Schema version the sender wrote.
    pub schema: u16,
    /// Payload type, equal to [`Message::KIND`].
    pub kind: String,
    /// Unique message id; a second message with the same id is a duplicate.
    pub id: String,
    /// The run this message belongs to.
    pub run: String,
    /// When the sender created the message, in milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The message itself.
    pub payload: T,
}

impl<T: Message> Envelope<T> {
    /// Wraps `payload` with a fresh time-ordered id (UUID v7) and the current time.
    pub fn new(run: impl Into<String>, payload: T) -> Envelope<T> {
        let id = uuid::Uuid::now_v7().to_string();
        Envelope::with_id(run, id, now_ms(), payload)
    }

    /// Wraps `payload` with a caller-chosen id, for messages whose identity is
    /// derived from their content so a resend is recognised as a duplicate.
    pub fn with_id(run: impl Into<String>, id: impl Into<String>, time_ms: i64, payload: T) -> Envelope<T> {
        Envelope { schema: SCHEMA_VERSION, kind: T::KIND.to_string(), id: id.into(), run: run.into(), time_ms, payload }
    }
}

/// Milliseconds since the Unix epoch, by the local clock.
pub fn now_ms() -> i64 {
    let elapsed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
}

/// The two encodings a subject can carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ContentType {
    /// `application/msgpack`, used between troupe's own services.
    #[default]
    MessagePack,
    /// `application/json`, accepted from and offered to external tools.
    Json,
}

impl ContentType {
    /// Returns the header value for this encoding.
    pub fn as_header(self) -> &'static str {
        match self {
            ContentType::MessagePack => "application/msgpack",
            ContentType::Json => "application/json",
        }
    }

    /// Reads a `Content-Type` header value. A missing header means
    /// MessagePack; parameters such as `; charset=utf-8` are ignored.
    pub fn from_header(value: Option<&str>) -> Result<ContentType, WireError> {
        let Some(value) = value else {
            return Ok(ContentType::MessagePack);
        };
        let media_type = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match media_type.as_str() {
            "" | "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
                Ok(ContentType::MessagePack)
            }
            "application/json" => Ok(ContentType::Json),
            _ => Err(WireError::UnknownContentType(value.to_string())),
        }
    }
}

/// Errors from encoding or decoding a message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("unknown content type {0:?}; use application/msgpack or application/json")]
    UnknownContentType(String),
    #[error("invalid MessagePack: {0}")]
    MessagePack(String),
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("unsupported schema version {found}; this build reads versions up to {supported}, so upgrade the reader")]
    UnsupportedSchema { found: u16, supported: u16 },
    #[error("message kind {found:?} where {expected:?} was expected; check the subject it was published on")]
    WrongKind { expected: &'static str, found: String },
    #[error("empty message id; every message needs a unique id")]
    EmptyId,
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Encodes an envelope in the given encoding.
pub fn encode<T: Message>(envelope: &Envelope<T>, content_type: ContentType) -> Result<Vec<u8>, WireError> {
    match content_type {
        ContentType::MessagePack => {
            rmp_serde::to_vec_named(envelope).map_err(|err| WireError::MessagePack(err.to_string()))
        }
        ContentType::Json => serde_json::to_vec(envelope).map_err(|err| WireError::Json(err.to_string())),
    }
}

/// Decodes an envelope and checks its schema version, kind, id and payload.
///
/// The frame is read first with the payload skipped, so a message of the
/// wrong kind or a newer schema is reported as such rather than as a
/// missing payload field.
pub fn decode<T: Message>(bytes: &[u8], content_type: ContentType) -> Result<Envelope<T>, WireError> {
    let frame: Envelope<serde::de::IgnoredAny> = from_bytes(bytes, content_type)?;
    if frame.schema > SCHEMA_VERSION {
        return Err(WireError::UnsupportedSchema { found: frame.schema, supported: SCHEMA_VERSION });
    }
    if frame.kind != T::KIND {
        return Err(WireError::WrongKind { expected: T::KIND, found: frame.kind });
    }
    if frame.id.trim().is_empty() {
        return Err(WireError::EmptyId);
    }
    let envelope: Envelope<T> = from_bytes(bytes, content_type)?;
    envelope.payload.validate()?;
    Ok(envelope)
}

fn from_bytes<T: DeserializeOwned>(bytes: &[u8], content_type: ContentType) -> Result<T, WireError> {
    match content_type {
        ContentType::MessagePack => rmp_serde::from_slice(bytes).map_err(|err| WireError::MessagePack(err.to_string())),
        ContentType::Json => serde_json::from_slice(bytes).map_err(|err| WireError::Json(err.to_string())),
    }
}
