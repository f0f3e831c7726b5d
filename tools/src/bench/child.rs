//! The exporter under measurement: a child process (this binary's hidden `exporter` command,
//! the product's code), optionally under `valgrind --tool=callgrind`, and what /proc and
//! callgrind say about it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
}

/// Writes `config.toml` and `secret` for `config` into `dir`.
pub fn write_config(dir: &Path, config: &ExporterConfig<'_>) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("secret"), "bench-secret").map_err(|e| e.to_string())?;
    let text = format!(
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
        sink = config.sink_url,
        token = config.token_url,
        backfill = config.backfill,
        max_events = config.max_events.max(1),
        rate_limit = config.rate_limit,
    );
    std::fs::write(dir.join("config.toml"), text).map_err(|e| e.to_string())
}

/// Starts the exporter with the configuration in `dir` against `database`; under callgrind
/// (writing `callgrind.out` into `dir`) when `callgrind` is set.
pub fn spawn(
    dir: &Path,
    server: &LocalServer,
    database: &str,
    workers: usize,
    callgrind: bool,
) -> Result<Child, String> {
    let binary = std::env::current_exe().map_err(|e| e.to_string())?;
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
        .stdout(Stdio::null());
    if callgrind {
        command.stderr(Stdio::null());
    }
    command.spawn().map_err(|e| {
        let what = if callgrind {
            "valgrind"
        } else {
            "the exporter"
        };
        format!("cannot start {what}: {e}")
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

/// CPU seconds used and peak resident memory (MiB) of process `pid`, from /proc.
pub fn process_usage(pid: u32) -> Option<(f64, f64)> {
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

/// Waits until the exporter has written its resume token (it is then streaming).
pub async fn wait_for_token(client: &tokio_postgres::Client) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
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
    Err("the exporter did not write a resume token within 60 s".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_usage_reads_this_process() {
        let (cpu, rss) = process_usage(std::process::id()).expect("/proc is readable");
        assert!(cpu >= 0.0 && rss > 0.0);
    }

    #[test]
    fn reads_callgrind_totals() {
        let profile = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nfl=(1) a.rs\n\
                       fn=(1) main\n1 5\nsummary: 123456789\ntotals: 123456789\n";
        assert_eq!(callgrind_instructions(profile), Some(123_456_789));
        assert_eq!(callgrind_instructions("events: Ir\n"), None);
    }
}
