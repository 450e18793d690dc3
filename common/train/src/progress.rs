//! Training-run reporting for people and for the bus: sizes before step 0, one
//! fixed-format line per step, a progress bar when stderr is a terminal, and
//! `JobProgress` messages.
//!
//! The step line reads
//!
//! ```text
//! step   12/200 | loss 5.4321 | lr 3.00e-4 | grad norm 1.234 | 12345 tok/s | eta 1m23s
//! ```
//!
//! where `loss` is the mean training loss of that step. Throughput and ETA
//! leave out the first [`WARMUP_STEPS_UNTIMED`] steps, which include one-time
//! allocation.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use troupe_bus::BusHandle;
use troupe_wire::{Envelope, JobProgress, JobState, Stage};

/// Steps left out of throughput and ETA.
pub const WARMUP_STEPS_UNTIMED: u64 = 2;

/// Sizes derived from the settings, logged before step 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DerivedSizes {
    pub parameters: usize,
    pub micro_batch: usize,
    pub grad_accum: usize,
    /// Tokens that carry loss per optimizer step (all micro-batches).
    pub tokens_per_step: usize,
    pub total_steps: u64,
}

impl DerivedSizes {
    /// Tokens seen over the whole run divided by the parameter count.
    pub fn tokens_per_parameter(&self) -> f64 {
        self.tokens_per_step as f64 * self.total_steps as f64 / self.parameters.max(1) as f64
    }

    /// Logs the sizes as one line.
    pub fn log(&self) {
        tracing::info!(
            parameters = self.parameters,
            micro_batch = self.micro_batch,
            grad_accum = self.grad_accum,
            tokens_per_step = self.tokens_per_step,
            total_steps = self.total_steps,
            tokens_per_parameter = format!("{:.2}", self.tokens_per_parameter()),
            "derived sizes"
        );
    }
}

/// Numbers of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The step just completed, counted from 0.
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed in this step.
    pub tokens: usize,
}

/// Formats step lines, drives the progress bar and publishes `JobProgress`.
pub struct StepReporter {
    job_id: String,
    stage: Stage,
    total_steps: u64,
    bus: Option<BusHandle>,
    bar: Option<ProgressBar>,
    /// Start of the timed window and the tokens counted in it.
    timed: Option<(Instant, u64, usize)>,
}

impl StepReporter {
    /// Creates a reporter for `total_steps` steps of `job_id`, publishing on `bus` when
    /// given. `first_step` is where a resumed run starts. The bar is shown only
    /// when stderr is a terminal.
    pub fn new(
        job_id: &str,
        stage: Stage,
        first_step: u64,
        total_steps: u64,
        bus: Option<BusHandle>,
    ) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_steps);
            let style = ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(first_step);
            bar
        });
        Self {
            job_id: job_id.to_string(),
            stage,
            total_steps,
            bus,
            bar,
            timed: None,
        }
    }

    /// Formats the step line for `stats`, with throughput and ETA when known.
    pub fn format_line(
        &self,
        stats: &StepStats,
        tokens_per_s: Option<f64>,
        eta: Option<Duration>,
    ) -> String {
        let width = self.total_steps.to_string().len();
        let speed =
            tokens_per_s.map_or_else(|| "- tok/s".to_string(), |rate| format!("{rate:.0} tok/s"));
        let eta = eta.map_or_else(|| "-".to_string(), format_duration);
        format!(
            "step {:>width$}/{} | loss {:.4} | lr {:.2e} | grad norm {:.3} | {speed} | eta {eta}",
            stats.step + 1,
            self.total_steps,
            stats.loss,
            stats.lr,
            stats.grad_norm,
        )
    }

    /// Logs the line for a completed step, moves the bar and publishes progress.
    pub async fn step(&mut self, stats: &StepStats, extra: &BTreeMap<String, f64>) {
        let (tokens_per_s, eta) = self.throughput(stats);
        let line = self.format_line(stats, tokens_per_s, eta);
        match &self.bar {
            Some(bar) => {
                bar.set_position(stats.step + 1);
                bar.set_message(line.clone());
                tracing::debug!(step = stats.step + 1, "{line}");
            }
            None => tracing::info!(step = stats.step + 1, "{line}"),
        }

        let mut metrics = extra.clone();
        metrics.insert("loss".into(), stats.loss);
        metrics.insert("lr".into(), stats.lr);
        metrics.insert("grad_norm".into(), stats.grad_norm);
        if let Some(rate) = tokens_per_s {
            metrics.insert("tokens_per_s".into(), rate);
        }
        self.publish(JobState::Running, stats.step + 1, metrics, None)
            .await;
    }

    /// Publishes the final state of the job and clears the bar.
    pub async fn finish(
        &mut self,
        state: JobState,
        step: u64,
        metrics: BTreeMap<String, f64>,
        message: Option<String>,
    ) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        self.publish(state, step, metrics, message).await;
    }

    /// Publishes a progress message. A failed publish is logged and the
    /// training goes on, because progress is a notice that readers can lose.
    pub async fn publish(
        &self,
        state: JobState,
        step: u64,
        metrics: BTreeMap<String, f64>,
        message: Option<String>,
    ) {
        let Some(bus) = &self.bus else { return };
        let progress = JobProgress {
            job_id: self.job_id.clone(),
            stage: self.stage,
            state,
            step,
            total_steps: self.total_steps,
            metrics,
            message,
        };
        let envelope = Envelope::new(bus.subjects().run().to_string(), progress);
        if let Err(error) = bus.publish(&bus.subjects().progress(), &envelope).await {
            tracing::warn!(job_id = %self.job_id, %error, "failed to publish job progress");
        }
    }

    fn throughput(&mut self, stats: &StepStats) -> (Option<f64>, Option<Duration>) {
        let now = Instant::now();
        let Some((start, start_step, tokens)) = self.timed.as_mut() else {
            // The timed window opens after the untimed warmup steps.
            if stats.step + 1 >= WARMUP_STEPS_UNTIMED {
                self.timed = Some((now, stats.step, 0));
            }
            return (None, None);
        };
        *tokens += stats.tokens;
        let elapsed = now.duration_since(*start).as_secs_f64();
        let steps_done = stats.step - *start_step;
        if elapsed <= 0.0 || steps_done == 0 {
            return (None, None);
        }
        let per_step = elapsed / steps_done as f64;
        let remaining = self.total_steps.saturating_sub(stats.step + 1) as f64 * per_step;
        (
            Some(*tokens as f64 / elapsed),
            Some(Duration::from_secs_f64(remaining)),
        )
    }
}

fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, (seconds % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_line_has_fixed_format() {
        let reporter = StepReporter::new("job", Stage::Pretrain, 0, 200, None);
        let stats = StepStats {
            step: 11,
            loss: 5.43214,
            lr: 3e-4,
            grad_norm: 1.2345,
            tokens: 1024,
        };
        let line = reporter.format_line(&stats, Some(12345.4), Some(Duration::from_secs(83)));
        assert_eq!(
            line,
            "step  12/200 | loss 5.4321 | lr 3.00e-4 | grad norm 1.234 | 12345 tok/s | eta 1m23s"
        );
    }
}
