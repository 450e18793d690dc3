//! Corpus ingestion: error locations, filtering, deduplication and the split.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tempfile::TempDir;
use troupe_data::split::bucket_of_digest;
use troupe_data::{
    load_corpus, Corpus, CorpusOptions, DataError, DirectorySource, DocumentId, JsonlSource,
    Location, Mode, Source, Split, ValidationFraction,
};

fn write(root: &Path, relative: &str, bytes: &[u8]) -> PathBuf {
    let path = root.join(relative);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, bytes).unwrap();
    path
}

fn options(fraction: f64) -> CorpusOptions {
    CorpusOptions::new(ValidationFraction::new(fraction).unwrap())
}

fn lenient(fraction: f64) -> CorpusOptions {
    CorpusOptions {
        mode: Mode::Lenient,
        ..options(fraction)
    }
}

fn text_dir(path: &Path) -> Source {
    DirectorySource::new(path, &["txt"]).into()
}

fn ids(documents: &[troupe_data::Document]) -> Vec<DocumentId> {
    documents.iter().map(|document| document.id).collect()
}

#[test]
fn missing_path_is_not_found() {
    let root = TempDir::new().unwrap();
    write(root.path(), "a.txt", b"text");
    let missing = root.path().join("no-such-dir");

    // The missing source is second, so the check must run before any reading.
    let error =
        load_corpus(&[text_dir(root.path()), text_dir(&missing)], &options(0.1)).unwrap_err();

    match &error {
        DataError::NotFound { path } => assert_eq!(path, &missing),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(
        error.to_string().contains("no-such-dir: not found"),
        "{error}"
    );
}

#[test]
fn missing_jsonl_is_not_found() {
    let root = TempDir::new().unwrap();
    let missing = root.path().join("absent.jsonl");
    let error =
        load_corpus(&[JsonlSource::new(&missing, "text").into()], &options(0.1)).unwrap_err();
    assert!(
        matches!(error, DataError::NotFound { ref path } if path == &missing),
        "{error:?}"
    );
}

#[test]
fn invalid_utf8_reports_line_and_offset() {
    let root = TempDir::new().unwrap();
    // "first line\n" is 11 bytes and "second " 7 more, so 0xFF is at offset 18.
    let file = write(root.path(), "bad.txt", b"first line\nsecond \xFF line\n");

    let error = load_corpus(&[text_dir(root.path())], &options(0.1)).unwrap_err();

    match &error {
        DataError::InvalidUtf8 {
            path,
            line,
            byte_offset,
        } => {
            assert_eq!(path, &file);
            assert_eq!(*line, 2);
            assert_eq!(*byte_offset, 18);
        }
        other => panic!("expected InvalidUtf8, got {other:?}"),
    }
    assert!(
        error
            .to_string()
            .contains("bad.txt:2: invalid UTF-8 at byte offset 18"),
        "{error}"
    );
}

#[test]
fn invalid_utf8_offset_counts_byte_order_mark() {
    let root = TempDir::new().unwrap();
    // A byte order mark (3 bytes), "ab", then a truncated 2-byte sequence.
    write(root.path(), "bom.txt", b"\xEF\xBB\xBFab\xC3");

    let error = load_corpus(&[text_dir(root.path())], &options(0.1)).unwrap_err();

    assert!(
        matches!(
            error,
            DataError::InvalidUtf8 {
                line: 1,
                byte_offset: 5,
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn byte_order_mark_is_not_document_text() {
    let root = TempDir::new().unwrap();
    write(root.path(), "bom.txt", b"\xEF\xBB\xBFhello");

    let corpus = load_corpus(&[text_dir(root.path())], &options(0.0)).unwrap();

    assert_eq!(corpus.train.len(), 1);
    assert_eq!(corpus.train[0].text, "hello");
}

#[test]
fn jsonl_invalid_utf8_reports_line_and_offset() {
    let root = TempDir::new().unwrap();
    // Line 1 is 14 bytes; on line 2, 0xFF follows `{"text": "` (10 bytes).
    let file = write(
        root.path(),
        "docs.jsonl",
        b"{\"text\":\"ok\"}\n{\"text\": \"\xFF\"}\n",
    );

    let error = load_corpus(&[JsonlSource::new(&file, "text").into()], &options(0.1)).unwrap_err();

    match error {
        DataError::InvalidUtf8 {
            path,
            line,
            byte_offset,
        } => {
            assert_eq!(path, file);
            assert_eq!(line, 2);
            assert_eq!(byte_offset, 24);
        }
        other => panic!("expected InvalidUtf8, got {other:?}"),
    }
}

#[test]
fn jsonl_line_not_json() {
    let root = TempDir::new().unwrap();
    // The blank line 2 is skipped but still counted.
    let file = write(
        root.path(),
        "docs.jsonl",
        b"{\"text\": \"a\"}\n\n{\"text\": \"unterminated\n",
    );

    let error = load_corpus(&[JsonlSource::new(&file, "text").into()], &options(0.1)).unwrap_err();

    assert!(matches!(error, DataError::InvalidJson { .. }), "{error:?}");
    assert_eq!(error.location(), Some(Location::new(&file, 3)));
    assert!(
        error.to_string().contains("docs.jsonl:3: invalid JSON"),
        "{error}"
    );
}

#[test]
fn jsonl_missing_text_field() {
    let root = TempDir::new().unwrap();
    let file = write(
        root.path(),
        "docs.jsonl",
        b"{\"text\": \"a\"}\n{\"body\": \"b\"}\n",
    );

    let error = load_corpus(&[JsonlSource::new(&file, "text").into()], &options(0.1)).unwrap_err();

    match &error {
        DataError::MissingField {
            location, field, ..
        } => {
            assert_eq!(location, &Location::new(&file, 2));
            assert_eq!(field, "text");
        }
        other => panic!("expected MissingField, got {other:?}"),
    }
    assert!(
        error
            .to_string()
            .contains("docs.jsonl:2: missing field \"text\""),
        "{error}"
    );
}

#[test]
fn jsonl_text_field_is_configurable() {
    let root = TempDir::new().unwrap();
    let file = write(
        root.path(),
        "docs.jsonl",
        b"{\"body\": \"b\", \"text\": 1}\n",
    );

    let corpus = load_corpus(&[JsonlSource::new(&file, "body").into()], &options(0.0)).unwrap();

    assert_eq!(corpus.train.len(), 1);
    assert_eq!(corpus.train[0].text, "b");
    assert_eq!(corpus.train[0].location, Location::new(&file, 1));
}

#[test]
fn jsonl_text_not_a_string() {
    let root = TempDir::new().unwrap();
    let file = write(root.path(), "docs.jsonl", b"{\"text\": 5}\n");

    let error = load_corpus(&[JsonlSource::new(&file, "text").into()], &options(0.1)).unwrap_err();

    assert!(
        matches!(error, DataError::WrongType { ref field, found: "a number", .. } if field == "text"),
        "{error:?}"
    );
    assert_eq!(error.location(), Some(Location::new(&file, 1)));
}

#[test]
fn jsonl_line_not_an_object() {
    let root = TempDir::new().unwrap();
    let file = write(root.path(), "docs.jsonl", b"[\"text\"]\n");

    let error = load_corpus(&[JsonlSource::new(&file, "text").into()], &options(0.1)).unwrap_err();

    assert!(
        matches!(error, DataError::InvalidRecord { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("docs.jsonl:1: line is an array"),
        "{error}"
    );
}

#[test]
fn empty_after_extension_filter() {
    let root = TempDir::new().unwrap();
    write(root.path(), "weights.bin", b"\x00\x01");
    write(root.path(), "notes.md", b"# notes");

    let error = load_corpus(&[text_dir(root.path())], &options(0.1)).unwrap_err();

    match &error {
        DataError::EmptyCorpus { path, filter } => {
            assert_eq!(path, root.path());
            assert_eq!(filter, "extensions: txt");
        }
        other => panic!("expected EmptyCorpus, got {other:?}"),
    }
}

#[test]
fn whitespace_files_are_empty_corpus() {
    let root = TempDir::new().unwrap();
    write(root.path(), "blank.txt", b"  \n\t\n");
    write(root.path(), "empty.txt", b"");

    let error = load_corpus(&[text_dir(root.path())], &options(0.1)).unwrap_err();

    assert!(matches!(error, DataError::EmptyCorpus { .. }), "{error:?}");
}

#[test]
fn every_source_must_yield_documents() {
    let root = TempDir::new().unwrap();
    write(root.path(), "good/a.txt", b"text");
    let only_markdown = root.path().join("md");
    write(&only_markdown, "b.md", b"# heading");

    let sources = [
        text_dir(&root.path().join("good")),
        text_dir(&only_markdown),
    ];
    let error = load_corpus(&sources, &options(0.1)).unwrap_err();

    assert!(
        matches!(error, DataError::EmptyCorpus { ref path, .. } if path == &only_markdown),
        "{error:?}"
    );
}

#[test]
fn no_sources_rejected() {
    let error = load_corpus(&[], &options(0.1)).unwrap_err();
    assert!(matches!(error, DataError::NoSources), "{error:?}");
}

#[test]
fn empty_separator_rejected() {
    let root = TempDir::new().unwrap();
    write(root.path(), "a.txt", b"text");
    let source = DirectorySource::new(root.path(), &["txt"]).with_separator("");

    let error = load_corpus(&[source.into()], &options(0.1)).unwrap_err();

    assert!(
        matches!(error, DataError::InvalidSource { .. }),
        "{error:?}"
    );
}

#[test]
fn walk_is_recursive_and_filtered() {
    let root = TempDir::new().unwrap();
    write(root.path(), "a.txt", b"alpha");
    write(root.path(), "sub/deeper/b.TXT", b"beta");
    write(root.path(), "sub/c.md", b"gamma");
    write(root.path(), "README", b"no extension");
    write(root.path(), ".git/d.txt", b"hidden directory");
    write(root.path(), ".e.txt", b"hidden file");

    let source = DirectorySource::new(root.path(), &[".txt", "MD"]);
    let corpus = load_corpus(&[source.into()], &options(0.0)).unwrap();

    let mut texts: Vec<&str> = corpus
        .train
        .iter()
        .map(|document| document.text.as_str())
        .collect();
    texts.sort();
    assert_eq!(texts, ["alpha", "beta", "gamma"]);
    let report = &corpus.report.sources[0];
    assert_eq!(report.files_read, 3);
    assert_eq!(report.files_filtered_out, 1);
    assert_eq!(report.documents, 3);
}

#[test]
fn empty_extension_list_reads_every_file() {
    let root = TempDir::new().unwrap();
    write(root.path(), "a.txt", b"alpha");
    write(root.path(), "README", b"no extension");

    let source = DirectorySource::new(root.path(), &[] as &[&str]);
    let corpus = load_corpus(&[source.into()], &options(0.0)).unwrap();

    assert_eq!(corpus.train.len(), 2);
}

#[test]
fn separator_pieces_start_lines() {
    let root = TempDir::new().unwrap();
    let file = write(
        root.path(),
        "riddles.txt",
        b"one\n%\ntwo\nlines\n%\n  \n%\nthree\n",
    );
    let source = DirectorySource::new(root.path(), &["txt"]).with_separator("\n%\n");

    let corpus = load_corpus(&[source.into()], &options(0.0)).unwrap();

    let mut documents: Vec<(String, usize)> = corpus
        .train
        .iter()
        .map(|document| (document.text.clone(), document.location.line))
        .collect();
    documents.sort_by_key(|(_, line)| *line);
    assert_eq!(
        documents,
        [
            ("one".to_owned(), 1),
            ("two\nlines".to_owned(), 3),
            ("three\n".to_owned(), 8),
        ]
    );
    assert!(corpus
        .train
        .iter()
        .all(|document| document.location.path == file));
    assert_eq!(corpus.report.sources[0].empty_documents, 1);
}

#[test]
fn duplicates_removed_and_reported() {
    let root = TempDir::new().unwrap();
    let first = write(root.path(), "corpus/a.txt", b"same text");
    write(root.path(), "corpus/b.txt", b"same text");
    write(root.path(), "corpus/c.txt", b"other text");
    let jsonl = write(
        root.path(),
        "docs.jsonl",
        b"{\"text\": \"other text\"}\n{\"text\": \"same text\"}\n",
    );

    // The JSONL source comes first, but the kept copy is the smallest location.
    let sources = [
        JsonlSource::new(&jsonl, "text").into(),
        text_dir(&root.path().join("corpus")),
    ];
    let corpus = load_corpus(&sources, &options(0.0)).unwrap();

    assert_eq!(corpus.train.len(), 2);
    assert_eq!(corpus.report.duplicates_removed(), 3);
    let same = DocumentId::of_text("same text");
    let kept = corpus
        .train
        .iter()
        .find(|document| document.id == same)
        .unwrap();
    assert_eq!(kept.location, Location::new(&first, 1));
    let removed_same: Vec<&Location> = corpus
        .report
        .duplicates
        .iter()
        .filter(|duplicate| duplicate.id == same)
        .map(|duplicate| &duplicate.removed)
        .collect();
    assert_eq!(
        removed_same,
        [
            &Location::new(root.path().join("corpus/b.txt"), 1),
            &Location::new(&jsonl, 2),
        ]
    );
    assert_eq!(
        corpus.report.sources[0].documents, 2,
        "counts are before deduplication"
    );
    assert_eq!(corpus.report.sources[1].documents, 3);
}

fn many_documents(root: &Path, count: usize) {
    for index in 0..count {
        write(
            root,
            &format!("part{}/doc{index:04}.txt", index % 7),
            format!("document {index}").as_bytes(),
        );
    }
}

fn split_ids(corpus: &Corpus) -> (Vec<DocumentId>, Vec<DocumentId>) {
    (ids(&corpus.train), ids(&corpus.validation))
}

#[test]
fn split_same_across_runs() {
    let root = TempDir::new().unwrap();
    many_documents(root.path(), 300);

    let first = load_corpus(&[text_dir(root.path())], &options(0.2)).unwrap();
    let second = load_corpus(&[text_dir(root.path())], &options(0.2)).unwrap();

    assert_eq!(split_ids(&first), split_ids(&second));
    assert_eq!(first.train.len() + first.validation.len(), 300);
    assert!(!first.validation.is_empty());
}

#[test]
fn split_ignores_source_order() {
    let root = TempDir::new().unwrap();
    many_documents(&root.path().join("texts"), 100);
    let mut lines = String::new();
    for index in 0..100 {
        lines.push_str(&format!("{{\"text\": \"record {index}\"}}\n"));
    }
    let jsonl = write(root.path(), "records.jsonl", lines.as_bytes());
    let directory = text_dir(&root.path().join("texts"));
    let records: Source = JsonlSource::new(&jsonl, "text").into();

    let forward = load_corpus(&[directory.clone(), records.clone()], &options(0.3)).unwrap();
    let reverse = load_corpus(&[records, directory], &options(0.3)).unwrap();

    assert_eq!(split_ids(&forward), split_ids(&reverse));
    assert_eq!(forward.report.sources[0].path, root.path().join("texts"));
    assert_eq!(reverse.report.sources[0].path, jsonl);
}

#[test]
fn split_ignores_file_names_and_layout() {
    let first = TempDir::new().unwrap();
    let second = TempDir::new().unwrap();
    for index in 0..100 {
        let text = format!("document {index}");
        write(first.path(), &format!("a/{index:03}.txt"), text.as_bytes());
        // The same texts in reverse name order and a different tree.
        write(
            second.path(),
            &format!("x/y/{:03}.txt", 999 - index),
            text.as_bytes(),
        );
    }

    let one = load_corpus(&[text_dir(first.path())], &options(0.3)).unwrap();
    let two = load_corpus(&[text_dir(second.path())], &options(0.3)).unwrap();

    assert_eq!(split_ids(&one), split_ids(&two));
}

#[test]
fn documents_sorted_by_id() {
    let root = TempDir::new().unwrap();
    many_documents(root.path(), 50);

    let corpus = load_corpus(&[text_dir(root.path())], &options(0.5)).unwrap();

    for side in [&corpus.train, &corpus.validation] {
        assert!(side.windows(2).all(|pair| pair[0].id < pair[1].id));
    }
}

#[test]
fn split_fraction_extremes() {
    let root = TempDir::new().unwrap();
    many_documents(root.path(), 40);

    let none = load_corpus(&[text_dir(root.path())], &options(0.0)).unwrap();
    let all = load_corpus(&[text_dir(root.path())], &options(1.0)).unwrap();

    assert_eq!((none.train.len(), none.validation.len()), (40, 0));
    assert_eq!((all.train.len(), all.validation.len()), (0, 40));
}

#[test]
fn split_share_near_fraction() {
    let root = TempDir::new().unwrap();
    many_documents(root.path(), 1000);

    let corpus = load_corpus(&[text_dir(root.path())], &options(0.1)).unwrap();

    // 1000 draws at p = 0.1 have a standard deviation of about 9.5.
    let held_out = corpus.validation.len();
    assert!(
        (60..=140).contains(&held_out),
        "{held_out} of 1000 held out"
    );
}

#[test]
fn split_matches_reference_buckets() {
    // Buckets computed with Python's hashlib:
    //   int.from_bytes(sha256(key).digest()[:8], "big") % 1_000_000
    let cases: [(&[u8], u64); 3] = [
        (b"", 261_652),
        (b"hello", 475_342),
        (b"What is the capital of Peru?", 132_180),
    ];
    for (key, bucket) in cases {
        let digest: [u8; 32] = Sha256::digest(key).into();
        assert_eq!(bucket_of_digest(&digest), bucket, "key {key:?}");
    }

    // A record is held out when its bucket is below the threshold.
    let at = ValidationFraction::new(0.475342).unwrap();
    let above = ValidationFraction::new(0.475343).unwrap();
    assert_eq!(Split::of_key(b"hello", at), Split::Train);
    assert_eq!(Split::of_key(b"hello", above), Split::Validation);
}

#[test]
fn fraction_outside_range_rejected() {
    for value in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
        let error = ValidationFraction::new(value).unwrap_err();
        assert!(
            matches!(error, DataError::InvalidFraction { .. }),
            "{value}: {error:?}"
        );
    }
    assert_eq!(ValidationFraction::new(0.25).unwrap().get(), 0.25);
}

#[test]
fn lenient_skips_bad_file_and_line() {
    let root = TempDir::new().unwrap();
    write(root.path(), "texts/good.txt", b"good text");
    let bad = write(root.path(), "texts/latin1.txt", b"caf\xE9\n");
    let jsonl = write(
        root.path(),
        "docs.jsonl",
        b"{\"text\": \"fine\"}\nnot json\n{\"body\": 1}\n",
    );
    let sources = [
        text_dir(&root.path().join("texts")),
        JsonlSource::new(&jsonl, "text").into(),
    ];

    let strict = load_corpus(&sources, &options(0.0)).unwrap_err();
    let corpus = load_corpus(&sources, &lenient(0.0)).unwrap();

    assert!(
        matches!(strict, DataError::InvalidUtf8 { ref path, .. } if path == &bad),
        "{strict:?}"
    );
    assert_eq!(corpus.train.len(), 2);
    let skipped: Vec<Option<Location>> = corpus
        .report
        .skipped
        .iter()
        .map(DataError::location)
        .collect();
    assert_eq!(
        skipped,
        [
            Some(Location::new(&bad, 1)),
            Some(Location::new(&jsonl, 2)),
            Some(Location::new(&jsonl, 3)),
        ]
    );
}
