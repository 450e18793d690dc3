//! `troupe import` and `troupe export`: bring a Hugging Face directory or a
//! GGUF file into the store as a base-model version, and write any stored
//! version out in Hugging Face layout.

use anyhow::Result;
use clap::Args;
use troupe_convert::{run_export, run_import, ExportArgs, ImportArgs};
use troupe_store::StoreArgs;

use crate::open_registry;

/// Flags of `troupe import`.
#[derive(Args, Debug)]
pub struct ImportCommand {
    #[command(flatten)]
    pub import: ImportArgs,

    #[command(flatten)]
    pub store: StoreArgs,
}

/// Flags of `troupe export`.
#[derive(Args, Debug)]
pub struct ExportCommand {
    #[command(flatten)]
    pub export: ExportArgs,

    #[command(flatten)]
    pub store: StoreArgs,
}

pub async fn import(command: ImportCommand) -> Result<()> {
    let registry = open_registry(&command.store)?;
    let manifest = run_import(&command.import, &registry).await?;
    println!(
        "imported {} as {} ({} files, {} bytes)",
        command.import.source.display(),
        manifest.model_ref(),
        manifest.files.len(),
        manifest.total_size()
    );
    Ok(())
}

pub async fn export(command: ExportCommand) -> Result<()> {
    let registry = open_registry(&command.store)?;
    let manifest = run_export(&command.export, &registry).await?;
    println!("exported {} to {} in Hugging Face layout", manifest.model_ref(), command.export.out.display());
    Ok(())
}
