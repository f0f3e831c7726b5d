//! `event-exporter-dev bench`: measures the exporter on this machine, in one run, and prints
//! figures and ratios to anchors measured in the same run rather than asserting times
//! (machines here are shared; no test asserts a time).
//!
//! Scenarios, each against a fresh database on the local PostgreSQL:
//! - **ceiling**: `wrk` POSTing a CloudEvent to the bench's nginx (Debian's, answering 202,
//!   started on loopback from a generated configuration; see `nginx`);
//! - **drain**: a backlog of `--drain-events` changelog rows, written while the exporter is
//!   stopped, drained on restart into that nginx (ratio to the ceiling) and into the reference
//!   sink; `--callgrind` adds a drain of `--callgrind-events` under `valgrind --tool=callgrind`
//!   and prints instructions per event (repeatable on a busy machine, unlike times);
//! - **slow sink**: the reference sink answering after `--slow-latency`, at each of
//!   `--slow-workers` (ratio to workers/latency);
//! - **latency**: events written at each of `--stream-rates` events/s while the exporter
//!   streams; p50/p99 from the commit of the writer's INSERT (when it returned) to arrival;
//! - **backfill**: a history of `--backfill-events` events backfilled at full speed, and at each
//!   `--rates` limit (how closely every 10 s window holds it).
//!
//! The exporter runs as a child process (this binary), so its CPU time and peak RSS (from
//! /proc) are its own; PostgreSQL, the sinks and the writer share the machine with it.

mod child;
mod nginx;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use crate::generate::{self, Generator};
use crate::local_postgres::LocalServer;
use crate::sink::{self, RunningSink, SinkArgs};
use child::ExporterConfig;
use event_exporter::exporter::ExitError;
use nginx::Nginx;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Changelog rows in each drain (into nginx and into the reference sink); 0 skips.
    #[arg(long, default_value_t = 100_000)]
    pub drain_events: u64,
    /// Events in the full-speed backfill; 0 skips.
    #[arg(long, default_value_t = 100_000)]
    pub backfill_events: u64,
    /// Commit-to-sink latency runs: events/s written while the exporter streams.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub stream_rates: Vec<u64>,
    /// How long each latency run writes.
    #[arg(long, default_value = "10s", value_parser = event_exporter::cli::parse_duration)]
    pub stream_run: Duration,
    /// Latency runs: each resume-token write sleeps this long in PostgreSQL (a trigger), as a
    /// remote or busy datastore's round trip would; 0 adds none.
    #[arg(long, default_value = "0s", value_parser = event_exporter::cli::parse_duration)]
    pub token_write_delay: Duration,
    /// Worker counts to run against the slow sink; 0 entries are skipped.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub slow_workers: Vec<usize>,
    /// The slow sink's latency per request.
    #[arg(long, default_value = "300ms", value_parser = event_exporter::cli::parse_duration)]
    pub slow_latency: Duration,
    /// How long each slow-sink run should last (it sends workers/latency × this many events).
    #[arg(long, default_value = "10s", value_parser = event_exporter::cli::parse_duration)]
    pub slow_run: Duration,
    /// Backfill rate limits (events/s) to check, comma-separated; 0 entries are skipped.
    #[arg(long, value_delimiter = ',', default_value = "5000")]
    pub rates: Vec<u64>,
    /// How long each rate-limited backfill runs.
    #[arg(long, default_value = "12s", value_parser = event_exporter::cli::parse_duration)]
    pub rate_run: Duration,
    /// Concurrent publishes (`workers`) in every scenario but the slow sink's.
    #[arg(long, default_value_t = 10)]
    pub workers: usize,
    /// Also drain `--callgrind-events` under `valgrind --tool=callgrind` (needs valgrind;
    /// slow: about 50 times the native time) and print instructions per event.
    #[arg(long)]
    pub callgrind: bool,
    /// Changelog rows in the callgrind drain.
    #[arg(long, default_value_t = 20_000)]
    pub callgrind_events: u64,
    /// The nginx binary (Debian: `apt-get install nginx-light`).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    pub nginx: PathBuf,
    /// The wrk binary (`apt-get install wrk`); without it the ceiling ratio is skipped.
    #[arg(long, default_value = "wrk")]
    pub wrk: PathBuf,
    /// How long wrk measures the nginx ceiling.
    #[arg(long, default_value = "5s", value_parser = event_exporter::cli::parse_duration)]
    pub wrk_run: Duration,
}

/// Upstream's published numbers (issue #1514, v1.15.0): a 1,000,000-event backlog caught up at
/// 400–431 events/s using 0.58–0.72 cores and 39–42 MiB.
const UPSTREAM_EVENTS_PER_SECOND: f64 = 431.0;

/// Where the sink is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SinkKind {
    /// The reference sink, answering after this latency.
    Reference(Duration),
    /// The bench's nginx answering 202.
    Nginx,
}

/// How the events reach the exporter.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Feed {
    /// A backlog of `count` changelog rows written while the exporter was stopped after it
    /// had written its resume token: the restart drains them through the changelog reader.
    Drain { count: u64 },
    /// `count` events written at `rate` events/s while the exporter streams.
    Stream { rate: u64, count: u64 },
    /// A history of `count` events backfilled (rate limit `rate_limit`, 0 = none).
    Backfill { count: u64, rate_limit: u64 },
}

impl Feed {
    fn count(self) -> u64 {
        match self {
            Feed::Drain { count } | Feed::Stream { count, .. } | Feed::Backfill { count, .. } => {
                count
            }
        }
    }
}

/// One run: where events come from, where they go, with how many workers.
#[derive(Debug, Clone, Copy)]
struct Plan {
    feed: Feed,
    sink: SinkKind,
    workers: usize,
    callgrind: bool,
}

struct Measured {
    events: u64,
    /// From the exporter's start (streaming: the writer's start) to the last delivery.
    seconds: f64,
    /// Events/s from the first delivery to the last (without start-up).
    steady_rate: f64,
    cpu_seconds: f64,
    peak_rss_mib: f64,
    /// (seconds since start, delivered so far), sampled every 100 ms.
    samples: Vec<(f64, u64)>,
    /// Commit-to-sink latency percentiles (p50, p99) of streamed events.
    latency: Option<(Duration, Duration)>,
    /// Streaming: each batch's `time` and when its INSERT committed, in time order.
    commits: Vec<(Stamp, Stamp)>,
    /// Instructions the exporter executed (callgrind runs).
    instructions: Option<u64>,
}

impl Measured {
    fn cpu_us_per_event(&self) -> f64 {
        self.cpu_seconds / self.events.max(1) as f64 * 1e6
    }

    /// `events/s (steady …/s), CPU µs/event, cores, peak RSS` for a result line.
    fn figures(&self) -> String {
        format!(
            "{} events in {:.1} s = {:.0} events/s (steady {:.0}/s); exporter CPU {:.1} µs/event \
             ({:.2} cores), peak RSS {:.1} MiB",
            self.events,
            self.seconds,
            self.events as f64 / self.seconds,
            self.steady_rate,
            self.cpu_us_per_event(),
            self.cpu_seconds / self.seconds,
            self.peak_rss_mib,
        )
    }
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
    let result = run_scenarios(&args, &server).await.map_err(failed);
    server.stop();
    result
}

async fn run_scenarios(args: &BenchArgs, server: &LocalServer) -> Result<(), String> {
    // The load average says how much else ran on the machine (the figures are shared-machine
    // figures; the ratios compare runs made under the same load).
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "benchmark: {} workers, {} cores, load average {}, {}; {}",
        args.workers,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        nginx::NEEDS
    );
    if args.drain_events > 0 {
        drains(args, server).await?;
    }
    if args.callgrind && args.callgrind_events > 0 {
        callgrind(args, server).await?;
    }
    slow_sink(args, server).await?;
    latency(args, server).await?;
    if args.backfill_events > 0 {
        backfills(args, server).await?;
    }
    Ok(())
}

/// The wrk → nginx ceiling, then the drain into nginx and into the reference sink.
async fn drains(args: &BenchArgs, server: &LocalServer) -> Result<(), String> {
    let ceiling = ceiling(args)?;
    let feed = Feed::Drain {
        count: args.drain_events,
    };
    let plan = |sink| Plan {
        feed,
        sink,
        workers: args.workers,
        callgrind: false,
    };
    let into_nginx = run_plan(server, plan(SinkKind::Nginx), args).await?;
    let ratio = match ceiling {
        Some(ceiling) => format!(
            "{:.1}% of the wrk → nginx ceiling ({ceiling:.0} POST/s, {} connections)",
            into_nginx.steady_rate / ceiling * 100.0,
            args.workers
        ),
        None => format!(
            "no ratio to the nginx ceiling: {} is not installed",
            args.wrk.display()
        ),
    };
    println!("drain into nginx: {}; {ratio}", into_nginx.figures());
    let into_reference = run_plan(server, plan(SinkKind::Reference(Duration::ZERO)), args).await?;
    println!(
        "drain into the reference sink: {}",
        into_reference.figures()
    );
    Ok(())
}

/// wrk's POSTs/s into a fresh nginx; `None` (and a line saying so) without wrk.
fn ceiling(args: &BenchArgs) -> Result<Option<f64>, String> {
    let dir = scratch_dir("nginx-ceiling");
    let nginx = Nginx::start(&args.nginx, &dir.join("nginx"))?;
    let body = sample_body();
    let measured = nginx::wrk_ceiling(
        &args.wrk,
        &nginx.url(),
        &body,
        args.workers,
        args.wrk_run,
        &dir,
    );
    nginx.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let measured = measured?;
    match measured {
        Some(rate) => println!(
            "ceiling: wrk → nginx (202), {} connections, {} B body: {rate:.0} POST/s",
            args.workers,
            body.len()
        ),
        None => println!(
            "ceiling: skipped, {} is not installed (`apt-get install wrk`)",
            args.wrk.display()
        ),
    }
    Ok(measured)
}

/// A CloudEvent body like the ones the exporter sends (for wrk).
fn sample_body() -> Vec<u8> {
    let mut generator = Generator::new(256, 0.0, Some(3));
    let row = generator.row(chrono::Utc::now(), None);
    let event = event_exporter::model::decode_document(&row.document)
        .ok()
        .flatten()
        .unwrap_or_default();
    let metadata = [("cluster".to_string(), "bench".to_string())].into();
    event_exporter::cloudevent::Transformer::new(metadata).encode(
        "7f0c1a2e-0000-4000-8000-000000000001",
        &event,
        None,
    )
}

async fn callgrind(args: &BenchArgs, server: &LocalServer) -> Result<(), String> {
    let plan = Plan {
        feed: Feed::Drain {
            count: args.callgrind_events,
        },
        sink: SinkKind::Reference(Duration::ZERO),
        workers: args.workers,
        callgrind: true,
    };
    let measured = run_plan(server, plan, args).await?;
    match measured.instructions {
        Some(instructions) => println!(
            "callgrind drain into the reference sink: {} events, {:.1}k instructions/event \
             (the whole process, start-up and shutdown included: {instructions})",
            measured.events,
            instructions as f64 / measured.events.max(1) as f64 / 1000.0,
        ),
        None => println!("callgrind drain: no callgrind profile was written"),
    }
    Ok(())
}

/// The slow sink at each worker count: ratio to workers/latency.
async fn slow_sink(args: &BenchArgs, server: &LocalServer) -> Result<(), String> {
    let latency = args.slow_latency.as_secs_f64().max(1e-3);
    for &workers in args.slow_workers.iter().filter(|w| **w > 0) {
        let ideal = workers as f64 / latency;
        let count = (ideal * args.slow_run.as_secs_f64()).ceil().max(1.0) as u64;
        let plan = Plan {
            feed: Feed::Drain { count },
            sink: SinkKind::Reference(args.slow_latency),
            workers,
            callgrind: false,
        };
        let measured = run_plan(server, plan, args).await?;
        println!(
            "{:?} sink, {workers} workers: {}; {:.1}% of workers/latency ({ideal:.1}/s)",
            args.slow_latency,
            measured.figures(),
            measured.steady_rate / ideal * 100.0,
        );
    }
    Ok(())
}

/// Commit-to-sink latency at each streaming rate.
async fn latency(args: &BenchArgs, server: &LocalServer) -> Result<(), String> {
    for &rate in args.stream_rates.iter().filter(|r| **r > 0) {
        let count = (rate as f64 * args.stream_run.as_secs_f64()).max(1.0) as u64;
        let plan = Plan {
            feed: Feed::Stream { rate, count },
            sink: SinkKind::Reference(Duration::ZERO),
            workers: args.workers,
            callgrind: false,
        };
        let measured = run_plan(server, plan, args).await?;
        let (p50, p99) = measured.latency.unwrap_or_default();
        // The writer's INSERTs may not keep the rate on a busy machine: say so, since the
        // load is then the writer's own limit, not the rate asked for.
        let achieved = measured.events as f64 / measured.seconds;
        let held = if achieved < rate as f64 * 0.95 {
            format!(" (the writer reached only {achieved:.0} events/s)")
        } else {
            String::new()
        };
        println!(
            "stream at {rate} events/s{held}: commit-to-sink p50 {p50:.1?}, p99 {p99:.1?}; {}",
            measured.figures()
        );
    }
    Ok(())
}

/// The full-speed backfill, then each rate-limited one.
async fn backfills(args: &BenchArgs, server: &LocalServer) -> Result<(), String> {
    let plan = |count, rate_limit| Plan {
        feed: Feed::Backfill { count, rate_limit },
        sink: SinkKind::Reference(Duration::ZERO),
        workers: args.workers,
        callgrind: false,
    };
    let unlimited = run_plan(server, plan(args.backfill_events, 0), args).await?;
    println!(
        "backfill, unlimited: {}; {:.1}x upstream's {UPSTREAM_EVENTS_PER_SECOND:.0}/s",
        unlimited.figures(),
        unlimited.events as f64 / unlimited.seconds / UPSTREAM_EVENTS_PER_SECOND,
    );
    for &limit in args.rates.iter().filter(|limit| **limit > 0) {
        let count = (limit as f64 * args.rate_run.as_secs_f64()) as u64;
        let measured = run_plan(server, plan(count, limit), args).await?;
        let held = match window_rates(&measured.samples, 10.0) {
            Some((low, high)) => format!(
                "10 s windows held {:.1}%–{:.1}% of the limit",
                low / limit as f64 * 100.0,
                high / limit as f64 * 100.0
            ),
            None => "no full 10 s window (use --rate-run of 12s or more)".into(),
        };
        println!(
            "backfill, rate_limit {limit}/s: {}; {held}",
            measured.figures()
        );
    }
    Ok(())
}

/// A temporary directory for one run.
fn scratch_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "event-exporter-bench-{}-{name}",
        std::process::id()
    ))
}

/// Runs `plan` against a fresh database, dropped afterwards.
async fn run_plan(server: &LocalServer, plan: Plan, args: &BenchArgs) -> Result<Measured, String> {
    let database = format!("event_exporter_bench_{}", std::process::id());
    server
        .create_database(&database)
        .await
        .map_err(|e| e.to_string())?;
    let dir = scratch_dir("run");
    let result = async {
        let client = server
            .schema_client(&database)
            .await
            .map_err(|e| e.to_string())?;
        if matches!(plan.feed, Feed::Stream { .. }) {
            slow_token_writes(&client, args.token_write_delay).await?;
        }
        let mut sinks = Sinks::start(plan, args, &dir).await?;
        let result = drive(server, &database, &client, &dir, plan, &mut sinks).await;
        let events = sinks.stop().await;
        result.map(|measured| Measured {
            latency: matches!(plan.feed, Feed::Stream { .. }).then(|| {
                sink::latency_percentiles_from(&events, |time| {
                    committed_at(&measured.commits, time)
                })
            }),
            ..measured
        })
    }
    .await;
    let _ = server.drop_database(&database).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The sinks of one run: the reference sink always (it issues the tokens), nginx when the
/// events go there.
struct Sinks {
    reference: RunningSink,
    nginx: Option<Nginx>,
}

impl Sinks {
    async fn start(plan: Plan, args: &BenchArgs, dir: &std::path::Path) -> Result<Sinks, String> {
        let (latency, nginx) = match plan.sink {
            SinkKind::Reference(latency) => (latency, None),
            SinkKind::Nginx => (
                Duration::ZERO,
                Some(Nginx::start(&args.nginx, &dir.join("nginx"))?),
            ),
        };
        let keep_events = match plan.feed {
            // The latency runs read every event's arrival time back.
            Feed::Stream { count, .. } => count as usize,
            _ => 0,
        };
        let reference = sink::start(SinkArgs {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            latency,
            client_secret: "bench-secret".into(),
            keep_events,
            ..SinkArgs::default()
        })
        .await
        .map_err(|e| e.to_string())?;
        Ok(Sinks { reference, nginx })
    }

    fn events_url(&self) -> String {
        match &self.nginx {
            Some(nginx) => nginx.url(),
            None => self.reference.events_url(),
        }
    }

    fn delivered(&mut self) -> u64 {
        match &mut self.nginx {
            Some(nginx) => nginx.answered(),
            None => self.reference.accepted(),
        }
    }

    /// Stops both; the events the reference sink kept.
    async fn stop(self) -> Vec<sink::ReceivedEvent> {
        if let Some(nginx) = self.nginx {
            nginx.stop();
        }
        let events = self.reference.events();
        let _ = self.reference.shutdown().await;
        events
    }
}

/// Configures and starts the exporter, feeds it, and watches the sink until every event
/// arrived.
async fn drive(
    server: &LocalServer,
    database: &str,
    client: &tokio_postgres::Client,
    dir: &std::path::Path,
    plan: Plan,
    sinks: &mut Sinks,
) -> Result<Measured, String> {
    let (backfill, rate_limit) = match plan.feed {
        Feed::Backfill { rate_limit, .. } => (true, rate_limit),
        _ => (false, 0),
    };
    let sink_url = sinks.events_url();
    let token_url = sinks.reference.token_url().unwrap_or_default();
    child::write_config(
        dir,
        &ExporterConfig {
            sink_url: &sink_url,
            token_url: &token_url,
            backfill,
            max_events: plan.feed.count(),
            rate_limit,
        },
    )?;
    prepare(server, database, client, dir, plan).await?;
    let mut started = Instant::now();
    let exporter = child::spawn(dir, server, database, plan.workers, plan.callgrind)?;
    let mut writer = None;
    if let Feed::Stream { rate, count } = plan.feed {
        if let Err(e) = child::wait_for_token(client).await {
            child::stop(exporter);
            return Err(e);
        }
        writer = Some(tokio::spawn(write_paced(
            server.settings(database),
            rate,
            count,
        )));
        started = Instant::now();
    }
    let watched = watch(exporter, sinks, plan.feed.count(), started).await;
    let commits = match writer {
        Some(writer) => writer.await.map_err(|e| e.to_string())??,
        None => Vec::new(),
    };
    let mut measured = Measured {
        commits,
        ..watched?
    };
    if plan.callgrind {
        let profile = std::fs::read_to_string(child::callgrind_out(dir)).unwrap_or_default();
        measured.instructions = child::callgrind_instructions(&profile);
    }
    Ok(measured)
}

/// Writes what the exporter finds at its start: a backlog above its resume token (written
/// by a first run of the exporter, then stopped), or a history to backfill.
async fn prepare(
    server: &LocalServer,
    database: &str,
    client: &tokio_postgres::Client,
    dir: &std::path::Path,
    plan: Plan,
) -> Result<(), String> {
    let (count, history) = match plan.feed {
        Feed::Stream { .. } => return Ok(()),
        Feed::Drain { count } => {
            let first = child::spawn(dir, server, database, plan.workers, false)?;
            let started = child::wait_for_token(client).await;
            child::stop(first);
            started?;
            (count, None)
        }
        Feed::Backfill { count, .. } => (count, Some(Duration::from_secs(24 * 3600))),
    };
    eprintln!("bench: writing {count} events");
    let mut generator = Generator::new(256, 0.1, Some(1));
    generate::write_history(client, &mut generator, count, history)
        .await
        .map_err(|e| e.to_string())?;
    client
        .batch_execute("ANALYZE health_events; ANALYZE datastore_changelog")
        .await
        .map_err(|e| e.to_string())
}

/// Samples the sink and the exporter every 100 ms until `count` events arrived, then stops
/// the exporter. Fails if the exporter exits first or nothing arrives for two minutes.
async fn watch(
    mut exporter: std::process::Child,
    sinks: &mut Sinks,
    count: u64,
    started: Instant,
) -> Result<Measured, String> {
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let (mut cpu_seconds, mut peak_rss_mib) = (0.0, 0.0);
    let mut last_change = (Instant::now(), 0);
    let mut last_report = Instant::now();
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let delivered = sinks.delivered();
        samples.push((started.elapsed().as_secs_f64(), delivered));
        if let Some((cpu, rss)) = child::process_usage(exporter.id()) {
            (cpu_seconds, peak_rss_mib) = (cpu, rss);
        }
        if delivered >= count {
            break Ok(());
        }
        if let Ok(Some(status)) = exporter.try_wait() {
            break Err(format!("the exporter exited early with {status}"));
        }
        if delivered != last_change.1 {
            last_change = (Instant::now(), delivered);
        } else if last_change.0.elapsed() > Duration::from_secs(120) {
            break Err(format!("no progress for 2 minutes at {delivered}/{count}"));
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("bench: {delivered}/{count}");
            last_report = Instant::now();
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    child::stop(exporter);
    outcome?;
    Ok(Measured {
        events: count,
        seconds,
        steady_rate: steady_rate(&samples).unwrap_or(count as f64 / seconds),
        cpu_seconds,
        peak_rss_mib,
        samples,
        latency: None,
        commits: Vec::new(),
        instructions: None,
    })
}

/// Events/s between the first sample with a delivery and the last sample.
fn steady_rate(samples: &[(f64, u64)]) -> Option<f64> {
    let (t0, a0) = *samples.iter().find(|(_, delivered)| *delivered > 0)?;
    let (t1, a1) = *samples.last()?;
    (t1 > t0).then(|| (a1 - a0) as f64 / (t1 - t0))
}

type Stamp = chrono::DateTime<chrono::Utc>;

/// Makes every resume-token write sleep `delay` in PostgreSQL (nothing for zero). The token
/// store writes with `INSERT … ON CONFLICT DO UPDATE`, which fires the BEFORE INSERT trigger
/// once per write (a BEFORE UPDATE one would fire too on a conflict, doubling the delay).
async fn slow_token_writes(client: &tokio_postgres::Client, delay: Duration) -> Result<(), String> {
    if delay.is_zero() {
        return Ok(());
    }
    let sql = format!(
        "CREATE FUNCTION bench_slow_token() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep({}); RETURN NEW; END $$; \
         CREATE TRIGGER bench_slow_token BEFORE INSERT ON resume_tokens \
         FOR EACH ROW EXECUTE FUNCTION bench_slow_token();",
        delay.as_secs_f64()
    );
    client.batch_execute(&sql).await.map_err(|e| e.to_string())
}

/// When the batch whose `time` is nearest to `time` committed (batches are at least 10 ms
/// apart, far more than the `time` field's precision).
fn committed_at(commits: &[(Stamp, Stamp)], time: Stamp) -> Option<Stamp> {
    let after = commits.partition_point(|(stamp, _)| *stamp < time);
    let distance = |i: usize| commits.get(i).map(|(stamp, _)| (*stamp - time).abs());
    let nearest = match (after.checked_sub(1).and_then(distance), distance(after)) {
        (Some(before), Some(later)) if before < later => after - 1,
        (Some(_), None) => after - 1,
        _ => after,
    };
    commits.get(nearest).map(|(_, committed)| *committed)
}

/// Writes `count` live events at `rate` events/s (in up to 100 batches a second); returns
/// each batch's `time` and when its INSERT (one autocommit statement) returned.
async fn write_paced(
    settings: event_exporter::datastore::postgres::PgSettings,
    rate: u64,
    count: u64,
) -> Result<Vec<(Stamp, Stamp)>, String> {
    let connector =
        event_exporter::datastore::postgres::Connector::new(settings).map_err(|e| e.to_string())?;
    let client = connector.connect().await.map_err(|e| e.to_string())?;
    let mut generator = Generator::new(256, 0.1, Some(2));
    let ticks_per_second = rate.clamp(1, 100);
    let per_tick = (rate / ticks_per_second).max(1);
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / ticks_per_second.max(1) as u32);
    let mut written = 0;
    let mut commits = Vec::new();
    while written < count {
        ticks.tick().await;
        let batch = per_tick.min(count - written);
        let now = chrono::Utc::now();
        let rows: Vec<_> = (0..batch).map(|_| generator.row(now, None)).collect();
        generate::insert(&client, &rows)
            .await
            .map_err(|e| e.to_string())?;
        commits.push((now, chrono::Utc::now()));
        written += batch;
    }
    Ok(commits)
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
    fn steady_rate_leaves_out_the_start() {
        // Nothing for 2 s (start-up), then 1,000 events/s.
        let samples: Vec<(f64, u64)> = (0..=50)
            .map(|i| {
                let t = i as f64 * 0.1;
                (
                    t,
                    if t < 2.0 {
                        0
                    } else {
                        ((t - 1.9) * 1000.0).round() as u64
                    },
                )
            })
            .collect();
        let rate = steady_rate(&samples).expect("deliveries");
        assert!((rate - 1000.0).abs() < 1.0, "{rate}");
        assert_eq!(steady_rate(&[(0.1, 0), (0.2, 0)]), None);
    }

    #[test]
    fn committed_at_takes_the_batch_nearest_to_the_time() {
        let t0 = chrono::Utc::now();
        let ms = chrono::Duration::milliseconds;
        let commits = [(t0, t0 + ms(3)), (t0 + ms(10), t0 + ms(40))];
        // `time` rounded to the millisecond still finds its own batch.
        assert_eq!(committed_at(&commits, t0 + ms(1)), Some(t0 + ms(3)));
        assert_eq!(committed_at(&commits, t0 + ms(9)), Some(t0 + ms(40)));
        assert_eq!(committed_at(&commits, t0 - ms(1)), Some(t0 + ms(3)));
        assert_eq!(committed_at(&commits, t0 + ms(99)), Some(t0 + ms(40)));
        assert_eq!(committed_at(&[], t0), None);
    }
}
