//! Reading JSONL files one JSON object per line.
//!
//! Each line is checked as UTF-8 on its own, so an invalid byte is reported
//! with its line and its byte offset in the file. Blank lines are skipped and
//! a UTF-8 byte order mark at the start of the file is ignored.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{DataError, Loaded, Located, Location, Mode};

const BYTE_ORDER_MARK: &[u8] = b"\xEF\xBB\xBF";

/// One non-blank line of a JSONL file.
pub(crate) enum Line {
    Object(Location, Map<String, Value>),
    /// A line that is not UTF-8, not JSON, or not a JSON object.
    Malformed(DataError),
}

pub(crate) struct JsonlReader<R> {
    reader: R,
    path: PathBuf,
    /// Number of the last line read, counted from 1.
    line: usize,
    /// Byte offset of the start of the next line.
    offset: u64,
    buffer: Vec<u8>,
}

impl JsonlReader<BufReader<File>> {
    pub(crate) fn open(path: &Path) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|source| DataError::io(path, source))?;
        Ok(JsonlReader::new(BufReader::new(file), path))
    }
}

impl<R: BufRead> JsonlReader<R> {
    pub(crate) fn new(reader: R, path: &Path) -> Self {
        JsonlReader {
            reader,
            path: path.to_path_buf(),
            line: 0,
            offset: 0,
            buffer: Vec::new(),
        }
    }

    /// Returns the next non-blank line, `None` at the end of the file, or an
    /// error when the file cannot be read at all.
    pub(crate) fn next_line(&mut self) -> Result<Option<Line>, DataError> {
        loop {
            self.buffer.clear();
            let read = self
                .reader
                .read_until(b'\n', &mut self.buffer)
                .map_err(|source| DataError::io(&self.path, source))?;
            if read == 0 {
                return Ok(None);
            }
            self.line += 1;
            let mut content_offset = self.offset;
            self.offset += read as u64;

            let mut bytes = self.buffer.as_slice();
            if self.line == 1 && bytes.starts_with(BYTE_ORDER_MARK) {
                bytes = &bytes[BYTE_ORDER_MARK.len()..];
                content_offset += BYTE_ORDER_MARK.len() as u64;
            }
            let text = match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(error) => {
                    return Ok(Some(Line::Malformed(DataError::InvalidUtf8 {
                        path: self.path.clone(),
                        line: self.line,
                        byte_offset: content_offset + error.valid_up_to() as u64,
                    })));
                }
            };
            if text.trim().is_empty() {
                continue;
            }

            let location = Location::new(&self.path, self.line);
            let line = match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(object)) => Line::Object(location, object),
                Ok(other) => Line::Malformed(DataError::InvalidRecord {
                    location,
                    reason: format!("line is {}, expected a JSON object", json_type_name(&other)),
                }),
                Err(source) => Line::Malformed(DataError::InvalidJson { location, source }),
            };
            return Ok(Some(line));
        }
    }
}

/// Reads every line of `reader` through `convert`, applying `mode` to lines
/// that are malformed or that `convert` rejects.
pub(crate) fn collect_records<R, T>(
    mut reader: JsonlReader<R>,
    mode: Mode,
    mut convert: impl FnMut(&Location, &Map<String, Value>) -> Result<T, DataError>,
) -> Result<Loaded<T>, DataError>
where
    R: BufRead,
{
    let mut loaded = Loaded {
        records: Vec::new(),
        skipped: Vec::new(),
    };
    while let Some(line) = reader.next_line()? {
        let result = match line {
            Line::Object(location, object) => {
                convert(&location, &object).map(|value| Located { location, value })
            }
            Line::Malformed(error) => Err(error),
        };
        match (result, mode) {
            (Ok(record), _) => loaded.records.push(record),
            (Err(error), Mode::Strict) => return Err(error),
            (Err(error), Mode::Lenient) => loaded.skipped.push(error),
        }
    }
    Ok(loaded)
}

/// Fails with [`DataError::NoValidRecords`] unless at least one line loaded.
pub(crate) fn require_records<T>(path: &Path, loaded: Loaded<T>) -> Result<Loaded<T>, DataError> {
    if loaded.records.is_empty() {
        return Err(DataError::NoValidRecords {
            path: path.to_path_buf(),
            skipped: loaded.skipped.len(),
        });
    }
    Ok(loaded)
}

/// Returns the string value of `field`, or an error that names the line and
/// the `expected` record shape.
pub(crate) fn string_field<'a>(
    object: &'a Map<String, Value>,
    field: &str,
    location: &Location,
    expected: &'static str,
) -> Result<&'a str, DataError> {
    match object.get(field) {
        Some(Value::String(text)) => Ok(text),
        Some(other) => Err(DataError::WrongType {
            location: location.clone(),
            field: field.to_owned(),
            expected: "a string",
            found: json_type_name(other),
        }),
        None => Err(DataError::MissingField {
            location: location.clone(),
            field: field.to_owned(),
            expected,
        }),
    }
}

/// Returns the JSON type of `value` with its article, for messages.
pub(crate) fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
