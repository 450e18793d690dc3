//! Stage 1 data: corpus sources from paths, the tokenizer (trained or
//! given), token shards in the store, and the seeded window sampler.
//!
//! Token shards live under `token-shards/<corpus>-<tokenizer>/`, named by the
//! first 16 hex digits of the corpus and tokenizer SHA-256s, as
//! little-endian `u32` files of at most [`SHARD_TOKENS`] tokens plus an
//! `index.json` written last. A run whose corpus and tokenizer match reads the
//! shards back instead of tokenizing again.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use troupe_data::{
    load_corpus, Corpus, CorpusOptions, DirectorySource, JsonlSource, Source, ValidationFraction,
};
use troupe_model::Tokenizer;
use troupe_store::{ObjectKey, Store, StoreError};
use troupe_train::sha256_hex;

use crate::PretrainError;

/// Tokens per shard object (4 MiB of `u32`).
pub const SHARD_TOKENS: usize = 1 << 20;
/// Extensions read from corpus directories: prose, docs and source code.
pub const TEXT_EXTENSIONS: [&str; 14] = [
    "txt", "md", "rst", "py", "rs", "c", "h", "go", "js", "ts", "java", "sh", "toml", "pod",
];
/// Field of a corpus JSONL line that contains the document text.
pub const JSONL_TEXT_FIELD: &str = "text";
/// Directory files are cut at blank lines so every book lands on both sides
/// of the train/validation split.
const PARAGRAPH_SEPARATOR: &str = "\n\n";

/// Builds corpus sources from paths. A directory yields a text source for
/// [`TEXT_EXTENSIONS`] and a JSONL source per `.jsonl` file under it. A file
/// is read as JSONL or as text, by its extension. A missing path is an error.
pub fn corpus_sources(paths: &[PathBuf]) -> Result<Vec<Source>, PretrainError> {
    let mut sources = Vec::new();
    for path in paths {
        if !path.exists() {
            return Err(PretrainError::Data(troupe_data::DataError::NotFound {
                path: path.clone(),
            }));
        }
        if path.is_file() {
            sources.push(file_source(path));
            continue;
        }
        let has_text = walk_files(path)
            .iter()
            .any(|p| has_extension(p, &TEXT_EXTENSIONS));
        if has_text {
            sources.push(
                DirectorySource::new(path, &TEXT_EXTENSIONS)
                    .with_separator(PARAGRAPH_SEPARATOR)
                    .into(),
            );
        }
        for file in walk_files(path)
            .into_iter()
            .filter(|p| has_extension(p, &["jsonl"]))
        {
            sources.push(JsonlSource::new(file, JSONL_TEXT_FIELD).into());
        }
        if sources.is_empty() {
            // Let the corpus reader name the directory and the filter in its error.
            sources.push(DirectorySource::new(path, &TEXT_EXTENSIONS).into());
        }
    }
    Ok(sources)
}

fn file_source(path: &Path) -> Source {
    if has_extension(path, &["jsonl"]) {
        JsonlSource::new(path, JSONL_TEXT_FIELD).into()
    } else {
        DirectorySource::new(path, &[] as &[&str])
            .with_separator(PARAGRAPH_SEPARATOR)
            .into()
    }
}

fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Files under `dir`, sorted, skipping hidden names as the corpus reader does.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Loads and splits the corpus at `paths`.
pub fn read_corpus(paths: &[PathBuf], validation_fraction: f64) -> Result<Corpus, PretrainError> {
    let sources = corpus_sources(paths)?;
    let fraction = ValidationFraction::new(validation_fraction)?;
    let corpus = load_corpus(&sources, &CorpusOptions::new(fraction))?;
    if corpus.train.is_empty() || corpus.validation.is_empty() {
        return Err(PretrainError::CorpusTooSmall {
            reason: format!(
                "{} training and {} validation documents; both sides of the split need at least one, so add text \
                 or raise --validation-fraction",
                corpus.train.len(),
                corpus.validation.len()
            ),
        });
    }
    Ok(corpus)
}

/// SHA-256 over the document ids of both sides, in order: equal corpora
/// (same documents, same split) hash equal.
pub fn corpus_sha256(corpus: &Corpus) -> String {
    let mut hasher = Sha256::new();
    for doc in &corpus.train {
        hasher.update(doc.id.0);
    }
    hasher.update(b"validation");
    for doc in &corpus.validation {
        hasher.update(doc.id.0);
    }
    hex::encode(hasher.finalize())
}

/// Object key of a trained tokenizer, kept so a rerun on the same corpus
/// reuses it instead of training again.
fn tokenizer_key(corpus_sha: &str, vocab_size: usize) -> Result<ObjectKey, StoreError> {
    ObjectKey::new(format!(
        "tokenizers/{}-v{vocab_size}.json",
        &corpus_sha[..16]
    ))
}

/// Trains a byte-level BPE of `vocab_size` on the training side of `corpus`.
pub fn train_tokenizer(corpus: &Corpus, vocab_size: usize) -> Result<Tokenizer, PretrainError> {
    let texts = corpus.train.iter().map(|doc| doc.text.as_str());
    Tokenizer::train(texts, vocab_size).map_err(|source| PretrainError::Tokenizer {
        origin: "training".into(),
        source,
    })
}

/// Reads a `tokenizer.json` file.
pub fn read_tokenizer(path: &Path) -> Result<Tokenizer, PretrainError> {
    Tokenizer::from_file(path).map_err(|source| PretrainError::Tokenizer {
        origin: path.display().to_string(),
        source,
    })
}

/// Reads the stored tokenizer for this corpus and vocabulary, if an earlier run saved one.
pub async fn stored_tokenizer(
    store: &Store,
    corpus_sha: &str,
    vocab_size: usize,
) -> Result<Option<Tokenizer>, PretrainError> {
    let key = tokenizer_key(corpus_sha, vocab_size)?;
    match store.get(&key).await {
        Ok(bytes) => Ok(Some(Tokenizer::from_bytes(&bytes).map_err(|source| {
            PretrainError::Tokenizer {
                origin: key.to_string(),
                source,
            }
        })?)),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Saves a trained tokenizer with the run's data.
pub async fn save_tokenizer(
    store: &Store,
    corpus_sha: &str,
    tokenizer: &Tokenizer,
) -> Result<(), PretrainError> {
    let key = tokenizer_key(corpus_sha, tokenizer.vocab_size())?;
    let json = tokenizer
        .to_json()
        .map_err(|source| PretrainError::Tokenizer {
            origin: "serializing".into(),
            source,
        })?;
    match store.put_new(&key, json).await {
        Ok(()) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// One shard as listed in `index.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardEntry {
    split: String,
    key: String,
    tokens: usize,
    sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardIndex {
    corpus_sha256: String,
    tokenizer_sha256: String,
    shards: Vec<ShardEntry>,
}

/// The token streams of both sides of the split.
#[derive(Debug, Clone)]
pub struct TokenStreams {
    pub train: Vec<u32>,
    pub validation: Vec<u32>,
    /// Whether the shards were read back from an earlier run.
    pub reused: bool,
    pub prefix: String,
}

/// Encodes every document, each opened with BOS (or, lacking one, closed with
/// EOS), concatenated in corpus order.
fn encode_documents(
    tokenizer: &Tokenizer,
    docs: &[troupe_data::Document],
) -> Result<Vec<u32>, PretrainError> {
    let mut tokens = Vec::new();
    for doc in docs {
        let ids = tokenizer
            .encode(&doc.text)
            .map_err(|source| PretrainError::Tokenizer {
                origin: doc.location.to_string(),
                source,
            })?;
        match (tokenizer.bos_id(), tokenizer.eos_id()) {
            (Some(bos), _) => {
                tokens.push(bos);
                tokens.extend(ids);
            }
            (None, Some(eos)) => {
                tokens.extend(ids);
                tokens.push(eos);
            }
            (None, None) => tokens.extend(ids),
        }
    }
    Ok(tokens)
}

/// Reads the token shards of this corpus and tokenizer from the store, or
/// tokenizes the corpus and writes them when they are not there yet.
pub async fn token_streams(
    store: &Store,
    corpus: &Corpus,
    tokenizer: &Tokenizer,
) -> Result<TokenStreams, PretrainError> {
    let corpus_sha = corpus_sha256(corpus);
    let tokenizer_json = tokenizer
        .to_json()
        .map_err(|source| PretrainError::Tokenizer {
            origin: "serializing".into(),
            source,
        })?;
    let tokenizer_sha = sha256_hex(tokenizer_json.as_bytes());
    let prefix = format!(
        "token-shards/{}-{}",
        &corpus_sha[..16],
        &tokenizer_sha[..16]
    );
    let index_key = ObjectKey::new(format!("{prefix}/index.json"))?;

    match store.get(&index_key).await {
        Ok(bytes) => {
            let index: ShardIndex =
                serde_json::from_slice(&bytes).map_err(|e| PretrainError::Shard {
                    key: index_key.to_string(),
                    reason: format!("invalid index: {e}"),
                })?;
            let mut streams = TokenStreams {
                train: Vec::new(),
                validation: Vec::new(),
                reused: true,
                prefix,
            };
            for entry in &index.shards {
                let key = ObjectKey::new(entry.key.clone())?;
                let bytes = store.get(&key).await?;
                if sha256_hex(&bytes) != entry.sha256 || bytes.len() != entry.tokens * 4 {
                    return Err(PretrainError::Shard {
                        key: entry.key.clone(),
                        reason: "size or SHA-256 differs from index.json; delete the shard folder to rebuild it".into(),
                    });
                }
                let tokens = bytes
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                match entry.split.as_str() {
                    "train" => streams.train.extend(tokens),
                    _ => streams.validation.extend(tokens),
                }
            }
            Ok(streams)
        }
        Err(StoreError::NotFound { .. }) => {
            let train = encode_documents(tokenizer, &corpus.train)?;
            let validation = encode_documents(tokenizer, &corpus.validation)?;
            let mut shards = Vec::new();
            for (split, tokens) in [("train", &train), ("validation", &validation)] {
                for (i, chunk) in tokens.chunks(SHARD_TOKENS).enumerate() {
                    let bytes: Vec<u8> = chunk.iter().flat_map(|t| t.to_le_bytes()).collect();
                    let key = format!("{prefix}/{split}-{i:05}.u32");
                    let sha256 = sha256_hex(&bytes);
                    store
                        .put(&ObjectKey::new(key.clone())?, Bytes::from(bytes))
                        .await?;
                    shards.push(ShardEntry {
                        split: split.into(),
                        key,
                        tokens: chunk.len(),
                        sha256,
                    });
                }
            }
            let index = ShardIndex {
                corpus_sha256: corpus_sha,
                tokenizer_sha256: tokenizer_sha,
                shards,
            };
            let encoded = serde_json::to_vec_pretty(&index).map_err(|e| PretrainError::Shard {
                key: index_key.to_string(),
                reason: e.to_string(),
            })?;
            match store.put_new(&index_key, encoded).await {
                Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
                Err(error) => return Err(error.into()),
            }
            Ok(TokenStreams {
                train,
                validation,
                reused: false,
                prefix,
            })
        }
        Err(error) => Err(error.into()),
    }
}

/// Draws fixed-length windows at seeded pseudo-random offsets. Window `k`'s
/// offset depends only on the seed and `k`, so the position (windows drawn so
/// far) is the whole sampler state and a resumed run draws the same windows.
#[derive(Debug, Clone)]
pub struct WindowSampler {
    seed: u64,
    seq_len: usize,
    position: u64,
}

impl WindowSampler {
    pub fn new(seed: u64, seq_len: usize, position: u64) -> Self {
        Self {
            seed,
            seq_len,
            position,
        }
    }

    /// Windows drawn so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Draws the next `count` windows of `tokens` as row-major ids `(count, seq_len)`.
    pub fn next_batch(&mut self, tokens: &[u32], count: usize) -> Vec<u32> {
        let starts = tokens.len() - self.seq_len + 1;
        let mut out = Vec::with_capacity(count * self.seq_len);
        for _ in 0..count {
            let offset =
                (splitmix64(self.seed ^ splitmix64(self.position)) % starts as u64) as usize;
            out.extend_from_slice(&tokens[offset..offset + self.seq_len]);
            self.position += 1;
        }
        out
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a fixed, well-mixed hash of a counter.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `count` evenly spaced windows of the validation stream, the same every
/// evaluation, as row-major ids `(rows, seq_len)`; fewer rows when the stream
/// is short.
pub fn heldout_windows(tokens: &[u32], seq_len: usize, count: usize) -> (Vec<u32>, usize) {
    let starts = tokens.len() - seq_len + 1;
    let rows = count.min(starts);
    let mut out = Vec::with_capacity(rows * seq_len);
    for i in 0..rows {
        let offset = i * (starts - 1) / (rows - 1).max(1);
        out.extend_from_slice(&tokens[offset..offset + seq_len]);
    }
    (out, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_resumes_at_position() {
        let tokens: Vec<u32> = (0..1000).collect();
        let mut full = WindowSampler::new(7, 16, 0);
        let first = full.next_batch(&tokens, 4);
        let second = full.next_batch(&tokens, 4);
        let mut resumed = WindowSampler::new(7, 16, 4);
        assert_eq!(resumed.next_batch(&tokens, 4), second);
        assert_ne!(first, second);
    }
}
