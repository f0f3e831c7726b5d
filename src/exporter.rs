//! The main job: wire configuration, datastore, sink and server together, run until a signal
//! or a delivery failure, and map the result to an exit status.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cli::RunArgs;
use crate::cloudevent::Transformer;
use crate::config::{format_go_duration, Config};
use crate::datastore::start::{Background, Feeds, Launch, Startup};
use crate::datastore::DatastoreSettings;
use crate::filter::Filter;
use crate::leader::Held;
use crate::pipeline::{EventHandler, Feed, Pipeline, PipelineError, Summary};
use crate::server::{self, Status};
use crate::sink::{self, Publisher, TokenProvider};

/// The cause an [`ExitError`] keeps: any error, or a message (`String` converts).
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why the exporter stopped unsuccessfully; each maps to an exit status. Keeps its cause:
/// `Display` is the context (when there is one) and the cause's text, `source()` the cause;
/// [`ExitError::report`] is the whole chain as printed at exit.
#[derive(Debug, thiserror::Error)]
pub enum ExitError {
    /// Invalid configuration, flags or datastore environment: exit 2.
    #[error("{}", with_context(.context, .source))]
    Config {
        context: Option<String>,
        #[source]
        source: Cause,
    },
    /// Anything else: exit 1.
    #[error("{}", with_context(.context, .source))]
    Failed {
        context: Option<String>,
        #[source]
        source: Cause,
    },
}

fn with_context(context: &Option<String>, source: &Cause) -> String {
    match context {
        Some(context) => format!("{context}: {source}"),
        None => source.to_string(),
    }
}

impl ExitError {
    /// Exit 2 for `cause` (an error naming the key, flag or variable, or a message).
    pub fn config(cause: impl Into<Cause>) -> ExitError {
        ExitError::Config {
            context: None,
            source: cause.into(),
        }
    }

    /// Exit 2: `context` (the key or flag) and the error that makes it invalid.
    pub fn config_with(context: impl Into<String>, cause: impl Into<Cause>) -> ExitError {
        ExitError::Config {
            context: Some(context.into()),
            source: cause.into(),
        }
    }

    /// Exit 1 for `cause`.
    pub fn failed(cause: impl Into<Cause>) -> ExitError {
        ExitError::Failed {
            context: None,
            source: cause.into(),
        }
    }

    /// Exit 1: what failed, and why.
    pub fn failed_with(context: impl Into<String>, cause: impl Into<Cause>) -> ExitError {
        ExitError::Failed {
            context: Some(context.into()),
            source: cause.into(),
        }
    }

    pub fn code(&self) -> u8 {
        match self {
            ExitError::Config { .. } => 2,
            ExitError::Failed { .. } => 1,
        }
    }

    /// The message and every cause below it, `: `-separated; a cause whose text the message
    /// already shows (errors that print their source) is not repeated.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self).and_then(|s| s.source());
        while let Some(error) = cause {
            let line = error.to_string();
            if !text.contains(&line) {
                text.push_str(": ");
                text.push_str(&line);
            }
            cause = error.source();
        }
        text
    }
}

/// Everything validated before any connection is made.
pub struct Settings {
    pub config: Config,
    pub workers: usize,
    /// 0 binds an ephemeral port (the demo does).
    pub metrics_port: u16,
    pub datastore: DatastoreSettings,
    pub oidc_secret_path: std::path::PathBuf,
    pub shutdown_grace: Duration,
}

/// What `validate_local` checked: everything but the datastore environment.
pub struct LocalSettings {
    pub config: Config,
    /// Effective `--workers` / `exporter.workers` (default 10).
    pub workers: usize,
    pub metrics_port: u16,
}

/// Validates the command line, the configuration file and the datastore environment.
pub fn validate(args: &RunArgs) -> Result<Settings, ExitError> {
    let LocalSettings {
        config,
        workers,
        metrics_port,
    } = validate_local(args, true)?;
    let datastore = DatastoreSettings::from_process_env().map_err(ExitError::config)?;
    Ok(Settings {
        config,
        workers,
        metrics_port,
        datastore,
        oidc_secret_path: args.oidc_secret_path.clone(),
        shutdown_grace: args.shutdown_grace,
    })
}

/// Validates what can be checked without the datastore environment or a connection (shared by
/// the exporter and `check-config`): the configuration file, the flags, the filter expression,
/// the OIDC client secret file (readable and not empty, when OIDC is on) and the CA files.
/// Every failure is `ExitError::Config` (exit 2) naming the key, flag or file.
/// `check_files = false` skips the files the pod mounts (secret, CA files), for checking a
/// rendered configuration outside the pod.
pub fn validate_local(args: &RunArgs, check_files: bool) -> Result<LocalSettings, ExitError> {
    let config = Config::load(&args.config).map_err(ExitError::config)?;
    for key in &config.unknown_keys {
        match config.did_you_mean.get(key) {
            Some(known) => tracing::warn!(
                key,
                did_you_mean = %known,
                "unknown configuration key ignored (did you mean {known}?)"
            ),
            None => tracing::warn!(key, "unknown configuration key ignored"),
        }
    }
    for warning in &config.warnings {
        tracing::warn!("configuration: {warning}");
    }
    let workers = match (args.workers, config.workers) {
        (Some(n), _) if n < 0 => {
            return Err(ExitError::config(format!(
                "--workers: must not be negative, got {n}"
            )))
        }
        (Some(0), _) => {
            tracing::warn!("--workers=0 treated as 1");
            1
        }
        (Some(n), _) if n > crate::config::MAX_WORKERS => {
            return Err(ExitError::config(format!(
                "--workers: must be at most {}, got {n}",
                crate::config::MAX_WORKERS
            )))
        }
        (Some(n), _) => n as usize,
        (None, Some(n)) => n,
        (None, None) => 10,
    };
    let metrics_port = args.metrics_port.trim().parse::<u16>().map_err(|_| {
        ExitError::config(format!(
            "--metrics-port: {:?} is not a port number",
            args.metrics_port
        ))
    })?;
    compile_filter(&config)?;
    if !check_files {
        return Ok(LocalSettings {
            config,
            workers,
            metrics_port,
        });
    }
    if config.oidc.is_some() {
        check_secret_file(&args.oidc_secret_path)?;
    }
    let ca_files = [
        ("exporter.sink.ca_file", config.sink.ca_file.as_deref()),
        (
            "exporter.oidc.ca_file",
            config.oidc.as_ref().and_then(|o| o.ca_file.as_deref()),
        ),
    ];
    for (key, path) in ca_files {
        if let Some(path) = path {
            crate::tls::roots_from_file(path).map_err(|e| ExitError::config_with(key, e))?;
        }
    }
    Ok(LocalSettings {
        config,
        workers,
        metrics_port,
    })
}

/// The OIDC client secret file must be readable and hold a secret; the exporter re-reads it on
/// every token refresh, but a missing mount is a deployment mistake to report at start.
fn check_secret_file(path: &std::path::Path) -> Result<(), ExitError> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => Ok(()),
        Ok(_) => Err(ExitError::config(format!(
            "--oidc-secret-path: {} is empty (the oidc-client-secret key of the Secret named by \
             oidcSecretName)",
            path.display()
        ))),
        Err(error) => Err(ExitError::config(format!(
            "--oidc-secret-path: cannot read {}: {error} (mount the Secret named by \
             oidcSecretName, or set exporter.oidc.enabled = false for a sink without \
             authentication)",
            path.display()
        ))),
    }
}

/// Compiles `exporter.filter.expression` (`None` when blank): a malformed or non-boolean
/// expression is a configuration error, as upstream.
pub fn compile_filter(config: &Config) -> Result<Option<Filter>, ExitError> {
    Filter::compile(config.filter_expression.as_deref().unwrap_or_default())
        .map_err(|e| ExitError::config_with("exporter.filter.expression", e))
}

/// Runs the exporter until SIGTERM/SIGINT (Ok) or a failure.
pub async fn run(args: RunArgs) -> Result<(), ExitError> {
    let settings = validate(&args)?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    run_with(settings, shutdown).await?;
    if let Some(reason) = crate::restart::requested() {
        tracing::info!(%reason, "stopped cleanly; restarting in place");
    }
    Ok(())
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
    let status = Arc::new(Status::default());
    let server_stop = CancellationToken::new();
    let (address, server) = server::start(metrics_port, status.clone(), server_stop.clone())
        .await
        .map_err(|e| {
            ExitError::failed_with(format!("cannot listen on metrics port {metrics_port}"), e)
        })?;

    let auth = match &config.oidc {
        Some(oidc) => {
            let provider = TokenProvider::new(oidc.clone(), oidc_secret_path.clone())
                .map_err(ExitError::failed)?;
            provider.check_secret().map_err(ExitError::failed)?;
            Some(Arc::new(provider))
        }
        None => {
            tracing::info!("OIDC disabled: events are sent without an Authorization header");
            None
        }
    };
    let client = sink::SinkClient::new(
        &config.sink.endpoint,
        config.sink.timeout,
        config.sink.insecure_skip_verify,
        config.sink.ca_file.as_deref(),
        workers,
        // Adaptive concurrency judges each round trip; fixed mode need not time them.
        config.sink.concurrency == crate::config::ConcurrencyMode::Adaptive,
    )
    .map_err(ExitError::failed)?;
    sink::log_proxy("sink", &config.sink.endpoint);
    let permits = sink::concurrency::Concurrency::new(workers, config.sink.concurrency);
    let publisher = Publisher::new(client, auth, config.failure_handling.clone())
        .with_statuses(
            config.rejections.rejected_statuses.clone(),
            config.rejections.already_delivered_statuses.clone(),
        )
        .with_concurrency(permits.clone());
    let dead_letter = dead_letter(&config, workers)?;
    configure_watchdog(&config);
    let filter = compile_filter(&config)?;
    if let Some(filter) = &filter {
        tracing::info!(
            expression = filter.expression(),
            "exporting only events the filter expression accepts"
        );
    }
    let handler = Arc::new(EventHandler {
        transformer: Transformer::new(config.metadata.clone()).with_subject(config.subject),
        publisher,
        filter,
        dead_letter,
        batch: (config.sink.mode == crate::config::SinkMode::Batch).then_some(config.sink.batch),
    });

    crate::metrics::get().set_feature_flag("backfill_enabled", config.backfill.enabled);
    crate::lag::global().set_client(&config.client_name);
    tracing::info!(
        module = "event-exporter",
        version = env!("CARGO_PKG_VERSION"),
        cluster = config.cluster(),
        sink = %sink::redact_url(&config.sink.endpoint),
        datastore = %datastore.describe(),
        client_name = %config.client_name,
        leadership_key = crate::leadership::lock_key(&config.client_name),
        workers,
        metrics = %address,
        retry_budget = %format_go_duration(sink::retry::total_base_delay(&config.failure_handling)),
        "event exporter starting"
    );

    // Stream and backfill share the workers; if either fails, both stop.
    let context = Context {
        config: &config,
        handler,
        permits,
        grace: shutdown_grace,
        stop: shutdown.child_token(),
        shutdown: shutdown.clone(),
        status: status.clone(),
    };
    let startup = Startup {
        config: &config,
        shutdown: &shutdown,
        status: &status,
    };
    let started =
        datastore
            .start(&startup, &context)
            .await
            .map_err(|e| match e.is_configuration() {
                true => ExitError::config(e),
                false => ExitError::failed(e),
            })?;
    let Some(started) = started else {
        status.set_standby(false);
        server_stop.cancel();
        return Ok(());
    };
    let readiness = status.clone();
    crate::metrics::get().watch_readiness(move || readiness.ready());
    status.set_running(true);
    status.set_standby(false);
    let Started {
        work,
        listener,
        leadership,
    } = started;
    supervise(work, listener, leadership, (server, server_stop), &context).await
}

/// What every backend's start-up shares: the configuration, the event handler, the worker
/// permits, the stop signals and the readiness status.
struct Context<'a> {
    config: &'a Config,
    handler: Arc<EventHandler>,
    permits: Arc<sink::concurrency::Concurrency>,
    grace: Duration,
    /// Stops the pipelines (a failure in one stops the other).
    stop: CancellationToken,
    /// SIGTERM/SIGINT.
    shutdown: CancellationToken,
    status: Arc<Status>,
}

/// How the stream and the backfill (if one ran) ended.
type Results = (
    Result<Summary, PipelineError>,
    Result<Option<Summary>, PipelineError>,
);

type Work = std::pin::Pin<Box<dyn std::future::Future<Output = Results> + Send>>;

/// A started backend: the stream and backfill pipelines joined, and the background tasks that
/// must run as long as they do.
struct Started {
    work: Work,
    /// A task that must not end while the exporter runs (PostgreSQL's LISTEN).
    listener: Option<tokio::task::JoinHandle<()>>,
    /// Leadership (PostgreSQL's lock, MongoDB's lease) and the task that keeps proving it.
    leadership: Held,
}

impl Launch for Context<'_> {
    type Running = Started;

    /// The stream pipeline and, if the backend planned one, the backfill's, joined; a failure
    /// in either stops both.
    fn launch<S, C, B, P>(&self, feeds: Feeds<S, C, B, P>, background: Background) -> Started
    where
        S: crate::datastore::ChangeSource,
        C: crate::datastore::CheckpointStore,
        B: crate::datastore::ChangeSource,
        P: crate::backfill::PlanStore,
    {
        let Feeds {
            stream,
            checkpoints,
            had_token,
            backfill,
        } = feeds;
        let stop = self.stop.clone();
        let stream = Pipeline {
            feed: Feed::Stream,
            source: stream,
            checkpoints,
            handler: self.handler.clone(),
            permits: self.permits.clone(),
            grace: self.grace,
            had_token,
            save_interval: self.config.resume_token_save_interval,
        }
        .run(stop.clone());
        let stream = stop_all_on_error(stream, stop.clone());
        let backfill = backfill.map(|(source, progress)| {
            stop_all_on_error(
                run_backfill(
                    source,
                    progress,
                    self.handler.clone(),
                    self.permits.clone(),
                    self.grace,
                    self.config.resume_token_save_interval,
                    stop.clone(),
                ),
                stop,
            )
        });
        let work = Box::pin(async move {
            let backfill = async move {
                match backfill {
                    Some(backfill) => backfill.await.map(Some),
                    None => Ok(None),
                }
            };
            tokio::join!(stream, backfill)
        });
        Started {
            work,
            listener: background.listener,
            leadership: background.leadership,
        }
    }
}

/// `work`, cancelling `stop` (and so every pipeline) when it fails.
async fn stop_all_on_error<T>(
    work: impl std::future::Future<Output = Result<T, PipelineError>>,
    stop: CancellationToken,
) -> Result<T, PipelineError> {
    let result = work.await;
    if result.is_err() {
        stop.cancel();
    }
    result
}

/// Runs the work to its end under supervision: a panic anywhere, or a background task ending
/// while the exporter runs, is fatal — the work is stopped (in-flight events get the grace
/// period, the resume token is saved over what was delivered) and the exporter exits 1 so
/// Kubernetes restarts it.
async fn supervise(
    work: Work,
    listener: Option<tokio::task::JoinHandle<()>>,
    leadership: Held,
    (server, server_stop): (tokio::task::JoinHandle<()>, CancellationToken),
    context: &Context<'_>,
) -> Result<(), ExitError> {
    let (shutdown, stop) = (&context.shutdown, &context.stop);
    let mut listener = listener;
    let mut server = server;
    let (keeper, keeper_stop, leadership) = leadership.into_parts();
    let mut keeper = Some(keeper);
    let mut server_done = false;
    let mut died: Option<String> = None;
    let mut hard_stop: Option<tokio::time::Instant> = None;
    let mut hard_stop_alarm = crate::clock::Alarm::new();
    let mut work = work;
    let results = loop {
        tokio::select! {
            results = &mut work => break Some(results),
            _ = crate::panics::panicked().cancelled(), if died.is_none() => {
                died = Some(format!(
                    "a task panicked ({})",
                    crate::panics::first_panic().unwrap_or("no message")
                ));
            }
            joined = join_some(&mut listener) => {
                listener = None;
                if !shutdown.is_cancelled() {
                    died.get_or_insert_with(|| task_ended("the datastore background task (LISTEN, certificate watcher)", joined));
                }
            }
            joined = &mut server, if !server_done => {
                server_done = true;
                died.get_or_insert_with(|| task_ended("the metrics server", joined));
            }
            kept = join_some(&mut keeper) => {
                keeper = None;
                if let Some(reason) = leadership_ended(kept) {
                    died.get_or_insert(reason);
                }
            }
            _ = hard_stop_alarm.at(hard_stop) => break None,
        }
        if let (Some(reason), None) = (&died, hard_stop) {
            tracing::error!(%reason, "stopping the exporter: a background task died");
            crate::watchdog::global().task_died(reason.clone());
            stop.cancel();
            hard_stop = Some(crate::clock::deadline_after(
                context.grace.saturating_add(Duration::from_secs(10)),
            ));
        }
    };
    context.status.set_running(false);
    shutdown.cancel();
    if let Some(listener) = listener {
        let _ = listener.await;
    }
    keeper_stop.cancel();
    if let Some(keeper) = keeper {
        let _ = keeper.await;
    }
    // Graceful hand-over: the final token write is done; a standby takes over at its next try.
    leadership.release().await;
    server_stop.cancel();
    if !server_done {
        let _ = server.await;
    }
    outcome(died, results)
}

/// What the end of the leadership keeper means: nothing (it was stopped), why the exporter
/// stops (it died), or, when leadership was lost, an exit with status 1 right here: nothing
/// may be published or saved any more (the gate is closed and token writes are fenced), and
/// Kubernetes restarts this replica as a standby.
fn leadership_ended<E: std::fmt::Display>(
    kept: Result<Result<(), E>, tokio::task::JoinError>,
) -> Option<String> {
    match kept {
        Ok(Ok(())) => None,
        Ok(Err(lost)) => {
            tracing::error!(error = %lost, "exiting with status 1");
            std::process::exit(1);
        }
        Err(joined) => Some(task_ended("the leadership task", Err(joined))),
    }
}

/// The exit result from why the work ended.
fn outcome(died: Option<String>, results: Option<Results>) -> Result<(), ExitError> {
    let failed = |e: String| ExitError::failed(e);
    if let Some(reason) = died {
        return Err(failed(format!(
            "{reason}; stopped so that the exporter is restarted (events not yet delivered are re-sent)"
        )));
    }
    let Some((stream_result, backfill_result)) = results else {
        return Err(failed("the exporter did not stop in time".into()));
    };
    match (stream_result, backfill_result) {
        (Ok(summary), Ok(backfill)) => {
            // The stream's counts, and the events a backfill (if one ran) published.
            tracing::info!(
                published = summary.published,
                skipped = summary.skipped,
                filtered = summary.filtered,
                backfill_published = backfill.as_ref().map(|b| b.published),
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

/// Waits for the task if there is one; never completes otherwise.
async fn join_some<T>(
    task: &mut Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// Sets the liveness watchdog's timeout; warns when it is shorter than the quiet gap a healthy
/// retry schedule can leave (one attempt plus one backoff sleep), which would fail `/healthz`
/// while the exporter is only waiting to retry.
fn configure_watchdog(config: &Config) {
    let timeout = config.liveness_timeout;
    crate::watchdog::global().configure(timeout);
    let gap = crate::watchdog::longest_quiet_gap(
        config.sink.timeout,
        config.failure_handling.max_backoff,
    );
    if timeout <= gap {
        tracing::warn!(
            liveness_timeout = %format_go_duration(timeout),
            longest_healthy_gap = %format_go_duration(gap),
            "exporter.liveness_timeout is not above exporter.sink.timeout + 1.1 × \
             exporter.failure_handling.max_backoff: /healthz may fail while a delivery is only \
             waiting to be retried"
        );
    }
}

/// The dead letter when `on_rejected = "dead_letter"`: its endpoint gets the sink's TLS
/// options and timeout.
fn dead_letter(
    config: &Config,
    workers: usize,
) -> Result<Option<sink::dead_letter::DeadLetter>, ExitError> {
    if config.rejections.on_rejected != crate::config::OnRejected::DeadLetter {
        return Ok(None);
    }
    let Some(settings) = &config.rejections.dead_letter else {
        return Ok(None);
    };
    let endpoint = match &settings.endpoint {
        None => None,
        Some(url) => {
            let http = sink::http_client(
                config.sink.timeout,
                config.sink.insecure_skip_verify,
                config.sink.ca_file.as_deref(),
                workers,
                "dead-letter endpoint",
            )
            .map_err(ExitError::failed)?;
            let url = reqwest::Url::parse(url).map_err(|e| {
                ExitError::failed_with("exporter.failure_handling.dead_letter.endpoint", e)
            })?;
            sink::log_proxy("dead-letter endpoint", url.as_str());
            Some((http, url))
        }
    };
    crate::metrics::get().dead_letter_statuses(&config.rejections.rejected_statuses);
    tracing::info!(
        file = ?settings.file,
        endpoint = ?settings.endpoint,
        statuses = ?config.rejections.rejected_statuses,
        "events the sink permanently rejects go to the dead letter after the retries"
    );
    Ok(Some(sink::dead_letter::DeadLetter::new(
        settings.file.clone(),
        endpoint,
    )))
}

/// Runs one backfill to completion (or until `stop`), marking its plan done when finished.
async fn run_backfill<S: crate::datastore::ChangeSource, P: crate::backfill::PlanStore>(
    source: S,
    progress: Arc<crate::backfill::BackfillProgress<P>>,
    handler: Arc<EventHandler>,
    permits: Arc<sink::concurrency::Concurrency>,
    grace: Duration,
    save_interval: Duration,
    stop: CancellationToken,
) -> Result<Summary, PipelineError> {
    let metrics = crate::metrics::get();
    metrics.backfill_in_progress.set(1);
    let started = std::time::Instant::now();
    let result = Pipeline {
        feed: Feed::Backfill,
        source,
        checkpoints: progress.clone(),
        handler,
        permits,
        grace,
        had_token: true,
        save_interval,
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

/// Why a background task that should run until shutdown ended.
fn task_ended(what: &str, joined: Result<(), tokio::task::JoinError>) -> String {
    match joined {
        Ok(()) => format!("{what} stopped"),
        Err(error) if error.is_panic() => format!("{what} panicked"),
        Err(error) => format!("{what} was cancelled: {error}"),
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

#[cfg(test)]
mod exit_error_tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn keeps_the_cause_and_reports_the_chain_once() {
        let io = || std::io::Error::other("disk gone");
        let error = ExitError::failed_with("writing the token", Outer(io()));
        assert_eq!(error.code(), 1);
        assert_eq!(error.to_string(), "writing the token: outer");
        assert_eq!(error.report(), "writing the token: outer: disk gone");
        assert!(std::error::Error::source(&error).is_some());
        let message = ExitError::config("exporter.workers: must be from 1 to 1000");
        assert_eq!(message.code(), 2);
        assert_eq!(message.report(), "exporter.workers: must be from 1 to 1000");
        // A cause that already prints its source is not repeated.
        let shown = ExitError::config(std::io::Error::other(format!("x: {}", io())));
        assert_eq!(shown.report(), "x: disk gone");
    }
}
