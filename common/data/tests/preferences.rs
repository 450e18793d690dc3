//! Preference pair reader: valid pairs, each rejection with its line, modes.

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use tempfile::TempDir;
use troupe_data::{
    parse_preference_pairs, read_preference_pairs, DataError, Location, Mode, PreferencePair,
    ValidationFraction,
};

const GOOD: &str = r#"{"prompt": "2 + 2?", "chosen": "4", "rejected": "5", "category": "math"}"#;

fn write(root: &TempDir, content: &str) -> PathBuf {
    let path = root.path().join("pairs.jsonl");
    fs::write(&path, content).unwrap();
    path
}

#[test]
fn reads_pairs_ignoring_extra_fields() {
    let root = TempDir::new().unwrap();
    let path = write(
        &root,
        &format!(
            "{GOOD}\n{}\n",
            r#"{"prompt": "Capital of Peru?", "chosen": "Lima", "rejected": "Cusco"}"#
        ),
    );

    let loaded = read_preference_pairs(&path, Mode::Strict).unwrap();

    assert_eq!(
        loaded.into_values(),
        [
            PreferencePair {
                prompt: "2 + 2?".into(),
                chosen: "4".into(),
                rejected: "5".into(),
            },
            PreferencePair {
                prompt: "Capital of Peru?".into(),
                chosen: "Lima".into(),
                rejected: "Cusco".into(),
            },
        ]
    );
}

#[test]
fn missing_rejected_field() {
    let root = TempDir::new().unwrap();
    let path = write(
        &root,
        &format!("{GOOD}\n{{\"prompt\": \"a\", \"chosen\": \"b\"}}\n"),
    );

    let error = read_preference_pairs(&path, Mode::Strict).unwrap_err();

    match &error {
        DataError::MissingField {
            location, field, ..
        } => {
            assert_eq!(location, &Location::new(&path, 2));
            assert_eq!(field, "rejected");
        }
        other => panic!("expected MissingField, got {other:?}"),
    }
    assert!(
        error
            .to_string()
            .contains("pairs.jsonl:2: missing field \"rejected\""),
        "{error}"
    );
}

#[test]
fn line_not_json() {
    let root = TempDir::new().unwrap();
    let path = write(&root, &format!("{GOOD}\n\n{GOOD}\n{{oops}}\n"));

    let error = read_preference_pairs(&path, Mode::Strict).unwrap_err();

    assert!(matches!(error, DataError::InvalidJson { .. }), "{error:?}");
    assert_eq!(error.location(), Some(Location::new(&path, 4)));
}

#[test]
fn chosen_not_a_string() {
    let root = TempDir::new().unwrap();
    let path = write(
        &root,
        "{\"prompt\": \"a\", \"chosen\": null, \"rejected\": \"b\"}\n",
    );

    let error = read_preference_pairs(&path, Mode::Strict).unwrap_err();

    assert!(
        matches!(error, DataError::WrongType { ref field, found: "null", .. } if field == "chosen"),
        "{error:?}"
    );
}

#[test]
fn identical_responses_rejected() {
    let root = TempDir::new().unwrap();
    let path = write(
        &root,
        "{\"prompt\": \"a\", \"chosen\": \"same\", \"rejected\": \"same\"}\n",
    );

    let error = read_preference_pairs(&path, Mode::Strict).unwrap_err();

    match &error {
        DataError::InvalidRecord { location, reason } => {
            assert_eq!(location, &Location::new(&path, 1));
            assert!(reason.contains("identical"), "{reason}");
        }
        other => panic!("expected InvalidRecord, got {other:?}"),
    }
}

#[test]
fn empty_prompt_rejected() {
    let root = TempDir::new().unwrap();
    let path = write(
        &root,
        "{\"prompt\": \"\", \"chosen\": \"a\", \"rejected\": \"b\"}\n",
    );

    let error = read_preference_pairs(&path, Mode::Strict).unwrap_err();

    assert!(
        error
            .to_string()
            .contains("pairs.jsonl:1: field \"prompt\" is empty"),
        "{error}"
    );
}

#[test]
fn lenient_skips_and_counts() {
    let root = TempDir::new().unwrap();
    let content = format!(
        "{GOOD}\n[]\n{GOOD}\n{{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"b\"}}\n"
    );
    let path = write(&root, &content);

    let loaded = read_preference_pairs(&path, Mode::Lenient).unwrap();

    assert_eq!(loaded.records.len(), 2);
    let skipped: Vec<Option<Location>> = loaded.skipped.iter().map(DataError::location).collect();
    assert_eq!(
        skipped,
        [Some(Location::new(&path, 2)), Some(Location::new(&path, 4))]
    );
}

#[test]
fn no_valid_pair_is_error() {
    let error =
        parse_preference_pairs(Cursor::new("{}\n"), Path::new("pairs.jsonl"), Mode::Lenient)
            .unwrap_err();
    assert!(
        matches!(error, DataError::NoValidRecords { skipped: 1, .. }),
        "{error:?}"
    );

    let error = parse_preference_pairs(Cursor::new(""), Path::new("pairs.jsonl"), Mode::Strict)
        .unwrap_err();
    assert!(
        matches!(error, DataError::NoValidRecords { skipped: 0, .. }),
        "{error:?}"
    );
}

#[test]
fn pairs_of_one_prompt_share_split() {
    let fraction = ValidationFraction::new(0.5).unwrap();
    let sides: Vec<_> = ["4", "four", "2 + 2"]
        .iter()
        .map(|chosen| {
            PreferencePair {
                prompt: "2 + 2?".into(),
                chosen: (*chosen).into(),
                rejected: "5".into(),
            }
            .split(fraction)
        })
        .collect();
    assert!(sides.windows(2).all(|pair| pair[0] == pair[1]));
}
