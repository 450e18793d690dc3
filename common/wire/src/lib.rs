//! The wire protocol that troupe's services speak on the bus.
//!
//! Every message travels in an [`Envelope`]: a schema version, a message id
//! (also used for de-duplication), the run it belongs to, a timestamp and a
//! typed payload. Payload types are plain data with no behaviour, one per flow
//! between stages; this crate depends on neither the tensor library nor the
//! async runtime, so external tools and tests can use it alone.
//!
//! - [`codec`]: MessagePack (the default) and JSON encodings, chosen by a
//!   content-type header, and the checks every decoder applies.
//! - [`messages`]: the payload types.
//! - [`subjects`]: subject names under a per-run prefix.

pub mod codec;
pub mod messages;
pub mod subjects;

pub use codec::{decode, encode, ContentType, Envelope, Message, WireError, SCHEMA_VERSION};
pub use messages::*;
pub use subjects::{RunId, Subjects};
