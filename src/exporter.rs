//! The main job: wire configuration, datastore, sink and server together, run until a signal
//! or a delivery failure, and map the result to an exit status.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cli::RunArgs;
use crate::cloudevent::Transformer;
use crate::config::{format_go_duration, Config};
use crate::datastore::postgres::{
    spawn_listener, ChangelogReader, Connector, PgSettings, StartPoint, TokenStore,
};
use crate::datastore::DatastoreError;
use crate::pipeline::{EventHandler, Pipeline};
use crate::server::{self, Status};
use crate::sink::{self, Publisher, TokenProvider};

/// How long start-up waits for an unreachable datastore before giving up.
const STARTUP_DATASTORE_WAIT: Duration = Duration::from_secs(60);

/// Why the exporter stopped unsuccessfully; each maps to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum ExitError {
    /// Invalid configuration, flags or datastore environment: exit 2.
    #[error("{0}")]
    Config(String),
    /// Anything else: exit 1.
    #[error("{0}")]
    Failed(String),
}

impl ExitError {
    pub fn code(&self) -> u8 {
        match self {
            ExitError::Config(_) => 2,
            ExitError::Failed(_) => 1,
        }
    }
}

/// Everything validated before any connection is made.
struct Settings {
    config: Config,
    workers: usize,
    metrics_port: u16,
    datastore: PgSettings,
}

fn validate(args: &RunArgs) -> Result<Settings, ExitError> {
    let config = Config::load(&args.config).map_err(|e| ExitError::Config(e.to_string()))?;
    for key in &config.unknown_keys {
        tracing::warn!(key, "unknown configuration key ignored");
    }
    let workers = match (args.workers, config.workers) {
        (Some(n), _) if n < 0 => {
            return Err(ExitError::Config(format!(
                "--workers: must not be negative, got {n}"
            )))
        }
        (Some(0), _) => {
            tracing::warn!("--workers=0 treated as 1");
            1
        }
        (Some(n), _) => n as usize,
        (None, Some(n)) => n,
        (None, None) => 10,
    };
    let metrics_port = args.metrics_port.trim().parse::<u16>().map_err(|_| {
        ExitError::Config(format!(
            "--metrics-port: {:?} is not a port number",
            args.metrics_port
        ))
    })?;
    if config.filter_expression.is_some() {
        return Err(ExitError::Config(
            "exporter.filter.expression: CEL filtering is not supported by this version yet; \
             remove the expression (or leave it blank) to export every event"
                .into(),
        ));
    }
    let datastore = PgSettings::from_env(|name| std::env::var(name).ok())
        .map_err(|e| ExitError::Config(e.to_string()))?;
    Ok(Settings {
        config,
        workers,
        metrics_port,
        datastore,
    })
}

/// Runs the exporter until SIGTERM/SIGINT (Ok) or a failure.
pub async fn run(args: RunArgs) -> Result<(), ExitError> {
    let Settings {
        config,
        workers,
        metrics_port,
        datastore,
    } = validate(&args)?;
    let failed = |e: String| ExitError::Failed(e);

    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let status = Arc::new(Status::default());
    let server_stop = CancellationToken::new();
    let (address, server) = server::start(metrics_port, status.clone(), server_stop.clone())
        .await
        .map_err(|e| failed(format!("cannot listen on metrics port {metrics_port}: {e}")))?;

    let auth = match &config.oidc {
        Some(oidc) => {
            let provider =
                TokenProvider::new(oidc.clone(), args.oidc_secret_path.clone()).map_err(failed)?;
            provider.check_secret().map_err(|e| failed(e.to_string()))?;
            Some(Arc::new(provider))
        }
        None => {
            tracing::info!("OIDC disabled: events are sent without an Authorization header");
            None
        }
    };
    let http = sink::http_client(
        config.sink.timeout,
        config.sink.insecure_skip_verify,
        config.sink.ca_file.as_deref(),
        workers,
        "sink",
    )
    .map_err(failed)?;
    let endpoint = reqwest::Url::parse(&config.sink.endpoint).map_err(|e| failed(e.to_string()))?;
    let publisher = Publisher::new(http, endpoint, auth, config.failure_handling.clone());
    let handler = Arc::new(EventHandler {
        transformer: Transformer::new(config.metadata.clone()),
        publisher,
    });

    crate::metrics::get().set_feature_flag("backfill_enabled", config.backfill.enabled);
    tracing::info!(
        module = "event-exporter",
        version = env!("CARGO_PKG_VERSION"),
        cluster = config.cluster(),
        sink = %config.sink.endpoint,
        datastore = %datastore.describe(),
        client_name = %config.client_name,
        workers,
        metrics = %address,
        retry_budget = %format_go_duration(sink::retry::total_base_delay(&config.failure_handling)),
        "event exporter starting"
    );

    let connector = Connector::new(datastore).map_err(|e| ExitError::Config(e.to_string()))?;
    let tokens = Arc::new(TokenStore::new(
        connector.clone(),
        config.client_name.clone(),
    ));
    let wake = Arc::new(Notify::new());
    let opened = tokio::select! {
        _ = shutdown.cancelled() => None,
        opened = open_source(&connector, &tokens, &config, wake.clone()) => Some(opened),
    };
    let Some(opened) = opened else {
        server_stop.cancel();
        return Ok(());
    };
    let (mut reader, had_token) = opened?;
    reader.report_connection(status.datastore_flag());
    let listener = spawn_listener(connector, wake, shutdown.clone());

    status.set_running(true);
    let pipeline = Pipeline {
        source: reader,
        checkpoints: tokens,
        handler,
        workers,
        grace: args.shutdown_grace,
        had_token,
    };
    let result = pipeline.run(shutdown.clone()).await;
    status.set_running(false);
    shutdown.cancel();
    let _ = listener.await;
    server_stop.cancel();
    let _ = server.await;
    match result {
        Ok(summary) => {
            tracing::info!(
                published = summary.published,
                skipped = summary.skipped,
                resume_token = summary.checkpoint,
                "stopped cleanly"
            );
            Ok(())
        }
        Err(error) => Err(failed(format!(
            "{error}; the resume token was not moved past it"
        ))),
    }
}

/// Reads the resume token and opens the changelog reader, waiting a while for a datastore that
/// is not reachable yet.
async fn open_source(
    connector: &Connector,
    tokens: &TokenStore,
    config: &Config,
    wake: Arc<Notify>,
) -> Result<(ChangelogReader, bool), ExitError> {
    let deadline = tokio::time::Instant::now() + STARTUP_DATASTORE_WAIT;
    let mut delay = Duration::from_millis(500);
    loop {
        let attempt = async {
            let token = tokens.load().await?;
            let start = match &token {
                Some(value) => StartPoint::from_token(tokens.client_name(), value)?,
                None => StartPoint::End,
            };
            describe_start(config, &start, token.as_ref());
            let reader = ChangelogReader::open(connector.clone(), start, wake.clone()).await?;
            Ok::<_, DatastoreError>((reader, token.is_some()))
        };
        match attempt.await {
            Ok(opened) => return Ok(opened),
            Err(error) if error.is_transient() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(%error, retry_in = ?delay, "datastore not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(error) => {
                return Err(ExitError::Failed(format!(
                    "cannot start from datastore {}: {error}",
                    connector.settings().describe()
                )))
            }
        }
    }
}

fn describe_start(config: &Config, start: &StartPoint, token: Option<&serde_json::Value>) {
    match (start, config.backfill.enabled) {
        (StartPoint::End, true) => tracing::warn!(
            "backfill is enabled and no resume token exists, but this version does not \
             backfill yet: historical events are not exported; streaming new events from now"
        ),
        (StartPoint::End, false) => {
            tracing::info!("no resume token and backfill disabled: streaming new events from now")
        }
        (_, enabled) => tracing::info!(
            token = %token.map(|t| t.to_string()).unwrap_or_default(),
            backfill_skipped = enabled,
            "resuming from the stored resume token"
        ),
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot install the SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received; stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; stopping"),
        }
        shutdown.cancel();
    });
}
