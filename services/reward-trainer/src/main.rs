//! `troupe-reward-trainer`: serves reward-model jobs from the bus.

use std::time::Duration;

use clap::Parser;
use troupe_bus::NatsArgs;
use troupe_reward_trainer::ServiceSettings;
use troupe_service::http::{install_metrics_recorder, HttpArgs, HttpServer, HttpSettings, Readiness};
use troupe_service::logging::{init_tracing, LogArgs, LogSettings};
use troupe_service::settings::{parse_args_or_exit, SettingsErrors, EX_USAGE};
use troupe_service::shutdown::{wait_for_signal, Shutdown, ShutdownArgs};
use troupe_store::{Store, StoreArgs, StoreConfig};
use troupe_wire::Stage;

/// Reward-model training service: takes `reward_model` jobs from the bus's
/// `jobs.reward_model` subject and publishes reward-model versions to the store.
#[derive(Parser)]
#[command(name = "troupe-reward-trainer", version)]
struct Cli {
    #[command(flatten)]
    service: ServiceSettings,
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    shutdown: ShutdownArgs,
}

/// Settings of the process that passed every check.
struct Checked {
    log: LogSettings,
    http: HttpSettings,
    grace: Duration,
    store: StoreConfig,
}

#[tokio::main]
async fn main() {
    let cli: Cli = parse_args_or_exit();
    let checked = check(&cli).unwrap_or_else(|problems| exit_invalid(&problems));

    if let Err(error) = init_tracing(&checked.log) {
        eprintln!("troupe-reward-trainer: {error}");
        std::process::exit(1);
    }
    if let Err(error) = serve(cli, checked).await {
        tracing::error!(%error, "reward trainer failed");
        std::process::exit(1);
    }
}

/// Checks every setting group and returns all problems at once, before
/// anything binds or connects.
fn check(cli: &Cli) -> Result<Checked, Vec<String>> {
    let mut errors = SettingsErrors::new();
    let log = cli.log.validate(&mut errors);
    let http = cli.http.validate(&mut errors);
    let grace = cli.shutdown.validate(&mut errors);
    let mut problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
    problems.extend(cli.nats.validate());
    problems.extend(cli.service.validate().err().unwrap_or_default());
    let store = cli.store.validate().map_err(|store_errors| {
        problems.extend(store_errors.iter().map(ToString::to_string));
    });

    match (log, http, grace, store) {
        (Some(log), Some(http), Some(grace), Ok(store)) if problems.is_empty() => {
            Ok(Checked { log, http, grace, store })
        }
        _ => Err(problems),
    }
}

fn exit_invalid(problems: &[String]) -> ! {
    eprintln!("troupe-reward-trainer: invalid settings:");
    for problem in problems {
        eprintln!("  - {problem}");
    }
    std::process::exit(EX_USAGE);
}

/// Serves health and metrics, then reward-model jobs until a signal arrives or
/// the job loop fails, and drains.
async fn serve(cli: Cli, checked: Checked) -> Result<(), Box<dyn std::error::Error>> {
    let shutdown = Shutdown::new();
    let readiness = Readiness::new();
    let server = HttpServer::bind(checked.http.addr, readiness.clone(), install_metrics_recorder()?).await?;
    tracing::info!(addr = %server.local_addr(), "serving health and metrics");
    let http_task = tokio::spawn(server.run_until_shutdown(shutdown.listener()));

    let store = Store::open(&checked.store)?;
    tracing::info!(store = %store, "opened the object store");
    let bus = troupe_bus::connect(&cli.nats).await?;
    tracing::info!(subject = %bus.subjects().jobs_for(Stage::RewardModel), "connected to the bus");
    readiness.set_ready(true);

    // The job loop keeps this listener until it returns, so the drain waits
    // for the job in progress to save its checkpoint.
    let listener = shutdown.listener();
    let worker_bus = bus.clone();
    let mut worker = tokio::spawn(async move {
        let result = troupe_reward_trainer::run(cli.service, worker_bus, store, listener.clone().into_recv()).await;
        drop(listener);
        result
    });

    let finished = tokio::select! {
        signal = wait_for_signal() => {
            tracing::info!(signal = %signal?, "shutting down");
            None
        }
        result = &mut worker => Some(result),
    };
    readiness.set_ready(false);
    shutdown.drain(checked.grace).await;
    http_task.abort();
    let result = match finished {
        Some(result) => Some(result),
        None if worker.is_finished() => Some(worker.await),
        None => {
            // The job stays unacknowledged, so the queue delivers it again
            // after --job-ack-wait and it resumes from its newest checkpoint.
            worker.abort();
            None
        }
    };
    if let Err(error) = bus.flush().await {
        tracing::warn!(%error, "failed to flush the bus");
    }
    if let Some(result) = result {
        result??;
    }
    Ok(())
}
