//! `troupe-ppo-learner`: the PPO learner as its own process.

use clap::Parser;
use troupe_bus::NatsArgs;
use troupe_ppo_learner::Settings;
use troupe_service::http::{install_metrics_recorder, HttpArgs, HttpServer, Readiness};
use troupe_service::logging::{init_tracing, LogArgs};
use troupe_service::settings::SettingsErrors;
use troupe_service::shutdown::{wait_for_signal, Shutdown, ShutdownArgs};
use troupe_store::{Store, StoreArgs};

/// Stage 3 PPO learner: trains the policy on scored rollouts from the bus and
/// publishes policy versions to the store.
#[derive(Parser)]
#[command(name = "troupe-ppo-learner", version)]
struct Cli {
    #[command(flatten)]
    ppo: Settings,
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

#[tokio::main]
async fn main() {
    let cli: Cli = troupe_service::settings::parse_args_or_exit();

    let mut errors = SettingsErrors::new();
    let log = cli.log.validate(&mut errors);
    let grace = cli.shutdown.validate(&mut errors);
    let http = cli.http.validate(&mut errors);
    let mut problems: Vec<String> = cli.nats.validate();
    problems.extend(cli.ppo.validate().err().unwrap_or_default());
    let store_config = match cli.store.validate() {
        Ok(config) => Some(config),
        Err(store_errors) => {
            problems.extend(store_errors.iter().map(ToString::to_string));
            None
        }
    };
    let (Some(log), Some(grace), Some(http), Some(store_config), true) =
        (log, grace, http, store_config, problems.is_empty() && errors.is_empty())
    else {
        eprintln!("troupe-ppo-learner: invalid settings:");
        for error in errors.iter() {
            eprintln!("  - {error}");
        }
        for problem in problems {
            eprintln!("  - {problem}");
        }
        std::process::exit(troupe_service::settings::EX_USAGE);
    };
    if let Err(error) = init_tracing(&log) {
        eprintln!("troupe-ppo-learner: {error}");
        std::process::exit(1);
    }

    // Health and metrics come up first, so a probe can tell "starting" from
    // "dead"; readiness follows once the store and the bus are reachable.
    let shutdown = Shutdown::new();
    let readiness = Readiness::new();
    let recorder = match install_metrics_recorder() {
        Ok(recorder) => recorder,
        Err(error) => {
            tracing::error!(%error, "cannot install the metrics recorder");
            std::process::exit(1);
        }
    };
    let server = match HttpServer::bind(http.addr, readiness.clone(), recorder).await {
        Ok(server) => server,
        Err(error) => {
            tracing::error!(%error, "cannot serve health and metrics");
            std::process::exit(1);
        }
    };
    tracing::info!(addr = %server.local_addr(), "serving health and metrics");
    let http_task = tokio::spawn(server.run_until_shutdown(shutdown.listener()));

    let store = match Store::open(&store_config) {
        Ok(store) => store,
        Err(error) => {
            tracing::error!(%error, "cannot open the store");
            std::process::exit(1);
        }
    };
    let bus = match troupe_bus::connect(&cli.nats).await {
        Ok(bus) => bus,
        Err(error) => {
            tracing::error!(%error, "cannot connect to the bus");
            std::process::exit(1);
        }
    };
    tracing::info!(
        scored = %bus.subjects().scored(),
        prompts = %bus.subjects().prompts(),
        models = %bus.subjects().models(),
        store = %store,
        reference = %cli.ppo.reference,
        policy = %cli.ppo.policy,
        job_id = %cli.ppo.job_id,
        "ppo learner starting"
    );
    readiness.set_ready(true);

    let listener = shutdown.listener();
    let mut service = tokio::spawn(troupe_ppo_learner::run(cli.ppo, bus.clone(), store, listener.into_recv()));
    let finished = tokio::select! {
        signal = wait_for_signal() => {
            match signal {
                Ok(signal) => tracing::info!(%signal, "shutting down"),
                Err(error) => tracing::warn!(%error, "cannot listen for signals; shutting down"),
            }
            None
        }
        result = &mut service => Some(result),
    };
    readiness.set_ready(false);
    shutdown.drain(grace).await;
    http_task.abort();
    let result = match finished {
        Some(result) => result,
        None => service.await,
    };
    let code = match result {
        Ok(Ok(summary)) => {
            tracing::info!(steps = summary.steps_run, finished = summary.finished, policy = ?summary.final_version.map(|v| v.to_string()), "ppo learner stopped");
            0
        }
        Ok(Err(error)) => {
            tracing::error!(%error, "ppo learner failed");
            1
        }
        Err(error) => {
            tracing::error!(%error, "ppo learner task panicked");
            1
        }
    };
    if let Err(error) = bus.flush().await {
        tracing::warn!(%error, "failed to flush the bus");
    }
    std::process::exit(code);
}
