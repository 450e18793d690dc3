//! Settings validation that reports every bad setting at once.
//!
//! A service's settings come from clap with `env =` on every flag. clap rejects
//! a malformed command line on the first problem it meets, so the argument
//! groups here take values as strings and check them afterwards. Each check
//! records its failure in a [`SettingsErrors`] and carries on, and the service
//! prints the whole list and exits with [`EX_USAGE`] before it binds anything:
//!
//! ```no_run
//! use clap::Parser;
//! use troupe_service::{http::HttpArgs, logging::LogArgs, settings};
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     log: LogArgs,
//!     #[command(flatten)]
//!     http: HttpArgs,
//! }
//!
//! let cli: Cli = settings::parse_args_or_exit();
//! let mut errors = settings::SettingsErrors::new();
//! let log = cli.log.validate(&mut errors);
//! let http = cli.http.validate(&mut errors);
//! let (log, http) = errors
//!     .finish(|| Some((log?, http?)))
//!     .unwrap_or_else(|errors| errors.exit());
//! ```
//!
//! Tests parse from an argument list and an environment map with
//! [`parse_args_with_env`], so they never read or change the process
//! environment.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;

use clap::{Command, Parser};

/// Exit status for invalid settings: `EX_USAGE` from BSD's `sysexits.h`.
pub const EX_USAGE: i32 = 64;

/// One setting as an operator sets it: a long command-line flag and the
/// environment variable that clap reads when the flag is absent.
///
/// The argument groups use these constants in their `#[arg(long, env)]`
/// attributes, so the names in error messages always match the real ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Flag name without the leading dashes, for example `http-addr`.
    pub long: &'static str,
    /// Environment variable name, for example `TROUPE_HTTP_ADDR`.
    pub env: &'static str,
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--{} (env {})", self.long, self.env)
    }
}

/// One invalid setting: which one, the value it had, why that value is
/// invalid and what to set instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingError {
    pub setting: Setting,
    pub value: String,
    pub reason: String,
    pub fix: String,
}

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {:?}: {}; {}",
            self.setting, self.value, self.reason, self.fix
        )
    }
}

/// Collector of every invalid setting found while validating a service's
/// settings.
#[derive(Clone, Debug, Default)]
pub struct SettingsErrors {
    errors: Vec<SettingError>,
}

impl SettingsErrors {
    pub fn new() -> SettingsErrors {
        SettingsErrors::default()
    }

    /// Records that `setting` has the invalid `value`.
    pub fn push(
        &mut self,
        setting: Setting,
        value: impl Into<String>,
        reason: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.errors.push(SettingError {
            setting,
            value: value.into(),
            reason: reason.into(),
            fix: fix.into(),
        });
    }

    /// Parses `value` with `parse`; on failure records the parser's error as
    /// the reason, together with `fix`, and returns `None`.
    pub fn parse<T, E: fmt::Display>(
        &mut self,
        setting: Setting,
        value: &str,
        fix: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        match parse(value) {
            Ok(parsed) => Some(parsed),
            Err(error) => {
                self.push(setting, value, error.to_string(), fix);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, SettingError> {
        self.errors.iter()
    }

    /// Returns the errors if any were recorded, and otherwise the value that
    /// `build` assembles from the checked settings.
    ///
    /// `build` usually unwraps each check's `Option` with `?`. A check that
    /// returns `None` has recorded an error, so `build` runs only when every
    /// check succeeded.
    ///
    /// # Panics
    ///
    /// Panics when no error was recorded but `build` returns `None`, because
    /// then some check rejected a value without saying why.
    pub fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, SettingsErrors> {
        if !self.is_empty() {
            return Err(self);
        }
        match build() {
            Some(settings) => Ok(settings),
            None => panic!("a settings check returned None without recording a SettingError"),
        }
    }

    /// Prints every error to stderr and exits with [`EX_USAGE`].
    ///
    /// This runs before tracing is set up, because the log settings are among
    /// the ones being checked, so it writes to stderr directly.
    pub fn exit(&self) -> ! {
        eprintln!("{self}");
        std::process::exit(EX_USAGE)
    }
}

impl fmt::Display for SettingsErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.errors.len();
        let noun = if count == 1 { "setting" } else { "settings" };
        write!(f, "error: {count} invalid {noun}")?;
        for error in &self.errors {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SettingsErrors {}

impl<'a> IntoIterator for &'a SettingsErrors {
    type Item = &'a SettingError;
    type IntoIter = std::slice::Iter<'a, SettingError>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.iter()
    }
}

/// Parses the process's arguments and environment into `P`.
///
/// `--help` and `--version` print to stdout and exit with status 0. Any other
/// clap error (an unknown flag, a missing value) prints clap's message and
/// exits with [`EX_USAGE`], the same status as invalid settings.
pub fn parse_args_or_exit<P: Parser>() -> P {
    match P::try_parse() {
        Ok(parsed) => parsed,
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => {
            // When stderr itself is gone there is no one left to tell.
            let _ = error.print();
            std::process::exit(EX_USAGE)
        }
    }
}

/// Parses `args` (the program name first) into `P`, reading `env` in place of
/// the process environment for every argument that has `env =`.
///
/// The precedence matches clap's: a flag on the command line wins over its
/// environment variable, which wins over the default value.
///
/// NOTE: a value from `env` is handed to clap as the argument's default value,
/// so `ArgMatches::value_source` reports `DefaultValue` for it where the
/// process environment would give `EnvVariable`, and an argument marked
/// `required` is not satisfied by it.
pub fn parse_args_with_env<P, I, T>(
    args: I,
    env: &HashMap<String, String>,
) -> Result<P, clap::Error>
where
    P: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let command = replace_process_env(P::command(), env);
    let matches = command.try_get_matches_from(args)?;
    P::from_arg_matches(&matches)
}

/// Rewrites every argument with an environment variable, in `command` and its
/// subcommands, to take that variable's value from `env`.
fn replace_process_env(command: Command, env: &HashMap<String, String>) -> Command {
    let with_env: Vec<(clap::Id, String)> = command
        .get_arguments()
        .filter_map(|arg| {
            let name = arg.get_env()?.to_string_lossy().into_owned();
            Some((arg.get_id().clone(), name))
        })
        .collect();
    let subcommands: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_string())
        .collect();

    let mut command = command;
    for (id, name) in with_env {
        let value = env.get(&name).cloned();
        command = command.mut_arg(id, |arg| {
            // `env(None)` also drops the value clap read from the process
            // environment when the argument was built.
            let arg = arg.env(None);
            match value {
                Some(value) => arg.default_value(value),
                None => arg,
            }
        });
    }
    for name in subcommands {
        command = command.mut_subcommand(name, |sub| replace_process_env(sub, env));
    }
    command
}
