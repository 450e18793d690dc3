//! Offline rankings from a JSONL file, and the order syntax of `troupe rank`.
//!
//! # JSONL format
//!
//! One ranking per line, the payload of a ranking message without its
//! envelope; blank lines are skipped:
//!
//! ```text
//! {"ranking_id": "r-17", "set_id": "set-3", "labeler": "ann", "order": [["D"], ["C", "A"], ["B"]]}
//! {"ranking_id": "r-18", "set_id": "set-4", "labeler": "ann", "order": [["B"], ["A"]], "note": "both weak", "ranked_at_ms": 1767225600000}
//! ```
//!
//! `note` and `ranked_at_ms` (when the ranking was made, in ms since the
//! epoch; the import time otherwise) are optional. Each line goes through
//! the same validation as every other source, so a bad line is rejected
//! with its reason and a dead letter while the rest of the file is
//! imported. Importing a file twice stores each ranking once.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokio::io::AsyncBufReadExt;
use troupe_wire::{CandidateSet, Ranking};

use crate::intake::{Intake, IntakeError};
use crate::record::Source;

/// One line of an offline JSONL file.
#[derive(Debug, Deserialize)]
struct OfflineRanking {
    ranking_id: String,
    set_id: String,
    labeler: String,
    order: Vec<Vec<String>>,
    #[serde(default)]
    note: Option<String>,
    #[serde(default)]
    ranked_at_ms: Option<i64>,
}

/// Counts and rejected lines of one import.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Non-blank lines read.
    pub lines: u64,
    /// Rankings stored by this import.
    pub accepted: u64,
    /// Rankings whose id was stored before (by an earlier import or another source).
    pub duplicates: u64,
    /// Pairs in the rankings stored by this import.
    pub pairs: u64,
    /// Rejected lines: line number (from 1) and reason.
    pub rejected: Vec<(u64, String)>,
}

/// Errors that stop an import; rejected lines do not.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {source}; lines before it were imported, so run the import again to finish", path.display())]
    Intake { path: PathBuf, line: u64, source: IntakeError },
}

/// Imports the rankings of a JSONL file at `path`; see the module documentation.
pub async fn import_jsonl(intake: &Intake, path: &Path) -> Result<ImportReport, ImportError> {
    let read_error = |source| ImportError::Read { path: path.to_path_buf(), source };
    let file = tokio::fs::File::open(path).await.map_err(read_error)?;
    let mut lines = tokio::io::BufReader::new(file).lines();
    let mut report = ImportReport::default();
    let mut number = 0u64;
    while let Some(line) = lines.next_line().await.map_err(read_error)? {
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        report.lines += 1;
        let offline: OfflineRanking = match serde_json::from_str(&line) {
            Ok(offline) => offline,
            Err(err) => {
                let reason = format!("{}:{number}: invalid ranking line: {err}", path.display());
                intake.reject_unparsed(Source::Jsonl, &reason, line.into_bytes()).await;
                report.rejected.push((number, reason));
                continue;
            }
        };
        let ranked_at_ms = offline.ranked_at_ms.unwrap_or_else(troupe_wire::codec::now_ms);
        let ranking = Ranking {
            ranking_id: offline.ranking_id,
            set_id: offline.set_id,
            labeler: offline.labeler,
            order: offline.order,
            note: offline.note,
        };
        let receipt = intake
            .submit_at(ranking, Source::Jsonl, ranked_at_ms)
            .await
            .map_err(|source| ImportError::Intake { path: path.to_path_buf(), line: number, source })?;
        match (receipt.accepted, receipt.duplicate) {
            (true, true) => report.duplicates += 1,
            (true, false) => {
                report.accepted += 1;
                report.pairs += u64::from(receipt.pairs);
            }
            (false, _) => report.rejected.push((number, receipt.reason.unwrap_or_default())),
        }
    }
    tracing::info!(
        path = %path.display(),
        lines = report.lines,
        accepted = report.accepted,
        duplicates = report.duplicates,
        rejected = report.rejected.len(),
        pairs = report.pairs,
        "offline rankings imported"
    );
    Ok(report)
}

/// Parses an order typed in a terminal, such as `D > C = A > B` or `4 > 3 = 1 > 2`.
///
/// `>` separates groups from best to worst and `=` joins tied candidates.
/// A candidate is named by its id or by its 1-based position in the set. An
/// id that is itself a number wins over the position. Whitespace is ignored.
/// Validation against the set happens when the ranking is submitted; this
/// only resolves positions and reports syntax errors.
pub fn parse_order_text(text: &str, set: &CandidateSet) -> Result<Vec<Vec<String>>, String> {
    let mut order = Vec::new();
    for group_text in text.split('>') {
        let mut group = Vec::new();
        for item in group_text.split('=') {
            let item = item.trim();
            if item.is_empty() {
                return Err(format!("{text:?} has an empty place; write candidates between '>' and '=', such as D > C = A > B"));
            }
            group.push(resolve_candidate(item, set));
        }
        order.push(group);
    }
    Ok(order)
}

fn resolve_candidate(item: &str, set: &CandidateSet) -> String {
    if set.candidates.iter().any(|candidate| candidate.candidate_id == item) {
        return item.to_string();
    }
    match item.parse::<usize>() {
        Ok(position) if (1..=set.candidates.len()).contains(&position) => set.candidates[position - 1].candidate_id.clone(),
        // Left as typed, so validation names it as an unknown candidate.
        _ => item.to_string(),
    }
}
