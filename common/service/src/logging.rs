//! Log settings and the tracing subscriber every service installs first.
//!
//! Logs go to stderr, as human-readable lines or as one JSON object per line,
//! filtered by a directive string in `RUST_LOG` syntax. Messages are short
//! and lowercase, and everything variable goes into fields:
//! `info!(addr = %addr, "serving health and metrics")`.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use clap::Args;
use tracing_subscriber::EnvFilter;

use crate::settings::{Setting, SettingsErrors};

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Readable lines for a person at a terminal, colored when stderr is one.
    Human,
    /// One JSON object per line for a log collector.
    Json,
}

impl FromStr for LogFormat {
    type Err = InvalidLogFormat;

    fn from_str(value: &str) -> Result<LogFormat, InvalidLogFormat> {
        match value {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            _ => Err(InvalidLogFormat),
        }
    }
}

/// Error for a log format other than `human` or `json`.
#[derive(Debug, thiserror::Error)]
#[error("unknown log format")]
pub struct InvalidLogFormat;

/// Command-line flags for logging, to `#[command(flatten)]` into a service's
/// settings.
#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// Log output format: `human` (readable lines) or `json` (one object per
    /// line, for log collectors).
    #[arg(
        long = LogArgs::FORMAT.long,
        env = LogArgs::FORMAT.env,
        value_name = "FORMAT",
        default_value = "human"
    )]
    pub log_format: String,

    /// Log filter in `RUST_LOG` syntax: a level (`info`) or comma-separated
    /// `target=level` directives (`troupe_bus=debug,info`).
    #[arg(
        long = LogArgs::FILTER.long,
        env = LogArgs::FILTER.env,
        value_name = "FILTER",
        default_value = "info"
    )]
    pub log: String,
}

impl LogArgs {
    pub const FORMAT: Setting = Setting {
        long: "log-format",
        env: "TROUPE_LOG_FORMAT",
    };
    pub const FILTER: Setting = Setting {
        long: "log",
        env: "TROUPE_LOG",
    };

    /// Checks both log settings, recording each invalid one in `errors`.
    pub fn validate(&self, errors: &mut SettingsErrors) -> Option<LogSettings> {
        let format = errors.parse(
            LogArgs::FORMAT,
            &self.log_format,
            "set it to human or json",
            LogFormat::from_str,
        );
        let filter = errors.parse(
            LogArgs::FILTER,
            &self.log,
            "set it to a level such as info, or to directives such as troupe_bus=debug,info",
            |directives: &str| EnvFilter::try_new(directives),
        );
        // The directives are stored as written: the parsed filter only proves
        // that `init_tracing` will accept them.
        let filter = filter.map(|_| self.log.clone());
        Some(LogSettings {
            format: format?,
            filter: filter?,
        })
    }
}

/// Checked log settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    /// Filter directives that `EnvFilter::try_new` accepts.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> LogSettings {
        LogSettings {
            format: LogFormat::Human,
            filter: "info".to_string(),
        }
    }
}

/// Error from [`init_tracing`].
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("invalid log filter {filter:?}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// Another global subscriber was installed first, for example by a test.
    #[error("failed to install the tracing subscriber")]
    Install(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Installs the global tracing subscriber described by `settings`.
pub fn init_tracing(settings: &LogSettings) -> Result<(), TracingError> {
    let filter = EnvFilter::try_new(&settings.filter).map_err(|source| TracingError::Filter {
        filter: settings.filter.clone(),
        source,
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);

    let installed = match settings.format {
        LogFormat::Human => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        // Event fields sit at the top level of each object, next to the
        // span fields (`run`, `policy_version`, ...), so a collector can
        // index them without unnesting.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    installed.map_err(TracingError::Install)
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        })
    }
}
