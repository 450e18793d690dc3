//! `troupe pretrain` and `troupe sft`: run stage 1 or stage 2 in this
//! process, against the bus and store the flags name, and print a summary.
//! The same settings, sent as a job request, drive the trainer services.

use anyhow::{bail, Result};
use clap::Args;
use troupe_bus::NatsArgs;
use troupe_store::StoreArgs;

use crate::open_store;

/// Flags of `troupe pretrain`.
#[derive(Args, Debug)]
pub struct PretrainCommand {
    #[command(flatten)]
    pub settings: troupe_pretrainer::Settings,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub store: StoreArgs,
}

/// Flags of `troupe sft`.
#[derive(Args, Debug)]
pub struct SftCommand {
    #[command(flatten)]
    pub settings: troupe_sft_trainer::Settings,

    #[command(flatten)]
    pub nats: NatsArgs,

    #[command(flatten)]
    pub store: StoreArgs,
}

/// Collects every invalid flag of a stage command into one error.
fn check(problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    bail!("{} invalid settings:\n  {}", problems.len(), problems.join("\n  "))
}

/// Resolves when the person presses Ctrl-C, so training stops at the next
/// step and keeps its last checkpoint.
async fn interrupted() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub async fn pretrain(command: PretrainCommand) -> Result<()> {
    let mut problems = command.settings.validate().err().unwrap_or_default();
    problems.extend(command.nats.validate());
    check(problems)?;
    let store = open_store(&command.store)?;
    let bus = troupe_bus::connect(&command.nats).await?;

    let outcome = troupe_pretrainer::pretrain(&command.settings, &bus, &store, interrupted()).await?;

    println!("pretraining finished: {}", outcome.model);
    println!("  held-out loss     {:.4} nats/token", outcome.heldout_loss);
    println!("  unigram entropy   {:.4} nats/token (a model that learned nothing scores about this)", outcome.unigram_entropy);
    println!("  tokens            {} train / {} held out", outcome.train_tokens, outcome.validation_tokens);
    if let Some(resumed) = &outcome.resumed_from {
        println!("  resumed from      {resumed} at step {}", outcome.first_step);
    }
    Ok(())
}

pub async fn sft(command: SftCommand) -> Result<()> {
    let mut problems = command.settings.validate().err().unwrap_or_default();
    problems.extend(command.nats.validate());
    check(problems)?;
    let store = open_store(&command.store)?;
    let bus = troupe_bus::connect(&command.nats).await?;

    let outcome = troupe_sft_trainer::fine_tune(&command.settings, &bus, &store, interrupted()).await?;

    println!("supervised fine-tuning finished: {} (from {})", outcome.model, outcome.base);
    if let (Some(loss), Some(eos)) = (outcome.heldout_loss_before, outcome.eos_rate_before) {
        println!("  before            held-out response loss {loss:.4}, EOS rate {:.0}%", eos * 100.0);
    }
    println!("  after             held-out response loss {:.4}, EOS rate {:.0}%", outcome.heldout_loss, outcome.eos_rate * 100.0);
    println!("  examples          {} train / {} held out", outcome.train_examples, outcome.heldout_examples);
    Ok(())
}
