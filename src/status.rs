//! `troupe status`: what a store holds (model versions with their lineage,
//! datasets with their record counts) and, when asked, how ranking goes on
//! a running ranking intake.

use anyhow::{Context, Result};
use clap::Args;
use troupe_store::{Datasets, ModelRegistry, StoreArgs};

/// Flags of `troupe status`.
#[derive(Args, Debug)]
pub struct StatusCommand {
    /// Base URL of a running ranking intake (plain http), whose `/progress`
    /// counts of pending and ranked sets are shown too.
    #[arg(long, env = "TROUPE_STATUS_INTAKE")]
    pub intake: Option<String>,

    #[command(flatten)]
    pub store: StoreArgs,
}

pub async fn status(command: StatusCommand) -> Result<()> {
    let store = crate::open_store(&command.store)?;
    let registry = ModelRegistry::new(store.clone());
    let datasets = Datasets::new(store);

    println!("store {}", command.store.store);
    let models = registry.list_models().await.context("cannot list the models")?;
    if models.is_empty() {
        println!("  no models yet: run `troupe up`, `troupe pretrain` or `troupe import`");
    }
    for name in models {
        let versions = registry.list_versions(&name).await?;
        let Some(latest) = registry.latest(&name).await? else { continue };
        let parent = latest.parent.as_ref().map(|parent| format!(", from {parent}")).unwrap_or_default();
        let noun = if versions.len() == 1 { "version" } else { "versions" };
        println!(
            "  model {name:<12} {} {noun}, newest {} ({}{parent}, {})",
            versions.len(),
            latest.model_ref(),
            latest.kind,
            latest.created_at.format("%Y-%m-%d %H:%M UTC")
        );
    }
    for name in datasets.list_datasets().await.context("cannot list the datasets")? {
        let segments = datasets.list(&name).await?;
        let noun = if segments.len() == 1 { "record" } else { "records" };
        println!("  dataset {name:<12} {} {noun}", segments.len());
    }

    if let Some(url) = &command.intake {
        let progress = crate::rank::get_json::<serde_json::Value>(url, "/progress", None).await?;
        println!("ranking intake {url}: {progress}");
    }
    Ok(())
}
