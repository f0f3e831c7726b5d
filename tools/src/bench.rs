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
//!   `--slow-workers` (ratio to workers/latency), and with `exporter.sink.concurrency =
//!   "adaptive"` and a ceiling of `--adaptive-workers` (ratio to ceiling/latency, and the
//!   exporter's `health_events_exporter_concurrency_limit` at the end), next door and, with
//!   `--remote-handshake`, as if across a WAN (over TLS, every new connection held that long
//!   before its handshake);
//! - **latency**: events written at each of `--stream-rates` events/s from
//!   `--stream-connections` connections while the exporter streams; p50/p99 from each row's
//!   commit (the return of its INSERT) to its arrival, and the rate the writer reached; then
//!   the same at each of `--batch-stream-rates` with `exporter.sink.mode = "batch"` (the
//!   batched content mode at its defaults: up to 100 events per request, 10 ms linger);
//! - **backfill**: a history of `--backfill-events` events backfilled at full speed, and at each
//!   `--rates` limit (how closely every 10 s window holds it).
//!
//! The exporter runs as a child process (this binary), so its CPU time and peak RSS (from
//! /proc) are its own; PostgreSQL, the sinks and the writer share the machine with it. At the
//! end the run's figures are judged against issue 17's targets (`targets`) and printed as a
//! Markdown table.

mod child;
mod error;
mod nginx;
mod seed;
mod targets;
mod writer;

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Args;

use crate::generate::Generator;
use crate::local_postgres::LocalServer;
use crate::sink::{self, RunningSink, SinkArgs};
use child::ExporterConfig;
use error::sql;
pub use error::BenchError;
use event_exporter::exporter::ExitError;
use nginx::Nginx;
use targets::{Scorecard, Target, WRITER_REACHED};
use writer::Written;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Changelog rows in each drain (into nginx and into the reference sink); 0 skips.
    #[arg(long, default_value_t = 100_000)]
    pub drain_events: u64,
    /// Events in the full-speed backfill; 0 skips it and the rate-limited ones (`--rates`).
    #[arg(long, default_value_t = 100_000)]
    pub backfill_events: u64,
    /// Commit-to-sink latency runs: events/s written while the exporter streams.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub stream_rates: Vec<u64>,
    /// Latency runs in batched mode (`exporter.sink.mode = "batch"`, default batch limits):
    /// events/s written while the exporter streams; 0 entries are skipped.
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    pub batch_stream_rates: Vec<u64>,
    /// Latency runs: drop `health_events`' ten secondary indexes (NVSentinel's schema keeps
    /// them; the exporter does not read through them). On a small machine shared by
    /// PostgreSQL, the writer, the sink and the exporter, maintaining them takes most of the
    /// CPU at 10,000 rows/s; without them the runs show what the exporter adds.
    #[arg(long)]
    pub lean_schema: bool,
    /// How long each latency run writes.
    #[arg(long, default_value = "10s", value_parser = event_exporter::cli::parse_duration)]
    pub stream_run: Duration,
    /// PostgreSQL connections the latency runs' writer writes from (one connection is one
    /// backend on one core; with NVSentinel's schema it takes well under 10,000 rows/s).
    #[arg(long, default_value_t = 4)]
    pub stream_connections: usize,
    /// Latency runs: each resume-token write sleeps this long in PostgreSQL (a trigger), as a
    /// remote or busy datastore's round trip would; 0 adds none.
    #[arg(long, default_value = "0s", value_parser = event_exporter::cli::parse_duration)]
    pub token_write_delay: Duration,
    /// Worker counts to run against the slow sink; 0 entries are skipped.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub slow_workers: Vec<usize>,
    /// The ceiling (`workers`) of the adaptive-concurrency run against the slow sink; 0 skips.
    #[arg(long, default_value_t = 100)]
    pub adaptive_workers: usize,
    /// The adaptive run again against a remote slow sink: the reference sink over TLS (a
    /// self-signed certificate, trusted by `ca_file`) holds every new connection this long
    /// before its handshake, as TCP's and TLS's handshakes take two network round trips (the
    /// default, 600 ms, is twice the default `--slow-latency`); 0 skips.
    #[arg(long, default_value = "600ms", value_parser = event_exporter::cli::parse_duration)]
    pub remote_handshake: Duration,
    /// The saturated sink's capacity: the slow sink answering at most this many requests at
    /// once (the rest queue), against `--adaptive-workers` fixed workers and the adaptive
    /// limit with that ceiling; 0 skips.
    #[arg(long, default_value_t = 10)]
    pub saturated_capacity: u32,
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
    /// The exporter's async worker threads (`TOKIO_WORKER_THREADS`); the default, 1, is what
    /// the exporter runs with in a pod under the chart's default CPU limit (`limits.cpu: "1"`).
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub exporter_threads: usize,
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
    /// The reference sink, answering after `latency`, at most `capacity` requests at a time
    /// (`--capacity`: the rest queue) when set, holding each new connection `handshake` first.
    Reference {
        latency: Duration,
        capacity: Option<u32>,
        handshake: Duration,
    },
    /// The bench's nginx answering 202.
    Nginx,
}

impl SinkKind {
    /// The reference sink answering after `latency`, with no capacity limit.
    fn reference(latency: Duration) -> SinkKind {
        SinkKind::Reference {
            latency,
            capacity: None,
            handshake: Duration::ZERO,
        }
    }
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
    /// `exporter.sink.concurrency = "adaptive"`, `workers` being the ceiling.
    adaptive: bool,
    /// `exporter.sink.mode = "batch"` (default batch limits).
    batch: bool,
}

impl Plan {
    fn new(feed: Feed, sink: SinkKind, workers: usize) -> Plan {
        Plan {
            feed,
            sink,
            workers,
            callgrind: false,
            adaptive: false,
            batch: false,
        }
    }
}

struct Measured {
    events: u64,
    /// From the exporter's start (streaming: the writer's start) to the last delivery.
    seconds: f64,
    /// Events/s from the first delivery to the last (without start-up).
    steady_rate: f64,
    /// The exporter's CPU time and peak memory.
    usage: child::Usage,
    /// (seconds since start, delivered so far), sampled every 100 ms.
    samples: Vec<(f64, u64)>,
    /// Commit-to-sink latency percentiles (p50, p99) of streamed events.
    latency: Option<writer::Latency>,
    /// Streaming: what the writer wrote, and when each row committed.
    written: Option<Written>,
    /// Instructions the exporter executed (callgrind runs).
    instructions: Option<u64>,
    /// Adaptive runs: the exporter's concurrency limit gauge, (seconds since start, value),
    /// read every second and once after the last delivery.
    concurrency_limits: Vec<(f64, f64)>,
    /// The most requests the reference sink was answering (or queueing) at once.
    sink_max_in_flight: usize,
    /// When the reference sink accepted each event, in seconds since the first acceptance,
    /// ascending (empty for nginx runs).
    delivered_at: Vec<f64>,
    /// Streaming runs: the exporter's `events_in_flight` gauge, read every 100 ms.
    in_flight: Vec<f64>,
    /// CPU seconds this bench process (the writer and the reference sink) used during the run.
    bench_cpu_seconds: f64,
    /// The whole machine over the run: (cores busy, cores stolen by the hypervisor) on
    /// average, of `cpus`; how much CPU the exporter could have had (drains are closed loops
    /// on a machine the exporter shares with PostgreSQL and the sink).
    machine: Option<(f64, f64, usize)>,
    /// The exporter's metrics scraped after the last delivery (runs that scrape).
    last_metrics: Option<String>,
}

impl Measured {
    /// Adaptive runs: when the concurrency limit first reached `ceiling` (seconds since the
    /// start), and the delivery rate from then on (`None` with less than a second left).
    fn at_ceiling(&self, ceiling: usize) -> Option<(f64, Option<f64>)> {
        self.concurrency_limits
            .iter()
            .find(|(_, value)| *value >= ceiling as f64)
            .map(|(at, _)| (*at, rate_after(&self.samples, *at)))
    }

    fn cpu_us_per_event(&self) -> f64 {
        self.usage.cpu_seconds() / self.events.max(1) as f64 * 1e6
    }

    /// `events/s (steady …/s), CPU µs/event, cores, peak RSS` for a result line.
    fn figures(&self) -> String {
        format!(
            "{} events in {:.1} s = {:.0} events/s (steady {:.0}/s); exporter CPU {:.1} µs/event \
             ({:.0}% in the kernel; {:.2} cores), peak RSS {:.1} MiB{}",
            self.events,
            self.seconds,
            self.events as f64 / self.seconds,
            self.steady_rate,
            self.cpu_us_per_event(),
            self.usage.system_seconds / self.usage.cpu_seconds().max(1e-9) * 100.0,
            self.usage.cpu_seconds() / self.seconds,
            self.usage.peak_rss_mib,
            self.machine
                .map_or_else(String::new, |(busy, stolen, cpus)| format!(
                    "; the machine {busy:.2} of {cpus} cores busy, {stolen:.2} stolen"
                )),
        )
    }
}

pub async fn run(args: BenchArgs) -> Result<(), ExitError> {
    if cfg!(debug_assertions) {
        eprintln!(
            "bench: this is a debug build; use `cargo run --release -p event-exporter-dev -- bench` for real numbers"
        );
    }
    let server = LocalServer::find().await.map_err(ExitError::failed)?;
    let bench = Bench {
        args: &args,
        server: &server,
        card: Mutex::default(),
    };
    let result = bench.run_all().await.map_err(ExitError::failed);
    server.stop();
    result
}

/// The run's arguments and server, shared by every scenario.
struct Bench<'a> {
    args: &'a BenchArgs,
    server: &'a LocalServer,
    /// Issue 17's targets as the scenarios measure them; printed at the end.
    card: Mutex<Scorecard>,
}

impl Bench<'_> {
    /// The scorecard, for a moment (never held across an await).
    fn card(&self) -> std::sync::MutexGuard<'_, Scorecard> {
        self.card.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn run_all(&self) -> Result<(), BenchError> {
        let args = self.args;
        self.print_header();
        if args.drain_events > 0 {
            self.drains().await?;
        }
        if args.callgrind && args.callgrind_events > 0 {
            self.callgrind().await?;
        }
        self.slow_sink().await?;
        if args.adaptive_workers > 0 {
            self.adaptive().await?;
            if args.saturated_capacity > 0 {
                self.saturated().await?;
            }
        }
        self.latency().await?;
        if args.backfill_events > 0 {
            self.backfills().await?;
        }
        println!("\n{}", self.card().markdown());
        Ok(())
    }

    /// The machine and its load average: the figures are shared-machine figures, the ratios
    /// compare runs made under the same load.
    fn print_header(&self) {
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "benchmark: {} workers, exporter on {} thread(s), {} cores, load average {}, {}; {}",
            self.args.workers,
            self.args.exporter_threads,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
            nginx::NEEDS
        );
    }

    /// Runs one scenario and prints its result line, `line` of what it measured.
    async fn scenario(
        &self,
        plan: Plan,
        line: impl FnOnce(&Measured) -> String,
    ) -> Result<Measured, BenchError> {
        let callgrind = plan.callgrind;
        let measured = run_plan(self.server, plan, self.args).await?;
        let line = line(&measured);
        println!("{line}");
        // Under valgrind the process is valgrind's, not the exporter's as it runs.
        if !callgrind {
            let run = line.split(':').next().unwrap_or_default();
            self.card().peak_rss(run, measured.usage.peak_rss_mib);
        }
        Ok(measured)
    }

    /// The wrk → nginx ceiling, then the drain into nginx and into the reference sink.
    async fn drains(&self) -> Result<(), BenchError> {
        let args = self.args;
        let ceiling = ceiling(args)?;
        let feed = Feed::Drain {
            count: args.drain_events,
        };
        let plan = Plan::new(feed, SinkKind::Nginx, args.workers);
        let ratio_to = |m: &Measured, ceiling: f64| m.steady_rate / ceiling * 100.0;
        let m = self
            .scenario(plan, |m| {
                let ratio = match ceiling {
                    Some(ceiling) => format!(
                        "{:.1}% of the wrk → nginx ceiling ({ceiling:.0} POST/s, {} connections)",
                        ratio_to(m, ceiling),
                        args.workers
                    ),
                    None => format!(
                        "no ratio to the nginx ceiling: {} is not installed",
                        args.wrk.display()
                    ),
                };
                format!(
                    "drain into nginx: {}; {ratio}; {}; {}",
                    m.figures(),
                    busy_line(&m.in_flight, args.workers),
                    stages_line(m.last_metrics.as_deref()),
                )
            })
            .await?;
        if let Some(why) = targets::drain_unjudged(args.workers) {
            let mut card = self.card();
            card.not_measured(Target::DrainRate, why.clone());
            card.not_measured(Target::DrainCpu, why);
        } else {
            let ratio = ceiling.map_or_else(
                || "no wrk ceiling".to_owned(),
                |ceiling| {
                    format!(
                        "{:.1} % of the wrk → nginx ceiling of {} POST/s",
                        ratio_to(&m, ceiling),
                        targets::grouped(ceiling)
                    )
                },
            );
            let threads = format!("{} exporter thread(s)", args.exporter_threads);
            let whole_run = m.events as f64 / m.seconds;
            let mut card = self.card();
            card.measured(
                Target::DrainRate,
                m.steady_rate,
                format!(
                    "{} events/s over the whole run; {ratio}; {threads}",
                    targets::grouped(whole_run)
                ),
            );
            card.measured(Target::DrainCpu, m.cpu_us_per_event(), threads);
        }
        let plan = Plan::new(feed, SinkKind::reference(Duration::ZERO), args.workers);
        self.scenario(plan, |m| {
            format!("drain into the reference sink: {}", m.figures())
        })
        .await?;
        Ok(())
    }

    async fn callgrind(&self) -> Result<(), BenchError> {
        let feed = Feed::Drain {
            count: self.args.callgrind_events,
        };
        let plan = Plan {
            callgrind: true,
            ..Plan::new(feed, SinkKind::reference(Duration::ZERO), self.args.workers)
        };
        self.scenario(plan, |m| match m.instructions {
            Some(instructions) => format!(
                "callgrind drain into the reference sink: {} events, {:.1}k instructions/event \
                 (the whole process, start-up and shutdown included: {instructions})",
                m.events,
                instructions as f64 / m.events.max(1) as f64 / 1000.0,
            ),
            None => "callgrind drain: no callgrind profile was written".into(),
        })
        .await?;
        Ok(())
    }

    /// A drain against the slow sink (with `capacity` slots, if any; holding each new
    /// connection `handshake` before its TLS handshake, if not zero) of ideal × `--slow-run`
    /// events, and the ideal rate (events/s): min(workers, slots)/latency, the most `workers`
    /// requests of that latency can carry through that many slots.
    fn slow_plan(&self, workers: usize, capacity: Option<u32>, handshake: Duration) -> (Plan, f64) {
        let latency = self.args.slow_latency.as_secs_f64().max(1e-3);
        let carried = Self::carried(workers, capacity);
        let ideal = carried as f64 / latency;
        // Whole rounds (see `round_rate`), at least two.
        let rounds = (self.args.slow_run.as_secs_f64() / latency).ceil().max(2.0) as u64;
        let count = carried as u64 * rounds;
        let sink = SinkKind::Reference {
            latency: self.args.slow_latency,
            capacity,
            handshake,
        };
        (Plan::new(Feed::Drain { count }, sink, workers), ideal)
    }

    /// `--remote-handshake`, unless 0 (which skips the remote runs).
    fn remote_handshake(&self) -> Option<Duration> {
        Some(self.args.remote_handshake).filter(|handshake| !handshake.is_zero())
    }

    /// How many requests the slow sink answers per round: the workers, or its slots if fewer.
    fn carried(workers: usize, capacity: Option<u32>) -> usize {
        capacity.map_or(workers, |slots| workers.min(slots as usize))
    }

    /// The slow sink at each worker count: ratio to workers/latency, from whole rounds.
    async fn slow_sink(&self) -> Result<(), BenchError> {
        let latency = self.args.slow_latency;
        for &workers in self.args.slow_workers.iter().filter(|w| **w > 0) {
            let (plan, ideal) = self.slow_plan(workers, None, Duration::ZERO);
            let m = self
                .scenario(plan, |m| {
                    format!(
                        "{latency:?} sink, {workers} workers: {}; {} of workers/latency \
                         ({ideal:.1}/s)",
                        m.figures(),
                        percent_of(round_rate(&m.delivered_at, workers), ideal),
                    )
                })
                .await?;
            if let Some(target) = targets::slow_sink_target(workers, latency) {
                match round_rate(&m.delivered_at, workers) {
                    Some(rate) => self.card().measured(
                        target,
                        rate / ideal * 100.0,
                        format!("{rate:.1} of {ideal:.1} events/s"),
                    ),
                    None => self
                        .card()
                        .not_measured(target, "fewer than two whole rounds"),
                }
            }
        }
        Ok(())
    }

    /// The slow sink with adaptive concurrency up to `--adaptive-workers`: ratio to
    /// ceiling/latency and the limit the exporter ended at; then the same sink as if remote
    /// (`--remote-handshake`).
    async fn adaptive(&self) -> Result<(), BenchError> {
        let (latency, ceiling) = (self.args.slow_latency, self.args.adaptive_workers);
        for handshake in std::iter::once(Duration::ZERO).chain(self.remote_handshake()) {
            let (plan, ideal) = self.slow_plan(ceiling, None, handshake);
            let plan = Plan {
                adaptive: true,
                ..plan
            };
            let remote = if handshake.is_zero() {
                String::new()
            } else {
                format!(" with {handshake:?} handshakes per new connection")
            };
            let m = self
                .scenario(plan, |m| {
                    let limit = limit_line(&m.concurrency_limits, ceiling);
                    let at_ceiling = m
                        .at_ceiling(ceiling)
                        .and_then(|(_, rate)| rate)
                        .map_or_else(String::new, |rate| {
                            format!(
                                "; from then on {rate:.0}/s = {:.1}% of ceiling/latency",
                                rate / ideal * 100.0
                            )
                        });
                    format!(
                        "{latency:?} sink{remote}, adaptive concurrency, ceiling {ceiling}: {}; \
                     {:.1}% of ceiling/latency ({ideal:.1}/s) including the climb from 1; \
                     {limit}{at_ceiling}",
                        m.figures(),
                        m.steady_rate / ideal * 100.0,
                    )
                })
                .await?;
            if targets::adaptive_target(ceiling, latency, handshake).is_some() {
                self.judge_adaptive(&m, ideal);
            }
        }
        Ok(())
    }

    /// The adaptive target: the share of ceiling/latency from the first second at the
    /// ceiling on (a running exporter's steady state; the climb from 1 is in the context);
    /// the whole run's share if it never got there.
    fn judge_adaptive(&self, m: &Measured, ideal: f64) {
        let whole_run = m.steady_rate / ideal * 100.0;
        let mut card = self.card();
        match m.at_ceiling(self.args.adaptive_workers) {
            Some((at, Some(rate))) => card.measured(
                Target::AdaptiveShare,
                rate / ideal * 100.0,
                format!(
                    "the ceiling after {at:.0} s; {whole_run:.1} % over the whole run from a \
                     limit of 1"
                ),
            ),
            Some((at, None)) => card.not_measured(
                Target::AdaptiveShare,
                format!("the ceiling after {at:.0} s left less than a second of the run"),
            ),
            None => card.measured(
                Target::AdaptiveShare,
                whole_run,
                "never at the ceiling: the whole run",
            ),
        }
    }

    /// The slow sink with `--saturated-capacity` slots (past them requests queue, so the sink's
    /// latency grows with concurrency), first with `--adaptive-workers` fixed workers, then
    /// with the adaptive limit up to that ceiling, then adaptive again with the sink as if
    /// remote (`--remote-handshake`, over TLS): all carry about capacity/latency, and the line
    /// shows how deep each pushed the sink's queue.
    async fn saturated(&self) -> Result<(), BenchError> {
        let (latency, workers) = (self.args.slow_latency, self.args.adaptive_workers);
        let capacity = self.args.saturated_capacity;
        // Fixed workers, adaptive, and adaptive against the same sink as if remote.
        let runs = [(false, Duration::ZERO), (true, Duration::ZERO)]
            .into_iter()
            .chain(self.remote_handshake().map(|handshake| (true, handshake)));
        for (adaptive, handshake) in runs {
            let (plan, ideal) = self.slow_plan(workers, Some(capacity), handshake);
            let plan = Plan { adaptive, ..plan };
            let mode = if adaptive {
                format!("adaptive concurrency, ceiling {workers}")
            } else {
                format!("{workers} fixed workers")
            };
            let remote = if handshake.is_zero() {
                String::new()
            } else {
                format!(" and {handshake:?} handshakes per new connection")
            };
            self.scenario(plan, |m| {
                let limit = if adaptive {
                    format!("; {}", limit_line(&m.concurrency_limits, workers))
                } else {
                    String::new()
                };
                let queued = m.sink_max_in_flight.saturating_sub(capacity as usize);
                format!(
                    "{latency:?} sink with {capacity} slots{remote}, {mode}: {}; {} of \
                     capacity/latency ({ideal:.1}/s); the sink held up to {} requests at once \
                     (at the deepest, one waited about {:?} for a slot){limit}",
                    m.figures(),
                    percent_of(
                        round_rate(&m.delivered_at, Self::carried(workers, Some(capacity))),
                        ideal
                    ),
                    m.sink_max_in_flight,
                    latency.mul_f64(queued as f64 / f64::from(capacity)),
                )
            })
            .await?;
        }
        Ok(())
    }

    /// Commit-to-sink latency at each streaming rate, with the rate the writer reached: one
    /// event per request at each of `--stream-rates`, then batched at `--batch-stream-rates`.
    async fn latency(&self) -> Result<(), BenchError> {
        let args = self.args;
        let runs = (args.stream_rates.iter().map(|rate| (*rate, false)))
            .chain(args.batch_stream_rates.iter().map(|rate| (*rate, true)));
        for (rate, batch) in runs.filter(|(rate, _)| *rate > 0) {
            let count = (rate as f64 * args.stream_run.as_secs_f64()).max(1.0) as u64;
            let plan = Plan {
                batch,
                ..Plan::new(
                    Feed::Stream { rate, count },
                    SinkKind::reference(Duration::ZERO),
                    args.workers,
                )
            };
            let mode = match (batch, args.lean_schema) {
                (false, false) => "",
                (true, false) => ", batched mode",
                (false, true) => ", lean schema",
                (true, true) => ", batched mode, lean schema",
            };
            let m = self
                .scenario(plan, |m| {
                    let written = m.written.as_ref().map_or(0.0, Written::rate);
                    let latency = m.latency.clone().unwrap_or_default();
                    let (p50, p99) = (latency.p50, latency.p99);
                    format!(
                        "stream at {rate} events/s{mode}: {}; commit-to-sink p50 {p50:.1?}, p99 \
                     {p99:.1?} (p99 of each second's commits, ms: {}); {}; {}; {}; the bench \
                     process (writer and reference sink) used {:.2} cores",
                        writer_reached(rate, written, args.stream_connections),
                        by_second(&latency.p99_by_second),
                        m.figures(),
                        if batch {
                            batched_in_flight(&m.in_flight, args.workers)
                        } else {
                            busy_line(&m.in_flight, args.workers)
                        },
                        stages_line(m.last_metrics.as_deref()),
                        m.bench_cpu_seconds / m.seconds,
                    )
                })
                .await?;
            let Some(target) = targets::stream_target(rate, batch) else {
                continue;
            };
            let written = m.written.as_ref().map_or(0.0, Written::rate);
            let mut card = self.card();
            match (
                targets::stream_unjudged(rate, written, args.lean_schema),
                &m.latency,
            ) {
                (Some(why), _) => card.not_measured(target, why),
                (None, Some(latency)) => card.measured(
                    target,
                    latency.p99.as_secs_f64() * 1e3,
                    format!(
                        "p50 {:.1} ms; {} workers, {} exporter thread(s)",
                        latency.p50.as_secs_f64() * 1e3,
                        args.workers,
                        args.exporter_threads
                    ),
                ),
                (None, None) => card.not_measured(target, "no latency was measured"),
            }
        }
        Ok(())
    }

    /// The full-speed backfill, then each rate-limited one.
    async fn backfills(&self) -> Result<(), BenchError> {
        let args = self.args;
        let sink = SinkKind::reference(Duration::ZERO);
        let plan =
            |count, rate_limit| Plan::new(Feed::Backfill { count, rate_limit }, sink, args.workers);
        self.scenario(plan(args.backfill_events, 0), |m| {
            format!(
                "backfill, unlimited: {}; {:.1}x upstream's {UPSTREAM_EVENTS_PER_SECOND:.0}/s",
                m.figures(),
                m.events as f64 / m.seconds / UPSTREAM_EVENTS_PER_SECOND,
            )
        })
        .await?;
        for &limit in args.rates.iter().filter(|limit| **limit > 0) {
            let count = (limit as f64 * args.rate_run.as_secs_f64()) as u64;
            self.scenario(plan(count, limit), |m| {
                format!(
                    "backfill, rate_limit {limit}/s: {}; {}",
                    m.figures(),
                    held_limit(&m.samples, limit)
                )
            })
            .await?;
        }
        Ok(())
    }
}

/// How busy the workers were over a run's `in_flight` samples: with all `workers` busy most
/// of the time while the exporter's CPU is low, events wait for the sink's answers; with few
/// busy, they wait for the datastore (or nothing was there to send).
fn busy_line(in_flight: &[f64], workers: usize) -> String {
    if in_flight.is_empty() {
        return "the exporter's metrics endpoint gave no events_in_flight".into();
    }
    let all_busy = in_flight.iter().filter(|v| **v >= workers as f64).count();
    let mean = in_flight.iter().sum::<f64>() / in_flight.len() as f64;
    format!(
        "events in flight: {mean:.1} of {workers} workers on average, all {workers} busy in \
         {:.0}% of {} samples (100 ms apart)",
        all_busy as f64 / in_flight.len() as f64 * 100.0,
        in_flight.len()
    )
}

/// Milliseconds, comma-separated, rounded; "-" for a second without commits.
fn by_second(p99s: &[Option<Duration>]) -> String {
    let ms: Vec<String> = p99s
        .iter()
        .map(|p99| match p99 {
            Some(p99) => format!("{:.0}", p99.as_secs_f64() * 1e3),
            None => "-".into(),
        })
        .collect();
    ms.join(", ")
}

/// Where a streamed event's time went, from the exporter's own histograms: its changelog
/// reads, and its publishes (from a worker taking the event to the sink's answer, retries
/// included). Little's law ties the second to the events in flight: mean in flight = rate ×
/// mean publish time, so a publish time near `workers` / rate means the workers, not the
/// datastore, held events back.
fn stages_line(metrics: Option<&str>) -> String {
    let Some(metrics) = metrics else {
        return "the exporter's metrics endpoint gave no histograms".into();
    };
    let mean = |name: &str| {
        let count = child::gauge(metrics, &format!("{name}_count"))?;
        let sum = child::gauge(metrics, &format!("{name}_sum"))?;
        (count > 0.0).then(|| (count, sum / count * 1e3))
    };
    let part = |what: &str, name: &str| match mean(name) {
        Some((count, ms)) => match (
            bucket_bound(metrics, name, count * 0.99),
            bucket_bound(metrics, name, count),
        ) {
            (Some(p99), Some(all)) => format!(
                "{what}: {count:.0}, mean {ms:.2} ms, {}, {}",
                match p99 {
                    Bound::Within(le) => format!("99% within {}", seconds_text(le)),
                    Bound::Above(last) => format!("over 1% above {}", seconds_text(last)),
                },
                match all {
                    Bound::Within(le) => format!("all within {}", seconds_text(le)),
                    Bound::Above(last) => format!("some above {}", seconds_text(last)),
                },
            ),
            _ => format!("{what}: {count:.0}, mean {ms:.2} ms"),
        },
        None => format!("{what}: none timed"),
    };
    format!(
        "{}; {}",
        part(
            "changelog reads",
            "health_events_exporter_changelog_poll_duration_seconds"
        ),
        part(
            "publishes",
            "health_events_exporter_publish_duration_seconds"
        ),
    )
}

/// Where the first `rank` observations of histogram `name` lie, from its buckets.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Bound {
    /// Within this bucket's upper bound, in seconds.
    Within(f64),
    /// Some are above the last finite bound (seconds): they are only in `+Inf`.
    Above(f64),
}

/// The first bucket of histogram `name` whose cumulative count reaches `rank`.
fn bucket_bound(metrics: &str, name: &str, rank: f64) -> Option<Bound> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, rest) = rest.split_once("\"}")?;
            let cumulative: f64 = rest.split_whitespace().next()?.parse().ok()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, cumulative))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (le, _) = buckets.iter().find(|(_, cumulative)| *cumulative >= rank)?;
    if le.is_finite() {
        return Some(Bound::Within(*le));
    }
    let last = buckets
        .iter()
        .map(|(le, _)| *le)
        .filter(|le| le.is_finite())
        .fold(0.0, f64::max);
    Some(Bound::Above(last))
}

/// A bucket bound in seconds as text: "2.5 ms", "1 s".
fn seconds_text(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{} ms", seconds * 1e3)
    } else {
        format!("{seconds} s")
    }
}

/// Events in flight in batched mode, where `workers` is the number of batches in flight (so
/// the events in flight say nothing about how busy the workers were).
fn batched_in_flight(in_flight: &[f64], workers: usize) -> String {
    if in_flight.is_empty() {
        return "the exporter's metrics endpoint gave no events_in_flight".into();
    }
    let mean = in_flight.iter().sum::<f64>() / in_flight.len() as f64;
    let most = in_flight.iter().copied().fold(0.0, f64::max);
    format!(
        "events in flight (in up to {workers} batches): {mean:.1} on average, at most {most:.0} \
         in {} samples (100 ms apart)",
        in_flight.len()
    )
}

/// The writer's achieved rate next to its target, saying plainly when it fell short.
fn writer_reached(target: u64, achieved: f64, connections: usize) -> String {
    let share = achieved / target.max(1) as f64;
    let verdict = if share >= WRITER_REACHED {
        "target reached"
    } else {
        "TARGET NOT REACHED: the figures are for the lower rate"
    };
    format!(
        "writer reached {achieved:.0} events/s of the {target}/s target ({:.1}%, {connections} \
         connections; {verdict})",
        share * 100.0
    )
}

/// How closely the 10 s windows of a rate-limited run held `limit`.
fn held_limit(samples: &[(f64, u64)], limit: u64) -> String {
    match window_rates(samples, 10.0) {
        Some((low, high)) => format!(
            "10 s windows held {:.1}%–{:.1}% of the limit",
            low / limit as f64 * 100.0,
            high / limit as f64 * 100.0
        ),
        None => "no full 10 s window (use --rate-run of 12s or more)".into(),
    }
}

/// wrk's POSTs/s into a fresh nginx; `None` (and a line saying so) without wrk.
fn ceiling(args: &BenchArgs) -> Result<Option<f64>, BenchError> {
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

/// A temporary directory for one run.
fn scratch_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "event-exporter-bench-{}-{name}",
        std::process::id()
    ))
}

/// Runs `plan` against a fresh database, dropped afterwards.
async fn run_plan(
    server: &LocalServer,
    plan: Plan,
    args: &BenchArgs,
) -> Result<Measured, BenchError> {
    let database = format!("event_exporter_bench_{}", std::process::id());
    server.create_database(&database).await?;
    let dir = scratch_dir("run");
    let result = async {
        let client = server.schema_client(&database).await?;
        if matches!(plan.feed, Feed::Stream { .. }) {
            slow_token_writes(&client, args.token_write_delay).await?;
            if args.lean_schema {
                drop_secondary_indexes(&client).await?;
            }
        }
        let mut sinks = Sinks::start(plan, args, &dir).await?;
        let run = Run {
            server,
            database: &database,
            client: &client,
            dir: &dir,
            plan,
            connections: args.stream_connections,
            threads: args.exporter_threads,
        };
        let result = run.drive(&mut sinks).await;
        let events = sinks.stop().await;
        let delivered_at = delivery_times(&events);
        result.map(|measured| Measured {
            delivered_at,
            latency: measured
                .written
                .as_ref()
                .and_then(|written| writer::commit_to_sink(&events, &written.commits)),
            ..measured
        })
    }
    .await;
    let _ = server.drop_database(&database).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A self-signed certificate for 127.0.0.1, written to `dir/sink-ca.pem` (the exporter's
/// `ca_file`), and a TLS server configuration with it for the reference sink. Errors: the
/// certificate, the file, or the configuration ([`BenchError`]).
fn self_signed(
    dir: &std::path::Path,
) -> Result<(std::sync::Arc<rustls::ServerConfig>, std::path::PathBuf), BenchError> {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])?;
    std::fs::create_dir_all(dir).map_err(error::io(format!("creating {}", dir.display())))?;
    let path = dir.join("sink-ca.pem");
    std::fs::write(&path, certified.cert.pem())
        .map_err(error::io(format!("writing {}", path.display())))?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)?;
    Ok((std::sync::Arc::new(config), path))
}

/// The sinks of one run: the reference sink always (it issues the tokens), nginx when the
/// events go there.
struct Sinks {
    reference: RunningSink,
    nginx: Option<Nginx>,
    /// The TLS reference sink's certificate (a remote sink's run), for `ca_file`.
    ca_file: Option<std::path::PathBuf>,
}

impl Sinks {
    async fn start(
        plan: Plan,
        args: &BenchArgs,
        dir: &std::path::Path,
    ) -> Result<Sinks, BenchError> {
        // With nginx as the sink, the reference sink only issues tokens: no latency, no slots.
        let (latency, capacity, handshake_delay, nginx) = match plan.sink {
            SinkKind::Reference {
                latency,
                capacity,
                handshake,
            } => (latency, capacity, handshake, None),
            SinkKind::Nginx => (
                Duration::ZERO,
                None,
                Duration::ZERO,
                Some(Nginx::start(&args.nginx, &dir.join("nginx"))?),
            ),
        };
        let keep_events = match (plan.feed, latency.is_zero()) {
            // The latency runs read every event's arrival time back; so do the slow sink's
            // runs, which count whole rounds (`round_rate`).
            (Feed::Stream { count, .. }, _) | (Feed::Drain { count }, false) => count as usize,
            _ => 0,
        };
        // A remote sink's handshakes are TLS's: the client waits them out before it sends.
        let (tls, ca_file) = if handshake_delay.is_zero() {
            (None, None)
        } else {
            let (config, ca_file) = self_signed(dir)?;
            (Some(config), Some(ca_file))
        };
        let reference = sink::start(SinkArgs {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            latency,
            capacity,
            handshake_delay,
            tls,
            client_secret: "bench-secret".into(),
            keep_events,
            ..SinkArgs::default()
        })
        .await?;
        Ok(Sinks {
            reference,
            nginx,
            ca_file,
        })
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

/// One run's database, scratch directory and plan.
struct Run<'a> {
    server: &'a LocalServer,
    database: &'a str,
    client: &'a tokio_postgres::Client,
    dir: &'a std::path::Path,
    plan: Plan,
    /// The streaming writer's connections.
    connections: usize,
    /// The exporter's worker threads (`--exporter-threads`).
    threads: usize,
}

impl Run<'_> {
    /// The exporter's workers and threads for this run.
    fn sizing(&self) -> child::Sizing {
        child::Sizing {
            workers: self.plan.workers,
            threads: self.threads,
        }
    }

    /// Configures and starts the exporter, feeds it, and watches the sink until every event
    /// arrived.
    async fn drive(&self, sinks: &mut Sinks) -> Result<Measured, BenchError> {
        let plan = self.plan;
        self.write_config(sinks)?;
        self.prepare().await?;
        let metrics_port = nginx::free_port()?.port();
        let exporter = child::spawn(
            self.dir,
            self.server,
            self.database,
            self.sizing(),
            metrics_port,
            plan.callgrind,
        )?;
        let (writer, started) = match plan.feed {
            Feed::Stream { rate, count } => match self.start_writer(rate, count).await {
                Ok(writer) => (Some(writer), Instant::now()),
                Err(e) => {
                    child::stop(exporter);
                    return Err(e);
                }
            },
            _ => (None, Instant::now()),
        };
        // Every run but callgrind's (whose instruction count would include the scrapes).
        let scrape = (!plan.callgrind).then_some(metrics_port);
        let watched = watch(exporter, sinks, plan.feed.count(), started, scrape).await;
        let written = match writer {
            Some(writer) => Some(writer.await??),
            None => None,
        };
        let mut measured = Measured {
            written,
            ..watched?
        };
        if plan.callgrind {
            let profile =
                std::fs::read_to_string(child::callgrind_out(self.dir)).unwrap_or_default();
            measured.instructions = child::callgrind_instructions(&profile);
            // Kept past the run's scratch directory, for `callgrind_annotate`.
            let kept = std::env::temp_dir().join("event-exporter-bench-callgrind.out");
            if std::fs::write(&kept, &profile).is_ok() {
                eprintln!("bench: callgrind profile kept at {}", kept.display());
            }
        }
        Ok(measured)
    }

    fn write_config(&self, sinks: &Sinks) -> Result<(), BenchError> {
        let (backfill, rate_limit) = match self.plan.feed {
            Feed::Backfill { rate_limit, .. } => (true, rate_limit),
            _ => (false, 0),
        };
        let sink_url = sinks.events_url();
        let token_url = sinks.reference.token_url().unwrap_or_default();
        child::write_config(
            self.dir,
            &ExporterConfig {
                sink_url: &sink_url,
                token_url: &token_url,
                backfill,
                max_events: self.plan.feed.count(),
                rate_limit,
                adaptive: self.plan.adaptive,
                batch: self.plan.batch,
                ca_file: sinks.ca_file.as_deref(),
            },
        )
    }

    /// Once the exporter streams (its resume token is written), starts the paced writer.
    async fn start_writer(
        &self,
        rate: u64,
        count: u64,
    ) -> Result<tokio::task::JoinHandle<Result<Written, BenchError>>, BenchError> {
        child::wait_for_token(self.client).await?;
        let settings = self.server.settings(self.database);
        Ok(tokio::spawn(writer::write_paced(
            settings,
            rate,
            count,
            self.connections,
        )))
    }

    /// Writes what the exporter finds at its start: a backlog above its resume token
    /// (written by a first run of the exporter, then stopped), or a history to backfill.
    async fn prepare(&self) -> Result<(), BenchError> {
        let (count, history) = match self.plan.feed {
            Feed::Stream { .. } => return Ok(()),
            Feed::Drain { count } => {
                let first = child::spawn(
                    self.dir,
                    self.server,
                    self.database,
                    self.sizing(),
                    0,
                    false,
                )?;
                let started = child::wait_for_token(self.client).await;
                child::stop(first);
                started?;
                (count, None)
            }
            Feed::Backfill { count, .. } => (count, Some(Duration::from_secs(24 * 3600))),
        };
        eprintln!("bench: writing {count} events");
        seed::seed(self.server.settings(self.database), count, history).await?;
        self.client
            .batch_execute("ANALYZE health_events; ANALYZE datastore_changelog")
            .await
            .map_err(sql("ANALYZE after seeding"))
    }
}

/// Samples the sink and the exporter every 100 ms until `count` events arrived, then stops
/// the exporter; with `scrape`, also reads the exporter's metrics port at each sample (its
/// events in flight every 100 ms, its concurrency limit every second and once at the end). Fails if the exporter exits first or nothing
/// arrives for two minutes.
async fn watch(
    mut exporter: std::process::Child,
    sinks: &mut Sinks,
    count: u64,
    started: Instant,
    scrape: Option<u16>,
) -> Result<Measured, BenchError> {
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut usage = child::Usage::default();
    let mut limit = Limit::new(started);
    let mut in_flight: Vec<f64> = Vec::new();
    let own_cpu = || child::process_usage(std::process::id()).map_or(0.0, |u| u.cpu_seconds());
    let own_cpu_at_start = own_cpu();
    let machine_at_start = child::machine_cpu();
    let mut last_change = (Instant::now(), 0);
    let mut last_report = Instant::now();
    let outcome = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let delivered = sinks.delivered();
        samples.push((started.elapsed().as_secs_f64(), delivered));
        if let Some(now) = child::process_usage(exporter.id()) {
            usage = now;
        }
        // One scrape a turn serves both series.
        if let Some(metrics) = scrape_some(scrape).await {
            limit.sample(&metrics, false);
            in_flight.extend(child::gauge(&metrics, child::EVENTS_IN_FLIGHT));
        }
        if delivered >= count {
            break Ok(());
        }
        if let Ok(Some(status)) = exporter.try_wait() {
            break Err(BenchError::ExporterExited { status });
        }
        if delivered != last_change.1 {
            last_change = (Instant::now(), delivered);
        } else if last_change.0.elapsed() > Duration::from_secs(120) {
            break Err(BenchError::Stalled { delivered, count });
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("bench: {delivered}/{count}");
            last_report = Instant::now();
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let machine = child::machine_cpu()
        .zip(machine_at_start)
        .and_then(|(end, start)| {
            end.since(&start)
                .map(|(busy, stolen)| (busy, stolen, end.cpus()))
        });
    let last_metrics = scrape_some(scrape).await;
    if let Some(metrics) = &last_metrics {
        limit.sample(metrics, true);
    }
    child::stop(exporter);
    outcome?;
    Ok(Measured {
        events: count,
        seconds,
        steady_rate: steady_rate(&samples).unwrap_or(count as f64 / seconds),
        usage,
        samples,
        latency: None,
        written: None,
        instructions: None,
        concurrency_limits: limit.series,
        sink_max_in_flight: sinks.reference.max_in_flight(),
        delivered_at: Vec::new(),
        in_flight,
        bench_cpu_seconds: own_cpu() - own_cpu_at_start,
        machine,
        last_metrics,
    })
}

/// The exporter's metrics, scraped when there is a port to scrape.
async fn scrape_some(port: Option<u16>) -> Option<String> {
    child::scrape_metrics(port?).await
}

/// The exporter's concurrency limit gauge, taken from its metrics about once a second.
struct Limit {
    started: Instant,
    last_read: Option<Instant>,
    /// (seconds since `started`, value).
    series: Vec<(f64, f64)>,
}

impl Limit {
    fn new(started: Instant) -> Limit {
        Limit {
            started,
            last_read: None,
            series: Vec::new(),
        }
    }

    /// Takes the gauge from `metrics` when a second has passed since the last reading, or
    /// `now`.
    fn sample(&mut self, metrics: &str, now: bool) {
        let due = self
            .last_read
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
        if !(now || due) {
            return;
        }
        self.last_read = Some(Instant::now());
        if let Some(value) = child::gauge(metrics, child::CONCURRENCY_LIMIT) {
            self.series
                .push((self.started.elapsed().as_secs_f64(), value));
        }
    }
}

/// The adaptive limit at the end of the run, and when it first reached `ceiling`.
fn limit_line(series: &[(f64, f64)], ceiling: usize) -> String {
    let Some((_, last)) = series.last() else {
        return "the exporter's metrics endpoint gave no concurrency limit".into();
    };
    let reached = series
        .iter()
        .find(|(_, value)| *value >= ceiling as f64)
        .map_or_else(
            || {
                let highest = series.iter().map(|(_, v)| *v).fold(0.0, f64::max);
                format!("never reached the ceiling (highest {highest:.0})")
            },
            |(at, _)| format!("first at the ceiling after {at:.0} s"),
        );
    format!("health_events_exporter_concurrency_limit {last:.0} of {ceiling} at the end, {reached}")
}

/// Events/s from `from` (seconds since the start) to the last sample; `None` without at least
/// a second of samples after it.
fn rate_after(samples: &[(f64, u64)], from: f64) -> Option<f64> {
    let (t0, a0) = *samples.iter().find(|(at, _)| *at >= from)?;
    let (t1, a1) = *samples.last()?;
    (t1 - t0 >= 1.0).then(|| a1.saturating_sub(a0) as f64 / (t1 - t0))
}

/// When each event was accepted, in seconds since the first acceptance, ascending.
fn delivery_times(events: &[sink::ReceivedEvent]) -> Vec<f64> {
    let Some(first) = events.iter().map(|e| e.received_at).min() else {
        return Vec::new();
    };
    let mut times: Vec<f64> = events
        .iter()
        .map(|e| {
            (e.received_at - first)
                .to_std()
                .unwrap_or_default()
                .as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

/// The rate of a sink that answers in rounds of `per_round` requests (fixed workers against a
/// sink of constant latency: each round's answers arrive together, and the next round's
/// requests leave right after): the events of every round after the first, over the time
/// from the first round's last answer to the last round's. `None` without two whole rounds.
///
/// Counting from the first sample with a delivery to the last one (`steady_rate`) is a
/// fencepost error here: a run whose last round is partial counts it as a whole cycle, and a
/// 100 ms sample lands anywhere within a round.
fn round_rate(delivered_at: &[f64], per_round: usize) -> Option<f64> {
    let rounds = delivered_at.len() / per_round.max(1);
    if rounds < 2 {
        return None;
    }
    let first_round_end = *delivered_at.get(per_round - 1)?;
    let last_round_end = *delivered_at.get(rounds * per_round - 1)?;
    let span = last_round_end - first_round_end;
    (span > 0.0).then(|| ((rounds - 1) * per_round) as f64 / span)
}

/// `rate` as a percentage of `ideal`, or a note that it could not be measured.
fn percent_of(rate: Option<f64>, ideal: f64) -> String {
    match rate {
        Some(rate) => format!("{:.1}%", rate / ideal * 100.0),
        None => "(not measured: fewer than two whole rounds)".into(),
    }
}

/// Events/s between the first sample with a delivery and the last sample.
fn steady_rate(samples: &[(f64, u64)]) -> Option<f64> {
    let (t0, a0) = *samples.iter().find(|(_, delivered)| *delivered > 0)?;
    let (t1, a1) = *samples.last()?;
    (t1 > t0).then(|| (a1 - a0) as f64 / (t1 - t0))
}

/// Drops `health_events`' secondary indexes (NVSentinel's ten `idx_health_events_*`): the
/// exporter's stream reads by changelog id and primary key, and maintaining those indexes is
/// most of PostgreSQL's CPU per written row (`--lean-schema`).
async fn drop_secondary_indexes(client: &tokio_postgres::Client) -> Result<(), BenchError> {
    client
        .batch_execute(
            "DO $$ DECLARE i record; BEGIN \
             FOR i IN SELECT indexname FROM pg_indexes \
                 WHERE tablename = 'health_events' AND indexname LIKE 'idx_health_events_%' \
             LOOP EXECUTE 'DROP INDEX ' || quote_ident(i.indexname); END LOOP; END $$",
        )
        .await
        .map_err(sql(
            "dropping health_events' secondary indexes (--lean-schema)",
        ))
}

/// Makes every resume-token write sleep `delay` in PostgreSQL (nothing for zero). The token
/// store writes with `INSERT … ON CONFLICT DO UPDATE`, which fires the BEFORE INSERT trigger
/// once per write (a BEFORE UPDATE one would fire too on a conflict, doubling the delay).
async fn slow_token_writes(
    client: &tokio_postgres::Client,
    delay: Duration,
) -> Result<(), BenchError> {
    if delay.is_zero() {
        return Ok(());
    }
    let sql_text = format!(
        "CREATE FUNCTION bench_slow_token() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep({}); RETURN NEW; END $$; \
         CREATE TRIGGER bench_slow_token BEFORE INSERT ON resume_tokens \
         FOR EACH ROW EXECUTE FUNCTION bench_slow_token();",
        delay.as_secs_f64()
    );
    client
        .batch_execute(&sql_text)
        .await
        .map_err(sql("creating the slow resume-token trigger"))
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
    fn rate_after_counts_from_the_given_time() {
        let samples: Vec<(f64, u64)> = (0..=50).map(|i| (i as f64 * 0.1, i * i)).collect();
        // From 3.0 s (900 delivered) to 5.0 s (2,500): 1,600 in 2 s.
        let rate = rate_after(&samples, 3.0).expect("two seconds of samples");
        assert!((rate - 800.0).abs() < 1e-6, "{rate}");
        assert_eq!(rate_after(&samples, 4.5), None);
    }

    #[test]
    fn busy_line_gives_the_mean_and_the_share_of_all_busy_samples() {
        let line = busy_line(&[10.0, 10.0, 4.0, 0.0], 10);
        assert!(line.contains("6.0 of 10 workers on average"), "{line}");
        assert!(line.contains("all 10 busy in 50% of 4 samples"), "{line}");
        assert!(busy_line(&[], 10).contains("no events_in_flight"));
    }

    #[test]
    fn stages_line_gives_each_histograms_count_and_mean() {
        let exposition = "\
# TYPE health_events_exporter_changelog_poll_duration_seconds histogram
health_events_exporter_changelog_poll_duration_seconds_sum 0.5
health_events_exporter_changelog_poll_duration_seconds_count 250
health_events_exporter_changelog_poll_duration_seconds_bucket{le=\"0.001\"} 10
health_events_exporter_changelog_poll_duration_seconds_bucket{le=\"0.005\"} 247
health_events_exporter_changelog_poll_duration_seconds_bucket{le=\"0.01\"} 248
health_events_exporter_changelog_poll_duration_seconds_bucket{le=\"+Inf\"} 250
health_events_exporter_publish_duration_seconds_sum 0.0
health_events_exporter_publish_duration_seconds_count 0
";
        assert_eq!(
            stages_line(Some(exposition)),
            "changelog reads: 250, mean 2.00 ms, 99% within 10 ms, some above 10 ms; publishes: \
             none timed"
        );
        assert_eq!(
            stages_line(None),
            "the exporter's metrics endpoint gave no histograms"
        );
        // Buckets listed out of order; every publish within 2.5 s; over 1% of reads only in
        // +Inf.
        let exposition = "\
health_events_exporter_changelog_poll_duration_seconds_sum 30
health_events_exporter_changelog_poll_duration_seconds_count 10
health_events_exporter_changelog_poll_duration_seconds_bucket{le=\"+Inf\"} 10
health_events_exporter_changelog_poll_duration_seconds_bucket{le=\"2.5\"} 8
health_events_exporter_publish_duration_seconds_sum 0.2
health_events_exporter_publish_duration_seconds_count 100
health_events_exporter_publish_duration_seconds_bucket{le=\"2.5\"} 100
health_events_exporter_publish_duration_seconds_bucket{le=\"0.005\"} 100
health_events_exporter_publish_duration_seconds_bucket{le=\"+Inf\"} 100
";
        assert_eq!(
            stages_line(Some(exposition)),
            "changelog reads: 10, mean 3000.00 ms, over 1% above 2.5 s, some above 2.5 s; \
             publishes: 100, mean 2.00 ms, 99% within 5 ms, all within 5 ms"
        );
    }

    #[test]
    fn round_rate_counts_whole_rounds_only() {
        // Rounds of 100 answers spread over 7 ms, one every 306 ms, then a partial round of 34.
        let mut times = Vec::new();
        for round in 0..34 {
            let size = if round == 33 { 34 } else { 100 };
            for i in 0..size {
                times.push(round as f64 * 0.306 + i as f64 * 0.00007);
            }
        }
        let rate = round_rate(&times, 100).expect("two rounds");
        assert!((rate - 100.0 / 0.306).abs() < 0.1, "{rate}");
        // The sampled rate undercounts the same run: the partial round weighs as a whole one.
        let samples: Vec<(f64, u64)> = vec![
            (0.05, 100),
            (32.0 * 0.306 + 0.05, 3300),
            (33.0 * 0.306 + 0.05, 3334),
        ];
        let sampled = steady_rate(&samples).expect("deliveries");
        assert!(sampled < rate * 0.99, "{sampled} vs {rate}");
        assert_eq!(round_rate(&times[..150], 100), None);
        assert_eq!(round_rate(&[], 10), None);
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
    fn limit_line_gives_the_end_and_when_the_ceiling_was_reached() {
        let rising = [(1.0, 4.0), (2.0, 10.0), (3.0, 9.0)];
        let line = limit_line(&rising, 10);
        assert!(line.contains("limit 9 of 10 at the end"), "{line}");
        assert!(line.contains("first at the ceiling after 2 s"), "{line}");
        let line = limit_line(&rising[..1], 10);
        assert!(
            line.contains("never reached the ceiling (highest 4)"),
            "{line}"
        );
        assert!(limit_line(&[], 10).contains("gave no concurrency limit"));
    }

    #[test]
    fn writer_line_says_when_the_target_was_not_reached() {
        let reached = writer_reached(10_000, 9_700.0, 4);
        assert!(reached.contains("writer reached 9700 events/s of the 10000/s target"));
        assert!(
            reached.contains("(97.0%, 4 connections; target reached)"),
            "{reached}"
        );
        let short = writer_reached(10_000, 6_000.0, 4);
        assert!(short.contains("60.0%"), "{short}");
        assert!(short.contains("TARGET NOT REACHED"), "{short}");
    }
}
