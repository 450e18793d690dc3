//! Settings parsing and validation, read from argument lists and environment
//! maps, never from the process environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use troupe_service::http::{HttpArgs, HttpSettings};
use troupe_service::logging::{LogArgs, LogFormat, LogSettings};
use troupe_service::settings::{parse_args_with_env, Setting, SettingsErrors, EX_USAGE};
use troupe_service::shutdown::ShutdownArgs;

/// The settings of a typical service: every shared group flattened together.
#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    shutdown: ShutdownArgs,
}

#[derive(Debug, PartialEq)]
struct Settings {
    log: LogSettings,
    http: HttpSettings,
    grace: Duration,
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

fn parse(args: &[&str], env: &HashMap<String, String>) -> Cli {
    let argv = std::iter::once("service").chain(args.iter().copied());
    parse_args_with_env(argv, env).expect("clap accepts the arguments")
}

fn validate(cli: &Cli) -> Result<Settings, SettingsErrors> {
    let mut errors = SettingsErrors::new();
    let log = cli.log.validate(&mut errors);
    let http = cli.http.validate(&mut errors);
    let grace = cli.shutdown.validate(&mut errors);
    errors.finish(|| {
        Some(Settings {
            log: log?,
            http: http?,
            grace: grace?,
        })
    })
}

#[test]
fn every_invalid_setting_reported() {
    let cli = parse(
        &["--http-addr", "localhost:8080", "--shutdown-grace=-1"],
        &env(&[
            ("TROUPE_LOG_FORMAT", "xml"),
            ("TROUPE_LOG", "info,troupe_bus=loud"),
        ]),
    );

    let errors = validate(&cli).expect_err("four settings are invalid");

    let reported: Vec<(Setting, &str)> = errors
        .iter()
        .map(|error| (error.setting, error.value.as_str()))
        .collect();
    assert_eq!(
        reported,
        vec![
            (LogArgs::FORMAT, "xml"),
            (LogArgs::FILTER, "info,troupe_bus=loud"),
            (HttpArgs::ADDR, "localhost:8080"),
            (ShutdownArgs::GRACE, "-1"),
        ]
    );
    for error in &errors {
        assert!(!error.reason.is_empty(), "{} has no reason", error.setting);
        assert!(!error.fix.is_empty(), "{} has no fix", error.setting);
    }
}

#[test]
fn error_message_names_flag_env_value() {
    let cli = parse(
        &["--log-format", "xml", "--http-addr", "nowhere"],
        &HashMap::new(),
    );

    let message = validate(&cli)
        .expect_err("two settings are invalid")
        .to_string();

    assert!(
        message.starts_with("error: 2 invalid settings"),
        "{message}"
    );
    assert!(
        message.contains("--log-format (env TROUPE_LOG_FORMAT) = \"xml\""),
        "{message}"
    );
    assert!(message.contains("human or json"), "{message}");
    assert!(
        message.contains("--http-addr (env TROUPE_HTTP_ADDR) = \"nowhere\""),
        "{message}"
    );
    assert!(message.contains("0.0.0.0:8080"), "{message}");
}

#[test]
fn defaults_when_nothing_set() {
    let cli = parse(&[], &HashMap::new());

    let settings = validate(&cli).expect("the defaults are valid");

    assert_eq!(
        settings.log,
        LogSettings {
            format: LogFormat::Human,
            filter: "info".into()
        }
    );
    assert_eq!(
        settings.http.addr,
        "0.0.0.0:8080".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(settings.grace, Duration::from_secs(8));
}

#[test]
fn env_map_overrides_defaults() {
    let cli = parse(
        &[],
        &env(&[
            ("TROUPE_LOG_FORMAT", "json"),
            ("TROUPE_LOG", "troupe_bus=debug,warn"),
            ("TROUPE_HTTP_ADDR", "127.0.0.1:0"),
            ("TROUPE_SHUTDOWN_GRACE", "0.5"),
        ]),
    );

    let settings = validate(&cli).expect("every value is valid");

    assert_eq!(settings.log.format, LogFormat::Json);
    assert_eq!(settings.log.filter, "troupe_bus=debug,warn");
    assert_eq!(
        settings.http.addr,
        "127.0.0.1:0".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(settings.grace, Duration::from_millis(500));
}

#[test]
fn command_line_overrides_env_map() {
    let cli = parse(
        &["--log-format", "human", "--http-addr", "127.0.0.1:9000"],
        &env(&[
            ("TROUPE_LOG_FORMAT", "json"),
            ("TROUPE_HTTP_ADDR", "127.0.0.1:0"),
        ]),
    );

    let settings = validate(&cli).expect("every value is valid");

    assert_eq!(settings.log.format, LogFormat::Human);
    assert_eq!(settings.http.addr.port(), 9000);
}

#[test]
fn unknown_env_names_ignored() {
    let cli = parse(
        &[],
        &env(&[("RUST_LOG", "debug"), ("TROUPE_UNRELATED", "x")]),
    );

    let settings = validate(&cli).expect("the defaults are valid");

    assert_eq!(settings.log.filter, "info");
}

/// A program with subcommands, like the `troupe` command line.
#[derive(Parser, Debug)]
enum Program {
    Serve {
        #[command(flatten)]
        log: LogArgs,
    },
}

#[test]
fn env_map_reaches_subcommands() {
    let argv = ["troupe", "serve"];
    let env = env(&[("TROUPE_LOG_FORMAT", "json")]);

    let program: Program = parse_args_with_env(argv, &env).expect("clap accepts the arguments");

    let Program::Serve { log } = program;
    assert_eq!(log.log_format, "json");
}

#[test]
fn unknown_flag_is_clap_error() {
    let argv = ["service", "--no-such-flag"];

    let error = parse_args_with_env::<Cli, _, _>(argv, &HashMap::new()).expect_err("unknown flag");

    assert_eq!(error.kind(), clap::error::ErrorKind::UnknownArgument);
}

#[test]
fn setting_constants_match_clap() {
    let command = Cli::command();
    for setting in [
        LogArgs::FORMAT,
        LogArgs::FILTER,
        HttpArgs::ADDR,
        ShutdownArgs::GRACE,
    ] {
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(setting.long))
            .unwrap_or_else(|| panic!("no flag --{}", setting.long));
        assert_eq!(
            arg.get_env().and_then(|env| env.to_str()),
            Some(setting.env)
        );
        assert!(
            arg.get_help().is_some(),
            "--{} has no help text",
            setting.long
        );
    }
}

#[test]
#[should_panic(expected = "without recording")]
fn finish_panics_on_unrecorded_none() {
    let errors = SettingsErrors::new();
    let _ = errors.finish(|| None::<()>);
}

/// Name of the variable that turns [`exit_child`] into the failing child.
const EXIT_CHILD_ENV: &str = "TROUPE_SERVICE_TEST_EXIT_CHILD";

/// Exits with the settings errors when run as the child of
/// [`exit_status_is_ex_usage`], and does nothing otherwise.
#[test]
fn exit_child() {
    if std::env::var_os(EXIT_CHILD_ENV).is_none() {
        return;
    }
    let cli = parse(&["--log-format", "xml"], &HashMap::new());
    let errors = validate(&cli).expect_err("the log format is invalid");
    errors.exit();
}

#[test]
fn exit_status_is_ex_usage() {
    let test_binary = std::env::current_exe().expect("path of this test binary");

    let output = Command::new(test_binary)
        .args(["--exact", "exit_child", "--nocapture", "--test-threads=1"])
        .env(EXIT_CHILD_ENV, "1")
        .output()
        .expect("run this test binary again");

    assert_eq!(output.status.code(), Some(EX_USAGE));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--log-format (env TROUPE_LOG_FORMAT) = \"xml\""),
        "{stderr}"
    );
}
