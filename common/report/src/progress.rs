//! Parsing a progress log and turning its messages into one history per job:
//! each metric as a series of `(step, value)` points, plus its final value.

use std::collections::BTreeMap;

use serde::Deserialize;
use troupe_wire::{JobProgress, JobState, Stage};

use crate::error::ReportError;

/// One line of the log as written. `serde_json` writes a NaN or infinite
/// metric as `null`, so metrics are read as `Option` and a `null` becomes
/// NaN instead of rejecting the line.
#[derive(Deserialize)]
struct LoggedProgress {
    job_id: String,
    stage: Stage,
    state: JobState,
    step: u64,
    total_steps: u64,
    metrics: BTreeMap<String, Option<f64>>,
    message: Option<String>,
}

impl From<LoggedProgress> for JobProgress {
    fn from(logged: LoggedProgress) -> JobProgress {
        let metrics = logged
            .metrics
            .into_iter()
            .map(|(name, value)| (name, value.unwrap_or(f64::NAN)))
            .collect();
        JobProgress {
            job_id: logged.job_id,
            stage: logged.stage,
            state: logged.state,
            step: logged.step,
            total_steps: logged.total_steps,
            metrics,
            message: logged.message,
        }
    }
}

/// Parses a JSONL progress log, one `JobProgress` per line; blank lines are
/// skipped. `source_name` (an object key or a path) appears in errors.
pub fn parse_progress_log(
    bytes: &[u8],
    source_name: &str,
) -> Result<Vec<JobProgress>, ReportError> {
    let mut progress = Vec::new();
    for (index, line) in bytes.split(|&byte| byte == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let logged: LoggedProgress =
            serde_json::from_slice(line).map_err(|error| ReportError::MalformedLine {
                source_name: source_name.to_string(),
                line: index + 1,
                reason: error.to_string(),
            })?;
        progress.push(JobProgress::from(logged));
    }
    if progress.is_empty() {
        return Err(ReportError::EmptyLog {
            source_name: source_name.to_string(),
        });
    }
    Ok(progress)
}

/// Everything the log recorded about one job.
#[derive(Clone, Debug)]
pub(crate) struct JobHistory {
    pub stage: Stage,
    pub job_id: String,
    /// State, step and message of the job's last message.
    pub state: JobState,
    pub step: u64,
    pub total_steps: u64,
    pub message: Option<String>,
    /// Points per metric, sorted by step, with non-finite values left out.
    pub series: BTreeMap<String, Vec<(u64, f64)>>,
    /// Value of each metric in the last message that carried it (NaN kept).
    pub finals: BTreeMap<String, f64>,
    /// Number of messages from this job.
    pub messages: usize,
}

impl JobHistory {
    /// Returns the points of the first of `names` that has any.
    pub fn first_series(&self, names: &[&str]) -> Option<(&str, &[(u64, f64)])> {
        names.iter().find_map(|name| {
            let (name, points) = self.series.get_key_value(*name)?;
            (!points.is_empty()).then_some((name.as_str(), points.as_slice()))
        })
    }
}

/// Groups messages by job, ordered by stage (pretrain, sft, reward_model,
/// ppo) and then by first appearance in the log.
pub(crate) fn job_histories(progress: &[JobProgress]) -> Vec<JobHistory> {
    let mut order: Vec<(Stage, String)> = Vec::new();
    for message in progress {
        let job = (message.stage, message.job_id.clone());
        if !order.contains(&job) {
            order.push(job);
        }
    }
    order.sort_by_key(|(stage, _)| stage_rank(*stage));

    order
        .into_iter()
        .map(|(stage, job_id)| {
            let messages: Vec<&JobProgress> = progress
                .iter()
                .filter(|message| message.stage == stage && message.job_id == job_id)
                .collect();
            history_of(stage, job_id, &messages)
        })
        .collect()
}

/// Position of a stage in the workflow, for ordering.
pub(crate) fn stage_rank(stage: Stage) -> u8 {
    match stage {
        Stage::Pretrain => 0,
        Stage::Sft => 1,
        Stage::RewardModel => 2,
        Stage::Ppo => 3,
    }
}

fn history_of(stage: Stage, job_id: String, messages: &[&JobProgress]) -> JobHistory {
    // A step reported twice (a resumed job, or a final message repeating the
    // last step) keeps the value logged later.
    let mut by_step: BTreeMap<&str, BTreeMap<u64, f64>> = BTreeMap::new();
    let mut finals = BTreeMap::new();
    for message in messages {
        for (name, &value) in &message.metrics {
            finals.insert(name.clone(), value);
            let points = by_step.entry(name.as_str()).or_default();
            if value.is_finite() {
                points.insert(message.step, value);
            } else {
                points.remove(&message.step);
            }
        }
    }

    let series = by_step
        .into_iter()
        .map(|(name, points)| {
            let points: Vec<(u64, f64)> = points.into_iter().collect();
            let points = if is_carried_forward(name) {
                change_points(&points)
            } else {
                points
            };
            (name.to_string(), points)
        })
        .collect();

    let last = messages
        .last()
        .expect("a job history is built from at least one message");
    JobHistory {
        stage,
        job_id,
        state: last.state,
        step: last.step,
        total_steps: last.total_steps,
        message: last.message.clone(),
        series,
        finals,
        messages: messages.len(),
    }
}

/// Returns whether trainers keep repeating a metric's last value in every later step
/// until they measure it again. The pretrainer, the SFT trainer and the
/// reward trainer keep evaluation results in the metrics map they publish at
/// every step.
fn is_carried_forward(name: &str) -> bool {
    name.starts_with("heldout_")
        || name.starts_with("base_")
        || name.starts_with("eval/")
        || name == "unigram_entropy"
}

/// Keeps the points where the value changes, plus the last point so the
/// line reaches the step where the value was last reported.
// NOTE: two evaluations in a row with exactly equal results merge into one
// point, because a repeated value cannot be distinguished from a carried one.
fn change_points(points: &[(u64, f64)]) -> Vec<(u64, f64)> {
    let mut changes: Vec<(u64, f64)> = Vec::new();
    for &(step, value) in points {
        if changes
            .last()
            .is_none_or(|&(_, previous)| previous != value)
        {
            changes.push((step, value));
        }
    }
    if let (Some(&last), Some(&last_change)) = (points.last(), changes.last()) {
        if last.0 != last_change.0 {
            changes.push(last);
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_points_drops_repeats_keeps_end() {
        let points = [(1, 2.0), (2, 2.0), (3, 1.5), (4, 1.5), (5, 1.5)];
        assert_eq!(change_points(&points), vec![(1, 2.0), (3, 1.5), (5, 1.5)]);
    }

    #[test]
    fn change_points_single_value() {
        assert_eq!(change_points(&[(7, 0.5)]), vec![(7, 0.5)]);
        assert_eq!(change_points(&[]), Vec::<(u64, f64)>::new());
    }
}
