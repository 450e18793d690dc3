//! SFT demonstrations: a conversation whose last turn is the response the
//! model is trained to give.
//!
//! Each line of a demonstration file is one JSON object in either format:
//!
//! ```text
//! {"prompt": "What is the capital of Peru?", "response": "Lima"}
//! {"messages": [{"role": "system", "content": "Be brief."},
//!               {"role": "user", "content": "What is the capital of Peru?"},
//!               {"role": "assistant", "content": "Lima"}]}
//! ```
//!
//! (the second example is one line in a file). The first format is a user
//! turn followed by an assistant turn. Other fields on a line are ignored.
//! Rendering turns through a chat template is left to the trainer.

use std::io::BufRead;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::jsonl::{collect_records, json_type_name, require_records, string_field, JsonlReader};
use crate::split::{Split, ValidationFraction};
use crate::{DataError, Loaded, Location, Mode};

const EXPECTED_SHAPE: &str = r#"{"prompt": string, "response": string} or {"messages": [{"role": string, "content": string}, ...]}"#;

/// The speaker of a turn, as the `role` field spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// Parses the lowercase role names `system`, `user` and `assistant`.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Turn {
    pub role: Role,
    pub content: String,
}

impl Turn {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Turn {
            role,
            content: content.into(),
        }
    }
}

/// The reason a list of turns is not a valid demonstration. Indices count
/// turns from 0, as in the `messages` array.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DemonstrationError {
    #[error("the conversation has no turns; it needs a user turn and an assistant turn")]
    Empty,
    #[error("messages[{index}] is a system turn; only the first turn may be a system turn")]
    MisplacedSystem { index: usize },
    #[error(
        "messages[{index}] is an assistant turn before any user turn; start the \
         conversation with a user turn (after an optional system turn)"
    )]
    AssistantBeforeUser { index: usize },
    #[error(
        "the last turn is a {} turn; it must be an assistant turn, the response to train on",
        role.as_str()
    )]
    LastTurnNotAssistant { role: Role },
    #[error("messages[{index}] ({}) has empty content", role.as_str())]
    EmptyContent { index: usize, role: Role },
}

/// A validated conversation that ends with the assistant response to train on.
///
/// [`Demonstration::new`] checks these invariants:
/// - there is at least one user turn, and no assistant turn comes before it;
/// - a system turn can only come first;
/// - the last turn is an assistant turn;
/// - no turn is empty or whitespace only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Demonstration {
    #[serde(rename = "messages")]
    turns: Vec<Turn>,
}

impl Demonstration {
    pub fn new(turns: Vec<Turn>) -> Result<Self, DemonstrationError> {
        validate_turns(&turns)?;
        Ok(Demonstration { turns })
    }

    /// Builds the two-turn demonstration of the `{"prompt","response"}` format.
    pub fn from_prompt_response(
        prompt: impl Into<String>,
        response: impl Into<String>,
    ) -> Result<Self, DemonstrationError> {
        Demonstration::new(vec![
            Turn::new(Role::User, prompt),
            Turn::new(Role::Assistant, response),
        ])
    }

    /// Returns every turn, the response last.
    pub fn turns(&self) -> &[Turn] {
        &self.turns
    }

    /// Returns the turns the model conditions on: every turn but the last.
    pub fn prompt(&self) -> &[Turn] {
        &self.turns[..self.turns.len() - 1]
    }

    /// Returns the content of the final assistant turn.
    pub fn response(&self) -> &str {
        &self.turns[self.turns.len() - 1].content
    }

    /// Returns the key the train/held-out split hashes: the prompt turns'
    /// contents joined by `\n`. For the `{"prompt","response"}` format this is
    /// the prompt string itself, so all responses to one prompt share a side.
    pub fn split_key(&self) -> String {
        let contents: Vec<&str> = self
            .prompt()
            .iter()
            .map(|turn| turn.content.as_str())
            .collect();
        contents.join("\n")
    }

    /// Returns the side of a train/held-out split this example falls on.
    pub fn split(&self, fraction: ValidationFraction) -> Split {
        Split::of_key(self.split_key().as_bytes(), fraction)
    }
}

fn validate_turns(turns: &[Turn]) -> Result<(), DemonstrationError> {
    let last = turns.last().ok_or(DemonstrationError::Empty)?;
    let mut seen_user = false;
    for (index, turn) in turns.iter().enumerate() {
        if turn.content.trim().is_empty() {
            return Err(DemonstrationError::EmptyContent {
                index,
                role: turn.role,
            });
        }
        match turn.role {
            Role::System if index > 0 => return Err(DemonstrationError::MisplacedSystem { index }),
            Role::System => {}
            Role::User => seen_user = true,
            Role::Assistant if !seen_user => {
                return Err(DemonstrationError::AssistantBeforeUser { index })
            }
            Role::Assistant => {}
        }
    }
    if last.role != Role::Assistant {
        return Err(DemonstrationError::LastTurnNotAssistant { role: last.role });
    }
    Ok(())
}

/// Reads a JSONL file of demonstrations.
///
/// Fails with [`DataError::NoValidRecords`] when the file has no valid line,
/// in either mode. See [`Mode`] for how malformed lines are treated.
pub fn read_demonstrations(
    path: impl AsRef<Path>,
    mode: Mode,
) -> Result<Loaded<Demonstration>, DataError> {
    let path = path.as_ref();
    require_records(
        path,
        collect_records(JsonlReader::open(path)?, mode, parse_line)?,
    )
}

/// Reads demonstrations from any buffered reader, such as an object fetched
/// from the store; `path` names the source in error messages.
pub fn parse_demonstrations(
    reader: impl BufRead,
    path: &Path,
    mode: Mode,
) -> Result<Loaded<Demonstration>, DataError> {
    require_records(
        path,
        collect_records(JsonlReader::new(reader, path), mode, parse_line)?,
    )
}

fn parse_line(
    location: &Location,
    object: &Map<String, Value>,
) -> Result<Demonstration, DataError> {
    let has_pair = object.contains_key("prompt") || object.contains_key("response");
    let has_messages = object.contains_key("messages");
    let turns =
        match (has_pair, has_messages) {
            (true, true) => return Err(DataError::InvalidRecord {
                location: location.clone(),
                reason:
                    r#"line has both "messages" and "prompt"/"response"; use one format per line"#
                        .to_owned(),
            }),
            (false, true) => parse_messages(location, object)?,
            (_, false) => {
                let prompt = string_field(object, "prompt", location, EXPECTED_SHAPE)?;
                let response = string_field(object, "response", location, EXPECTED_SHAPE)?;
                for (field, text) in [("prompt", prompt), ("response", response)] {
                    if text.trim().is_empty() {
                        return Err(DataError::InvalidRecord {
                            location: location.clone(),
                            reason: format!("field \"{field}\" is empty"),
                        });
                    }
                }
                vec![
                    Turn::new(Role::User, prompt),
                    Turn::new(Role::Assistant, response),
                ]
            }
        };
    Demonstration::new(turns).map_err(|error| DataError::InvalidRecord {
        location: location.clone(),
        reason: error.to_string(),
    })
}

fn parse_messages(
    location: &Location,
    object: &Map<String, Value>,
) -> Result<Vec<Turn>, DataError> {
    let messages = match &object["messages"] {
        Value::Array(messages) => messages,
        other => {
            return Err(DataError::WrongType {
                location: location.clone(),
                field: "messages".to_owned(),
                expected: "an array of {\"role\", \"content\"} objects",
                found: json_type_name(other),
            })
        }
    };

    let mut turns = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let Value::Object(message) = message else {
            return Err(DataError::WrongType {
                location: location.clone(),
                field: format!("messages[{index}]"),
                expected: "an object with \"role\" and \"content\"",
                found: json_type_name(message),
            });
        };
        let expected = r#"{"role": "system" | "user" | "assistant", "content": string}"#;
        let role_name = string_field(message, "role", location, expected)
            .map_err(|error| prefix_field(error, index))?;
        let content = string_field(message, "content", location, expected)
            .map_err(|error| prefix_field(error, index))?;
        let role = Role::parse(role_name).ok_or_else(|| DataError::InvalidRecord {
            location: location.clone(),
            reason: format!(
                "messages[{index}].role is \"{role_name}\"; expected \"system\", \"user\" or \"assistant\""
            ),
        })?;
        turns.push(Turn::new(role, content));
    }
    Ok(turns)
}

/// Rewrites the field name in a field error to its path inside `messages`.
fn prefix_field(error: DataError, index: usize) -> DataError {
    match error {
        DataError::MissingField {
            location,
            field,
            expected,
        } => DataError::MissingField {
            location,
            field: format!("messages[{index}].{field}"),
            expected,
        },
        DataError::WrongType {
            location,
            field,
            expected,
            found,
        } => DataError::WrongType {
            location,
            field: format!("messages[{index}].{field}"),
            expected,
            found,
        },
        other => other,
    }
}
