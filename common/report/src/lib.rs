//! Run reports: a run's progress log rendered to SVG plots and one
//! self-contained HTML page, written to a local folder and to the object
//! store under `runs/<run>/report/`.
//!
//! The log is the JSONL file `troupe up` stores at `runs/<run>/progress.jsonl`,
//! one `JobProgress` per line. Each job gets its plots (losses and held-out
//! numbers for pretraining and SFT, loss and accuracy for the reward model,
//! reward, KL, KL coefficient, response length and EOS rate for PPO) and a
//! row in the table of final numbers. Plots exist only for metrics the log
//! contains.
//!
//! - `args`: [`ReportArgs`], the `troupe report` flags.
//! - `progress`: [`parse_progress_log`] and the grouping of messages into
//!   one history per job.
//! - `plot`: which plots each stage gets, drawn with plotters' SVG backend.
//! - `html`: the page, with the plots inlined.
//! - `text`: escaping and number formatting.
//! - `error`: [`ReportError`].

mod args;
mod error;
mod html;
mod plot;
mod progress;
mod text;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use troupe_store::{ObjectKey, Store};
use troupe_wire::{JobProgress, RunId};

pub use args::ReportArgs;
pub use error::ReportError;
pub use progress::parse_progress_log;

/// File name of the report page.
pub const REPORT_HTML: &str = "report.html";

/// A file the report wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportFile {
    /// File name, such as `report.html` or `pretrain-loss.svg`.
    pub name: String,
    /// Local path.
    pub path: PathBuf,
    /// Object key in the store.
    pub key: String,
    /// Size in bytes.
    pub size: usize,
}

/// The result of [`render_report`].
#[derive(Clone, Debug)]
pub struct ReportSummary {
    pub run: String,
    /// Local path of `report.html`.
    pub html: PathBuf,
    /// Every file written, `report.html` first.
    pub files: Vec<ReportFile>,
}

/// Returns the object key of a run's progress log.
pub fn progress_log_key(run: &str) -> Result<ObjectKey, ReportError> {
    let run = validate_run(run)?;
    run_key(&run, "progress.jsonl")
}

/// Reads a run's progress log from the store, renders the report, and
/// writes it to `out_dir` (created if missing) and under
/// `runs/<run>/report/` in the store. Files of an earlier report that this
/// one does not produce are left in place.
pub async fn render_report(
    store: &Store,
    run: &str,
    out_dir: &Path,
) -> Result<ReportSummary, ReportError> {
    let run_id = validate_run(run)?;
    let key = run_key(&run_id, "progress.jsonl")?;
    let bytes = match store.get(&key).await {
        Ok(bytes) => bytes,
        Err(error) if error.is_not_found() => {
            return Err(ReportError::MissingLog {
                key: key.to_string(),
                store: store.to_string(),
                run: run.to_string(),
            })
        }
        Err(source) => {
            return Err(ReportError::Store {
                action: "read",
                key: key.to_string(),
                store: store.to_string(),
                source: Box::new(source),
            })
        }
    };
    let progress = parse_progress_log(&bytes, key.as_str())?;
    let files = render_from_progress(&progress, run)?;
    write_report(store, &run_id, out_dir, files).await
}

/// Like [`render_report`], but reads the progress log from the local JSONL
/// file `log_path`. The report still goes to `out_dir` and to the store.
pub async fn render_report_from_file(
    store: &Store,
    log_path: &Path,
    run: &str,
    out_dir: &Path,
) -> Result<ReportSummary, ReportError> {
    let run_id = validate_run(run)?;
    let bytes = tokio::fs::read(log_path)
        .await
        .map_err(|source| ReportError::LocalIo {
            path: log_path.to_path_buf(),
            action: "read",
            source,
        })?;
    let progress = parse_progress_log(&bytes, &log_path.display().to_string())?;
    let files = render_from_progress(&progress, run)?;
    write_report(store, &run_id, out_dir, files).await
}

/// Renders the report of `run` from its progress messages without writing
/// anything. Returns `(file name, bytes)` pairs, `report.html` first and
/// then one SVG per plot.
pub fn render_from_progress(
    progress: &[JobProgress],
    run: &str,
) -> Result<Vec<(String, Vec<u8>)>, ReportError> {
    validate_run(run)?;
    if progress.is_empty() {
        return Err(ReportError::EmptyLog {
            source_name: "the given progress messages".to_string(),
        });
    }

    let jobs = progress::job_histories(progress);
    let mut jobs_per_stage: BTreeMap<u8, usize> = BTreeMap::new();
    let mut sections = Vec::with_capacity(jobs.len());
    for job in &jobs {
        // A second job of the same stage gets `<stage>-2-...` file names.
        let count = jobs_per_stage
            .entry(progress::stage_rank(job.stage))
            .or_default();
        *count += 1;
        let anchor = match *count {
            1 => job.stage.as_str().to_string(),
            n => format!("{}-{n}", job.stage.as_str()),
        };
        let plots = plot::render_job_plots(job, &anchor)?;
        sections.push(html::JobSection { job, anchor, plots });
    }

    let page = html::render_page(run, &sections, progress.len());
    let mut files = vec![(REPORT_HTML.to_string(), page.into_bytes())];
    for section in sections {
        for plot in section.plots {
            files.push((plot.file_name, plot.svg.into_bytes()));
        }
    }
    Ok(files)
}

fn validate_run(run: &str) -> Result<RunId, ReportError> {
    RunId::new(run).map_err(|error| ReportError::InvalidRun {
        run: run.to_string(),
        reason: error.to_string(),
    })
}

fn run_key(run: &RunId, relative: &str) -> Result<ObjectKey, ReportError> {
    // A valid run id is a valid key segment, so this fails only on a bad
    // `relative`, which is a constant or a generated file name.
    ObjectKey::new(format!("runs/{run}/{relative}")).map_err(|error| ReportError::InvalidRun {
        run: run.to_string(),
        reason: error.to_string(),
    })
}

async fn write_report(
    store: &Store,
    run: &RunId,
    out_dir: &Path,
    files: Vec<(String, Vec<u8>)>,
) -> Result<ReportSummary, ReportError> {
    tokio::fs::create_dir_all(out_dir)
        .await
        .map_err(|source| ReportError::LocalIo {
            path: out_dir.to_path_buf(),
            action: "created",
            source,
        })?;

    let mut written = Vec::with_capacity(files.len());
    for (name, bytes) in files {
        let path = out_dir.join(&name);
        tokio::fs::write(&path, &bytes)
            .await
            .map_err(|source| ReportError::LocalIo {
                path: path.clone(),
                action: "written",
                source,
            })?;
        let key = run_key(run, &format!("report/{name}"))?;
        let size = bytes.len();
        store
            .put(&key, bytes)
            .await
            .map_err(|source| ReportError::Store {
                action: "write",
                key: key.to_string(),
                store: store.to_string(),
                source: Box::new(source),
            })?;
        written.push(ReportFile {
            name,
            path,
            key: key.to_string(),
            size,
        });
    }

    let html = out_dir.join(REPORT_HTML);
    tracing::info!(run = %run, out_dir = %out_dir.display(), files = written.len(), "report written");
    Ok(ReportSummary {
        run: run.to_string(),
        html,
        files: written,
    })
}
