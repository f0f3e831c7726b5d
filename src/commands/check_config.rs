//! `event-exporter check-config`: runs the exporter's own start-up validation with the same
//! flags (configuration file, flags, filter, OIDC secret file, CA files, and the datastore
//! environment when `DATASTORE_PROVIDER` is set), without connecting anywhere, and prints the
//! effective settings, secrets redacted.
//!
//! Unknown keys make it fail (exit 2) although the exporter only warns about them: a misspelled
//! key silently changes behaviour (`max_retires = 17` leaves `max_retries` at 0), and this
//! command is where an operator looks for that.

use serde_json::json;

use crate::cli::CheckConfigArgs;
use crate::config::format_go_duration;
use crate::datastore::postgres::PgSettings;
use crate::exporter::{validate_local, ExitError, LocalSettings};

/// What `check-config` found.
pub struct Report {
    /// The effective settings as pretty JSON (printed on stdout).
    pub json: String,
    /// Unknown keys, one message each (with a likely correction); any makes the check fail.
    pub unknown_keys: Vec<String>,
}

/// Returns the report to print, or the error that makes the configuration invalid.
pub fn check(args: &CheckConfigArgs) -> Result<Report, ExitError> {
    let run = &args.run;
    let LocalSettings {
        mut config,
        workers,
        metrics_port,
    } = validate_local(run, !args.skip_files)?;
    let datastore = if std::env::var_os("DATASTORE_PROVIDER").is_some() {
        let settings =
            PgSettings::from_process_env().map_err(|e| ExitError::Config(e.to_string()))?;
        serde_json::to_value(settings).unwrap_or_default()
    } else {
        json!("not checked: DATASTORE_PROVIDER is not set")
    };
    // Shown as used: the flag or the file's value, else the default.
    config.workers = Some(workers);
    // The proxy each endpoint is reached through (HTTPS_PROXY / HTTP_PROXY / NO_PROXY).
    let proxy = |url: &str| match crate::sink::proxy_in_effect(url) {
        Some(proxy) => json!(proxy),
        None => json!("none (direct)"),
    };
    let mut proxies = serde_json::Map::new();
    proxies.insert("sink".into(), proxy(&config.sink.endpoint));
    if let Some(oidc) = &config.oidc {
        proxies.insert("oidcTokenEndpoint".into(), proxy(&oidc.token_url));
    }
    let report = json!({
        "config": run.config.display().to_string(),
        "exporter": config,
        "files": if args.skip_files {
            "not checked: --skip-files"
        } else {
            "checked: the OIDC secret file and CA files are readable"
        },
        "flags": {
            "metrics_port": metrics_port,
            "oidc_secret_path": if config.oidc.is_some() {
                json!(run.oidc_secret_path.display().to_string())
            } else {
                json!("not used: exporter.oidc.enabled = false")
            },
            "shutdown_grace": format_go_duration(run.shutdown_grace),
        },
        "unknownKeys": config.unknown_keys,
        "warnings": config.warnings,
        "datastore": datastore,
        "proxies": proxies,
    });
    Ok(Report {
        json: serde_json::to_string_pretty(&report).unwrap_or_default(),
        unknown_keys: config.unknown_key_messages(),
    })
}
