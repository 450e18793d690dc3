//! Graceful shutdown: the signal, the notice to every task, and a drain
//! bounded by a grace period.
//!
//! The protocol, in order:
//!
//! 1. `main` creates one [`Shutdown`] and hands each long-running task a
//!    [`ShutdownListener`] from [`Shutdown::listener`]. The listener is both
//!    the task's way to hear the notice and its proof of life: a task counts
//!    as running for as long as it keeps one.
//! 2. [`wait_for_signal`] resolves on SIGINT or SIGTERM. `main` then calls
//!    [`Shutdown::drain`], which sends the notice on a `watch` channel. A
//!    `watch` keeps its latest value, so a listener that subscribes or
//!    checks late still sees it, and no listener can miss it by lagging.
//! 3. Each task finishes its unit of work (a message, a training step), stops
//!    taking new work and drops its listener.
//! 4. When the last listener is dropped, the channel's `closed` future
//!    resolves and `drain` returns [`Drain::Complete`]. When the grace period
//!    runs out first, `drain` logs a warning with the count of tasks still
//!    running and returns [`Drain::Overrun`], so `main` exits anyway; the
//!    orchestrator would kill the process soon after in any case.
//!
//! ```no_run
//! # async fn process(job: u64) {}
//! # async fn service() -> std::io::Result<()> {
//! use std::time::Duration;
//! use troupe_service::shutdown::{wait_for_signal, Shutdown};
//!
//! let shutdown = Shutdown::new();
//! let (_submit, mut jobs) = tokio::sync::mpsc::channel::<u64>(16);
//! let mut listener = shutdown.listener();
//! tokio::spawn(async move {
//!     // The notice cancels the wait for the next job, never a job in
//!     // progress: a `select!` handler runs to completion.
//!     loop {
//!         tokio::select! {
//!             _ = listener.recv() => break,
//!             Some(job) = jobs.recv() => process(job).await,
//!         }
//!     }
//!     // `listener` is dropped here, which tells the drain this task is done.
//! });
//!
//! let signal = wait_for_signal().await?;
//! tracing::info!(%signal, "shutting down");
//! shutdown.drain(Duration::from_secs(8)).await;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::settings::{Setting, SettingsErrors};

/// Command-line flags for shutdown, to `#[command(flatten)]` into a service's
/// settings.
#[derive(Args, Clone, Debug)]
pub struct ShutdownArgs {
    /// Seconds to wait after SIGTERM or SIGINT for work in flight to finish
    /// before exiting anyway. Keep it below the orchestrator's stop timeout:
    /// `docker stop` waits 10 s and Kubernetes 30 s by default.
    #[arg(
        long = ShutdownArgs::GRACE.long,
        env = ShutdownArgs::GRACE.env,
        value_name = "SECONDS",
        default_value = "8"
    )]
    pub shutdown_grace: String,
}

impl ShutdownArgs {
    pub const GRACE: Setting = Setting {
        long: "shutdown-grace",
        env: "TROUPE_SHUTDOWN_GRACE",
    };

    /// Checks the grace period, recording an error in `errors` when it is
    /// invalid.
    pub fn validate(&self, errors: &mut SettingsErrors) -> Option<Duration> {
        errors.parse(
            ShutdownArgs::GRACE,
            &self.shutdown_grace,
            "set it to a number of seconds such as 8 or 0.5",
            parse_seconds,
        )
    }
}

fn parse_seconds(value: &str) -> Result<Duration, String> {
    let seconds: f64 = value.parse().map_err(|_| "not a number".to_string())?;
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| "not a finite, non-negative number".to_string())
}

/// The signal that asked the process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        })
    }
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM (`docker stop`, Kubernetes) and
/// returns which one came.
///
/// The handlers are installed when the future is first polled, so poll it
/// (spawn it or `select!` on it) before work starts. It returns an error
/// when the handlers cannot be installed.
pub async fn wait_for_signal() -> std::io::Result<Signal> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = interrupt.recv() => Ok(Signal::Interrupt),
        _ = terminate.recv() => Ok(Signal::Terminate),
    }
}

/// Outcome of a [`Shutdown::drain`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    /// Every listener was dropped within the grace period.
    Complete { elapsed: Duration },
    /// The grace period ran out with `running` listeners still held.
    Overrun { running: usize },
}

/// The sending side of the shutdown notice, owned by `main`.
#[derive(Debug)]
pub struct Shutdown {
    notice: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Shutdown {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (notice, _) = watch::channel(false);
        Shutdown { notice }
    }

    /// Returns a listener for one task; the drain waits until it is dropped.
    pub fn listener(&self) -> ShutdownListener {
        let notice = self.notice.subscribe();
        let is_shutdown = *notice.borrow();
        ShutdownListener {
            notice,
            is_shutdown,
        }
    }

    /// Sends the notice without waiting, for a service that decides to stop
    /// by itself, for example after a fatal error in one task.
    pub fn trigger(&self) {
        self.notice.send_replace(true);
    }

    /// Returns true once the notice was sent.
    pub fn is_triggered(&self) -> bool {
        *self.notice.borrow()
    }

    /// Returns how many listeners are still held.
    pub fn running(&self) -> usize {
        self.notice.receiver_count()
    }

    /// Sends the notice and waits up to `grace` for every listener to be
    /// dropped. Logs the start, and a warning when the grace period is
    /// overrun.
    pub async fn drain(self, grace: Duration) -> Drain {
        let started = Instant::now();
        self.trigger();
        tracing::info!(
            running = self.running(),
            grace_secs = grace.as_secs_f64(),
            "draining"
        );

        match tokio::time::timeout(grace, self.notice.closed()).await {
            Ok(()) => {
                let elapsed = started.elapsed();
                tracing::info!(elapsed_secs = elapsed.as_secs_f64(), "drained");
                Drain::Complete { elapsed }
            }
            Err(_) => {
                let running = self.running();
                tracing::warn!(
                    running,
                    grace_secs = grace.as_secs_f64(),
                    "shutdown grace period overrun, exiting with tasks still running"
                );
                Drain::Overrun { running }
            }
        }
    }
}

/// A task's handle on the shutdown notice. The task counts as running until
/// it drops this.
///
/// It remembers whether it has seen the notice, so a loop can check
/// [`is_shutdown`](ShutdownListener::is_shutdown) without awaiting.
#[derive(Clone, Debug)]
pub struct ShutdownListener {
    notice: watch::Receiver<bool>,
    is_shutdown: bool,
}

impl ShutdownListener {
    /// Returns true once [`recv`](ShutdownListener::recv) has returned or the
    /// notice was already sent when this listener was made.
    pub fn is_shutdown(&self) -> bool {
        self.is_shutdown
    }

    /// Waits for the notice, or returns at once if it was already seen.
    ///
    /// A dropped [`Shutdown`] counts as the notice, because no notice can
    /// come after that.
    pub async fn recv(&mut self) {
        if self.is_shutdown {
            return;
        }
        // An error means the sender is gone, which is treated as the notice.
        let _ = self.notice.wait_for(|&shutdown| shutdown).await;
        self.is_shutdown = true;
    }

    /// Waits for the notice and then drops the listener, for APIs that take
    /// an owned shutdown future, such as [`HttpServer::run`](crate::http::HttpServer::run).
    ///
    /// The drain stops waiting for this listener as soon as the notice
    /// arrives. A task that still has work to finish after that, such as a
    /// server closing its connections, keeps a clone until it is done.
    pub async fn into_recv(mut self) {
        self.recv().await;
    }
}
