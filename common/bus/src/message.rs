//! Raw messages as both bus implementations carry them.

use std::collections::BTreeMap;
use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use troupe_wire::codec::{CONTENT_TYPE_HEADER, MESSAGE_ID_HEADER};
use troupe_wire::{decode, ContentType, Envelope, Message, WireError};

use crate::{encode_envelope, BusError};

/// A message to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing {
    /// Headers, including [`MESSAGE_ID_HEADER`] and [`CONTENT_TYPE_HEADER`].
    pub headers: BTreeMap<String, String>,
    pub payload: Bytes,
}

impl Outgoing {
    /// Creates a message with the given id and encoding.
    pub fn new(id: &str, content_type: ContentType, payload: impl Into<Bytes>) -> Outgoing {
        let headers = BTreeMap::from([
            (MESSAGE_ID_HEADER.to_string(), id.to_string()),
            (CONTENT_TYPE_HEADER.to_string(), content_type.as_header().to_string()),
        ]);
        Outgoing { headers, payload: payload.into() }
    }

    /// Encodes an envelope; its id becomes the message id.
    pub fn encode<T: Message>(
        subject: &str,
        envelope: &Envelope<T>,
        content_type: ContentType,
    ) -> Result<Outgoing, BusError> {
        let bytes = encode_envelope(subject, envelope, content_type)?;
        Ok(Outgoing::new(&envelope.id, content_type, bytes))
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: &str) -> Outgoing {
        self.headers.insert(name.to_string(), value.to_string());
        self
    }

    /// Returns the message id, if set.
    pub fn id(&self) -> Option<&str> {
        self.headers.get(MESSAGE_ID_HEADER).map(String::as_str)
    }
}

/// Result of a durable publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// Position of the message in the run's stream.
    pub sequence: u64,
    /// True when the message id had been stored already and this copy was dropped.
    pub duplicate: bool,
}

/// A received message.
#[derive(Clone, Debug, PartialEq)]
pub struct Incoming {
    pub subject: String,
    pub headers: BTreeMap<String, String>,
    pub payload: Bytes,
}

impl Incoming {
    /// Returns the message id header, if the sender set one.
    pub fn id(&self) -> Option<&str> {
        self.headers.get(MESSAGE_ID_HEADER).map(String::as_str)
    }

    /// Returns the raw content-type header, if the sender set one.
    pub fn content_type_header(&self) -> Option<&str> {
        self.headers.get(CONTENT_TYPE_HEADER).map(String::as_str)
    }

    /// Decodes the payload in the encoding its content-type header names.
    pub fn decode<T: Message>(&self) -> Result<Envelope<T>, WireError> {
        let content_type = ContentType::from_header(self.content_type_header())?;
        decode(&self.payload, content_type)
    }
}

/// A plain subscription: live messages only.
pub struct Subscription {
    stream: Pin<Box<dyn Stream<Item = Incoming> + Send>>,
}

impl Subscription {
    pub(crate) fn new(stream: impl Stream<Item = Incoming> + Send + 'static) -> Subscription {
        Subscription { stream: Box::pin(stream) }
    }

    /// Waits for the next message; `None` once the bus is closed.
    pub async fn next(&mut self) -> Option<Incoming> {
        self.stream.next().await
    }
}
