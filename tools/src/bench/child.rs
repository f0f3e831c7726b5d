//! The exporter under measurement: a child process (this binary's hidden `exporter` command,
//! the product's code), optionally under `valgrind --tool=callgrind`, and what /proc and
//! callgrind say about it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::error::{io, sql, BenchError};
use crate::local_postgres::LocalServer;

/// How one exporter run is configured.
pub struct ExporterConfig<'a> {
    pub sink_url: &'a str,
    pub token_url: &'a str,
    pub backfill: bool,
    /// The backfill's `max_events`.
    pub max_events: u64,
    /// The backfill's `rate_limit` (0 = none).
    pub rate_limit: u64,
    /// `exporter.sink.concurrency = "adaptive"` (`workers` is then the ceiling) instead of
    /// the default `fixed`.
    pub adaptive: bool,
    /// `exporter.sink.mode = "batch"` (default batch limits) instead of `structured`.
    pub batch: bool,
    /// The certificate that a TLS reference sink (sink and token endpoint) is trusted by:
    /// `ca_file` of `exporter.sink` and `exporter.oidc`.
    pub ca_file: Option<&'a Path>,
}

/// Writes `config.toml` and `secret` for `config` into `dir` (created). Errors:
/// [`BenchError::Io`] naming the file.
pub fn write_config(dir: &Path, config: &ExporterConfig<'_>) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let secret = dir.join("secret");
    std::fs::write(&secret, "bench-secret").map_err(io(format!("writing {}", secret.display())))?;
    let ca_file = config
        .ca_file
        .map(|path| {
            let quoted = toml::Value::String(path.display().to_string());
            format!("ca_file = {quoted}\n")
        })
        .unwrap_or_default();
    let text = format!(
        r#"[exporter.metadata]
cluster = "bench"
[exporter.sink]
endpoint = "{sink}"
concurrency = "{concurrency}"
mode = "{mode}"
{ca_file}[exporter.oidc]
token_url = "{token}"
client_id = "nvsentinel-exporter"
scope = "events:write"
{ca_file}[exporter.backfill]
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
        sink = config.sink_url,
        token = config.token_url,
        backfill = config.backfill,
        max_events = config.max_events.max(1),
        rate_limit = config.rate_limit,
        concurrency = if config.adaptive { "adaptive" } else { "fixed" },
        mode = if config.batch { "batch" } else { "structured" },
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))
}

/// How much the exporter may do at once.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    /// Concurrent publishes (`--workers`).
    pub workers: usize,
    /// Async worker threads (`TOKIO_WORKER_THREADS`).
    pub threads: usize,
}

/// Starts the exporter with the configuration in `dir` against `database`, serving its
/// metrics on `metrics_port` (0: an ephemeral port nobody reads); under callgrind (writing
/// `callgrind.out` into `dir`) when `callgrind` is set. Errors: [`BenchError::Spawn`].
pub fn spawn(
    dir: &Path,
    server: &LocalServer,
    database: &str,
    sizing: Sizing,
    metrics_port: u16,
    callgrind: bool,
) -> Result<Child, BenchError> {
    let binary = std::env::current_exe().map_err(io("finding this program's path"))?;
    let mut command = if callgrind {
        let mut valgrind = Command::new("valgrind");
        valgrind
            .arg("--tool=callgrind")
            .arg(format!(
                "--callgrind-out-file={}",
                callgrind_out(dir).display()
            ))
            .arg(binary);
        valgrind
    } else {
        Command::new(binary)
    };
    // The hidden `exporter` command runs the product's exporter (same code and flags as the
    // `event-exporter` binary).
    command
        .arg("exporter")
        .arg(format!("--config={}", dir.join("config.toml").display()))
        .arg(format!(
            "--oidc-secret-path={}",
            dir.join("secret").display()
        ))
        .arg(format!("--metrics-port={metrics_port}"))
        .arg(format!("--workers={}", sizing.workers))
        .env("TOKIO_WORKER_THREADS", sizing.threads.to_string())
        .env("LOG_LEVEL", "warn")
        .env("DATASTORE_PROVIDER", "postgresql")
        .env("DATASTORE_HOST", server.host())
        .env("DATASTORE_PORT", server.port().to_string())
        .env("DATASTORE_DATABASE", database)
        .env("DATASTORE_USERNAME", server.user())
        .env("DATASTORE_SSLMODE", "disable")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if callgrind {
        command.stderr(Stdio::null());
    }
    command.spawn().map_err(|source| BenchError::Spawn {
        program: if callgrind {
            "valgrind"
        } else {
            "the exporter"
        }
        .into(),
        hint: if callgrind {
            " (`apt-get install valgrind`)"
        } else {
            ""
        },
        source,
    })
}

/// Where callgrind writes its profile of the run in `dir`.
pub fn callgrind_out(dir: &Path) -> PathBuf {
    dir.join("callgrind.out")
}

/// Stops the exporter (SIGTERM, its graceful shutdown) and waits for it.
pub fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Instructions executed in the whole run, from callgrind's `summary:` (or `totals:`) line.
pub fn callgrind_instructions(profile: &str) -> Option<u64> {
    profile.lines().find_map(|line| {
        line.strip_prefix("summary:")
            .or_else(|| line.strip_prefix("totals:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    })
}

/// What a process has used so far, from /proc.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// CPU seconds in user space.
    pub user_seconds: f64,
    /// CPU seconds in the kernel on the process's behalf (system calls: on loopback, the
    /// TCP stack of both ends of a send is mostly charged to the sender).
    pub system_seconds: f64,
    /// Peak resident memory (VmHWM), MiB.
    pub peak_rss_mib: f64,
}

impl Usage {
    /// User and system CPU seconds together.
    pub fn cpu_seconds(&self) -> f64 {
        self.user_seconds + self.system_seconds
    }
}

/// CPU time and peak resident memory of process `pid`, from /proc; `None` once it is gone.
pub fn process_usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user_ticks: f64 = fields.get(11)?.parse().ok()?;
    let system_ticks: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let peak_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    // Linux reports CPU time in clock ticks of 1/100 s.
    Some(Usage {
        user_seconds: user_ticks / 100.0,
        system_seconds: system_ticks / 100.0,
        peak_rss_mib: peak_kib / 1024.0,
    })
}

/// The whole machine's CPU time so far, from /proc/stat: (busy, stolen, all) in clock ticks
/// summed over the CPUs, and the number of CPUs. Busy is user, nice, system, irq and softirq;
/// stolen is the hypervisor's (time the machine had no CPU); all adds idle and iowait. `None`
/// when /proc/stat cannot be read.
pub fn machine_cpu() -> Option<MachineCpu> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let mut lines = stat.lines();
    let ticks: Vec<f64> = lines
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| ticks.get(i).copied().unwrap_or(0.0);
    let busy = field(0) + field(1) + field(2) + field(5) + field(6);
    let stolen = field(7);
    let cpus = lines.filter(|line| line.starts_with("cpu")).count();
    Some(MachineCpu {
        busy,
        stolen,
        all: busy + stolen + field(3) + field(4),
        cpus,
    })
}

/// A reading of [`machine_cpu`].
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    busy: f64,
    stolen: f64,
    all: f64,
    cpus: usize,
}

impl MachineCpu {
    /// The CPUs /proc/stat lists.
    pub fn cpus(&self) -> usize {
        self.cpus
    }

    /// Cores busy and cores stolen on average from `earlier` to this reading.
    pub fn since(&self, earlier: &MachineCpu) -> Option<(f64, f64)> {
        let all = self.all - earlier.all;
        if all <= 0.0 {
            return None;
        }
        let cpus = self.cpus as f64;
        Some((
            (self.busy - earlier.busy) / all * cpus,
            (self.stolen - earlier.stolen) / all * cpus,
        ))
    }
}

/// Waits until the exporter has written its resume token (it is then streaming). Errors:
/// [`BenchError::NoResumeToken`] after 60 s, [`BenchError::Sql`] when the query fails.
pub async fn wait_for_token(client: &tokio_postgres::Client) -> Result<(), BenchError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let row = client
            .query_opt(
                "SELECT 1 FROM resume_tokens WHERE client_name = 'event-exporter'",
                &[],
            )
            .await
            .map_err(sql("reading the exporter's resume token"))?;
        if row.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(BenchError::NoResumeToken)
}

/// The exporter's adaptive concurrency limit gauge.
pub const CONCURRENCY_LIMIT: &str = "health_events_exporter_concurrency_limit";
/// The exporter's gauge of events its workers are publishing now.
pub const EVENTS_IN_FLIGHT: &str = "health_events_exporter_events_in_flight";

/// The exporter's metrics exposition, scraped from 127.0.0.1:`port` (a plain HTTP/1.0 GET,
/// within 2 s); `None` when the endpoint does not answer. Read gauges from it with [`gauge`].
pub async fn scrape_metrics(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let scrape = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    };
    tokio::time::timeout(Duration::from_secs(2), scrape)
        .await
        .ok()
        .flatten()
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition.
pub fn gauge(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_usage_reads_this_process() {
        let usage = process_usage(std::process::id()).expect("/proc is readable");
        assert!(usage.user_seconds >= 0.0 && usage.system_seconds >= 0.0);
        assert!(usage.peak_rss_mib > 0.0);
        assert_eq!(process_usage(u32::MAX), None);
    }

    #[test]
    fn reads_callgrind_totals() {
        let profile = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nfl=(1) a.rs\n\
                       fn=(1) main\n1 5\nsummary: 123456789\ntotals: 123456789\n";
        assert_eq!(callgrind_instructions(profile), Some(123_456_789));
        assert_eq!(callgrind_instructions("events: Ir\n"), None);
    }

    #[test]
    fn reads_an_unlabelled_gauge() {
        let text = "HTTP/1.0 200 OK\r\n\r\n# HELP health_events_exporter_concurrency_limit x\n\
                    # TYPE health_events_exporter_concurrency_limit gauge\n\
                    health_events_exporter_concurrency_limit_other 3\n\
                    health_events_exporter_concurrency_limit 42\n";
        assert_eq!(gauge(text, CONCURRENCY_LIMIT), Some(42.0));
        assert_eq!(gauge("nothing\n", CONCURRENCY_LIMIT), None);
    }
}
