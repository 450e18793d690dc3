//! SFT demonstration reader: both formats, every rejection with its line,
//! strict and lenient modes.

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use tempfile::TempDir;
use troupe_data::{
    parse_demonstrations, read_demonstrations, DataError, Demonstration, DemonstrationError,
    Location, Mode, Role, Split, Turn, ValidationFraction,
};

fn write(root: &TempDir, content: &[u8]) -> PathBuf {
    let path = root.path().join("demos.jsonl");
    fs::write(&path, content).unwrap();
    path
}

/// Reads `content` in strict mode and returns the error.
fn strict_error(content: &str) -> (PathBuf, DataError) {
    let root = TempDir::new().unwrap();
    let path = write(&root, content.as_bytes());
    let error = read_demonstrations(&path, Mode::Strict).unwrap_err();
    (path, error)
}

fn assert_invalid_record(error: &DataError, path: &Path, line: usize, reason_part: &str) {
    match error {
        DataError::InvalidRecord { location, reason } => {
            assert_eq!(location, &Location::new(path, line));
            assert!(reason.contains(reason_part), "reason: {reason}");
        }
        other => panic!("expected InvalidRecord, got {other:?}"),
    }
}

const GOOD: &str =
    r#"{"prompt": "What is the capital of Peru?", "response": "Lima", "source": "quiz"}"#;

#[test]
fn reads_both_formats() {
    let root = TempDir::new().unwrap();
    let content = format!(
        "{GOOD}\n{}\n",
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}"#
    );
    let path = write(&root, content.as_bytes());

    let loaded = read_demonstrations(&path, Mode::Strict).unwrap();

    assert_eq!(loaded.records.len(), 2);
    assert!(loaded.skipped.is_empty());
    let pair = &loaded.records[0];
    assert_eq!(pair.location, Location::new(&path, 1));
    assert_eq!(
        pair.value.turns(),
        [
            Turn::new(Role::User, "What is the capital of Peru?"),
            Turn::new(Role::Assistant, "Lima"),
        ]
    );
    let chat = &loaded.records[1].value;
    assert_eq!(chat.turns().len(), 5);
    assert_eq!(chat.prompt().len(), 4);
    assert_eq!(chat.prompt()[0].role, Role::System);
    assert_eq!(chat.response(), "4");
}

#[test]
fn line_not_json() {
    let (path, error) = strict_error(&format!("{GOOD}\n{GOOD}\n{{\"prompt\": \"a\",\n"));
    assert!(matches!(error, DataError::InvalidJson { .. }), "{error:?}");
    assert_eq!(error.location(), Some(Location::new(&path, 3)));
    assert!(
        error.to_string().contains("demos.jsonl:3: invalid JSON"),
        "{error}"
    );
}

#[test]
fn missing_response_field() {
    let (path, error) = strict_error(&format!("{GOOD}\n{{\"prompt\": \"a\"}}\n"));
    match &error {
        DataError::MissingField {
            location, field, ..
        } => {
            assert_eq!(location, &Location::new(&path, 2));
            assert_eq!(field, "response");
        }
        other => panic!("expected MissingField, got {other:?}"),
    }
    assert!(
        error
            .to_string()
            .contains("demos.jsonl:2: missing field \"response\""),
        "{error}"
    );
}

#[test]
fn line_without_either_format() {
    let (path, error) = strict_error("{\"question\": \"a\", \"answer\": \"b\"}\n");
    assert!(
        matches!(error, DataError::MissingField { ref field, .. } if field == "prompt"),
        "{error:?}"
    );
    assert_eq!(error.location(), Some(Location::new(&path, 1)));
    assert!(
        error.to_string().contains("\"messages\""),
        "message names both formats: {error}"
    );
}

#[test]
fn response_not_a_string() {
    let (path, error) = strict_error("{\"prompt\": \"a\", \"response\": [\"b\"]}\n");
    assert!(
        matches!(error, DataError::WrongType { ref field, found: "an array", .. } if field == "response"),
        "{error:?}"
    );
    assert_eq!(error.location(), Some(Location::new(&path, 1)));
}

#[test]
fn empty_response_rejected() {
    let (path, error) = strict_error("{\"prompt\": \"a\", \"response\": \"  \"}\n");
    assert_invalid_record(&error, &path, 1, "field \"response\" is empty");
}

#[test]
fn last_message_not_assistant() {
    let line = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}"#;
    let (path, error) = strict_error(&format!("{GOOD}\n{line}\n"));
    assert_invalid_record(&error, &path, 2, "the last turn is a user turn");
}

#[test]
fn unknown_role() {
    let line =
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}"#;
    let (path, error) = strict_error(&format!("{line}\n"));
    assert_invalid_record(&error, &path, 1, "messages[1].role is \"bot\"");
}

#[test]
fn system_turn_not_first() {
    let line = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}]}"#;
    let (path, error) = strict_error(&format!("{line}\n"));
    assert_invalid_record(&error, &path, 1, "messages[1] is a system turn");
}

#[test]
fn assistant_before_user() {
    let line = r#"{"messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    let (path, error) = strict_error(&format!("{line}\n"));
    assert_invalid_record(
        &error,
        &path,
        1,
        "messages[1] is an assistant turn before any user turn",
    );
}

#[test]
fn empty_messages_rejected() {
    let (path, error) = strict_error("{\"messages\": []}\n");
    assert_invalid_record(&error, &path, 1, "no turns");
}

#[test]
fn messages_not_an_array() {
    let (path, error) = strict_error("{\"messages\": \"hello\"}\n");
    assert!(
        matches!(error, DataError::WrongType { ref field, found: "a string", .. } if field == "messages"),
        "{error:?}"
    );
    assert_eq!(error.location(), Some(Location::new(&path, 1)));
}

#[test]
fn message_missing_content() {
    let line = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}"#;
    let (path, error) = strict_error(&format!("{line}\n"));
    assert!(
        matches!(error, DataError::MissingField { ref field, .. } if field == "messages[1].content"),
        "{error:?}"
    );
    assert_eq!(error.location(), Some(Location::new(&path, 1)));
}

#[test]
fn message_not_an_object() {
    let line = r#"{"messages": [{"role": "user", "content": "a"}, "b"]}"#;
    let (_, error) = strict_error(&format!("{line}\n"));
    assert!(
        matches!(error, DataError::WrongType { ref field, .. } if field == "messages[1]"),
        "{error:?}"
    );
}

#[test]
fn both_formats_on_one_line() {
    let line = r#"{"prompt": "a", "response": "b", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    let (path, error) = strict_error(&format!("{line}\n"));
    assert_invalid_record(&error, &path, 1, "both \"messages\" and \"prompt\"");
}

#[test]
fn invalid_utf8_line() {
    let root = TempDir::new().unwrap();
    let mut content = format!("{GOOD}\n").into_bytes();
    let line_two_start = content.len();
    content.extend_from_slice(b"{\"prompt\": \"caf\xE9\", \"response\": \"b\"}\n");
    let path = write(&root, &content);

    let error = read_demonstrations(&path, Mode::Strict).unwrap_err();

    match error {
        DataError::InvalidUtf8 {
            path: error_path,
            line,
            byte_offset,
        } => {
            assert_eq!(error_path, path);
            assert_eq!(line, 2);
            assert_eq!(byte_offset, (line_two_start + 15) as u64);
        }
        other => panic!("expected InvalidUtf8, got {other:?}"),
    }
}

#[test]
fn lenient_skips_and_counts() {
    let root = TempDir::new().unwrap();
    let content = format!(
        "{GOOD}\nnot json\n{{\"prompt\": \"a\"}}\n{GOOD}\n{}\n",
        r#"{"messages": [{"role": "user", "content": "a"}]}"#
    );
    let path = write(&root, content.as_bytes());

    let loaded = read_demonstrations(&path, Mode::Lenient).unwrap();

    let lines: Vec<usize> = loaded
        .records
        .iter()
        .map(|record| record.location.line)
        .collect();
    assert_eq!(lines, [1, 4]);
    let skipped: Vec<usize> = loaded
        .skipped
        .iter()
        .map(|error| error.location().unwrap().line)
        .collect();
    assert_eq!(skipped, [2, 3, 5]);
}

#[test]
fn strict_is_default_mode() {
    assert_eq!(Mode::default(), Mode::Strict);
}

#[test]
fn empty_file_has_no_valid_records() {
    let root = TempDir::new().unwrap();
    let path = write(&root, b"\n  \n");

    let error = read_demonstrations(&path, Mode::Lenient).unwrap_err();

    assert!(
        matches!(error, DataError::NoValidRecords { path: ref error_path, skipped: 0 } if error_path == &path),
        "{error:?}"
    );
}

#[test]
fn all_lines_malformed_is_error() {
    let root = TempDir::new().unwrap();
    let path = write(&root, b"nope\n{\"prompt\": 1, \"response\": 2}\n");

    let error = read_demonstrations(&path, Mode::Lenient).unwrap_err();

    assert!(
        matches!(error, DataError::NoValidRecords { skipped: 2, .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("malformed lines skipped: 2"),
        "{error}"
    );
}

#[test]
fn missing_file_is_not_found() {
    let root = TempDir::new().unwrap();
    let path = root.path().join("absent.jsonl");
    let error = read_demonstrations(&path, Mode::Strict).unwrap_err();
    assert!(
        matches!(error, DataError::NotFound { path: ref p } if p == &path),
        "{error:?}"
    );
}

#[test]
fn byte_order_mark_crlf_and_blank_lines() {
    let content = b"\xEF\xBB\xBF{\"prompt\": \"a\", \"response\": \"b\"}\r\n\r\n{\"prompt\": \"c\", \"response\": \"d\"}\r\n";
    let label = Path::new("upload.jsonl");

    let loaded = parse_demonstrations(Cursor::new(&content[..]), label, Mode::Strict).unwrap();

    let lines: Vec<usize> = loaded
        .records
        .iter()
        .map(|record| record.location.line)
        .collect();
    assert_eq!(lines, [1, 3]);
    assert_eq!(loaded.records[1].location.path, label);
    assert_eq!(loaded.records[1].value.response(), "d");
}

#[test]
fn split_key_is_prompt() {
    let first = Demonstration::from_prompt_response("Tell me a joke", "One.").unwrap();
    let second = Demonstration::from_prompt_response("Tell me a joke", "Two.").unwrap();
    let fraction = ValidationFraction::new(0.5).unwrap();

    assert_eq!(first.split_key(), "Tell me a joke");
    assert_eq!(first.split(fraction), second.split(fraction));
    assert_eq!(
        first.split(fraction),
        Split::of_key(b"Tell me a joke", fraction)
    );
}

#[test]
fn new_validates_turns() {
    let cases = [
        (vec![], DemonstrationError::Empty),
        (
            vec![Turn::new(Role::User, "a")],
            DemonstrationError::LastTurnNotAssistant { role: Role::User },
        ),
        (
            vec![Turn::new(Role::User, "a"), Turn::new(Role::Assistant, "")],
            DemonstrationError::EmptyContent {
                index: 1,
                role: Role::Assistant,
            },
        ),
    ];
    for (turns, expected) in cases {
        assert_eq!(Demonstration::new(turns).unwrap_err(), expected);
    }
}

#[test]
fn serializes_as_messages() {
    let demonstration = Demonstration::from_prompt_response("a", "b").unwrap();
    let json = serde_json::to_string(&demonstration).unwrap();
    assert_eq!(
        json,
        r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#
    );
}
