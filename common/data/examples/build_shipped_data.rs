//! Rebuilds the repository's `data/` folder from the extracted source files.
//!
//! ```text
//! cargo run -p troupe-data --example build_shipped_data -- EXTRACTED_DIR PYTHON_STDLIB_DIR OUT_DIR
//! ```
//!
//! EXTRACTED_DIR contains the files extracted from their packages under the
//! names in `data/README.md` (tinyshakespeare_input.txt, sft_perlfaq.jsonl,
//! ...). PYTHON_STDLIB_DIR is Debian's `/usr/lib/python3.11`. The rustc
//! explanations come from `rustc --explain` (set `RUSTC` to pick the
//! toolchain). Every input is read through this crate's readers in strict
//! mode, so a malformed source line stops the build.
//!
//! SFT files are split by [`Demonstration::split`] with a held-out fraction
//! of 0.1, and each line is copied verbatim to the `.train.jsonl` or
//! `.heldout.jsonl` file. The docs corpus takes only training-side examples,
//! so no held-out answer is in the pretraining corpus.

use std::collections::BTreeSet;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use troupe_data::{read_demonstrations, read_preference_pairs, Mode, Split, ValidationFraction};

/// Share of SFT prompts held out, and the fraction the shipped files use.
const HELDOUT_FRACTION: f64 = 0.1;

/// Books: (extracted file, shipped name).
const BOOKS: &[(&str, &str)] = &[
    ("tinyshakespeare_input.txt", "tinyshakespeare.txt"),
    ("shakespeare_hamlet_gut.txt", "shakespeare_hamlet.txt"),
    ("shakespeare_sonnets_gut.txt", "shakespeare_sonnets.txt"),
    ("devils_dictionary.txt", "devils_dictionary.txt"),
    ("fortunes_riddles.txt", "fortunes_riddles.txt"),
];

/// SFT sets: (extracted file, shipped stem).
const DEMONSTRATIONS: &[(&str, &str)] = &[
    ("sft_bsdgames_capitals.jsonl", "capitals"),
    ("sft_chatterbot_english.jsonl", "chatterbot_english"),
    ("sft_python_faq.jsonl", "python_faq"),
    ("sft_perlfaq.jsonl", "perlfaq"),
    ("sft_rustc_explain_first200.jsonl", "rustc_explain"),
];

/// Preference sets copied byte for byte: (extracted file, shipped name).
const PREFERENCES: &[(&str, &str)] = &[
    (
        "pref_bigbench_hhh_alignment.jsonl",
        "bigbench_hhh_alignment.jsonl",
    ),
    (
        "pref_bigbench_truthfulqa.jsonl",
        "bigbench_truthfulqa.jsonl",
    ),
];

/// Files of the Python standard library, relative to PYTHON_STDLIB_DIR. All
/// are under the PSF license alone: modules that carry another license
/// notice in the file or in Debian's copyright file (logging, optparse,
/// trace, re, tarfile, asyncio) are left out.
const PYTHON_FILES: &[&str] = &[
    "_pydecimal.py",
    "abc.py",
    "argparse.py",
    "ast.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "collections/__init__.py",
    "concurrent/futures/__init__.py",
    "concurrent/futures/_base.py",
    "concurrent/futures/process.py",
    "concurrent/futures/thread.py",
    "configparser.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "datetime.py",
    "difflib.py",
    "doctest.py",
    "email/__init__.py",
    "email/_encoded_words.py",
    "email/_header_value_parser.py",
    "email/_parseaddr.py",
    "email/_policybase.py",
    "email/base64mime.py",
    "email/charset.py",
    "email/contentmanager.py",
    "email/encoders.py",
    "email/errors.py",
    "email/feedparser.py",
    "email/generator.py",
    "email/header.py",
    "email/headerregistry.py",
    "email/iterators.py",
    "email/message.py",
    "email/parser.py",
    "email/policy.py",
    "email/quoprimime.py",
    "email/utils.py",
    "enum.py",
    "fnmatch.py",
    "fractions.py",
    "functools.py",
    "gettext.py",
    "glob.py",
    "graphlib.py",
    "heapq.py",
    "http/client.py",
    "http/server.py",
    "importlib/_bootstrap.py",
    "importlib/_bootstrap_external.py",
    "inspect.py",
    "ipaddress.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "json/scanner.py",
    "json/tool.py",
    "numbers.py",
    "operator.py",
    "os.py",
    "pathlib.py",
    "pprint.py",
    "pydoc.py",
    "queue.py",
    "random.py",
    "sched.py",
    "selectors.py",
    "shlex.py",
    "shutil.py",
    "statistics.py",
    "string.py",
    "subprocess.py",
    "tempfile.py",
    "textwrap.py",
    "threading.py",
    "tokenize.py",
    "traceback.py",
    "typing.py",
    "urllib/parse.py",
    "uuid.py",
    "warnings.py",
    "weakref.py",
];

fn main() -> Result<(), Box<dyn Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let [extracted, stdlib, out] = arguments.as_slice() else {
        return Err("usage: build_shipped_data EXTRACTED_DIR PYTHON_STDLIB_DIR OUT_DIR".into());
    };
    let (extracted, stdlib, out) = (Path::new(extracted), Path::new(stdlib), Path::new(out));
    let fraction = ValidationFraction::new(HELDOUT_FRACTION)?;

    copy_books(extracted, &out.join("corpus/books"))?;
    copy_python(stdlib, &out.join("corpus/code/python"))?;
    let heldout_rustc_prompts = split_demonstrations(extracted, out, fraction)?;
    build_docs(out, &heldout_rustc_prompts)?;
    copy_preferences(extracted, &out.join("preference"))?;
    Ok(())
}

fn copy_books(extracted: &Path, books: &Path) -> Result<(), Box<dyn Error>> {
    fs::create_dir_all(books)?;
    for (source, name) in BOOKS {
        fs::copy(extracted.join(source), books.join(name))?;
    }
    Ok(())
}

fn copy_python(stdlib: &Path, code: &Path) -> Result<(), Box<dyn Error>> {
    for relative in PYTHON_FILES {
        let target = code.join(relative);
        fs::create_dir_all(target.parent().expect("a file path has a parent"))?;
        fs::copy(stdlib.join(relative), &target)?;
    }
    Ok(())
}

/// Writes the train and held-out files of every SFT set and returns the
/// prompts of held-out rustc examples, which the docs corpus leaves out.
fn split_demonstrations(
    extracted: &Path,
    out: &Path,
    fraction: ValidationFraction,
) -> Result<BTreeSet<String>, Box<dyn Error>> {
    let sft = out.join("sft");
    fs::create_dir_all(&sft)?;
    let mut heldout_rustc_prompts = BTreeSet::new();

    for (source, stem) in DEMONSTRATIONS {
        let path = extracted.join(source);
        let text = fs::read_to_string(&path)?;
        let lines: Vec<&str> = text.lines().collect();
        let loaded = read_demonstrations(&path, Mode::Strict)?;

        let mut train = String::new();
        let mut heldout = String::new();
        for record in &loaded.records {
            let line = lines[record.location.line - 1];
            let target = match record.value.split(fraction) {
                Split::Train => &mut train,
                Split::Validation => &mut heldout,
            };
            target.push_str(line);
            target.push('\n');
            if *stem == "rustc_explain" && record.value.split(fraction) == Split::Validation {
                heldout_rustc_prompts.insert(record.value.split_key());
            }
        }
        fs::write(sft.join(format!("{stem}.train.jsonl")), train)?;
        fs::write(sft.join(format!("{stem}.heldout.jsonl")), heldout)?;
    }
    Ok(heldout_rustc_prompts)
}

/// Builds `corpus/docs`: the training-side FAQ answers with their questions,
/// and `rustc --explain` for every error code whose SFT example is not held
/// out.
fn build_docs(out: &Path, heldout_rustc_prompts: &BTreeSet<String>) -> Result<(), Box<dyn Error>> {
    let docs = out.join("corpus/docs");
    fs::create_dir_all(&docs)?;

    for stem in ["python_faq", "perlfaq"] {
        let train = out.join(format!("sft/{stem}.train.jsonl"));
        let mut lines = String::new();
        for line in fs::read_to_string(&train)?.lines() {
            let record: Value = serde_json::from_str(line)?;
            let text = format!(
                "{}\n\n{}",
                record["prompt"].as_str().unwrap_or_default(),
                record["response"].as_str().unwrap_or_default()
            );
            let document =
                json!({"text": text, "source": record["source"], "license": record["license"]});
            lines.push_str(&serde_json::to_string(&document)?);
            lines.push('\n');
        }
        fs::write(docs.join(format!("{stem}.jsonl")), lines)?;
    }

    let rustc = std::env::var_os("RUSTC")
        .map(PathBuf::from)
        .unwrap_or_else(|| "rustc".into());
    let version = String::from_utf8(Command::new(&rustc).arg("--version").output()?.stdout)?;
    let version = version
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    // rustc 1.95 has error codes E0001 to E0806. rustc has no command that
    // lists them, so every number up to 999 is tried and unknown codes are
    // skipped.
    let mut lines = String::new();
    for number in 1..=999 {
        let code = format!("E{number:04}");
        if heldout_rustc_prompts.contains(&format!("Explain the Rust compiler error {code}.")) {
            continue;
        }
        let output = Command::new(&rustc).args(["--explain", &code]).output()?;
        if !output.status.success() {
            continue;
        }
        let explanation = String::from_utf8(output.stdout)?;
        let document = json!({
            "text": format!("# {code}\n\n{explanation}"),
            "source": format!("{version} --explain {code}"),
            "license": "MIT OR Apache-2.0",
        });
        lines.push_str(&serde_json::to_string(&document)?);
        lines.push('\n');
    }
    fs::write(docs.join("rustc_explain.jsonl"), lines)?;
    Ok(())
}

fn copy_preferences(extracted: &Path, preference: &Path) -> Result<(), Box<dyn Error>> {
    fs::create_dir_all(preference)?;
    for (source, name) in PREFERENCES {
        read_preference_pairs(extracted.join(source), Mode::Strict)?;
        fs::copy(extracted.join(source), preference.join(name))?;
    }

    // The alpaca-farm examples are a JSON array whose prompt is split into an
    // instruction and an optional input. The JSONL form joins the two with a
    // blank line as "prompt" and keeps the originals as extra fields.
    let array: Vec<Value> = serde_json::from_str(&fs::read_to_string(
        extracted.join("pref_alpacafarm_fewshot.json"),
    )?)?;
    let mut lines = String::new();
    for example in array {
        let instruction = example["prompt"]
            .as_str()
            .ok_or("alpaca-farm example without prompt")?;
        let input = example["input"].as_str().unwrap_or_default();
        let prompt = if input.is_empty() {
            instruction.to_owned()
        } else {
            format!("{instruction}\n\n{input}")
        };
        let line = json!({
            "prompt": prompt,
            "chosen": example["chosen"],
            "rejected": example["rejected"],
            "instruction": instruction,
            "input": input,
            "source": example["source"],
            "license": "Apache-2.0",
        });
        lines.push_str(&serde_json::to_string(&line)?);
        lines.push('\n');
    }
    let target = preference.join("alpacafarm_fewshot.jsonl");
    fs::write(&target, lines)?;
    read_preference_pairs(&target, Mode::Strict)?;
    Ok(())
}
