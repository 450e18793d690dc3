//! `troupe-ranking-intake`: the ranking intake as its own process.

use std::time::Duration;

use troupe_ranking_intake::{Cli, IntakeSettings};
use troupe_service::http::{install_metrics_recorder, HttpServer, HttpSettings, Readiness};
use troupe_service::logging::init_tracing;
use troupe_service::settings::{parse_args_or_exit, SettingsErrors, EX_USAGE};
use troupe_service::shutdown::{wait_for_signal, Shutdown};
use troupe_store::{Store, StoreConfig};

#[tokio::main]
async fn main() {
    let cli: Cli = parse_args_or_exit();

    // Every problem in every setting group is reported before exiting.
    let mut errors = SettingsErrors::new();
    let log = cli.log.validate(&mut errors);
    let http = cli.http.validate(&mut errors);
    let grace = cli.shutdown.validate(&mut errors);
    let intake = cli.intake.validate(&mut errors);
    let mut problems: Vec<String> = cli.nats.validate();
    let store = match cli.store.validate() {
        Ok(store) => Some(store),
        Err(store_errors) => {
            problems.extend(store_errors.iter().map(ToString::to_string));
            None
        }
    };
    let checked = errors.finish(|| Some((log?, http?, grace?, intake?)));
    let settings = match (checked, store) {
        (Ok(settings), Some(store)) if problems.is_empty() => (settings, store),
        (checked, _) => {
            let mut lines: Vec<String> = checked.err().map(|errors| errors.iter().map(ToString::to_string).collect()).unwrap_or_default();
            lines.extend(problems);
            eprintln!("troupe-ranking-intake: invalid settings:");
            for line in lines {
                eprintln!("  - {line}");
            }
            std::process::exit(EX_USAGE);
        }
    };
    let ((log, http, grace, intake), store) = settings;

    if let Err(err) = init_tracing(&log) {
        eprintln!("troupe-ranking-intake: {err}");
        std::process::exit(1);
    }
    if let Err(err) = serve(cli.nats, store, http, grace, intake).await {
        tracing::error!(error = %err, "ranking intake failed");
        std::process::exit(1);
    }
}

async fn serve(
    nats: troupe_bus::NatsArgs,
    store: StoreConfig,
    http: HttpSettings,
    grace: Duration,
    settings: IntakeSettings,
) -> Result<(), Box<dyn std::error::Error>> {
    let shutdown = Shutdown::new();
    let readiness = Readiness::new();
    let server = HttpServer::bind(http.addr, readiness.clone(), install_metrics_recorder()?).await?;
    tracing::info!(addr = %server.local_addr(), "serving health and metrics");
    let http_task = tokio::spawn(server.run_until_shutdown(shutdown.listener()));

    let bus = troupe_bus::connect(&nats).await?;
    tracing::info!(store = %store, "opening the store");
    let store = Store::open(&store)?;
    let running = troupe_ranking_intake::start(settings, bus, store, shutdown.listener().into_recv()).await?;
    readiness.set_ready(true);

    // The intake's tasks hold this listener until they have all stopped, so
    // the drain below waits for them.
    let task_listener = shutdown.listener();
    let mut service = tokio::spawn(async move {
        let result = running.wait().await;
        drop(task_listener);
        result
    });

    // The service stops on a signal, or by itself when a task fails.
    let finished = tokio::select! {
        signal = wait_for_signal() => {
            tracing::info!(signal = %signal?, "shutting down");
            None
        }
        result = &mut service => Some(result),
    };
    readiness.set_ready(false);
    shutdown.drain(grace).await;
    http_task.abort();
    match finished {
        Some(result) => result??,
        None if service.is_finished() => service.await??,
        None => service.abort(),
    }
    Ok(())
}
