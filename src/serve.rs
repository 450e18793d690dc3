//! `troupe serve SERVICE [FLAGS]`: runs one service in the foreground by
//! executing its own binary, `troupe-SERVICE`, installed next to `troupe`.
//! Every flag after the service name goes to that binary unchanged, so
//! `troupe serve sampler --help` lists the sampler's flags.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;

/// Services that `troupe serve` can start, each built as `troupe-<name>`.
pub const SERVICES: [&str; 8] = [
    "pretrainer",
    "sft-trainer",
    "sampler",
    "ranking-intake",
    "labeler",
    "reward-trainer",
    "reward-scorer",
    "ppo-learner",
];

/// Flags of `troupe serve`.
#[derive(Args, Debug)]
pub struct ServeCommand {
    /// The service to run: pretrainer, sft-trainer, sampler, ranking-intake,
    /// labeler, reward-trainer, reward-scorer or ppo-learner.
    #[arg(value_name = "SERVICE")]
    pub service: String,

    /// Flags for the service, as its own binary takes them.
    #[arg(value_name = "FLAGS", trailing_var_arg = true, allow_hyphen_values = true)]
    pub flags: Vec<String>,
}

pub fn serve(command: ServeCommand) -> Result<()> {
    if !SERVICES.contains(&command.service.as_str()) {
        bail!("unknown service {:?}; choose one of: {}", command.service, SERVICES.join(", "));
    }
    let binary = service_binary(&command.service)?;
    // exec replaces this process, so signals and the exit status belong to
    // the service itself, as under a process supervisor.
    let err = Command::new(&binary).args(&command.flags).exec();
    Err(err).with_context(|| format!("cannot run {}", binary.display()))
}

/// Finds `troupe-<service>` next to the running `troupe` binary.
fn service_binary(service: &str) -> Result<PathBuf> {
    let current = std::env::current_exe().context("cannot locate the troupe binary")?;
    let directory = current.parent().context("the troupe binary has no parent folder")?;
    let binary = directory.join(format!("troupe-{service}"));
    if !binary.is_file() {
        bail!(
            "{} not found; build every service binary with `cargo build --release --workspace`",
            binary.display()
        );
    }
    Ok(binary)
}
