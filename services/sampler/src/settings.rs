//! Command-line flags and environment variables of the sampler, and their
//! validation with every problem reported at once.

use std::time::Duration;

use clap::{Args, Parser};
use troupe_bus::NatsArgs;
use troupe_service::http::HttpArgs;
use troupe_service::logging::LogArgs;
use troupe_service::settings::{Setting, SettingsErrors};
use troupe_service::shutdown::ShutdownArgs;
use troupe_store::StoreArgs;

use crate::batch::Limits;

/// The `troupe-sampler` command line.
#[derive(Parser, Clone)]
#[command(name = "troupe-sampler", about = "Samples candidate sets and rollouts from policy versions")]
pub struct Cli {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

/// The sampler's own flags. Numbers are taken as text and parsed after clap,
/// so that every invalid value is reported at once.
#[derive(Args, Clone, Debug)]
pub struct SamplerArgs {
    /// Registry name of the policy whose newest announced version samples
    /// every batch that names no policy. Batches that name a version are
    /// sampled with that version, whatever its name.
    #[arg(long = SamplerArgs::POLICY.long, env = SamplerArgs::POLICY.env, value_name = "NAME", default_value = "policy")]
    pub policy: String,

    /// Durable queue name on the prompts subject. Replicas with the same name
    /// share the batches, and a queue of another name receives every batch again.
    #[arg(long = SamplerArgs::QUEUE.long, env = SamplerArgs::QUEUE.env, value_name = "NAME", default_value = "sampler")]
    pub queue: String,

    /// Seconds a batch may stay unacknowledged before the queue hands it to
    /// another replica. The sampler reports progress every third of it while
    /// it works, so only a replica that died or hung loses its batch.
    #[arg(long = SamplerArgs::ACK_WAIT.long, env = SamplerArgs::ACK_WAIT.env, value_name = "SECONDS", default_value = "60")]
    pub ack_wait: String,

    /// Batches unacknowledged at once on the queue, across all replicas. Each
    /// replica samples one batch at a time, so set it to at least the replica
    /// count; past it, replicas wait for the next batch.
    #[arg(long = SamplerArgs::MAX_IN_FLIGHT.long, env = SamplerArgs::MAX_IN_FLIGHT.env, value_name = "BATCHES", default_value = "16")]
    pub max_in_flight: String,

    /// Deliveries of one batch before it goes to the dead-letter subject.
    #[arg(long = SamplerArgs::MAX_DELIVER.long, env = SamplerArgs::MAX_DELIVER.env, value_name = "COUNT", default_value = "5")]
    pub max_deliver: String,

    /// Prompts one batch may hold; a larger batch is rejected to the
    /// dead-letter subject.
    #[arg(long = SamplerArgs::MAX_PROMPTS.long, env = SamplerArgs::MAX_PROMPTS.env, value_name = "PROMPTS", default_value = "64")]
    pub max_prompts: String,

    /// Candidates (k) or rollouts (n) one batch may ask for per prompt; a
    /// batch asking for more is rejected to the dead-letter subject.
    #[arg(long = SamplerArgs::MAX_OUTPUTS.long, env = SamplerArgs::MAX_OUTPUTS.env, value_name = "OUTPUTS", default_value = "16")]
    pub max_outputs_per_prompt: String,

    /// Largest max_new_tokens, in tokens, a batch may ask for; a batch asking
    /// for more is rejected to the dead-letter subject.
    #[arg(long = SamplerArgs::MAX_NEW_TOKENS.long, env = SamplerArgs::MAX_NEW_TOKENS.env, value_name = "TOKENS", default_value = "256")]
    pub max_new_tokens: String,

    /// Sequences decoded together. It bounds the KV cache in memory; a batch
    /// with more rows (prompts times outputs) is sampled in chunks of this size.
    #[arg(long = SamplerArgs::MAX_ROWS.long, env = SamplerArgs::MAX_ROWS.env, value_name = "SEQUENCES", default_value = "32")]
    pub max_rows: String,

    /// Policy versions kept in memory: the followed version plus older ones
    /// that batches named. Past it, the least recently used is dropped.
    #[arg(long = SamplerArgs::MAX_LOADED.long, env = SamplerArgs::MAX_LOADED.env, value_name = "VERSIONS", default_value = "2")]
    pub max_loaded_versions: String,
}

impl SamplerArgs {
    pub const POLICY: Setting = Setting { long: "policy", env: "TROUPE_SAMPLER_POLICY" };
    pub const QUEUE: Setting = Setting { long: "queue", env: "TROUPE_SAMPLER_QUEUE" };
    pub const ACK_WAIT: Setting = Setting { long: "ack-wait", env: "TROUPE_SAMPLER_ACK_WAIT" };
    pub const MAX_IN_FLIGHT: Setting = Setting { long: "max-in-flight", env: "TROUPE_SAMPLER_MAX_IN_FLIGHT" };
    pub const MAX_DELIVER: Setting = Setting { long: "max-deliver", env: "TROUPE_SAMPLER_MAX_DELIVER" };
    pub const MAX_PROMPTS: Setting = Setting { long: "max-prompts", env: "TROUPE_SAMPLER_MAX_PROMPTS" };
    pub const MAX_OUTPUTS: Setting =
        Setting { long: "max-outputs-per-prompt", env: "TROUPE_SAMPLER_MAX_OUTPUTS_PER_PROMPT" };
    pub const MAX_NEW_TOKENS: Setting = Setting { long: "max-new-tokens", env: "TROUPE_SAMPLER_MAX_NEW_TOKENS" };
    pub const MAX_ROWS: Setting = Setting { long: "max-rows", env: "TROUPE_SAMPLER_MAX_ROWS" };
    pub const MAX_LOADED: Setting = Setting { long: "max-loaded-versions", env: "TROUPE_SAMPLER_MAX_LOADED_VERSIONS" };

    /// Checks every flag, recording each invalid one in `errors`.
    pub fn validate(&self, errors: &mut SettingsErrors) -> Option<SamplerSettings> {
        let count = |errors: &mut SettingsErrors, setting: Setting, value: &str, unit: &str| {
            errors.parse(setting, value, &format!("set it to a whole number of {unit}, at least 1"), parse_positive)
        };
        let max_in_flight = count(errors, SamplerArgs::MAX_IN_FLIGHT, &self.max_in_flight, "batches");
        let max_deliver = count(errors, SamplerArgs::MAX_DELIVER, &self.max_deliver, "deliveries");
        let max_prompts = count(errors, SamplerArgs::MAX_PROMPTS, &self.max_prompts, "prompts");
        let max_outputs = count(errors, SamplerArgs::MAX_OUTPUTS, &self.max_outputs_per_prompt, "outputs");
        let max_new_tokens = count(errors, SamplerArgs::MAX_NEW_TOKENS, &self.max_new_tokens, "tokens");
        let max_rows = count(errors, SamplerArgs::MAX_ROWS, &self.max_rows, "sequences");
        let max_loaded = count(errors, SamplerArgs::MAX_LOADED, &self.max_loaded_versions, "versions");
        let ack_wait = errors.parse(
            SamplerArgs::ACK_WAIT,
            &self.ack_wait,
            "set it to a number of seconds, at least 1, such as 60",
            parse_ack_wait,
        );

        if let Err(reason) = check_model_name(&self.policy) {
            errors.push(SamplerArgs::POLICY, &self.policy, reason, "set it to the registry name of the policy, such as policy");
        }
        let queue_valid = !self.queue.is_empty()
            && self.queue.len() <= 64
            && self.queue.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !queue_valid {
            errors.push(SamplerArgs::QUEUE, &self.queue, "not a queue name", "use 1 to 64 ASCII letters, digits, '-' or '_'");
        }
        let max_outputs = max_outputs.and_then(|value| match u32::try_from(value) {
            Ok(value) => Some(value),
            Err(_) => {
                errors.push(SamplerArgs::MAX_OUTPUTS, &self.max_outputs_per_prompt, "too large", "use at most 4294967295");
                None
            }
        });
        let max_new_tokens = max_new_tokens.and_then(|value| match u32::try_from(value) {
            Ok(value) => Some(value),
            Err(_) => {
                errors.push(SamplerArgs::MAX_NEW_TOKENS, &self.max_new_tokens, "too large", "use at most 4294967295");
                None
            }
        });

        Some(SamplerSettings {
            policy: self.policy.clone(),
            queue: self.queue.clone(),
            ack_wait: ack_wait?,
            max_in_flight: max_in_flight?,
            max_deliver: max_deliver? as u64,
            limits: Limits {
                max_prompts: max_prompts?,
                max_outputs_per_prompt: max_outputs?,
                max_new_tokens: max_new_tokens?,
                max_rows: max_rows?,
            },
            max_loaded_versions: max_loaded?,
        })
    }
}

fn parse_positive(value: &str) -> Result<usize, String> {
    let parsed: usize = value.trim().parse().map_err(|_| "not a whole number".to_string())?;
    if parsed == 0 {
        return Err("0 is not allowed".to_string());
    }
    Ok(parsed)
}

fn parse_ack_wait(value: &str) -> Result<Duration, String> {
    let seconds: f64 = value.trim().parse().map_err(|_| "not a number".to_string())?;
    if !seconds.is_finite() || seconds < 1.0 {
        return Err("it must be at least 1 second".to_string());
    }
    Duration::try_from_secs_f64(seconds).map_err(|error| error.to_string())
}

/// Checks a model name against the registry's naming rule, without a store.
fn check_model_name(name: &str) -> Result<(), String> {
    format!("{name}@1").parse::<troupe_store::ModelRef>().map(|_| ()).map_err(|error| error.to_string())
}

/// Checked sampler settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerSettings {
    /// Registry name of the followed policy.
    pub policy: String,
    /// Durable queue name shared by replicas.
    pub queue: String,
    pub ack_wait: Duration,
    pub max_in_flight: usize,
    pub max_deliver: u64,
    pub limits: Limits,
    pub max_loaded_versions: usize,
}

impl SamplerSettings {
    /// Settings with every default, following `policy`, for tests and `troupe up`.
    pub fn new(policy: &str) -> SamplerSettings {
        SamplerSettings {
            policy: policy.to_string(),
            queue: "sampler".to_string(),
            ack_wait: Duration::from_secs(60),
            max_in_flight: 16,
            max_deliver: 5,
            limits: Limits::default(),
            max_loaded_versions: 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use troupe_service::settings::parse_args_with_env;

    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<SamplerSettings, SettingsErrors> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut argv = vec!["troupe-sampler"];
        argv.extend_from_slice(args);
        let cli: Cli = parse_args_with_env(argv, &env).expect("clap accepts the flags");
        let mut errors = SettingsErrors::new();
        let settings = cli.sampler.validate(&mut errors);
        errors.finish(|| settings)
    }

    #[test]
    fn defaults_match_new() {
        let settings = parse(&[], &[]).unwrap();
        assert_eq!(settings, SamplerSettings::new("policy"));
    }

    #[test]
    fn flags_and_environment_are_read() {
        let settings = parse(
            &["--policy", "sft", "--max-rows", "8"],
            &[("TROUPE_SAMPLER_ACK_WAIT", "2.5"), ("TROUPE_SAMPLER_MAX_LOADED_VERSIONS", "3")],
        )
        .unwrap();
        assert_eq!(settings.policy, "sft");
        assert_eq!(settings.limits.max_rows, 8);
        assert_eq!(settings.ack_wait, Duration::from_millis(2500));
        assert_eq!(settings.max_loaded_versions, 3);
    }

    #[test]
    fn every_bad_setting_is_reported() {
        let errors = parse(
            &["--policy", "no/slash", "--queue", "has.dot", "--ack-wait", "0.2", "--max-rows", "0"],
            &[("TROUPE_SAMPLER_MAX_NEW_TOKENS", "many"), ("TROUPE_SAMPLER_MAX_PROMPTS", "-1")],
        )
        .unwrap_err();
        let named: Vec<&str> = errors.iter().map(|error| error.setting.long).collect();
        for flag in ["policy", "queue", "ack-wait", "max-rows", "max-new-tokens", "max-prompts"] {
            assert!(named.contains(&flag), "--{flag} not reported in {named:?}");
        }
        assert_eq!(errors.len(), 6, "{errors}");
    }
}
