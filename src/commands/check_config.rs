//! `event-exporter check-config`: validates a configuration (and the datastore environment
//! when `DATASTORE_PROVIDER` is set) and prints the effective settings, secrets redacted.

use serde_json::json;

use crate::cli::CheckConfigArgs;
use crate::config::Config;
use crate::datastore::postgres::PgSettings;

/// Returns the report to print, or the error that makes the config invalid.
pub fn check(args: &CheckConfigArgs) -> Result<String, String> {
    let config = Config::load(&args.config).map_err(|e| e.to_string())?;
    crate::exporter::compile_filter(&config).map_err(|e| e.to_string())?;
    let datastore = if std::env::var_os("DATASTORE_PROVIDER").is_some() {
        let settings =
            PgSettings::from_env(|name| std::env::var(name).ok()).map_err(|e| e.to_string())?;
        serde_json::to_value(settings).unwrap_or_default()
    } else {
        json!("not checked: DATASTORE_PROVIDER is not set")
    };
    let report = json!({
        "config": args.config.display().to_string(),
        "exporter": config,
        "unknownKeys": config.unknown_keys,
        "warnings": config.warnings,
        "datastore": datastore,
    });
    Ok(serde_json::to_string_pretty(&report).unwrap_or_default())
}
