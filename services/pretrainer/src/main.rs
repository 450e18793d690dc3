//! `troupe-pretrainer`: serves stage 1 jobs from the bus.

use clap::Parser;
use troupe_bus::NatsArgs;
use troupe_pretrainer::ServiceSettings;
use troupe_service::logging::{init_tracing, LogArgs};
use troupe_service::settings::SettingsErrors;
use troupe_service::shutdown::{wait_for_signal, Shutdown, ShutdownArgs};
use troupe_store::{Store, StoreArgs};

/// Stage 1 pretraining service: takes pretraining jobs from the bus's job
/// subject and publishes base model versions to the store.
#[derive(Parser)]
#[command(name = "troupe-pretrainer", version)]
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

    // Every invalid setting is reported at once, before anything connects.
    let mut errors = SettingsErrors::new();
    let log = cli.log.validate(&mut errors);
    let grace = cli.shutdown.validate(&mut errors);
    let mut problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
    problems.extend(cli.nats.validate());
    problems.extend(cli.service.validate().err().unwrap_or_default());
    let store_config = cli.store.validate().map_err(|store_errors| {
        problems.extend(store_errors.iter().map(ToString::to_string));
    });
    let (Some(log), Some(grace), Ok(store_config), true) =
        (log, grace, store_config, problems.is_empty())
    else {
        let noun = if problems.len() == 1 {
            "setting"
        } else {
            "settings"
        };
        eprintln!("error: {} invalid {noun}", problems.len());
        for problem in &problems {
            eprintln!("  {problem}");
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
    tracing::info!(subject = %bus.subjects().jobs_for(troupe_wire::Stage::Pretrain), store = %store_config, "pretrainer starting");

    let shutdown = Shutdown::new();
    let listener = shutdown.listener();
    let service = tokio::spawn(troupe_pretrainer::run(
        cli.service,
        bus.clone(),
        store,
        listener.into_recv(),
    ));
    match wait_for_signal().await {
        Ok(signal) => tracing::info!(%signal, "shutting down"),
        Err(error) => tracing::warn!(%error, "cannot listen for signals; shutting down"),
    }
    shutdown.drain(grace).await;
    match service.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "pretrainer failed"),
        Err(error) => tracing::error!(%error, "pretrainer task panicked"),
    }
    if let Err(error) = bus.flush().await {
        tracing::warn!(%error, "failed to flush the bus");
    }
}
