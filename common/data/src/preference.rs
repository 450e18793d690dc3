//! Preference pairs: a prompt with a chosen and a rejected response, the
//! training and evaluation unit of a Bradley-Terry reward model.
//!
//! Each line of a preference file is one JSON object:
//!
//! ```text
//! {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}
//! ```
//!
//! Other fields on a line are ignored.

use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::jsonl::{collect_records, require_records, string_field, JsonlReader};
use crate::split::{Split, ValidationFraction};
use crate::{DataError, Loaded, Location, Mode};

const EXPECTED_SHAPE: &str = r#"{"prompt": string, "chosen": string, "rejected": string}"#;

/// A prompt and two responses, the first preferred over the second.
///
/// The reader guarantees that no field is empty or whitespace only and
/// that `chosen` differs from `rejected`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

impl PreferencePair {
    /// Returns the side of a train/held-out split this pair falls on. The
    /// key is the prompt, so every pair of one prompt lands on the same side.
    pub fn split(&self, fraction: ValidationFraction) -> Split {
        Split::of_key(self.prompt.as_bytes(), fraction)
    }
}

/// Reads a JSONL file of preference pairs.
///
/// Fails with [`DataError::NoValidRecords`] when the file has no valid line,
/// in either mode. See [`Mode`] for how malformed lines are treated.
pub fn read_preference_pairs(
    path: impl AsRef<Path>,
    mode: Mode,
) -> Result<Loaded<PreferencePair>, DataError> {
    let path = path.as_ref();
    require_records(
        path,
        collect_records(JsonlReader::open(path)?, mode, parse_line)?,
    )
}

/// Reads preference pairs from any buffered reader; `path` names the source
/// in error messages.
pub fn parse_preference_pairs(
    reader: impl BufRead,
    path: &Path,
    mode: Mode,
) -> Result<Loaded<PreferencePair>, DataError> {
    require_records(
        path,
        collect_records(JsonlReader::new(reader, path), mode, parse_line)?,
    )
}

fn parse_line(
    location: &Location,
    object: &Map<String, Value>,
) -> Result<PreferencePair, DataError> {
    let prompt = string_field(object, "prompt", location, EXPECTED_SHAPE)?;
    let chosen = string_field(object, "chosen", location, EXPECTED_SHAPE)?;
    let rejected = string_field(object, "rejected", location, EXPECTED_SHAPE)?;

    for (field, text) in [
        ("prompt", prompt),
        ("chosen", chosen),
        ("rejected", rejected),
    ] {
        if text.trim().is_empty() {
            return Err(DataError::InvalidRecord {
                location: location.clone(),
                reason: format!("field \"{field}\" is empty"),
            });
        }
    }
    if chosen == rejected {
        return Err(DataError::InvalidRecord {
            location: location.clone(),
            reason:
                "\"chosen\" and \"rejected\" are identical; a pair needs two different responses"
                    .to_owned(),
        });
    }

    Ok(PreferencePair {
        prompt: prompt.to_owned(),
        chosen: chosen.to_owned(),
        rejected: rejected.to_owned(),
    })
}
