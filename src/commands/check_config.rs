//! `event-exporter check-config`: runs the exporter's own start-up validation with the same
//! flags (configuration file, flags, filter, OIDC secret file, CA files, and the datastore
//! environment: `DATASTORE_*` with `DATASTORE_PROVIDER=postgresql`, else — `mongodb` or unset,
//! NVSentinel's default — `MONGODB_*`), without connecting anywhere, and prints the effective
//! settings, secrets (passwords, the URI's password) redacted.
//!
//! Unknown keys make it fail (exit 2) although the exporter only warns about them: a misspelled
//! key silently changes behaviour (`max_retires = 17` leaves `max_retries` at 0), and this
//! command is where an operator looks for that.
//!
//! `--connect` then tries what the exporter connects to, with the exporter's own code: the
//! datastore (PostgreSQL: `Connector::connect` and `check_schema`, SELECTs only, never DDL;
//! MongoDB: the exporter's client options, `ping`, `listCollections` for the two collections;
//! a CA file not mounted yet is not waited for), the OIDC token
//! endpoint (`TokenProvider::token`, a real client-credentials grant with the configured client
//! authentication and secret file) and the sink (an `OPTIONS` request with the sink's TLS
//! settings and proxy; any HTTP answer, 405 included, means reachable; no event is sent). Each
//! check is bounded by [`CONNECT_TIMEOUT`], reported as `ok`, `failed` (with the reason) or
//! `skipped` (OIDC disabled, no dead-letter endpoint), and any failure makes the command exit 2.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::{CheckConfigArgs, RunArgs};
use crate::config::{format_go_duration, Config};
use crate::datastore::mongo::MongoSettings;
use crate::datastore::postgres::{Connector, PgSettings};
use crate::datastore::DatastoreSettings;
use crate::exporter::{validate_local, ExitError, LocalSettings};
use crate::logging;

/// Bound on each `--connect` check (datastore, token endpoint, sink, dead-letter endpoint).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What `check-config` found.
pub struct Report {
    /// The effective settings as pretty JSON (printed on stdout).
    pub json: String,
    /// Unknown keys, one message each (with a likely correction); any makes the check fail.
    pub unknown_keys: Vec<String>,
    /// `--connect` results, one line each (`datastore: ok: …`); empty without `--connect`.
    pub connect_lines: Vec<String>,
    /// Whether any `--connect` check failed (exit 2).
    pub connect_failed: bool,
}

/// Runs `check-config`: prints the report (stdout) and the problems (stderr); exit 0 when the
/// configuration is valid and every `--connect` check passed, 2 otherwise (1 when the checks
/// themselves cannot run).
pub fn main(args: &CheckConfigArgs) -> ExitCode {
    match check(args) {
        Ok(report) => {
            logging::print_stdout(&report.json);
            for line in &report.connect_lines {
                logging::print_stderr(&format!("connect: {line}"));
            }
            for message in &report.unknown_keys {
                logging::print_stderr(&format!("invalid configuration: {message}"));
            }
            if !report.unknown_keys.is_empty() {
                logging::print_stderr(&format!(
                    "invalid configuration: {} unknown key(s); the exporter would ignore them",
                    report.unknown_keys.len()
                ));
            }
            if report.connect_failed {
                logging::print_stderr(
                    "connect: failed: the exporter would not get through (see above)",
                );
            }
            if report.unknown_keys.is_empty() && !report.connect_failed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Err(error) => {
            logging::print_stderr(&format!("invalid configuration: {}", error.report()));
            ExitCode::from(error.code())
        }
    }
}

/// Returns the report to print, or the error that makes the configuration invalid.
pub fn check(args: &CheckConfigArgs) -> Result<Report, ExitError> {
    let run = &args.run;
    // What `run_job` refuses before the exporter starts: the same checks, the same messages.
    let log_level = crate::logging::level_directive(&run.log_level)
        .map_err(|e| ExitError::config_with("--log-level/LOG_LEVEL", e))?;
    let threads = crate::cli::process_worker_threads().map_err(ExitError::config)?;
    let LocalSettings {
        mut config,
        workers,
        metrics_port,
    } = validate_local(run, !args.skip_files)?;
    let datastore = datastore_report()?;
    // Shown as used: the flag or the file's value, else the default.
    config.workers = Some(workers);
    let connect = if args.connect {
        ConnectReport::from_probes(connect_checks(&config, run)?)
    } else {
        ConnectReport::not_tried()
    };
    let report = json!({
        "config": run.config.display().to_string(),
        "exporter": config,
        "files": if args.skip_files {
            "not checked: --skip-files"
        } else {
            "checked: the OIDC secret file and CA files are readable"
        },
        "flags": flags_report(&config, run, metrics_port),
        "runtime": {
            "logLevel": log_level,
            "workerThreads": threads,
        },
        "unknownKeys": config.unknown_keys,
        "warnings": config.warnings,
        "datastore": datastore,
        "proxies": proxies_report(&config),
        "connect": connect.json,
        "leadership": {
            "advisoryLockKey": crate::leadership::lock_key(&config.client_name),
            "derivedFrom": format!("{}{}", crate::leadership::KEY_PREFIX, config.client_name),
        },
    });
    Ok(Report {
        json: serde_json::to_string_pretty(&report).unwrap_or_default(),
        unknown_keys: config.unknown_key_messages(),
        connect_lines: connect.lines,
        connect_failed: connect.failed,
    })
}

/// The datastore settings from the environment, as the report shows them. Errors: exit 2
/// naming the variable.
fn datastore_report() -> Result<Value, ExitError> {
    let settings = DatastoreSettings::from_process_env()
        .map_err(|e| ExitError::config(datastore_error(&e.to_string())))?;
    Ok(match settings {
        DatastoreSettings::Postgres(settings) => serde_json::to_value(settings).unwrap_or_default(),
        DatastoreSettings::Mongo(settings) => {
            let mut report = settings.report();
            if let (None, Some(map)) = (
                std::env::var_os("DATASTORE_PROVIDER"),
                report.as_object_mut(),
            ) {
                map.insert(
                    "providerFrom".into(),
                    json!("DATASTORE_PROVIDER is not set: MongoDB, NVSentinel's default"),
                );
            }
            report
        }
    })
}

/// The flags as used.
fn flags_report(config: &Config, run: &RunArgs, metrics_port: u16) -> Value {
    json!({
        "metrics_port": metrics_port,
        "oidc_secret_path": if config.oidc.is_some() {
            json!(run.oidc_secret_path.display().to_string())
        } else {
            json!("not used: exporter.oidc.enabled = false")
        },
        "shutdown_grace": format_go_duration(run.shutdown_grace),
    })
}

/// The proxy each endpoint is reached through (HTTPS_PROXY / HTTP_PROXY / NO_PROXY).
fn proxies_report(config: &Config) -> serde_json::Map<String, Value> {
    let proxy = |url: &str| match crate::sink::proxy_in_effect(url) {
        Some(proxy) => json!(proxy),
        None => json!("none (direct)"),
    };
    let mut proxies = serde_json::Map::new();
    proxies.insert("sink".into(), proxy(&config.sink.endpoint));
    if let Some(oidc) = &config.oidc {
        proxies.insert("oidcTokenEndpoint".into(), proxy(&oidc.token_url));
    }
    // The dead letter's client reads the same proxy variables (reqwest's default).
    let rejections = &config.rejections;
    let dead_letter = (rejections.on_rejected == crate::config::OnRejected::DeadLetter)
        .then_some(rejections.dead_letter.as_ref())
        .flatten();
    if let Some(endpoint) = dead_letter.and_then(|d| d.endpoint.as_deref()) {
        proxies.insert("deadLetterEndpoint".into(), proxy(endpoint));
    }
    proxies
}

/// The `--connect` part of the report: JSON, one line per check, and whether one failed.
struct ConnectReport {
    json: Value,
    lines: Vec<String>,
    failed: bool,
}

impl ConnectReport {
    fn not_tried() -> ConnectReport {
        ConnectReport {
            json: json!("not tried: pass --connect"),
            lines: Vec::new(),
            failed: false,
        }
    }

    fn from_probes(probes: Vec<(&'static str, Probe)>) -> ConnectReport {
        let failed = probes
            .iter()
            .any(|(_, probe)| probe.outcome == Outcome::Failed);
        let lines = probes
            .iter()
            .map(|(name, probe)| format!("{name}: {}: {}", probe.outcome.name(), probe.detail))
            .collect();
        let map: serde_json::Map<String, Value> = probes
            .into_iter()
            .map(|(name, probe)| {
                (
                    name.to_string(),
                    json!({"result": probe.outcome.name(), "detail": probe.detail}),
                )
            })
            .collect();
        ConnectReport {
            json: Value::Object(map),
            lines,
            failed,
        }
    }
}

/// The result of one `--connect` check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    /// Not applicable to this configuration (e.g. OIDC disabled).
    Skipped,
}

impl Outcome {
    /// `ok`, `failed` or `skipped`, as shown in the report.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
        }
    }
}

/// One `--connect` check's outcome and what was seen (the reason, for a failure).
#[derive(Debug, Clone)]
pub struct Probe {
    pub outcome: Outcome,
    pub detail: String,
}

impl Probe {
    fn ok(detail: impl Into<String>) -> Probe {
        Probe {
            outcome: Outcome::Ok,
            detail: detail.into(),
        }
    }

    fn failed(detail: impl Into<String>) -> Probe {
        Probe {
            outcome: Outcome::Failed,
            detail: detail.into(),
        }
    }

    fn skipped(detail: impl Into<String>) -> Probe {
        Probe {
            outcome: Outcome::Skipped,
            detail: detail.into(),
        }
    }
}

/// Runs the `--connect` checks concurrently on a private runtime: `datastore`,
/// `oidcTokenEndpoint`, `sink` and `deadLetterEndpoint`, in that order. Errors only when the
/// runtime cannot start (exit 1).
pub fn connect_checks(
    config: &Config,
    run: &RunArgs,
) -> Result<Vec<(&'static str, Probe)>, ExitError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ExitError::failed_with("cannot start the async runtime", e))?;
    let dead_letter = config
        .rejections
        .dead_letter
        .as_ref()
        .and_then(|d| d.endpoint.clone());
    let (datastore, token, sink, dead_letter) = runtime.block_on(async {
        tokio::join!(
            bounded(check_datastore()),
            bounded(check_token_endpoint(config, run)),
            bounded(check_endpoint("sink", &config.sink.endpoint, &config.sink)),
            async {
                match &dead_letter {
                    // The dead letter is POSTed with the sink's TLS options.
                    Some(url) => {
                        bounded(check_endpoint("dead-letter endpoint", url, &config.sink)).await
                    }
                    None => Probe::skipped("no exporter.failure_handling.dead_letter.endpoint"),
                }
            },
        )
    });
    Ok(vec![
        ("datastore", datastore),
        ("oidcTokenEndpoint", token),
        ("sink", sink),
        ("deadLetterEndpoint", dead_letter),
    ])
}

/// `check` bounded by [`CONNECT_TIMEOUT`].
async fn bounded(check: impl std::future::Future<Output = Probe>) -> Probe {
    tokio::time::timeout(CONNECT_TIMEOUT, check)
        .await
        .unwrap_or_else(|_| {
            Probe::failed(format!(
                "no result within {}",
                format_go_duration(CONNECT_TIMEOUT)
            ))
        })
}

/// A datastore settings error, saying which backend an unset `DATASTORE_PROVIDER` chose.
fn datastore_error(error: &str) -> String {
    if std::env::var_os("DATASTORE_PROVIDER").is_none() {
        format!("{error} (DATASTORE_PROVIDER is not set: MongoDB, NVSentinel's default)")
    } else {
        error.to_string()
    }
}

/// Connects to the datastore the environment names, as the exporter does, and checks that what
/// it reads exists.
async fn check_datastore() -> Probe {
    match DatastoreSettings::from_process_env() {
        Ok(DatastoreSettings::Postgres(settings)) => check_postgres(settings).await,
        Ok(DatastoreSettings::Mongo(settings)) => {
            let probe = check_mongo(settings).await;
            if probe.outcome == Outcome::Failed {
                Probe::failed(datastore_error(&probe.detail))
            } else {
                probe
            }
        }
        Err(error) => Probe::failed(datastore_error(&error.to_string())),
    }
}

/// MongoDB: the exporter's client options (a CA not mounted yet fails at once instead of being
/// waited for, and server selection is bounded below [`CONNECT_TIMEOUT`]), `ping`, and
/// `listCollections` for the health-events and token collections.
async fn check_mongo(mut settings: MongoSettings) -> Probe {
    use mongodb::bson::doc;
    settings.tls.ca_mount_timeout = Duration::ZERO;
    let target = settings.describe();
    let mut options = match settings.client_options().await {
        Ok(options) => options,
        Err(error) => return Probe::failed(format!("{target}: {error}")),
    };
    let bound = CONNECT_TIMEOUT.saturating_sub(Duration::from_secs(2));
    options.server_selection_timeout = Some(settings.ping_timeout.min(bound));
    options.connect_timeout = Some(settings.ping_timeout.min(bound));
    let client = match mongodb::Client::with_options(options) {
        Ok(client) => client,
        Err(error) => return Probe::failed(format!("{target}: {error}")),
    };
    let database = client.database(&settings.database);
    let probe = async {
        database.run_command(doc! {"ping": 1}).await?;
        database.list_collection_names().await
    }
    .await;
    let probe = match probe {
        Err(error) => Probe::failed(format!(
            "{target}: {}",
            crate::datastore::mongo::settings::redact_uri(&error.to_string())
        )),
        Ok(names) => {
            let missing: Vec<String> = [
                ("MONGODB_COLLECTION_NAME", &settings.collection),
                ("MONGODB_TOKEN_COLLECTION_NAME", &settings.token_collection),
            ]
            .into_iter()
            .filter(|(_, name)| !names.iter().any(|n| n == *name))
            .map(|(variable, name)| format!("{name:?} ({variable})"))
            .collect();
            if missing.is_empty() {
                Probe::ok(format!(
                    "connected to {target} ({}); collections {:?} and {:?} present",
                    settings.tls_mode(),
                    settings.collection,
                    settings.token_collection
                ))
            } else {
                Probe::failed(format!(
                    "{target}: database {:?} has no collection {} (NVSentinel's MongoDB setup \
                     job creates them; the exporter never does)",
                    settings.database,
                    missing.join(" and ")
                ))
            }
        }
    };
    drop(database);
    client.shutdown().await;
    probe
}

/// PostgreSQL: connects with the `DATASTORE_*` environment, as the exporter does, and checks
/// that the tables it reads exist (`Connector::check_schema`: one SELECT).
async fn check_postgres(settings: PgSettings) -> Probe {
    let target = settings.describe();
    let connector = match Connector::new(settings) {
        Ok(connector) => connector,
        Err(error) => return Probe::failed(format!("{target}: {error}")),
    };
    let client = match connector.connect().await {
        Ok(client) => client,
        Err(error) => return Probe::failed(format!("{target}: {error}")),
    };
    match connector.check_schema(&client).await {
        Ok(()) => Probe::ok(format!(
            "connected to {target}; tables datastore_changelog, health_events and \
             resume_tokens present"
        )),
        Err(error) => Probe::failed(format!("{target}: {error}")),
    }
}

/// A real client-credentials token request with the configured client authentication and
/// the `--oidc-secret-path` file (the exporter's `TokenProvider`).
async fn check_token_endpoint(config: &Config, run: &RunArgs) -> Probe {
    let Some(oidc) = &config.oidc else {
        return Probe::skipped("exporter.oidc.enabled = false: no token is requested");
    };
    let url = oidc.token_url.clone();
    let method = serde_json::to_value(oidc.client_auth_method)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let provider = match crate::sink::TokenProvider::new(oidc.clone(), run.oidc_secret_path.clone())
    {
        Ok(provider) => provider,
        Err(error) => return Probe::failed(format!("{url}: {error}")),
    };
    match provider.token().await {
        Ok(_) => Probe::ok(format!(
            "{url} issued a token to client {:?} ({method})",
            oidc.client_id
        )),
        Err(error) => Probe::failed(error.to_string()),
    }
}

/// An `OPTIONS` request to `url` with the sink's TLS settings (and the proxy the environment
/// names): any HTTP answer means reachable. Nothing is delivered.
async fn check_endpoint(what: &str, url: &str, sink: &crate::config::SinkConfig) -> Probe {
    let client = match crate::sink::http_client(
        CONNECT_TIMEOUT,
        sink.insecure_skip_verify,
        sink.ca_file.as_deref(),
        1,
        what,
    ) {
        Ok(client) => client,
        Err(error) => return Probe::failed(format!("{url}: {error}")),
    };
    match client.request(reqwest::Method::OPTIONS, url).send().await {
        Ok(response) => Probe::ok(format!(
            "{url} answered OPTIONS with HTTP {}",
            response.status().as_u16()
        )),
        Err(error) => Probe::failed(format!(
            "{url}: {}",
            crate::sink::http::describe_error(&error)
        )),
    }
}
