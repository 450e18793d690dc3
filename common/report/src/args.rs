//! [`ReportArgs`]: the flags of `troupe report`, next to the store flags.

use std::path::{Path, PathBuf};

use clap::Args;
use troupe_store::Store;

use crate::{render_report, render_report_from_file, ReportError, ReportSummary};

/// Flags of `troupe report`: the run to report on and the output folder.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct ReportArgs {
    /// Run id whose progress log `runs/RUN/progress.jsonl` is read from the
    /// store; the report is also stored under `runs/RUN/report/`.
    #[arg(long, env = "TROUPE_RUN", default_value = "default")]
    pub run: String,

    /// Local folder for `report.html` and the SVG plots; created if missing.
    #[arg(long, env = "TROUPE_REPORT_OUT", default_value = "troupe-report")]
    pub out: PathBuf,

    /// Read the progress log from this local JSONL file instead of the store.
    #[arg(long, value_name = "FILE")]
    pub progress_file: Option<PathBuf>,
}

impl ReportArgs {
    /// Renders and writes the report these flags describe.
    pub async fn execute(&self, store: &Store) -> Result<ReportSummary, ReportError> {
        match &self.progress_file {
            Some(log_path) => render_report_from_file(store, log_path, &self.run, &self.out).await,
            None => render_report(store, &self.run, Path::new(&self.out)).await,
        }
    }
}
