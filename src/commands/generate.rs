//! `event-exporter generate`: writes realistic NVSentinel health events into the PostgreSQL
//! datastore. Not yet implemented.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {}

pub async fn run(_args: GenerateArgs) -> Result<(), crate::exporter::ExitError> {
    Err(crate::exporter::ExitError::Failed(
        "the generate subcommand is not implemented yet".into(),
    ))
}
