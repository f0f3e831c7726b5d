//! The main job: wire configuration, datastore, sink and server together, run until a signal
//! or a delivery failure, and map the result to an exit status.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::backfill::{self, BackfillPlan};
use crate::cli::RunArgs;
use crate::cloudevent::Transformer;
use crate::config::{format_go_duration, Config};
use crate::datastore::postgres::{
    spawn_listener, ChangelogReader, Connector, PgSettings, StartPoint, TokenStore,
};
use crate::datastore::DatastoreError;
use crate::filter::Filter;
use crate::pipeline::{EventHandler, Feed, Pipeline, PipelineError, Summary};
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
pub struct Settings {
    pub config: Config,
    pub workers: usize,
    /// 0 binds an ephemeral port (the demo does).
    pub metrics_port: u16,
    pub datastore: PgSettings,
    pub oidc_secret_path: std::path::PathBuf,
    pub shutdown_grace: Duration,
}

/// Validates the command line, the configuration file and the datastore environment.
pub fn validate(args: &RunArgs) -> Result<Settings, ExitError> {
    let config = Config::load(&args.config).map_err(|e| ExitError::Config(e.to_string()))?;
    for key in &config.unknown_keys {
        tracing::warn!(key, "unknown configuration key ignored");
    }
    for warning in &config.warnings {
        tracing::warn!("configuration: {warning}");
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
        (Some(n), _) if n > crate::config::MAX_WORKERS => {
            return Err(ExitError::Config(format!(
                "--workers: must be at most {}, got {n}",
                crate::config::MAX_WORKERS
            )))
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
    compile_filter(&config)?;
    let datastore = PgSettings::from_env(|name| std::env::var(name).ok())
        .map_err(|e| ExitError::Config(e.to_string()))?;
    Ok(Settings {
        config,
        workers,
        metrics_port,
        datastore,
        oidc_secret_path: args.oidc_secret_path.clone(),
        shutdown_grace: args.shutdown_grace,
    })
}

/// Compiles `exporter.filter.expression` (`None` when blank): a malformed or non-boolean
/// expression is a configuration error, as upstream.
pub fn compile_filter(config: &Config) -> Result<Option<Filter>, ExitError> {
    Filter::compile(config.filter_expression.as_deref().unwrap_or_default())
        .map_err(|e| ExitError::Config(format!("exporter.filter.expression: {e}")))
}

/// Runs the exporter until SIGTERM/SIGINT (Ok) or a failure.
pub async fn run(args: RunArgs) -> Result<(), ExitError> {
    let settings = validate(&args)?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    run_with(settings, shutdown).await
}

/// Runs the exporter with validated settings until `shutdown` (Ok) or a failure.
pub async fn run_with(settings: Settings, shutdown: CancellationToken) -> Result<(), ExitError> {
    let Settings {
        config,
        workers,
        metrics_port,
        datastore,
        oidc_secret_path,
        shutdown_grace,
    } = settings;
    let failed = |e: String| ExitError::Failed(e);
    let status = Arc::new(Status::default());
    let server_stop = CancellationToken::new();
    let (address, server) = server::start(metrics_port, status.clone(), server_stop.clone())
        .await
        .map_err(|e| failed(format!("cannot listen on metrics port {metrics_port}: {e}")))?;

    let auth = match &config.oidc {
        Some(oidc) => {
            let provider =
                TokenProvider::new(oidc.clone(), oidc_secret_path.clone()).map_err(failed)?;
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
    let filter = compile_filter(&config)?;
    if let Some(filter) = &filter {
        tracing::info!(
            expression = filter.expression(),
            "exporting only events the filter expression accepts"
        );
    }
    let handler = Arc::new(EventHandler {
        transformer: Transformer::new(config.metadata.clone()),
        publisher,
        filter,
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
    let Opened {
        mut reader,
        had_token,
        backfill: backfill_plan,
    } = opened?;
    reader.report_connection(status.datastore_flag());
    let listener = spawn_listener(connector.clone(), wake, shutdown.clone());

    status.set_running(true);
    // Stream and backfill share the workers; if either fails, both stop.
    let permits = Arc::new(Semaphore::new(workers));
    let stop = shutdown.child_token();
    let stream = Pipeline {
        feed: Feed::Stream,
        source: reader,
        checkpoints: tokens,
        handler: handler.clone(),
        permits: permits.clone(),
        grace: shutdown_grace,
        had_token,
    }
    .run(stop.clone());
    let stream = async {
        let result = stream.await;
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let backfill = async {
        let Some(plan) = backfill_plan else {
            return Ok(None);
        };
        let store = Arc::new(TokenStore::new(
            connector.clone(),
            backfill::record_name(&config.client_name),
        ));
        let result = run_backfill(
            store,
            plan,
            &config,
            handler.clone(),
            permits.clone(),
            shutdown_grace,
            stop.clone(),
        )
        .await;
        if result.is_err() {
            stop.cancel();
        }
        result.map(Some)
    };
    let (stream_result, backfill_result) = tokio::join!(stream, backfill);
    status.set_running(false);
    shutdown.cancel();
    let _ = listener.await;
    server_stop.cancel();
    let _ = server.await;
    match (stream_result, backfill_result) {
        (Ok(summary), Ok(_)) => {
            tracing::info!(
                published = summary.published,
                skipped = summary.skipped,
                filtered = summary.filtered,
                resume_token = summary.checkpoint,
                "stopped cleanly"
            );
            Ok(())
        }
        (Err(error), _) | (_, Err(error)) => Err(failed(format!(
            "{error}; the resume token was not moved past it"
        ))),
    }
}

/// Runs one backfill to completion (or until `stop`), marking its plan done when finished.
async fn run_backfill(
    store: Arc<TokenStore>,
    plan: BackfillPlan,
    config: &Config,
    handler: Arc<EventHandler>,
    permits: Arc<Semaphore>,
    grace: Duration,
    stop: CancellationToken,
) -> Result<Summary, PipelineError> {
    let metrics = crate::metrics::get();
    metrics.backfill_in_progress.set(1);
    let started = std::time::Instant::now();
    let (source, progress) = backfill::open(store, plan, &config.backfill);
    let result = Pipeline {
        feed: Feed::Backfill,
        source,
        checkpoints: progress.clone(),
        handler,
        permits,
        grace,
        had_token: true,
    }
    .run(stop)
    .await;
    metrics.backfill_in_progress.set(0);
    let summary = result?;
    if summary.finished {
        progress.finish().await.map_err(PipelineError::Checkpoint)?;
        metrics
            .backfill_duration
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            published = summary.published,
            skipped = summary.skipped,
            filtered = summary.filtered,
            took = %format_go_duration(Duration::from_secs(started.elapsed().as_secs())),
            "backfill complete"
        );
    } else {
        tracing::info!(
            delivered = summary.checkpoint,
            "backfill stopped; it resumes from here on the next start"
        );
    }
    Ok(summary)
}

/// What start-up found in the datastore.
struct Opened {
    reader: ChangelogReader,
    had_token: bool,
    backfill: Option<BackfillPlan>,
}

/// Reads the resume token and opens the changelog reader, waiting a while for a datastore that
/// is not reachable yet.
async fn open_source(
    connector: &Connector,
    tokens: &TokenStore,
    config: &Config,
    wake: Arc<Notify>,
) -> Result<Opened, ExitError> {
    let deadline = tokio::time::Instant::now() + STARTUP_DATASTORE_WAIT;
    let mut delay = Duration::from_millis(500);
    loop {
        let attempt = async {
            // The schema first: a missing table is a clear, final error, not a retry.
            connector.check_schema(&connector.connect().await?).await?;
            let token = tokens.load().await?;
            let start = match &token {
                Some(value) => StartPoint::from_token(tokens.client_name(), value)?,
                None => StartPoint::End,
            };
            if let Some(value) = &token {
                tracing::info!(token = %value, "resuming from the stored resume token");
            }
            // A token ahead of the changelog's head restarts within the backfill window.
            let window = crate::datastore::postgres::reset::ResetWindow {
                max_age: config.backfill.max_age,
                max_events: config.backfill.max_events,
            };
            let reader =
                ChangelogReader::open_bounded(connector.clone(), start, wake.clone(), window)
                    .await?;
            let backfill = decide_backfill(connector, config, &reader, token.is_some()).await?;
            Ok::<_, DatastoreError>(Opened {
                reader,
                had_token: token.is_some(),
                backfill,
            })
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

/// Whether a backfill runs: a new one on a first start (no resume token), the unfinished one
/// after a restart mid-backfill, none otherwise.
async fn decide_backfill(
    connector: &Connector,
    config: &Config,
    reader: &ChangelogReader,
    had_token: bool,
) -> Result<Option<BackfillPlan>, DatastoreError> {
    let store = TokenStore::new(
        connector.clone(),
        backfill::record_name(&config.client_name),
    );
    let previous = store
        .load()
        .await?
        .and_then(|v| BackfillPlan::from_value(&v));
    let unfinished = previous.filter(|plan| !plan.done);
    if !config.backfill.enabled {
        match unfinished {
            Some(plan) => tracing::warn!(
                delivered = plan.delivered,
                total = plan.total,
                "backfill disabled in configuration; an unfinished backfill is left as it is"
            ),
            None => tracing::info!("backfill disabled in configuration"),
        }
        return Ok(None);
    }
    if had_token {
        return Ok(match unfinished {
            Some(plan) => {
                tracing::info!(
                    delivered = plan.delivered,
                    total = plan.total,
                    "resuming the unfinished backfill"
                );
                Some(plan)
            }
            None => {
                tracing::info!("backfill skipped: a resume token exists");
                None
            }
        });
    }
    let Some(start) = reader.fresh_start() else {
        return Ok(None);
    };
    let client = store.connect().await?;
    let plan = BackfillPlan::make(&client, &config.backfill, start).await?;
    // The plan is saved before the stream can write its token, so a restart either starts
    // afresh or finds this plan.
    store
        .save_value(&serde_json::to_value(&plan).unwrap_or_default())
        .await?;
    tracing::info!(
        total = plan.total,
        max_age = %format_go_duration(config.backfill.max_age),
        max_events = config.backfill.max_events,
        rate_limit = config.backfill.rate_limit,
        "no resume token: backfilling existing events while streaming new ones"
    );
    Ok(Some(plan))
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
