//! `troupe-sampler`: the sampler as its own process.

use troupe_sampler::{Cli, SamplerSettings, StatusHandle};
use troupe_service::http::{install_metrics_recorder, HttpServer, HttpSettings, Readiness};
use troupe_service::logging::init_tracing;
use troupe_service::settings::{parse_args_or_exit, SettingsErrors, EX_USAGE};
use troupe_service::shutdown::{wait_for_signal, Shutdown};
use troupe_store::{Store, StoreConfig};

#[tokio::main]
async fn main() {
    let cli: Cli = parse_args_or_exit();
    let mut errors = SettingsErrors::new();
    let log = cli.log.validate(&mut errors);
    let http = cli.http.validate(&mut errors);
    let grace = cli.shutdown.validate(&mut errors);
    let sampler = cli.sampler.validate(&mut errors);
    let mut problems: Vec<String> = cli.nats.validate();
    let store = match cli.store.validate() {
        Ok(config) => Some(config),
        Err(store_errors) => {
            problems.extend(store_errors.iter().map(ToString::to_string));
            None
        }
    };
    let checked = errors.finish(|| Some((log?, http?, grace?, sampler?)));
    let (log, http, grace, sampler, store) = match (checked, store) {
        (Ok((log, http, grace, sampler)), Some(store)) if problems.is_empty() => (log, http, grace, sampler, store),
        (checked, _) => {
            let mut lines: Vec<String> = checked.err().iter().flat_map(|errors| errors.iter().map(ToString::to_string)).collect();
            lines.extend(problems);
            eprintln!("troupe-sampler: invalid settings:");
            for line in lines {
                eprintln!("  - {line}");
            }
            std::process::exit(EX_USAGE);
        }
    };

    if let Err(err) = init_tracing(&log) {
        eprintln!("troupe-sampler: {err}");
        std::process::exit(1);
    }
    if let Err(err) = serve(cli.nats, store, http, grace, sampler).await {
        tracing::error!(error = %err, "sampler failed");
        std::process::exit(1);
    }
}

async fn serve(
    nats: troupe_bus::NatsArgs,
    store: StoreConfig,
    http: HttpSettings,
    grace: std::time::Duration,
    sampler: SamplerSettings,
) -> Result<(), Box<dyn std::error::Error>> {
    let shutdown = Shutdown::new();
    let readiness = Readiness::new();
    let status = StatusHandle::new();
    let server = HttpServer::bind(http.addr, readiness.clone(), install_metrics_recorder()?)
        .await?
        .merge(troupe_sampler::status_routes(status.clone()));
    tracing::info!(addr = %server.local_addr(), "serving health, metrics and /status");
    let http_task = tokio::spawn(server.run_until_shutdown(shutdown.listener()));

    let store = Store::open(&store)?;
    tracing::info!(store = %store, "opened the object store");
    let bus = troupe_bus::connect(&nats).await?;
    readiness.set_ready(true);

    let listener = shutdown.listener();
    let mut worker = tokio::spawn(async move {
        let result = troupe_sampler::run_with_status(sampler, bus, store, status, listener.clone().into_recv()).await;
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
    shutdown.drain(grace).await;
    http_task.abort();
    let result = match finished {
        Some(result) => result,
        None if worker.is_finished() => worker.await,
        None => {
            // The batch in progress stays unacknowledged, so the queue hands
            // it to another replica after --ack-wait.
            worker.abort();
            return Ok(());
        }
    };
    result??;
    Ok(())
}
