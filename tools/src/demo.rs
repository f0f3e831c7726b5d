//! `event-exporter-dev demo`: the whole job on this machine in one command. It finds PostgreSQL
//! (the local server, else a throwaway cluster from the installed server binaries), creates a
//! scratch database with NVSentinel's schema, starts the reference sink and token endpoint on
//! loopback, seeds history, runs the exporter with backfill and live streaming while the
//! generator writes more events, and ends with a summary. It removes what it created, except
//! the file of received CloudEvents (with `--output`), also when it is interrupted (SIGINT or
//! SIGTERM): the interruption stops the exporter and the writer, and the same clean-up runs
//! (the scratch database dropped with its connections, a throwaway cluster stopped, the
//! secret's directory removed). The client secret is written 0600 in a 0700 directory.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::generate::{self, Generator};
use crate::local_postgres;
use crate::sink::{self, SinkArgs};
use event_exporter::config::Config;
use event_exporter::exporter::{self, ExitError, Settings};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Historical events seeded before the exporter starts (spread over the last 24 hours).
    #[arg(long, default_value_t = 5_000)]
    pub history: u64,
    /// Events per second written while the exporter runs.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// How long live events are written.
    #[arg(long, default_value = "10s", value_parser = event_exporter::cli::parse_duration)]
    pub live_for: Duration,
    /// Concurrent publishes (the exporter's own default).
    #[arg(long, default_value_t = 10)]
    pub workers: usize,
    /// Keep the received CloudEvents in DIR/received.ndjson. Without it they are written to a
    /// temporary directory that is removed before the demo exits.
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    pub written: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub missing: u64,
    /// Write-to-sink latency of the live events.
    pub p50: Duration,
    pub p99: Duration,
    /// Where the received CloudEvents are kept; `None` when they were not kept (no `--output`).
    pub received_file: Option<PathBuf>,
    pub postgres: String,
}

pub async fn run(args: DemoArgs) -> Result<(), ExitError> {
    // Installed before the run, so an early signal is not lost; without them nothing stops it.
    let signals = sink::Signals::install().ok();
    let interrupted = async move {
        match signals {
            Some(signals) => {
                signals.wait().await;
            }
            None => std::future::pending().await,
        }
    };
    let summary = run_demo_until(args, interrupted).await?;
    println!();
    println!("events written:    {}", summary.written);
    println!(
        "events delivered:  {} (missing: {})",
        summary.delivered, summary.missing
    );
    println!("duplicates:        {}", summary.duplicates);
    println!(
        "live latency:      p50 {:.1?}, p99 {:.1?} (written → accepted by the sink)",
        summary.p50, summary.p99
    );
    println!("PostgreSQL:        {}", summary.postgres);
    match &summary.received_file {
        Some(file) => println!("received events:   {}", file.display()),
        None => {
            println!("received events:   not kept (--output DIR keeps them in DIR/received.ndjson)")
        }
    }
    if summary.missing > 0 {
        return Err(ExitError::failed(format!(
            "{} events were not delivered",
            summary.missing
        )));
    }
    Ok(())
}

/// Runs the demo and returns its numbers (the end-to-end test calls this).
pub async fn run_demo(args: DemoArgs) -> Result<DemoSummary, ExitError> {
    run_demo_until(args, std::future::pending()).await
}

/// [`run_demo`], cut short (and cleaned up) when `stop` resolves.
pub async fn run_demo_until(
    args: DemoArgs,
    stop: impl std::future::Future<Output = ()>,
) -> Result<DemoSummary, ExitError> {
    // Without --output the received events go to a scratch directory removed at the end.
    let (output, keep) = match &args.output {
        Some(dir) => (dir.clone(), true),
        None => (
            std::env::temp_dir().join(format!("event-exporter-demo-{}", std::process::id())),
            false,
        ),
    };
    std::fs::create_dir_all(&output)
        .map_err(|e| ExitError::failed_with(output.display().to_string(), e))?;
    let received_file = output.join("received.ndjson");
    let _ = std::fs::remove_file(&received_file);
    let result = run_in(&args, &received_file, stop).await;
    if !keep {
        let _ = std::fs::remove_dir_all(&output);
    }
    let mut summary = result?;
    summary.received_file = keep.then_some(received_file);
    Ok(summary)
}

async fn run_in(
    args: &DemoArgs,
    received_file: &std::path::Path,
    stop: impl std::future::Future<Output = ()>,
) -> Result<DemoSummary, ExitError> {
    say("finding PostgreSQL");
    let server = local_postgres::LocalServer::find()
        .await
        .map_err(ExitError::failed)?;
    let database = format!("event_exporter_demo_{}", std::process::id());
    server
        .create_database(&database)
        .await
        .map_err(ExitError::failed)?;
    let scratch = match tempdir() {
        Ok(scratch) => scratch,
        Err(error) => {
            let _ = server.drop_database(&database).await;
            server.stop();
            return Err(error);
        }
    };
    let exporter_stop = CancellationToken::new();
    let result = tokio::select! {
        result = run_with_database(
            args, &server, &database, received_file, &scratch, &exporter_stop,
        ) => result,
        () = stop => {
            // The writer and the wait end with the dropped future; the exporter task is told
            // to stop, and the database is dropped with its connections (FORCE) below.
            exporter_stop.cancel();
            say("interrupted: removing the scratch database and files");
            Err(ExitError::failed("interrupted"))
        }
    };
    let _ = std::fs::remove_dir_all(&scratch);
    if let Err(error) = server.drop_database(&database).await {
        eprintln!("could not drop the scratch database {database}: {error}");
    }
    server.stop();
    let mut summary = result?;
    summary.postgres = server.describe();
    Ok(summary)
}

async fn run_with_database(
    args: &DemoArgs,
    server: &local_postgres::LocalServer,
    database: &str,
    received_file: &std::path::Path,
    scratch: &std::path::Path,
    shutdown: &CancellationToken,
) -> Result<DemoSummary, ExitError> {
    let client = server
        .schema_client(database)
        .await
        .map_err(ExitError::failed)?;
    let live_total = (args.rate * args.live_for.as_secs_f64()).round() as u64;
    let written = args.history + live_total;
    let secret = format!("demo-{:016x}", fastrand::u64(..));
    let running_sink = start_sink(received_file, &secret, written).await?;

    say(&format!("seeding {} historical events", args.history));
    let mut generator = Generator::new(64, 0.1, None);
    generate::write_history(
        &client,
        &mut generator,
        args.history,
        Some(Duration::from_secs(24 * 3600)),
    )
    .await
    .map_err(ExitError::failed)?;

    let settings = exporter_settings(
        args,
        server.settings(database),
        &running_sink,
        &secret,
        scratch,
    )?;
    let exporter = tokio::spawn(exporter::run_with(settings, shutdown.clone()));

    // Live events while the backfill runs.
    say(&format!(
        "exporter running; writing {live_total} live events over {:?}",
        args.live_for
    ));
    let live_started = Utc::now();
    let mut progress = Progress::new(&running_sink, written);
    write_live(&client, &mut generator, args, live_total, &mut progress).await?;
    wait_for_delivery(&exporter, &mut progress).await;
    say(&format!("delivered {}/{written}", running_sink.accepted()));
    shutdown.cancel();
    let exported = exporter.await.map_err(ExitError::failed)?;
    summarize(running_sink, written, live_started, exported).await
}

/// Starts the reference sink on loopback, keeping the received events in `received_file`
/// and in memory (room for `written` events and their redeliveries), with `secret` as the
/// token endpoint's client secret.
async fn start_sink(
    received_file: &std::path::Path,
    secret: &str,
    written: u64,
) -> Result<sink::RunningSink, ExitError> {
    let running_sink = sink::start(SinkArgs {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        out: Some(received_file.to_path_buf()),
        client_secret: secret.to_string(),
        keep_events: written as usize * 2 + 1_000,
        ..SinkArgs::default()
    })
    .await
    .map_err(ExitError::failed)?;
    say(&format!(
        "sink and token endpoint on http://{}",
        running_sink.local_addr()
    ));
    Ok(running_sink)
}

/// The exporter's settings: `running_sink` as sink and token endpoint, backfill on, the
/// client secret written into `scratch`.
fn exporter_settings(
    args: &DemoArgs,
    datastore: event_exporter::datastore::postgres::PgSettings,
    running_sink: &sink::RunningSink,
    secret: &str,
    scratch: &std::path::Path,
) -> Result<Settings, ExitError> {
    let secret_path = scratch.join("oidc-client-secret");
    write_private(&secret_path, secret)
        .map_err(|e| ExitError::failed_with(secret_path.display().to_string(), e))?;
    let token_url = running_sink.token_url().unwrap_or_default();
    let config = Config::parse(&demo_config(&running_sink.events_url(), &token_url))
        .map_err(ExitError::failed)?;
    Ok(Settings {
        config,
        workers: args.workers.max(1),
        metrics_port: 0,
        datastore: event_exporter::datastore::DatastoreSettings::Postgres(datastore),
        oidc_secret_path: secret_path,
        shutdown_grace: Duration::from_secs(10),
    })
}

/// The demo's exporter configuration (TOML) for a sink at `sink` and tokens from `token_url`.
fn demo_config(sink: &str, token_url: &str) -> String {
    format!(
        r#"
[exporter.metadata]
cluster = "demo"
environment = "local"

[exporter.sink]
endpoint = "{sink}"
timeout = "10s"

[exporter.oidc]
token_url = "{token_url}"
client_id = "nvsentinel-exporter"
scope = "events:write"

[exporter.backfill]
enabled = true
max_age = "48h"
max_events = 1000000
batch_size = 500
rate_limit = 0

[exporter.failure_handling]
max_retries = 5
initial_backoff = "200ms"
max_backoff = "5s"
backoff_multiplier = 2.0
"#
    )
}

/// Writes `live_total` live events at `--rate` (the events due, every 100 ms).
async fn write_live(
    client: &tokio_postgres::Client,
    generator: &mut Generator,
    args: &DemoArgs,
    live_total: u64,
    progress: &mut Progress<'_>,
) -> Result<(), ExitError> {
    let started = Instant::now();
    let mut live_written = 0u64;
    while live_written < live_total {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let due = ((started.elapsed().as_secs_f64() * args.rate) as u64).min(live_total);
        if due > live_written {
            let now = Utc::now();
            let rows: Vec<_> = (live_written..due)
                .map(|_| generator.row(now, None))
                .collect();
            generate::insert(client, &rows)
                .await
                .map_err(ExitError::failed)?;
            live_written = due;
        }
        progress.show();
    }
    Ok(())
}

/// Waits until every event arrived, the exporter stopped, or two minutes passed.
async fn wait_for_delivery(
    exporter: &tokio::task::JoinHandle<Result<(), ExitError>>,
    progress: &mut Progress<'_>,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while progress.sink.accepted() < progress.total && Instant::now() < deadline {
        if exporter.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        progress.show();
    }
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
}

/// Stops the sink and counts what it received: unique events, duplicates, missing ones, and
/// the latency of the events written since `live_started`. Fails with the exporter's error.
async fn summarize(
    running_sink: sink::RunningSink,
    written: u64,
    live_started: chrono::DateTime<Utc>,
    exported: Result<(), ExitError>,
) -> Result<DemoSummary, ExitError> {
    let events = running_sink.events();
    let stats = running_sink.shutdown().await.map_err(ExitError::failed)?;
    exported?;
    let unique: HashSet<String> = events
        .iter()
        .filter_map(|e| e.event["id"].as_str().map(str::to_string))
        .collect();
    let (p50, p99) = sink::latency_percentiles(&events, live_started);
    Ok(DemoSummary {
        written,
        delivered: unique.len() as u64,
        duplicates: stats.duplicates,
        missing: written.saturating_sub(unique.len() as u64),
        p50,
        p99,
        received_file: None,
        postgres: String::new(),
    })
}

fn say(message: &str) {
    eprintln!("demo: {message}");
}

/// Delivery progress: on a terminal one rewritten line; elsewhere (a log file, CI) a plain
/// line at most every five seconds, so logs do not get one very long line of `\r` updates.
struct Progress<'a> {
    sink: &'a sink::RunningSink,
    total: u64,
    last_line: Option<Instant>,
}

impl<'a> Progress<'a> {
    fn new(sink: &'a sink::RunningSink, total: u64) -> Progress<'a> {
        Progress {
            sink,
            total,
            last_line: None,
        }
    }

    fn show(&mut self) {
        let total = self.total;
        if std::io::stderr().is_terminal() {
            eprint!("\rdemo: delivered {}/{total}   ", self.sink.accepted());
            self.last_line = Some(Instant::now());
        } else if self
            .last_line
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(5))
        {
            eprintln!("demo: delivered {}/{total}", self.sink.accepted());
            self.last_line = Some(Instant::now());
        }
    }
}

/// A new directory for the client secret, readable by this user only (0700).
fn tempdir() -> Result<PathBuf, ExitError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!(
        "event-exporter-demo-secrets-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| ExitError::failed_with(dir.display().to_string(), e))?;
    Ok(dir)
}

/// Writes `text` to a new file at `path` readable by this user only (0600).
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_secret_is_readable_by_this_user_only() {
        let dir = tempdir().expect("secret directory");
        let file = dir.join("oidc-client-secret");
        write_private(&file, "s3cret").expect("secret written");
        let mode = |path: &std::path::Path| {
            std::fs::metadata(path)
                .expect("metadata")
                .permissions()
                .mode()
                & 0o777
        };
        let (dir_mode, file_mode) = (mode(&dir), mode(&file));
        let text = std::fs::read_to_string(&file).expect("read back");
        std::fs::remove_dir_all(&dir).expect("clean up");
        assert_eq!((dir_mode, file_mode), (0o700, 0o600));
        assert_eq!(text, "s3cret");
    }
}
