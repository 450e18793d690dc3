//! Subject names, all under one prefix per run: `troupe.<run>.<name>`.
//!
//! | subject | message | delivery |
//! | --- | --- | --- |
//! | `troupe.<run>.prompts` | [`PromptBatch`](crate::PromptBatch) | work queue shared by samplers |
//! | `troupe.<run>.candidates` | [`CandidateSet`](crate::CandidateSet) | durable, read by ranking intake; JSON accepted |
//! | `troupe.<run>.rankings` | [`Ranking`](crate::Ranking) | work queue of ranking intake; external tools publish here in JSON or MessagePack |
//! | `troupe.<run>.receipts` | [`RankingReceipt`](crate::RankingReceipt) | pub/sub, also sent to a ranking's reply subject |
//! | `troupe.<run>.preferences` | [`PreferenceUpdate`](crate::PreferenceUpdate) | pub/sub |
//! | `troupe.<run>.rollouts` | [`Rollout`](crate::Rollout) | work queue shared by reward scorers |
//! | `troupe.<run>.scored` | [`ScoredRollout`](crate::ScoredRollout) | work queue of the PPO learner |
//! | `troupe.<run>.models` | [`ModelAnnouncement`](crate::ModelAnnouncement) | pub/sub, kept in the stream for late readers |
//! | `troupe.<run>.jobs.<stage>` | [`JobRequest`](crate::JobRequest) | work queue shared by the trainers of one stage (`pretrain`, `sft`, `reward_model`, `ppo`) |
//! | `troupe.<run>.progress` | [`JobProgress`](crate::JobProgress) | pub/sub |
//! | `troupe.<run>.dead` | [`DeadLetter`](crate::DeadLetter) | durable, for operators |
//!
//! Every subject of a run is captured by one JetStream stream, so each is
//! durable; "pub/sub" marks those that services read as live notices.

use std::fmt;

use crate::codec::WireError;

/// The first token of every troupe subject.
pub const ROOT: &str = "troupe";

pub const PROMPTS: &str = "prompts";
pub const CANDIDATES: &str = "candidates";
pub const RANKINGS: &str = "rankings";
pub const RECEIPTS: &str = "receipts";
pub const PREFERENCES: &str = "preferences";
pub const ROLLOUTS: &str = "rollouts";
pub const SCORED: &str = "scored";
pub const MODELS: &str = "models";
pub const JOBS: &str = "jobs";
pub const PROGRESS: &str = "progress";
pub const DEAD: &str = "dead";

/// Every subject name, for listing and for stream configuration checks.
pub const ALL: [&str; 11] =
    [PROMPTS, CANDIDATES, RANKINGS, RECEIPTS, PREFERENCES, ROLLOUTS, SCORED, MODELS, JOBS, PROGRESS, DEAD];

/// Maximum length of a run id, which becomes part of stream and consumer names.
pub const MAX_RUN_ID_LEN: usize = 64;

/// A validated run id: ASCII letters, digits, `-` and `_`, so it is safe in
/// a subject token, a JetStream stream name and an object key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(String);

impl RunId {
    /// Checks `value` and wraps it.
    pub fn new(value: &str) -> Result<RunId, WireError> {
        let valid_chars = value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if value.is_empty() || value.len() > MAX_RUN_ID_LEN || !valid_chars {
            return Err(WireError::Invalid {
                field: "run",
                reason: format!(
                    "{value:?} is not a run id; use 1 to {MAX_RUN_ID_LEN} ASCII letters, digits, '-' or '_'"
                ),
            });
        }
        Ok(RunId(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The subjects of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    run: RunId,
}

impl Subjects {
    pub fn new(run: RunId) -> Subjects {
        Subjects { run }
    }

    pub fn run(&self) -> &RunId {
        &self.run
    }

    /// `troupe.<run>.<name>` for one of the names in [`ALL`].
    pub fn subject(&self, name: &str) -> String {
        format!("{ROOT}.{}.{name}", self.run)
    }

    /// `troupe.<run>.>`: every subject of the run, as a stream captures them.
    pub fn wildcard(&self) -> String {
        format!("{ROOT}.{}.>", self.run)
    }

    pub fn prompts(&self) -> String {
        self.subject(PROMPTS)
    }
    pub fn candidates(&self) -> String {
        self.subject(CANDIDATES)
    }
    pub fn rankings(&self) -> String {
        self.subject(RANKINGS)
    }
    pub fn receipts(&self) -> String {
        self.subject(RECEIPTS)
    }
    pub fn preferences(&self) -> String {
        self.subject(PREFERENCES)
    }
    pub fn rollouts(&self) -> String {
        self.subject(ROLLOUTS)
    }
    pub fn scored(&self) -> String {
        self.subject(SCORED)
    }
    pub fn models(&self) -> String {
        self.subject(MODELS)
    }
    pub fn jobs(&self) -> String {
        self.subject(JOBS)
    }
    /// `troupe.<run>.jobs.<stage>`: the job queue of one stage's trainers, so
    /// a trainer only receives jobs it can run.
    pub fn jobs_for(&self, stage: crate::Stage) -> String {
        format!("{}.{}", self.subject(JOBS), stage.as_str())
    }
    pub fn progress(&self) -> String {
        self.subject(PROGRESS)
    }
    pub fn dead(&self) -> String {
        self.subject(DEAD)
    }
}

/// Returns whether `subject` matches a NATS subject `pattern`, where `*` matches one
/// token and a final `>` matches one or more tokens.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut pattern_tokens = pattern.split('.');
    let mut subject_tokens = subject.split('.');
    loop {
        match (pattern_tokens.next(), subject_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => continue,
            (Some(p), Some(s)) if p == s => continue,
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_rejects_subject_syntax() {
        for bad in ["", "a.b", "a*", "a>", "a b", "ü", &"x".repeat(65)] {
            assert!(RunId::new(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(RunId::new("demo-1_a").unwrap().as_str(), "demo-1_a");
    }

    #[test]
    fn subject_wildcards() {
        assert!(subject_matches("troupe.r.>", "troupe.r.prompts"));
        assert!(subject_matches("troupe.r.>", "troupe.r.a.b"));
        assert!(!subject_matches("troupe.r.>", "troupe.r"));
        assert!(subject_matches("troupe.*.prompts", "troupe.r.prompts"));
        assert!(!subject_matches("troupe.*.prompts", "troupe.r.rankings"));
        assert!(subject_matches("troupe.r.prompts", "troupe.r.prompts"));
        assert!(!subject_matches("troupe.r.prompts", "troupe.r.prompts.x"));
        assert!(!subject_matches("troupe.r.prompts.x", "troupe.r.prompts"));
    }

    #[test]
    fn subjects_share_the_run_prefix() {
        let subjects = Subjects::new(RunId::new("demo").unwrap());
        assert_eq!(subjects.prompts(), "troupe.demo.prompts");
        assert_eq!(subjects.dead(), "troupe.demo.dead");
        for name in ALL {
            assert!(subject_matches(&subjects.wildcard(), &subjects.subject(name)));
        }
        assert_eq!(subjects.jobs_for(crate::Stage::RewardModel), "troupe.demo.jobs.reward_model");
        assert!(subject_matches(&subjects.wildcard(), &subjects.jobs_for(crate::Stage::Sft)));
    }
}
