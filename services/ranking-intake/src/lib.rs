//! The ranking intake service: stores the candidate sets that samplers
//! publish, takes rankings of them from every source, validates them,
//! turns each into preference pairs and appends one record per ranking to
//! the preference dataset in the store.
//!
//! Ranking sources, all through [`Intake::decide`]:
//!
//! - the web page ([`web`]), protected by labeler tokens;
//! - the bus: external tools and the scripted labeler publish JSON or
//!   MessagePack on the rankings subject ([`worker`]), and receipts go to
//!   the receipts subject and to the subject named in [`REPLY_TO_HEADER`];
//! - `troupe rank` in a terminal, through [`Intake::pending`],
//!   [`Intake::submit`] and [`offline::parse_order_text`];
//! - offline JSONL files ([`offline::import_jsonl`]).
//!
//! Modules:
//!
//! - [`intake`]: the shared index, validation-then-store, progress counts.
//! - [`pairs`]: ranking checks and the pairs a ranking implies (pure).
//! - [`record`]: the stored [`PreferenceRecord`] and segment ids.
//! - [`worker`]: the candidates and rankings queue consumers.
//! - [`web`]: the labeling page, its JSON API and `/progress`.
//! - [`offline`]: JSONL import and the terminal order syntax.
//! - [`settings`]: flags and environment variables.

pub mod intake;
pub mod offline;
pub mod pairs;
pub mod record;
pub mod settings;
pub mod web;
pub mod worker;

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use troupe_bus::{BusError, BusHandle};
use troupe_store::Store;

pub use intake::{read_preference_records, DatasetNames, Intake, IntakeError, Progress, SetState, SetView, Verdict};
pub use offline::{import_jsonl, parse_order_text, ImportError, ImportReport};
pub use pairs::{pairs_from_order, PairIds, Rejection};
pub use record::{PreferenceRecord, RecordCandidate, Source};
pub use settings::{Cli, IntakeArgs, IntakeSettings, LabelerTokens};
pub use worker::REPLY_TO_HEADER;

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Intake(#[from] IntakeError),
    #[error("bus failure: {0}")]
    Bus(#[from] BusError),
    #[error("cannot serve the labeling page on {addr}: {source}")]
    Web { addr: SocketAddr, source: std::io::Error },
    #[error("a service task panicked: {0}")]
    Task(String),
}

/// A started intake: its tasks run until the shutdown future resolves.
pub struct Running {
    /// The address the web page is served on (the real port when 0 was asked).
    pub web_addr: SocketAddr,
    /// The intake state, for library calls next to the service.
    pub intake: Intake,
    tasks: JoinSet<Result<(), ServiceError>>,
}

impl Running {
    /// Waits until every task has stopped, returning the first error.
    pub async fn wait(mut self) -> Result<(), ServiceError> {
        let mut first_error = None;
        while let Some(joined) = self.tasks.join_next().await {
            let result = joined.unwrap_or_else(|err| Err(ServiceError::Task(err.to_string())));
            if let Err(err) = result {
                tracing::error!(error = %err, "intake task failed");
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Opens the intake, binds the web page and starts the two bus consumers.
/// They stop when `shutdown` resolves.
pub async fn start(
    settings: IntakeSettings,
    bus: BusHandle,
    store: Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ServiceError> {
    let intake = Intake::open(bus, store, settings.datasets.clone()).await?;
    let listener = TcpListener::bind(settings.web_addr)
        .await
        .map_err(|source| ServiceError::Web { addr: settings.web_addr, source })?;
    let web_addr = listener.local_addr().map_err(|source| ServiceError::Web { addr: settings.web_addr, source })?;
    tracing::info!(addr = %web_addr, labelers = ?settings.tokens, "serving the labeling page and /progress");

    // One future fans out to every task through a watch channel.
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        shutdown.await;
        stop.send_replace(true);
        Ok(())
    });

    let router = web::router(intake.clone(), settings.tokens.clone());
    let mut web_stop = stopped.clone();
    tasks.spawn(async move {
        let until_stopped = async move { worker::stopped(&mut web_stop).await };
        axum::serve(listener, router)
            .with_graceful_shutdown(until_stopped)
            .await
            .map_err(|source| ServiceError::Web { addr: web_addr, source })
    });

    let candidates = worker::consume_candidates(intake.clone(), settings.clone(), stopped.clone());
    tasks.spawn(async move { candidates.await.map_err(ServiceError::from) });
    let rankings = worker::consume_rankings(intake.clone(), settings, stopped);
    tasks.spawn(async move { rankings.await.map_err(ServiceError::from) });

    Ok(Running { web_addr, intake, tasks })
}

/// Runs the intake until `shutdown` resolves; see [`start`].
pub async fn run(
    settings: IntakeSettings,
    bus: BusHandle,
    store: Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    start(settings, bus, store, shutdown).await?.wait().await
}
