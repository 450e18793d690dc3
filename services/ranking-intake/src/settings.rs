//! Command-line flags and environment variables of the ranking intake,
//! checked all at once.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser};
use troupe_bus::NatsArgs;
use troupe_service::http::HttpArgs;
use troupe_service::logging::LogArgs;
use troupe_service::settings::{Setting, SettingsErrors};
use troupe_service::shutdown::ShutdownArgs;
use troupe_store::StoreArgs;

use crate::intake::{DatasetNames, DEFAULT_CANDIDATE_DATASET, DEFAULT_PREFERENCE_DATASET};
use crate::record::segment_id;

/// The `troupe-ranking-intake` command line.
#[derive(Parser, Clone, Debug)]
#[command(
    name = "troupe-ranking-intake",
    about = "Stores candidate sets, takes rankings from the web page, the bus, the terminal and JSONL files, and writes preference pairs"
)]
pub struct Cli {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub intake: IntakeArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

/// The intake's own flags. Values are taken as text and checked after
/// clap, so every invalid one is reported at once.
#[derive(Args, Clone, Debug)]
pub struct IntakeArgs {
    /// Address (IP:PORT) of the labeling web page and the /progress
    /// endpoint. Loopback by default; port 0 picks a free port, which is logged.
    #[arg(long = IntakeArgs::WEB_ADDR.long, env = IntakeArgs::WEB_ADDR.env, value_name = "IP:PORT", default_value = "127.0.0.1:8090")]
    pub web_addr: String,

    /// Labeler tokens for the web page, comma-separated `NAME=TOKEN` entries;
    /// NAME becomes the labeler id of that person's rankings. A bare TOKEN
    /// gets the labeler id `web`. Empty turns the page off (every request gets 401).
    #[arg(long = IntakeArgs::TOKENS.long, env = IntakeArgs::TOKENS.env, value_name = "NAME=TOKEN,...", default_value = "", hide_env_values = true, hide_default_value = true)]
    pub labeler_tokens: String,

    /// Dataset in the store that receives one preference record per accepted ranking.
    #[arg(long = IntakeArgs::PREFERENCES.long, env = IntakeArgs::PREFERENCES.env, default_value = DEFAULT_PREFERENCE_DATASET)]
    pub preference_dataset: String,

    /// Dataset in the store that keeps every candidate set received.
    #[arg(long = IntakeArgs::CANDIDATES.long, env = IntakeArgs::CANDIDATES.env, default_value = DEFAULT_CANDIDATE_DATASET)]
    pub candidate_dataset: String,

    /// Durable queue name on the candidates subject, shared by intake replicas.
    #[arg(long = IntakeArgs::CANDIDATES_QUEUE.long, env = IntakeArgs::CANDIDATES_QUEUE.env, default_value = "ranking-intake-candidates")]
    pub candidates_queue: String,

    /// Durable queue name on the rankings subject, shared by intake replicas.
    #[arg(long = IntakeArgs::RANKINGS_QUEUE.long, env = IntakeArgs::RANKINGS_QUEUE.env, default_value = "ranking-intake")]
    pub rankings_queue: String,

    /// Times a bus ranking of a not-yet-seen set is retried before it is
    /// rejected, because its candidate set may still be on its way.
    #[arg(long = IntakeArgs::UNKNOWN_SET_RETRIES.long, env = IntakeArgs::UNKNOWN_SET_RETRIES.env, default_value = "3")]
    pub unknown_set_retries: String,

    /// Wait before a retried message is delivered again, in milliseconds
    /// (unknown set, store or bus failure).
    #[arg(long = IntakeArgs::RETRY_DELAY.long, env = IntakeArgs::RETRY_DELAY.env, value_name = "MS", default_value = "1000")]
    pub retry_delay_ms: String,
}

impl IntakeArgs {
    pub const WEB_ADDR: Setting = Setting { long: "web-addr", env: "TROUPE_INTAKE_WEB_ADDR" };
    pub const TOKENS: Setting = Setting { long: "labeler-tokens", env: "TROUPE_LABELER_TOKENS" };
    pub const PREFERENCES: Setting = Setting { long: "preference-dataset", env: "TROUPE_PREFERENCE_DATASET" };
    pub const CANDIDATES: Setting = Setting { long: "candidate-dataset", env: "TROUPE_CANDIDATE_DATASET" };
    pub const CANDIDATES_QUEUE: Setting = Setting { long: "candidates-queue", env: "TROUPE_INTAKE_CANDIDATES_QUEUE" };
    pub const RANKINGS_QUEUE: Setting = Setting { long: "rankings-queue", env: "TROUPE_INTAKE_RANKINGS_QUEUE" };
    pub const UNKNOWN_SET_RETRIES: Setting =
        Setting { long: "unknown-set-retries", env: "TROUPE_INTAKE_UNKNOWN_SET_RETRIES" };
    pub const RETRY_DELAY: Setting = Setting { long: "retry-delay-ms", env: "TROUPE_INTAKE_RETRY_DELAY_MS" };

    /// Checks every flag, recording each invalid one in `errors`.
    pub fn validate(&self, errors: &mut SettingsErrors) -> Option<IntakeSettings> {
        let web_addr = errors.parse(
            IntakeArgs::WEB_ADDR,
            &self.web_addr,
            "set it to an IP address and port such as 127.0.0.1:8090",
            str::parse::<SocketAddr>,
        );
        let tokens = match LabelerTokens::parse(&self.labeler_tokens) {
            Ok(tokens) => Some(tokens),
            Err(reason) => {
                // The value holds secrets, so it is not repeated in the error.
                errors.push(IntakeArgs::TOKENS, "<redacted>", reason, "use NAME=TOKEN entries separated by commas");
                None
            }
        };
        for (setting, name) in [(IntakeArgs::PREFERENCES, &self.preference_dataset), (IntakeArgs::CANDIDATES, &self.candidate_dataset)] {
            if segment_id(name) != *name {
                errors.push(setting, name, "not a dataset name", "use ASCII letters, digits, '-', '_' or '.', starting with a letter or digit");
            }
        }
        if self.preference_dataset == self.candidate_dataset {
            errors.push(IntakeArgs::CANDIDATES, &self.candidate_dataset, "the same dataset as the preference dataset", "give the two datasets different names");
        }
        for (setting, name) in [(IntakeArgs::CANDIDATES_QUEUE, &self.candidates_queue), (IntakeArgs::RANKINGS_QUEUE, &self.rankings_queue)] {
            let valid = !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                errors.push(setting, name, "not a queue name", "use 1 to 64 ASCII letters, digits, '-' or '_'");
            }
        }
        if self.candidates_queue == self.rankings_queue {
            errors.push(IntakeArgs::RANKINGS_QUEUE, &self.rankings_queue, "the same name as the candidates queue", "give the two queues different names");
        }
        let retries = errors.parse(IntakeArgs::UNKNOWN_SET_RETRIES, &self.unknown_set_retries, "set it to a whole number such as 3, or 0 to reject at once", str::parse::<u64>);
        let delay = errors.parse(IntakeArgs::RETRY_DELAY, &self.retry_delay_ms, "set it to a whole number of milliseconds such as 1000", str::parse::<u64>);

        Some(IntakeSettings {
            web_addr: web_addr?,
            tokens: tokens?,
            datasets: DatasetNames {
                preferences: self.preference_dataset.clone(),
                candidate_sets: self.candidate_dataset.clone(),
            },
            candidates_queue: self.candidates_queue.clone(),
            rankings_queue: self.rankings_queue.clone(),
            unknown_set_retries: retries?,
            retry_delay: Duration::from_millis(delay?),
        })
    }
}

/// Checked intake settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntakeSettings {
    pub web_addr: SocketAddr,
    pub tokens: LabelerTokens,
    pub datasets: DatasetNames,
    pub candidates_queue: String,
    pub rankings_queue: String,
    /// Redeliveries of a bus ranking whose set is unknown before it is rejected.
    pub unknown_set_retries: u64,
    pub retry_delay: Duration,
}

impl Default for IntakeSettings {
    /// The flag defaults, except a free loopback port for the web page and
    /// no tokens.
    fn default() -> IntakeSettings {
        IntakeSettings {
            web_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            tokens: LabelerTokens::default(),
            datasets: DatasetNames::default(),
            candidates_queue: "ranking-intake-candidates".to_string(),
            rankings_queue: "ranking-intake".to_string(),
            unknown_set_retries: 3,
            retry_delay: Duration::from_secs(1),
        }
    }
}

/// Web page tokens and the labeler id each stands for. `Debug` hides the tokens.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LabelerTokens {
    entries: Vec<(String, String)>,
}

/// Labeler id of a token given without a name.
pub const DEFAULT_WEB_LABELER: &str = "web";

impl LabelerTokens {
    /// Parses comma-separated `NAME=TOKEN` (or bare `TOKEN`) entries.
    pub fn parse(text: &str) -> Result<LabelerTokens, String> {
        let mut tokens = LabelerTokens::default();
        for (position, entry) in text.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let (name, token) = match entry.split_once('=') {
                Some((name, token)) => (name.trim(), token.trim()),
                None => (DEFAULT_WEB_LABELER, entry),
            };
            if name.is_empty() || token.is_empty() {
                return Err(format!("entry {} has an empty name or token", position + 1));
            }
            tokens.insert(name, token)?;
        }
        Ok(tokens)
    }

    /// Adds one token for `labeler`.
    pub fn insert(&mut self, labeler: &str, token: &str) -> Result<(), String> {
        if token.len() < 8 {
            return Err(format!("the token of labeler {labeler:?} is shorter than 8 characters, too easy to guess"));
        }
        if self.entries.iter().any(|(_, existing)| existing == token) {
            return Err(format!("the token of labeler {labeler:?} is also given to another labeler"));
        }
        self.entries.push((labeler.to_string(), token.to_string()));
        Ok(())
    }

    /// Returns the labeler id that `token` stands for. Every stored token is
    /// compared in full, in time independent of where the bytes differ.
    pub fn labeler_for(&self, token: &str) -> Option<&str> {
        let mut found = None;
        for (labeler, expected) in &self.entries {
            if constant_time_eq(expected.as_bytes(), token.as_bytes()) {
                found = Some(labeler.as_str());
            }
        }
        found
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Labeler ids that have a token.
    pub fn labelers(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(labeler, _)| labeler.as_str())
    }
}

impl fmt::Debug for LabelerTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries.iter().map(|(labeler, _)| format!("{labeler}=<redacted>"))).finish()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |difference, (x, y)| difference | (x ^ y)) == 0
}
