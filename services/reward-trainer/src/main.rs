//! `troupe-reward-trainer`: serves reward-model jobs from the bus.

use clap::Parser;
use troupe_bus::NatsArgs;
use troupe_reward_trainer::ServiceSettings;
use troupe_service::logging::{init_tracing, LogArgs};
use troupe_service::settings::SettingsErrors;
use troupe_service::shutdown::{wait_for_signal, Shutdown, ShutdownArgs};
use troupe_store::{Store, StoreArgs};

/// Reward-model training service: takes `reward_model` jobs from the bus's
/// `jobs` subject and publishes reward-model versions to the store.
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
    shutdown: ShutdownArgs,
}

#[tokio::main]
async fn main() {
    let cli: Cli = troupe_service::settings::parse_args_or_exit();

    let mut errors = SettingsErrors::new();
    let log = cli.log.validate(&mut errors);
    let grace = cli.shutdown.validate(&mut errors);
    let problems: Vec<String> = cli.nats.validate().into_iter().chain(cli.service.validate().err().unwrap_or_default()).collect();
    let store_config = cli.store.validate();
    let (Some(log), Some(grace), true, Ok(store_config)) = (log, grace, problems.is_empty() && errors.is_empty(), store_config) else {
        eprintln!("{errors}");
        for problem in problems {
            eprintln!("  {problem}");
        }
        if let Err(store_errors) = cli.store.validate() {
            for error in store_errors {
                eprintln!("  {error}");
            }
        }
        std::process::exit(troupe_service::settings::EX_USAGE);
    };
    if let Err(error) = init_tracing(&log) {
        eprintln!("error: {error}");
        std::process::exit(1);
    }

    let bus = match troupe_bus::connect(&cli.nats).await {
        Ok(bus) => bus,
        Err(error) => {
            tracing::error!(%error, "cannot connect to the bus");
            std::process::exit(1);
        }
    };
    let store = match Store::open(&store_config) {
        Ok(store) => store,
        Err(error) => {
            tracing::error!(%error, "cannot open the store");
            std::process::exit(1);
        }
    };
    tracing::info!(subject = %bus.subjects().jobs_for(troupe_wire::Stage::RewardModel), store = %store_config, "reward trainer starting");

    let shutdown = Shutdown::new();
    let listener = shutdown.listener();
    let service = tokio::spawn(troupe_reward_trainer::run(cli.service, bus.clone(), store, listener.into_recv()));
    match wait_for_signal().await {
        Ok(signal) => tracing::info!(%signal, "shutting down"),
        Err(error) => tracing::warn!(%error, "cannot listen for signals; shutting down"),
    }
    shutdown.drain(grace).await;
    match service.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "reward trainer failed"),
        Err(error) => tracing::error!(%error, "reward trainer task panicked"),
    }
    if let Err(error) = bus.flush().await {
        tracing::warn!(%error, "failed to flush the bus");
    }
}
