//! Pretraining corpus ingestion: documents from directories of text files
//! and from JSONL files, validated, deduplicated and split.
//!
//! A [`DirectorySource`] is walked recursively in file-name order, skipping
//! hidden files and directories (names starting with `.`) and files whose
//! extension is not listed. Each file is one document, or one document per
//! piece when a separator is set. A [`JsonlSource`] yields one document per
//! line, taken from a configurable string field.
//!
//! Every document is checked as UTF-8. Documents that are empty or only
//! whitespace are skipped and counted. Documents with identical text are
//! kept once, and each removed copy is reported. The document ID is the
//! SHA-256 of the text, and the train/validation split is taken from it
//! (see [`crate::split`]). Both sides are sorted by ID, an order fixed by
//! the content alone, so listing the files or sources in another order
//! changes neither the split nor the order.
//!
//! The whole corpus is held in memory.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use walkdir::WalkDir;

use crate::jsonl::{collect_records, string_field, JsonlReader};
use crate::split::{Split, ValidationFraction};
use crate::{DataError, Location, Mode};

const BYTE_ORDER_MARK: &[u8] = b"\xEF\xBB\xBF";

/// A corpus input: a directory of text files or a JSONL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Directory(DirectorySource),
    Jsonl(JsonlSource),
}

impl Source {
    pub fn path(&self) -> &Path {
        match self {
            Source::Directory(source) => &source.path,
            Source::Jsonl(source) => &source.path,
        }
    }

    /// Describes the filter applied to this source, for messages.
    fn filter_description(&self) -> String {
        match self {
            Source::Directory(source) if source.extensions.is_empty() => "all files".to_owned(),
            Source::Directory(source) => format!("extensions: {}", source.extensions.join(", ")),
            Source::Jsonl(source) => format!("JSONL text field \"{}\"", source.text_field),
        }
    }
}

impl From<DirectorySource> for Source {
    fn from(source: DirectorySource) -> Self {
        Source::Directory(source)
    }
}

impl From<JsonlSource> for Source {
    fn from(source: JsonlSource) -> Self {
        Source::Jsonl(source)
    }
}

/// A directory walked recursively, or a single file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectorySource {
    pub path: PathBuf,
    /// File extensions to read, without the dot and compared ignoring case.
    /// An empty list reads every file.
    pub extensions: Vec<String>,
    /// When set, each file is cut at every occurrence of this string and
    /// each piece is a document, kept verbatim. When unset, a file is one
    /// document.
    pub separator: Option<String>,
}

impl DirectorySource {
    /// Reads the files under `path` whose extension is one of `extensions`
    /// (a leading dot is accepted and dropped), one document per file.
    pub fn new<S: AsRef<str>>(path: impl Into<PathBuf>, extensions: &[S]) -> Self {
        let extensions = extensions
            .iter()
            .map(|extension| {
                extension
                    .as_ref()
                    .trim_start_matches('.')
                    .to_ascii_lowercase()
            })
            .collect();
        DirectorySource {
            path: path.into(),
            extensions,
            separator: None,
        }
    }

    /// Cuts every file at `separator` into several documents, such as
    /// `"\n\n"` for paragraphs or `"\n%\n"` for a fortune file.
    /// The match is exact, so files with CRLF line ends need `"\r\n\r\n"`
    /// for paragraphs.
    pub fn with_separator(mut self, separator: impl Into<String>) -> Self {
        self.separator = Some(separator.into());
        self
    }

    fn accepts(&self, path: &Path) -> bool {
        if self.extensions.is_empty() {
            return true;
        }
        let Some(extension) = path.extension().and_then(|extension| extension.to_str()) else {
            return false;
        };
        // The field is public, so entries set directly may still carry a
        // dot or capitals.
        self.extensions.iter().any(|wanted| {
            wanted
                .trim_start_matches('.')
                .eq_ignore_ascii_case(extension)
        })
    }
}

/// A JSONL file with one document per line in a string field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonlSource {
    pub path: PathBuf,
    /// Top-level field that contains the document text, such as `"text"`.
    pub text_field: String,
}

impl JsonlSource {
    pub fn new(path: impl Into<PathBuf>, text_field: impl Into<String>) -> Self {
        JsonlSource {
            path: path.into(),
            text_field: text_field.into(),
        }
    }
}

/// Settings of [`load_corpus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorpusOptions {
    /// Share of documents held out for validation.
    pub validation_fraction: ValidationFraction,
    /// Whether an undecodable file or malformed JSONL line fails the load.
    pub mode: Mode,
}

impl CorpusOptions {
    /// Strict loading with the given validation fraction.
    pub fn new(validation_fraction: ValidationFraction) -> Self {
        CorpusOptions {
            validation_fraction,
            mode: Mode::Strict,
        }
    }
}

/// SHA-256 of a document's UTF-8 text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocumentId(pub [u8; 32]);

impl DocumentId {
    pub fn of_text(text: &str) -> Self {
        DocumentId(Sha256::digest(text.as_bytes()).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for DocumentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One pretraining document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub id: DocumentId,
    pub text: String,
    /// The file, and the line where the document starts (1 for a whole file,
    /// the line of the record for JSONL). For duplicated text this is the
    /// smallest location among the copies.
    pub location: Location,
}

/// A document dropped because an identical one was kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    pub id: DocumentId,
    pub kept: Location,
    pub removed: Location,
}

/// Counts for one source, taken before deduplication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceReport {
    pub path: PathBuf,
    /// Files opened (1 for a JSONL source).
    pub files_read: usize,
    /// Files left out because of their extension.
    pub files_filtered_out: usize,
    /// Non-empty documents found.
    pub documents: usize,
    /// Documents left out because they were empty or only whitespace.
    pub empty_documents: usize,
}

/// Counts and problems found while loading a corpus.
#[derive(Debug, Default)]
pub struct IngestReport {
    /// One entry per source, in the order the sources were given.
    pub sources: Vec<SourceReport>,
    /// Each removed copy of duplicated text, in ID order.
    pub duplicates: Vec<Duplicate>,
    /// Undecodable files and malformed lines skipped in lenient mode.
    pub skipped: Vec<DataError>,
}

impl IngestReport {
    pub fn duplicates_removed(&self) -> usize {
        self.duplicates.len()
    }
}

/// A deduplicated corpus split into train and validation documents, each
/// side sorted by [`DocumentId`].
#[derive(Debug)]
pub struct Corpus {
    pub train: Vec<Document>,
    pub validation: Vec<Document>,
    pub report: IngestReport,
}

/// Loads, validates, deduplicates and splits the documents of `sources`.
///
/// Fails when a source path does not exist (checked for every source before
/// anything is read), when a source yields no document, on any I/O error,
/// and in strict mode on the first invalid UTF-8 file or malformed JSONL
/// line.
pub fn load_corpus(sources: &[Source], options: &CorpusOptions) -> Result<Corpus, DataError> {
    if sources.is_empty() {
        return Err(DataError::NoSources);
    }
    for source in sources {
        check_source(source)?;
    }

    let mut report = IngestReport::default();
    let mut documents = Vec::new();
    for source in sources {
        let source_report = match source {
            Source::Directory(directory) => {
                read_directory(directory, options.mode, &mut documents, &mut report.skipped)?
            }
            Source::Jsonl(jsonl) => {
                read_jsonl(jsonl, options.mode, &mut documents, &mut report.skipped)?
            }
        };
        if source_report.documents == 0 {
            return Err(DataError::EmptyCorpus {
                path: source.path().to_path_buf(),
                filter: source.filter_description(),
            });
        }
        report.sources.push(source_report);
    }

    let documents = remove_duplicates(documents, &mut report.duplicates);
    let (validation, train) = documents.into_iter().partition(|document| {
        Split::of_digest(&document.id.0, options.validation_fraction) == Split::Validation
    });
    Ok(Corpus {
        train,
        validation,
        report,
    })
}

fn check_source(source: &Source) -> Result<(), DataError> {
    let path = source.path();
    match path.try_exists() {
        Ok(true) => {}
        Ok(false) => {
            return Err(DataError::NotFound {
                path: path.to_path_buf(),
            })
        }
        Err(error) => return Err(DataError::io(path, error)),
    }
    let problem = match source {
        Source::Directory(directory) => match &directory.separator {
            Some(separator) if separator.is_empty() => Some("the separator is empty"),
            _ => None,
        },
        Source::Jsonl(jsonl) if jsonl.text_field.is_empty() => Some("the text field name is empty"),
        Source::Jsonl(_) => None,
    };
    match problem {
        Some(reason) => Err(DataError::InvalidSource {
            path: path.to_path_buf(),
            reason: reason.to_owned(),
        }),
        None => Ok(()),
    }
}

fn read_directory(
    source: &DirectorySource,
    mode: Mode,
    documents: &mut Vec<Document>,
    skipped: &mut Vec<DataError>,
) -> Result<SourceReport, DataError> {
    let mut report = SourceReport {
        path: source.path.clone(),
        ..SourceReport::default()
    };
    let walker = WalkDir::new(&source.path)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|entry| entry.depth() == 0 || !is_hidden(entry.file_name()));

    for entry in walker {
        let entry = entry.map_err(|error| {
            let path = error.path().unwrap_or(&source.path).to_path_buf();
            DataError::io(&path, error.into())
        })?;
        if !entry.file_type().is_file() {
            continue;
        }
        if !source.accepts(entry.path()) {
            report.files_filtered_out += 1;
            continue;
        }

        let bytes = fs::read(entry.path()).map_err(|error| DataError::io(entry.path(), error))?;
        report.files_read += 1;
        let text = match decode_utf8(entry.path(), &bytes) {
            Ok(text) => text,
            Err(error) if mode == Mode::Lenient => {
                skipped.push(error);
                continue;
            }
            Err(error) => return Err(error),
        };

        match &source.separator {
            None => push_document(documents, &mut report, text, Location::new(entry.path(), 1)),
            Some(separator) => {
                for (line, piece) in pieces_with_lines(text, separator) {
                    push_document(
                        documents,
                        &mut report,
                        piece,
                        Location::new(entry.path(), line),
                    );
                }
            }
        }
    }
    Ok(report)
}

fn read_jsonl(
    source: &JsonlSource,
    mode: Mode,
    documents: &mut Vec<Document>,
    skipped: &mut Vec<DataError>,
) -> Result<SourceReport, DataError> {
    let expected =
        "the document text in this field (set the source's text field to the key the file uses)";
    let reader = JsonlReader::open(&source.path)?;
    let loaded = collect_records(reader, mode, |location, object| {
        string_field(object, &source.text_field, location, expected).map(str::to_owned)
    })?;

    let mut report = SourceReport {
        path: source.path.clone(),
        files_read: 1,
        ..SourceReport::default()
    };
    skipped.extend(loaded.skipped);
    for record in loaded.records {
        push_document(documents, &mut report, &record.value, record.location);
    }
    Ok(report)
}

fn push_document(
    documents: &mut Vec<Document>,
    report: &mut SourceReport,
    text: &str,
    location: Location,
) {
    if text.trim().is_empty() {
        report.empty_documents += 1;
        return;
    }
    report.documents += 1;
    documents.push(Document {
        id: DocumentId::of_text(text),
        text: text.to_owned(),
        location,
    });
}

/// Decodes a whole file as UTF-8, without a leading byte order mark.
fn decode_utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str, DataError> {
    let (start, content) = match bytes.strip_prefix(BYTE_ORDER_MARK) {
        Some(content) => (BYTE_ORDER_MARK.len(), content),
        None => (0, bytes),
    };
    std::str::from_utf8(content).map_err(|error| {
        let byte_offset = start + error.valid_up_to();
        let line = 1 + bytes[..byte_offset]
            .iter()
            .filter(|&&byte| byte == b'\n')
            .count();
        DataError::InvalidUtf8 {
            path: path.to_path_buf(),
            line,
            byte_offset: byte_offset as u64,
        }
    })
}

/// Cuts `text` at each `separator` and pairs every piece with the line it
/// starts on, counted from 1.
fn pieces_with_lines<'a>(text: &'a str, separator: &'a str) -> Vec<(usize, &'a str)> {
    let mut pieces = Vec::new();
    let mut line = 1;
    for piece in text.split(separator) {
        pieces.push((line, piece));
        line += piece.matches('\n').count() + separator.matches('\n').count();
    }
    pieces
}

fn is_hidden(file_name: &std::ffi::OsStr) -> bool {
    file_name.to_str().is_some_and(|name| name.starts_with('.'))
}

/// Keeps one document per ID, the one with the smallest location, and
/// returns them sorted by ID.
fn remove_duplicates(
    mut documents: Vec<Document>,
    duplicates: &mut Vec<Duplicate>,
) -> Vec<Document> {
    documents.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| a.location.cmp(&b.location)));
    let mut unique: Vec<Document> = Vec::with_capacity(documents.len());
    for document in documents {
        match unique.last() {
            Some(kept) if kept.id == document.id => duplicates.push(Duplicate {
                id: document.id,
                kept: kept.location.clone(),
                removed: document.location,
            }),
            _ => unique.push(document),
        }
    }
    unique
}
