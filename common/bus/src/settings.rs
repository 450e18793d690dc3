//! The bus flags every service shares, and [`connect`].

use clap::Args;
use troupe_wire::RunId;

use crate::memory::MemoryBus;
use crate::nats::NatsBus;
use crate::{BusError, BusHandle};

/// Bus location and run id flags.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct NatsArgs {
    /// NATS server URL, such as nats://127.0.0.1:4222. Empty runs the
    /// in-process bus, which only actors in this same process can reach.
    #[arg(long = "nats", env = "TROUPE_NATS_URL", default_value = "")]
    pub nats_url: String,

    /// Run id: every subject is `troupe.<run>.<name>`, so runs on one
    /// server stay apart. ASCII letters, digits, '-' and '_'.
    #[arg(long, env = "TROUPE_RUN", default_value = "default")]
    pub run: String,
}

impl NatsArgs {
    /// Checks the flags, returning every problem found.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(err) = RunId::new(&self.run) {
            problems.push(format!("--run / TROUPE_RUN: {err}"));
        }
        let url = self.nats_url.trim();
        // Empty selects the in-process bus, and HOST:PORT without a scheme is a NATS server.
        let accepted = url.is_empty() || url.starts_with("nats://") || url.starts_with("tls://") || !url.contains("://");
        if !accepted {
            problems.push(format!(
                "--nats / TROUPE_NATS_URL: {url:?} is not a NATS URL; use nats://HOST:PORT, or leave it empty for the in-process bus"
            ));
        }
        problems
    }
}

/// Connects to the bus the flags name: NATS when a URL is set, otherwise a
/// fresh in-process bus.
pub async fn connect(args: &NatsArgs) -> Result<BusHandle, BusError> {
    let run = RunId::new(&args.run).map_err(|err| BusError::Invalid {
        what: "run id",
        value: args.run.clone(),
        reason: err.to_string(),
    })?;
    let url = args.nats_url.trim();
    if url.is_empty() {
        tracing::info!(run = %run, "using the in-process bus");
        return Ok(BusHandle::new(MemoryBus::new(run)));
    }
    Ok(BusHandle::new(NatsBus::connect(url, run).await?))
}
