//! `troupe-labeler`: the scripted labeler as its own process.

use troupe_labeler::Cli;
use troupe_service::http::{install_metrics_recorder, HttpServer, Readiness};
use troupe_service::logging::init_tracing;
use troupe_service::settings::{parse_args_or_exit, SettingsErrors, EX_USAGE};
use troupe_service::shutdown::{wait_for_signal, Shutdown};

#[tokio::main]
async fn main() {
    let cli: Cli = parse_args_or_exit();
    let mut errors = SettingsErrors::new();
    let log = cli.log.validate(&mut errors);
    let http = cli.http.validate(&mut errors);
    let grace = cli.shutdown.validate(&mut errors);
    let labeler = cli.labeler.validate(&mut errors);
    let nats_problems = cli.nats.validate();
    let checked = errors.finish(|| Some((log?, http?, grace?, labeler?)));
    let (log, http, grace, labeler) = match checked {
        Ok(settings) if nats_problems.is_empty() => settings,
        Ok(_) => {
            print_problems(nats_problems.iter().map(String::as_str));
            std::process::exit(EX_USAGE);
        }
        Err(errors) => {
            let mut lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            lines.extend(nats_problems);
            print_problems(lines.iter().map(String::as_str));
            std::process::exit(EX_USAGE);
        }
    };

    if let Err(err) = init_tracing(&log) {
        eprintln!("troupe-labeler: {err}");
        std::process::exit(1);
    }
    if let Err(err) = serve(cli.nats, http, grace, labeler).await {
        tracing::error!(error = %err, "labeler failed");
        std::process::exit(1);
    }
}

fn print_problems<'a>(problems: impl Iterator<Item = &'a str>) {
    eprintln!("troupe-labeler: invalid settings:");
    for problem in problems {
        eprintln!("  - {problem}");
    }
}

async fn serve(
    nats: troupe_bus::NatsArgs,
    http: troupe_service::http::HttpSettings,
    grace: std::time::Duration,
    labeler: troupe_labeler::LabelerSettings,
) -> Result<(), Box<dyn std::error::Error>> {
    let shutdown = Shutdown::new();
    let readiness = Readiness::new();
    let server = HttpServer::bind(http.addr, readiness.clone(), install_metrics_recorder()?).await?;
    tracing::info!(addr = %server.local_addr(), "serving health and metrics");
    let http_task = tokio::spawn(server.run_until_shutdown(shutdown.listener()));

    let bus = troupe_bus::connect(&nats).await?;
    readiness.set_ready(true);
    let worker_listener = shutdown.listener();
    let mut worker = tokio::spawn(async move {
        let result = troupe_labeler::run(labeler, bus, worker_listener.clone().into_recv()).await;
        drop(worker_listener);
        result
    });

    // The labeler stops on a signal, or by itself after --max-sets sets.
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
            worker.abort();
            return Ok(());
        }
    };
    let summary = result??;
    tracing::info!(ranked = summary.ranked, all_tied = summary.all_tied, expired = summary.expired, "summary");
    Ok(())
}
