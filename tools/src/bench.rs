//! `event-exporter-dev bench`: measures the backfill against a local sink, in one run on this
//! machine, and prints ratios rather than asserting times (machines here are shared).
//!
//! Scenarios: an unlimited backfill of `--events` events (events/s, CPU, peak memory of the
//! exporter process), and backfills at each `--rates` limit, reporting how closely every 10 s
//! window holds the configured rate. The exporter runs as a child process (this binary), so
//! its CPU time and memory are its own; PostgreSQL and the sink share the machine with it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

use crate::generate::{self, Generator};
use crate::local_postgres::LocalServer;
use crate::sink::{self, SinkArgs};
use event_exporter::exporter::ExitError;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Events in the unlimited backfill; 0 skips that scenario.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Events written while the exporter streams (no backfill); 0 skips that scenario.
    #[arg(long, default_value_t = 100_000)]
    pub stream_events: u64,
    /// Rate limits (events/s) to check, comma-separated; 0 entries are skipped.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    pub rates: Vec<u64>,
    /// How long each rate-limited backfill runs.
    #[arg(long, default_value = "30s", value_parser = event_exporter::cli::parse_duration)]
    pub rate_run: Duration,
    /// Concurrent publishes.
    #[arg(long, default_value_t = 10)]
    pub workers: usize,
    /// Sink latency per request.
    #[arg(long, default_value = "0s", value_parser = event_exporter::cli::parse_duration)]
    pub sink_latency: Duration,
}

/// Upstream's published numbers (issue #1514, v1.15.0): a 1,000,000-event backlog caught up at
/// 400–431 events/s using 0.58–0.72 cores and 39–42 MiB; streaming with a 0 ms sink and 10
/// workers reached 346–455 events/s with end-to-end p50 0.46–0.84 s and p99 2.4–3.0 s.
const UPSTREAM_EVENTS_PER_SECOND: f64 = 431.0;
const UPSTREAM_STREAM_EVENTS_PER_SECOND: f64 = 455.0;

/// What one run measures.
#[derive(Debug, Clone, Copy)]
enum Scenario {
    /// History of `count` events, backfilled at `rate_limit` (0 = unlimited).
    Backfill { count: u64, rate_limit: u64 },
    /// `count` events written as fast as possible while the exporter streams.
    Stream { count: u64 },
}

impl Scenario {
    fn count(self) -> u64 {
        match self {
            Scenario::Backfill { count, .. } | Scenario::Stream { count } => count,
        }
    }
}

struct Measured {
    events: u64,
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_mib: f64,
    /// (seconds since start, accepted so far), sampled every 100 ms.
    samples: Vec<(f64, u64)>,
    /// Write-to-sink latency percentiles (p50, p99) of streamed events.
    latency: Option<(Duration, Duration)>,
}

pub async fn run(args: BenchArgs) -> Result<(), ExitError> {
    let failed = |e: String| ExitError::failed(e);
    if cfg!(debug_assertions) {
        eprintln!(
            "bench: this is a debug build; use `cargo run --release -p event-exporter-dev -- bench` for real numbers"
        );
    }
    let server = LocalServer::find()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let result = run_scenarios(&args, &server).await;
    server.stop();
    result
}

async fn run_scenarios(args: &BenchArgs, server: &LocalServer) -> Result<(), ExitError> {
    println!(
        "benchmark: {} workers, sink latency {:?}",
        args.workers, args.sink_latency
    );
    if args.stream_events > 0 {
        let stream = scenario(
            args,
            server,
            Scenario::Stream {
                count: args.stream_events,
            },
        )
        .await?;
        let rate = stream.events as f64 / stream.seconds;
        let (p50, p99) = stream.latency.unwrap_or_default();
        println!(
            "stream: {} events written at full speed, delivered in {:.1} s = {:.0} events/s \
             ({:.1}x upstream's {:.0}/s); write-to-sink latency p50 {:.1?}, p99 {:.1?}; \
             exporter CPU {:.2} cores, peak RSS {:.1} MiB",
            stream.events,
            stream.seconds,
            rate,
            rate / UPSTREAM_STREAM_EVENTS_PER_SECOND,
            UPSTREAM_STREAM_EVENTS_PER_SECOND,
            p50,
            p99,
            stream.cpu_seconds / stream.seconds,
            stream.peak_rss_mib,
        );
    }
    if args.events > 0 {
        let unlimited_backfill = Scenario::Backfill {
            count: args.events,
            rate_limit: 0,
        };
        let unlimited = scenario(args, server, unlimited_backfill).await?;
        let rate = unlimited.events as f64 / unlimited.seconds;
        println!(
            "backfill, unlimited: {} events in {:.1} s = {:.0} events/s ({:.1}x upstream's {:.0}/s); \
             exporter CPU {:.2} cores, peak RSS {:.1} MiB",
            unlimited.events,
            unlimited.seconds,
            rate,
            rate / UPSTREAM_EVENTS_PER_SECOND,
            UPSTREAM_EVENTS_PER_SECOND,
            unlimited.cpu_seconds / unlimited.seconds,
            unlimited.peak_rss_mib,
        );
    }
    for &limit in args.rates.iter().filter(|limit| **limit > 0) {
        let count = (limit as f64 * args.rate_run.as_secs_f64()) as u64;
        let measured = scenario(
            args,
            server,
            Scenario::Backfill {
                count,
                rate_limit: limit,
            },
        )
        .await?;
        let held = match window_rates(&measured.samples, 10.0) {
            Some((low, high)) => format!(
                "10 s windows held {:.1}%–{:.1}% of the limit",
                low / limit as f64 * 100.0,
                high / limit as f64 * 100.0
            ),
            None => "no full 10 s window (use --rate-run of 12s or more)".into(),
        };
        println!(
            "backfill, rate_limit {limit}/s: {} events in {:.1} s = {:.0}/s overall; {held}; \
             CPU {:.2} cores, peak RSS {:.1} MiB",
            measured.events,
            measured.seconds,
            measured.events as f64 / measured.seconds,
            measured.cpu_seconds / measured.seconds,
            measured.peak_rss_mib,
        );
    }
    Ok(())
}

/// One scenario against a fresh database.
async fn scenario(
    args: &BenchArgs,
    server: &LocalServer,
    scenario: Scenario,
) -> Result<Measured, ExitError> {
    let failed = |e: String| ExitError::failed(e);
    let database = format!("event_exporter_bench_{}", std::process::id());
    server
        .create_database(&database)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let result = async {
        let client = server
            .schema_client(&database)
            .await
            .map_err(|e| failed(e.to_string()))?;
        if let Scenario::Backfill { count, .. } = scenario {
            eprintln!("bench: writing {count} events");
            let mut generator = Generator::new(256, 0.1, Some(1));
            let history = Some(Duration::from_secs(24 * 3600));
            generate::write_history(&client, &mut generator, count, history)
                .await
                .map_err(|e| failed(e.to_string()))?;
            client
                .batch_execute("ANALYZE health_events; ANALYZE datastore_changelog")
                .await
                .map_err(|e| failed(e.to_string()))?;
        }
        measure(args, server, &database, &client, scenario).await
    }
    .await;
    let _ = server.drop_database(&database).await;
    result
}

async fn measure(
    args: &BenchArgs,
    server: &LocalServer,
    database: &str,
    client: &tokio_postgres::Client,
    scenario: Scenario,
) -> Result<Measured, ExitError> {
    let failed = |e: String| ExitError::failed(e);
    let count = scenario.count();
    let (backfill, rate_limit) = match scenario {
        Scenario::Backfill { rate_limit, .. } => (true, rate_limit),
        Scenario::Stream { .. } => (false, 0),
    };
    let streaming = !backfill;
    let running_sink = sink::start(SinkArgs {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        latency: args.sink_latency,
        client_secret: "bench-secret".into(),
        // The stream scenario reads every event's arrival time back for latencies.
        keep_events: if streaming { count as usize } else { 0 },
        ..SinkArgs::default()
    })
    .await
    .map_err(|e| failed(e.to_string()))?;
    let dir = std::env::temp_dir().join(format!("event-exporter-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| failed(e.to_string()))?;
    std::fs::write(dir.join("secret"), "bench-secret").map_err(|e| failed(e.to_string()))?;
    std::fs::write(
        dir.join("config.toml"),
        format!(
            r#"[exporter.metadata]
cluster = "bench"
[exporter.sink]
endpoint = "{sink}"
[exporter.oidc]
token_url = "{token}"
client_id = "nvsentinel-exporter"
scope = "events:write"
[exporter.backfill]
enabled = {backfill}
max_age = "48h"
max_events = {max_events}
batch_size = 500
rate_limit = {rate_limit}
[exporter.failure_handling]
max_retries = 5
initial_backoff = "100ms"
max_backoff = "2s"
backoff_multiplier = 2.0
"#,
            sink = running_sink.events_url(),
            token = running_sink.token_url().unwrap_or_default(),
            max_events = count.max(1),
        ),
    )
    .map_err(|e| failed(e.to_string()))?;

    let mut started = Instant::now();
    let mut child = spawn_exporter(&dir, server, database, args.workers).map_err(failed)?;
    let mut writer = None;
    if streaming {
        // Once the exporter has written its first token it is streaming: then write.
        wait_for_token(client).await.map_err(failed)?;
        writer = Some(tokio::spawn(write_stream(server.settings(database), count)));
        started = Instant::now();
    }
    let mut samples = Vec::new();
    let mut last_progress = Instant::now();
    let mut cpu_seconds = 0.0;
    let mut peak_rss_mib = 0.0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let accepted = running_sink.accepted();
        samples.push((started.elapsed().as_secs_f64(), accepted));
        if let Some((cpu, rss)) = process_usage(child.id()) {
            cpu_seconds = cpu;
            peak_rss_mib = rss;
        }
        if accepted >= count {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(failed(format!("the exporter exited early with {status}")));
        }
        if last_progress.elapsed() > Duration::from_secs(5) {
            eprintln!("bench: {accepted}/{count}");
            last_progress = Instant::now();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    if let Some(writer) = writer {
        writer
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(failed)?;
    }
    let latency = streaming.then(|| {
        sink::latency_percentiles(
            &running_sink.events(),
            chrono::DateTime::<chrono::Utc>::MIN_UTC,
        )
    });
    let _ = running_sink.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measured {
        events: count,
        seconds,
        cpu_seconds,
        peak_rss_mib,
        samples,
        latency,
    })
}

/// Waits until the exporter has written its resume token (it is then streaming).
async fn wait_for_token(client: &tokio_postgres::Client) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let row = client
            .query_opt(
                "SELECT 1 FROM resume_tokens WHERE client_name = 'event-exporter'",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        if row.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("the exporter did not start streaming within 60 s".into())
}

/// Writes `count` live events as fast as PostgreSQL takes them, in batches of 100.
async fn write_stream(
    settings: event_exporter::datastore::postgres::PgSettings,
    count: u64,
) -> Result<(), String> {
    let connector =
        event_exporter::datastore::postgres::Connector::new(settings).map_err(|e| e.to_string())?;
    let client = connector.connect().await.map_err(|e| e.to_string())?;
    let mut generator = Generator::new(256, 0.1, Some(2));
    let mut written = 0;
    while written < count {
        let batch = (count - written).min(100);
        let now = chrono::Utc::now();
        let rows: Vec<_> = (0..batch).map(|_| generator.row(now, None)).collect();
        generate::insert(&client, &rows)
            .await
            .map_err(|e| e.to_string())?;
        written += batch;
    }
    Ok(())
}

fn spawn_exporter(
    dir: &Path,
    server: &LocalServer,
    database: &str,
    workers: usize,
) -> Result<Child, String> {
    let binary = std::env::current_exe().map_err(|e| e.to_string())?;
    // This binary's hidden `exporter` command runs the product's exporter (same code and
    // flags as the `event-exporter` binary).
    Command::new(binary)
        .arg("exporter")
        .arg(format!("--config={}", dir.join("config.toml").display()))
        .arg(format!(
            "--oidc-secret-path={}",
            dir.join("secret").display()
        ))
        .arg("--metrics-port=0")
        .arg(format!("--workers={workers}"))
        .env("LOG_LEVEL", "warn")
        .env("DATASTORE_PROVIDER", "postgresql")
        .env("DATASTORE_HOST", server.host())
        .env("DATASTORE_PORT", server.port().to_string())
        .env("DATASTORE_DATABASE", database)
        .env("DATASTORE_USERNAME", server.user())
        .env("DATASTORE_SSLMODE", "disable")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the exporter: {e}"))
}

/// CPU seconds used and peak resident memory (MiB) of process `pid`, from /proc.
fn process_usage(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    // Linux reports CPU time in clock ticks of 1/100 s.
    Some((ticks / 100.0, peak_kib / 1024.0))
}

/// The lowest and highest rate (events/s) over every `window`-second span between the first
/// and the last delivery, stepping by one second; `None` when the run has no such span.
fn window_rates(samples: &[(f64, u64)], window: f64) -> Option<(f64, f64)> {
    let at = |t: f64| -> f64 {
        // Linear interpolation between samples.
        match samples.iter().position(|(time, _)| *time >= t) {
            Some(0) | None => samples.last().map(|s| s.1 as f64).unwrap_or(0.0),
            Some(i) => {
                let (t0, a0) = samples[i - 1];
                let (t1, a1) = samples[i];
                a0 as f64 + (a1 as f64 - a0 as f64) * (t - t0) / (t1 - t0).max(1e-9)
            }
        }
    };
    let first = samples
        .iter()
        .find(|(_, a)| *a > 0)
        .map(|s| s.0)
        .unwrap_or(0.0);
    let last = samples.last().map(|s| s.0).unwrap_or(0.0);
    let (mut low, mut high) = (f64::MAX, 0.0f64);
    let mut start = first + 1.0;
    while start + window <= last {
        let rate = (at(start + window) - at(start)) / window;
        low = low.min(rate);
        high = high.max(rate);
        start += 1.0;
    }
    (low <= high).then_some((low, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_rates_of_a_steady_series() {
        let samples: Vec<(f64, u64)> = (0..=400).map(|i| (i as f64 * 0.1, i * 100)).collect();
        let (low, high) = window_rates(&samples, 10.0).expect("a full window");
        assert!(
            (low - 1000.0).abs() < 1.0 && (high - 1000.0).abs() < 1.0,
            "{low} {high}"
        );
        let short = &samples[..100];
        assert_eq!(
            window_rates(short, 10.0),
            None,
            "10 s of samples: no full window"
        );
    }

    #[test]
    fn process_usage_reads_this_process() {
        let (cpu, rss) = process_usage(std::process::id()).expect("/proc is readable");
        assert!(cpu >= 0.0 && rss > 0.0);
    }
}
