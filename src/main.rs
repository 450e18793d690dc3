//! `troupe`: the command-line program. It parses flags and hands each
//! subcommand to its module; the work itself lives in the library crates.
//!
//! - [`generate`]: `troupe generate`, sampling from a stored model version.
//! - [`models`]: `troupe import` and `troupe export`.
//! - [`stages`]: `troupe pretrain` and `troupe sft`.
//! - [`serve`]: `troupe serve SERVICE`, one service in the foreground.
//! - [`up`]: `troupe up`, the three stages in one process.
//! - [`rank`]: `troupe rank`, ranking candidate sets in a terminal.
//! - [`status`]: `troupe status`, what the store holds and how ranking goes.
//! - `troupe report`: plots and an HTML page of a run's progress (`troupe-report`).
//! - [`compare`]: held-out answers of several versions, scored side by side.

mod compare;
mod generate;
mod models;
mod rank;
mod serve;
mod stages;
mod status;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use troupe_service::logging::{init_tracing, LogArgs};
use troupe_service::settings::SettingsErrors;
use troupe_store::{ModelRegistry, Store, StoreArgs};

/// Pretraining, supervised fine-tuning and RLHF as services on a NATS bus.
#[derive(Parser)]
#[command(name = "troupe", version, about)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run pretraining, SFT and RLHF (reward model and PPO) in this process.
    Up(up::UpCommand),
    /// Sample from a stored model version, for a person to try it.
    Generate(generate::GenerateArgs),
    /// Import a Hugging Face Llama directory or a GGUF file as a base-model version.
    Import(models::ImportCommand),
    /// Write a stored model version in Hugging Face layout.
    Export(models::ExportCommand),
    /// Pretrain a base model on a corpus (stage 1) in this process.
    Pretrain(stages::PretrainCommand),
    /// Fine-tune a base model on demonstrations (stage 2) in this process.
    Sft(stages::SftCommand),
    /// Show the models and datasets in the store, and ranking progress.
    Status(status::StatusCommand),
    /// Render a run's progress as SVG plots and an HTML page.
    Report(ReportCommand),
    /// Rank pending candidate sets in the terminal.
    Rank(rank::RankCommand),
    /// Run one service in the foreground, with the flags of its own binary
    /// (`troupe serve sampler --help` lists the sampler's flags).
    #[command(disable_help_flag = true)]
    Serve(serve::ServeCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();

    let mut errors = SettingsErrors::new();
    let log = cli.log.validate(&mut errors);
    let Some(log) = log.filter(|_| errors.is_empty()) else {
        errors.exit();
    };
    if let Err(err) = init_tracing(&log) {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(command) => up::up(command).await,
            Command::Generate(args) => generate::run(args).await,
            Command::Import(command) => models::import(command).await,
            Command::Export(command) => models::export(command).await,
            Command::Pretrain(command) => stages::pretrain(command).await,
            Command::Sft(command) => stages::sft(command).await,
            Command::Serve(command) => serve::serve(command),
            Command::Rank(command) => rank::rank(command).await,
            Command::Report(command) => report(command).await,
            Command::Status(command) => status::status(command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Opens the store the flags name, reporting every invalid flag at once.
fn open_store(args: &StoreArgs) -> anyhow::Result<Store> {
    let config = args.validate().map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("invalid store settings:\n  {}", lines.join("\n  "))
    })?;
    Store::open(&config).map_err(|err| anyhow::anyhow!("cannot open the store {config}: {err}"))
}

/// Opens the model registry in the store the flags name.
fn open_registry(args: &StoreArgs) -> anyhow::Result<ModelRegistry> {
    Ok(ModelRegistry::new(open_store(args)?))
}

/// Flags of `troupe report`.
#[derive(clap::Args, Debug)]
struct ReportCommand {
    #[command(flatten)]
    report: troupe_report::ReportArgs,

    #[command(flatten)]
    store: StoreArgs,
}

async fn report(command: ReportCommand) -> anyhow::Result<()> {
    let store = open_store(&command.store)?;
    let summary = command.report.execute(&store).await?;
    println!("report of run {}: {}", summary.run, summary.html.display());
    for file in &summary.files {
        println!("  {} ({} bytes, also at {} in the store)", file.path.display(), file.size, file.key);
    }
    Ok(())
}
