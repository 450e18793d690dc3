//! Reads the data shipped in the repository's `data/` folder and checks the
//! counts that `data/README.md` states.
//!
//! The expected corpus counts were computed separately with Python: split
//! each book on blank lines, drop whitespace-only pieces, deduplicate by
//! exact text, and assign validation when
//! `int.from_bytes(sha256(text)[:8], "big") % 1_000_000 < 50_000`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use troupe_data::{
    load_corpus, read_demonstrations, read_preference_pairs, CorpusOptions, DirectorySource,
    JsonlSource, Mode, Source, Split, ValidationFraction,
};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data")
}

/// Held-out fraction the shipped SFT files were split with.
const HELDOUT_FRACTION: f64 = 0.1;

/// (file stem, train examples, held-out examples)
const SFT_SETS: &[(&str, usize, usize)] = &[
    ("capitals", 227, 20),
    ("chatterbot_english", 1065, 111),
    ("perlfaq", 276, 30),
    ("python_faq", 161, 14),
    ("rustc_explain", 183, 17),
];

#[test]
fn sft_files_counts_and_split() {
    let fraction = ValidationFraction::new(HELDOUT_FRACTION).unwrap();
    for &(stem, train_count, heldout_count) in SFT_SETS {
        let train = read_demonstrations(
            data_dir().join(format!("sft/{stem}.train.jsonl")),
            Mode::Strict,
        )
        .unwrap()
        .into_values();
        let heldout = read_demonstrations(
            data_dir().join(format!("sft/{stem}.heldout.jsonl")),
            Mode::Strict,
        )
        .unwrap()
        .into_values();

        assert_eq!(
            (train.len(), heldout.len()),
            (train_count, heldout_count),
            "{stem}"
        );
        assert!(
            train
                .iter()
                .all(|example| example.split(fraction) == Split::Train),
            "{stem}"
        );
        assert!(
            heldout
                .iter()
                .all(|example| example.split(fraction) == Split::Validation),
            "{stem}"
        );
        let train_prompts: BTreeSet<String> =
            train.iter().map(|example| example.split_key()).collect();
        assert!(
            heldout
                .iter()
                .all(|example| !train_prompts.contains(&example.split_key())),
            "{stem}: a prompt is on both sides"
        );
    }
}

#[test]
fn preference_files_counts() {
    for (name, count) in [
        ("bigbench_hhh_alignment.jsonl", 221),
        ("bigbench_truthfulqa.jsonl", 1084),
        ("alpacafarm_fewshot.jsonl", 13),
    ] {
        let loaded =
            read_preference_pairs(data_dir().join("preference").join(name), Mode::Strict).unwrap();
        assert_eq!(loaded.records.len(), count, "{name}");
    }
}

fn shipped_corpus_sources() -> Vec<Source> {
    let corpus = data_dir().join("corpus");
    vec![
        DirectorySource::new(corpus.join("books"), &["txt"])
            .with_separator("\n\n")
            .into(),
        JsonlSource::new(corpus.join("docs/python_faq.jsonl"), "text").into(),
        JsonlSource::new(corpus.join("docs/perlfaq.jsonl"), "text").into(),
        JsonlSource::new(corpus.join("docs/rustc_explain.jsonl"), "text").into(),
        DirectorySource::new(corpus.join("code"), &["py"]).into(),
    ]
}

#[test]
fn corpus_counts() {
    let options = CorpusOptions::new(ValidationFraction::new(0.05).unwrap());

    let corpus = load_corpus(&shipped_corpus_sources(), &options).unwrap();

    let per_source: Vec<(usize, usize, usize)> = corpus
        .report
        .sources
        .iter()
        .map(|source| (source.files_read, source.documents, source.empty_documents))
        .collect();
    assert_eq!(
        per_source,
        [
            (5, 10_436, 23),
            (1, 161, 0),
            (1, 276, 0),
            (1, 501, 0),
            (84, 84, 0)
        ]
    );
    assert_eq!(corpus.report.duplicates_removed(), 145);
    assert_eq!(corpus.train.len() + corpus.validation.len(), 11_313);
    assert_eq!(corpus.validation.len(), 587);
}

#[test]
fn docs_corpus_has_no_heldout_answer() {
    let docs: Vec<String> = ["python_faq", "perlfaq", "rustc_explain"]
        .iter()
        .flat_map(|stem| {
            let path = data_dir().join(format!("corpus/docs/{stem}.jsonl"));
            let source = JsonlSource::new(path, "text").into();
            let corpus =
                load_corpus(&[source], &CorpusOptions::new(ValidationFraction::NONE)).unwrap();
            corpus.train.into_iter().map(|document| document.text)
        })
        .collect();

    // A long response must not appear anywhere in a document. A short one,
    // such as the one-line "no longer emitted" note that many rustc
    // explanations open with, must only not be the whole answer that ends a
    // document.
    for stem in ["python_faq", "perlfaq", "rustc_explain"] {
        let path = data_dir().join(format!("sft/{stem}.heldout.jsonl"));
        for example in read_demonstrations(path, Mode::Strict)
            .unwrap()
            .into_values()
        {
            let response = example.response();
            let found = if response.len() >= 200 {
                docs.iter().any(|document| document.contains(response))
            } else {
                let answer = format!("\n\n{}", response.trim_end());
                docs.iter()
                    .any(|document| document.trim_end().ends_with(&answer))
            };
            assert!(
                !found,
                "{stem}: held-out answer to {:?} is in the docs corpus",
                example.split_key()
            );
        }
    }
}
