//! Command-line flags and environment variables of the scripted labeler,
//! and their validation with every problem reported at once.

use clap::{Args, Parser};
use troupe_bus::NatsArgs;
use troupe_service::http::HttpArgs;
use troupe_service::logging::LogArgs;
use troupe_service::settings::{Setting, SettingsErrors};
use troupe_service::shutdown::ShutdownArgs;

use crate::rule::Preference;

/// The `troupe-labeler` command line.
#[derive(Parser, Clone, Debug)]
#[command(name = "troupe-labeler", about = "Ranks candidate sets by a scripted preference, in place of people")]
pub struct Cli {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub labeler: LabelerArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

/// The labeler's own flags. Numbers are taken as text and parsed after
/// clap, so that every invalid value is reported at once.
#[derive(Args, Clone, Debug)]
pub struct LabelerArgs {
    /// Labeler id written into every ranking; the ranking id is `<labeler-id>-<set id>`.
    #[arg(long = LabelerArgs::ID.long, env = LabelerArgs::ID.env, default_value = "scripted")]
    pub labeler_id: String,

    /// Durable queue name on the candidates subject. Replicas with the same
    /// name share the work; another name sees every set again.
    #[arg(long = LabelerArgs::QUEUE.long, env = LabelerArgs::QUEUE.env, default_value = "labeler")]
    pub queue: String,

    /// Score added when a candidate stopped at the end-of-sequence token (0 turns the rule off).
    #[arg(long = LabelerArgs::EOS_WEIGHT.long, env = LabelerArgs::EOS_WEIGHT.env, default_value = "1.0")]
    pub eos_weight: String,

    /// Score added when a candidate has at most --max-tokens tokens (0 turns the rule off).
    #[arg(long = LabelerArgs::LENGTH_WEIGHT.long, env = LabelerArgs::LENGTH_WEIGHT.env, default_value = "0.5")]
    pub length_weight: String,

    /// Length limit of the length rule, in tokens.
    #[arg(long = LabelerArgs::MAX_TOKENS.long, env = LabelerArgs::MAX_TOKENS.env, default_value = "64")]
    pub max_tokens: String,

    /// Score added when a candidate contains the prompt's reference answer,
    /// ignoring case (0 turns the rule off).
    #[arg(long = LabelerArgs::REFERENCE_WEIGHT.long, env = LabelerArgs::REFERENCE_WEIGHT.env, default_value = "2.0")]
    pub reference_weight: String,

    /// Candidate sets to rank before exiting; 0 runs until shutdown.
    #[arg(long = LabelerArgs::MAX_SETS.long, env = LabelerArgs::MAX_SETS.env, default_value = "0")]
    pub max_sets: String,
}

impl LabelerArgs {
    pub const ID: Setting = Setting { long: "labeler-id", env: "TROUPE_LABELER_ID" };
    pub const QUEUE: Setting = Setting { long: "queue", env: "TROUPE_LABELER_QUEUE" };
    pub const EOS_WEIGHT: Setting = Setting { long: "eos-weight", env: "TROUPE_LABELER_EOS_WEIGHT" };
    pub const LENGTH_WEIGHT: Setting = Setting { long: "length-weight", env: "TROUPE_LABELER_LENGTH_WEIGHT" };
    pub const MAX_TOKENS: Setting = Setting { long: "max-tokens", env: "TROUPE_LABELER_MAX_TOKENS" };
    pub const REFERENCE_WEIGHT: Setting =
        Setting { long: "reference-weight", env: "TROUPE_LABELER_REFERENCE_WEIGHT" };
    pub const MAX_SETS: Setting = Setting { long: "max-sets", env: "TROUPE_LABELER_MAX_SETS" };

    /// Checks every flag, recording each invalid one in `errors`.
    pub fn validate(&self, errors: &mut SettingsErrors) -> Option<LabelerSettings> {
        let weight_fix = "set it to a number >= 0 such as 1.0, or 0 to turn the rule off";
        let eos_weight = errors.parse(LabelerArgs::EOS_WEIGHT, &self.eos_weight, weight_fix, parse_weight);
        let length_weight = errors.parse(LabelerArgs::LENGTH_WEIGHT, &self.length_weight, weight_fix, parse_weight);
        let reference_weight =
            errors.parse(LabelerArgs::REFERENCE_WEIGHT, &self.reference_weight, weight_fix, parse_weight);
        let max_tokens = errors.parse(LabelerArgs::MAX_TOKENS, &self.max_tokens, "set it to a whole number of tokens", |value| {
            value.parse::<u32>()
        });
        let max_sets = errors.parse(LabelerArgs::MAX_SETS, &self.max_sets, "set it to a whole number, 0 for no limit", |value| {
            value.parse::<u64>()
        });
        if self.labeler_id.trim().is_empty() {
            errors.push(LabelerArgs::ID, &self.labeler_id, "the labeler id is empty", "set it to a name such as scripted");
        }
        let queue_valid = !self.queue.is_empty()
            && self.queue.len() <= 64
            && self.queue.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !queue_valid {
            errors.push(LabelerArgs::QUEUE, &self.queue, "not a queue name", "use 1 to 64 ASCII letters, digits, '-' or '_'");
        }

        let (eos_weight, length_weight, reference_weight) = (eos_weight?, length_weight?, reference_weight?);
        let preference = Preference { eos_weight, length_weight, max_tokens: max_tokens?, reference_weight };
        for problem in preference.problems() {
            errors.push(LabelerArgs::EOS_WEIGHT, &self.eos_weight, problem, "raise one of the weights above 0");
        }
        Some(LabelerSettings {
            labeler_id: self.labeler_id.trim().to_string(),
            queue: self.queue.clone(),
            preference,
            max_sets: max_sets?,
        })
    }
}

fn parse_weight(value: &str) -> Result<f64, String> {
    let weight: f64 = value.trim().parse().map_err(|_| "not a number".to_string())?;
    if !weight.is_finite() || weight < 0.0 {
        return Err("a weight must be a finite number >= 0".to_string());
    }
    Ok(weight)
}

/// Checked labeler settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelerSettings {
    pub labeler_id: String,
    pub queue: String,
    pub preference: Preference,
    /// Sets to rank before [`crate::run`] returns; 0 means no limit.
    pub max_sets: u64,
}

impl LabelerSettings {
    /// Returns settings with the default preference, for tests and `troupe up`.
    pub fn new(labeler_id: &str) -> LabelerSettings {
        LabelerSettings {
            labeler_id: labeler_id.to_string(),
            queue: "labeler".to_string(),
            preference: Preference::default(),
            max_sets: 0,
        }
    }
}
