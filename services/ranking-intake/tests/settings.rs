//! The intake's settings: every invalid value reported at once, tokens
//! parsed and never printed.

use std::collections::HashMap;

use troupe_ranking_intake::{Cli, LabelerTokens};
use troupe_service::settings::{parse_args_with_env, SettingsErrors};

#[test]
fn settings_report_every_error() {
    let env = HashMap::from([("TROUPE_LABELER_TOKENS".to_string(), "ann=s3cr".to_string())]);
    let args = [
        "troupe-ranking-intake",
        "--web-addr",
        "localhost:80",
        "--preference-dataset",
        "../escape",
        "--rankings-queue",
        "ranking-intake-candidates",
        "--unknown-set-retries",
        "many",
        "--retry-delay-ms=-1",
    ];
    let cli: Cli = parse_args_with_env(args, &env).unwrap();
    let mut errors = SettingsErrors::new();
    assert!(cli.intake.validate(&mut errors).is_none());
    let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
    for flag in ["--web-addr", "--labeler-tokens", "--preference-dataset", "--rankings-queue", "--unknown-set-retries", "--retry-delay-ms"] {
        assert!(text.iter().any(|line| line.contains(flag)), "no error for {flag}: {text:#?}");
    }
    assert!(!text.iter().any(|line| line.contains("s3cr")), "a token was printed: {text:#?}");
}

#[test]
fn defaults_bind_loopback() {
    let cli: Cli = parse_args_with_env(["troupe-ranking-intake"], &HashMap::new()).unwrap();
    let mut errors = SettingsErrors::new();
    let settings = cli.intake.validate(&mut errors).unwrap();
    assert!(settings.web_addr.ip().is_loopback());
    assert!(settings.tokens.is_empty());
    assert_eq!(settings.datasets.preferences, "preferences");
}

#[test]
fn tokens_map_to_labelers() {
    let tokens = LabelerTokens::parse("ann=token-of-ann-1, bob = token-of-bob-2,bare-token-3").unwrap();
    assert_eq!(tokens.labeler_for("token-of-ann-1"), Some("ann"));
    assert_eq!(tokens.labeler_for("token-of-bob-2"), Some("bob"));
    assert_eq!(tokens.labeler_for("bare-token-3"), Some("web"));
    assert_eq!(tokens.labeler_for("token-of-ann-"), None);
    assert_eq!(tokens.labeler_for(""), None);
    assert!(!format!("{tokens:?}").contains("token-of"), "Debug shows a token: {tokens:?}");
    assert!(LabelerTokens::parse("ann=same-token-x,bob=same-token-x").is_err());
    assert!(LabelerTokens::parse("ann=").is_err());
}
