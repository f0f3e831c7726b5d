//! Runs the real `event-exporter` binary as a child process, as Kubernetes would: a config
//! file, the datastore environment, a secret file, and signals to stop it.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::sink::SinkServer;
use super::token::TokenServer;

/// What goes into the exporter's config file and command line.
#[derive(Clone, Debug)]
pub struct ExporterOptions {
    pub sink_url: String,
    /// `(token_url, client_id, scope, secret)`; `None` writes `oidc.enabled = false`.
    pub oidc: Option<(String, String, String, String)>,
    pub workers: usize,
    pub max_retries: u32,
    pub initial_backoff: String,
    pub max_backoff: String,
    pub backoff_multiplier: f64,
    /// `exporter.sink.timeout` (a Go duration; "5s" unless a test sets it).
    pub sink_timeout: String,
    /// Appended to the `[exporter.sink]` table (e.g. `ca_file = "…"`).
    pub sink_extra: String,
    /// Appended to the `[exporter.oidc]` table.
    pub oidc_extra: String,
    /// Body of the `[exporter.backfill]` table.
    pub backfill: String,
    /// Appended at the end of the file (whole tables).
    pub extra_toml: String,
    /// Appended to the `[exporter.failure_handling]` table (e.g. `on_rejected = …`).
    pub failure_extra: String,
    /// Datastore environment (see `TestDb::env`).
    pub env: Vec<(String, String)>,
    pub shutdown_grace: String,
}

impl ExporterOptions {
    pub fn new(sink: &SinkServer, token: Option<&TokenServer>, env: Vec<(String, String)>) -> Self {
        ExporterOptions {
            sink_url: sink.url(),
            oidc: token.map(|t| {
                (
                    t.url(),
                    t.client_id().to_string(),
                    t.scope().to_string(),
                    t.secret(),
                )
            }),
            workers: 4,
            max_retries: 5,
            initial_backoff: "100ms".into(),
            max_backoff: "1s".into(),
            backoff_multiplier: 2.0,
            sink_timeout: "5s".into(),
            sink_extra: String::new(),
            oidc_extra: String::new(),
            backfill: "enabled = false".into(),
            extra_toml: String::new(),
            failure_extra: String::new(),
            env,
            shutdown_grace: "5s".into(),
        }
    }

    pub fn config_toml(&self) -> String {
        let oidc = match &self.oidc {
            Some((url, id, scope, _)) => format!(
                "token_url = \"{url}\"\nclient_id = \"{id}\"\nscope = \"{scope}\"\n{}",
                self.oidc_extra
            ),
            None => "enabled = false\n".to_string(),
        };
        format!(
            r#"[exporter.metadata]
cluster = "test-cluster"
environment = "test"

[exporter.sink]
endpoint = "{sink}"
timeout = "{sink_timeout}"
{sink_extra}

[exporter.oidc]
{oidc}

[exporter.backfill]
{backfill}

[exporter.resume_token]
database = "nvsentinel"
collection = "resumetokens"

[exporter.failure_handling]
max_retries = {retries}
initial_backoff = "{initial}"
max_backoff = "{max}"
backoff_multiplier = {mult:?}
{failure_extra}

{extra}
"#,
            sink = self.sink_url,
            sink_timeout = self.sink_timeout,
            sink_extra = self.sink_extra,
            backfill = self.backfill,
            retries = self.max_retries,
            initial = self.initial_backoff,
            max = self.max_backoff,
            mult = self.backoff_multiplier,
            failure_extra = self.failure_extra,
            extra = self.extra_toml,
        )
    }
}

/// A running exporter process; killed on drop.
pub struct Exporter {
    child: Child,
    pub metrics_port: u16,
    dir: tempfile::TempDir,
    status: Option<ExitStatus>,
}

/// `GET http://127.0.0.1:{port}{path}` within 2 s: status and body, `None` when nothing
/// answered (the exporter's probes and metrics).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let response = super::tls::plain_reqwest_client()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.unwrap_or_default()))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The binary of the package under test: `event-exporter` for the product's tests,
/// `event-exporter-dev` for the tools' tests (which include this harness by path).
pub fn binary() -> &'static str {
    option_env!("CARGO_BIN_EXE_event-exporter")
        .or(option_env!("CARGO_BIN_EXE_event-exporter-dev"))
        .expect("cargo sets CARGO_BIN_EXE_<name> for the package's binaries")
}

impl Exporter {
    /// Starts the exporter and waits until `/readyz` answers 200.
    pub async fn start(options: &ExporterOptions) -> Exporter {
        let mut exporter = Exporter::spawn(options);
        exporter.wait_ready(Duration::from_secs(30)).await;
        exporter
    }

    /// Starts the exporter without waiting.
    pub fn spawn(options: &ExporterOptions) -> Exporter {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("config.toml");
        fs::write(&config, options.config_toml()).expect("write config");
        let secret = dir.path().join("oidc-client-secret");
        let secret_text = options
            .oidc
            .as_ref()
            .map(|(_, _, _, s)| format!("{s}\n"))
            .unwrap_or_default();
        fs::write(&secret, secret_text).expect("write secret");
        let metrics_port = free_port();
        let log = fs::File::create(dir.path().join("exporter.log")).expect("log file");
        let child = Command::new(binary())
            .arg(format!("--config={}", config.display()))
            .arg(format!("--metrics-port={metrics_port}"))
            .arg(format!("--oidc-secret-path={}", secret.display()))
            .arg(format!("--workers={}", options.workers))
            .arg(format!("--shutdown-grace={}", options.shutdown_grace))
            .arg("--log-format=text")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_LEVEL", "debug")
            .envs(options.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn event-exporter");
        Exporter {
            child,
            metrics_port,
            dir,
            status: None,
        }
    }

    pub fn secret_path(&self) -> PathBuf {
        self.dir.path().join("oidc-client-secret")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("exporter.log")).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics_port, path).await
    }

    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                panic!(
                    "exporter exited early with {status}; log:\n{}",
                    self.log_tail()
                );
            }
            if let Some((200, _)) = self.get("/readyz").await {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "exporter not ready after {timeout:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `(status, body)` of a probe or `/metrics`.
    pub async fn probe(&self, path: &str) -> Option<(u16, String)> {
        self.get(path).await
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits for the process to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "exporter still running after {timeout:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(Duration::from_secs(30)).await
    }

    /// SIGTERM, and the exit must be status 0 (the log is shown when it is not); returns how
    /// long the exporter took to exit.
    pub async fn terminate_cleanly(&mut self) -> Duration {
        let started = Instant::now();
        let status = self.terminate().await;
        assert_eq!(status.code(), Some(0), "log:\n{}", self.log());
        started.elapsed()
    }

    /// The process id (for `kill -STOP` / `-CONT` in tests/leadership.rs).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to save anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        self.status = Some(self.child.wait().expect("wait after kill"));
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the binary to completion with `args` and a config text; returns (exit code, stderr).
pub fn run_once(args: &[&str], env: &[(String, String)]) -> (Option<i32>, String) {
    let output = Command::new(binary())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .output()
        .expect("run event-exporter");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout),
    )
}

/// The value of the sample line `series` (a metric name with its `{labels}`, exactly as
/// exposed) in a Prometheus text exposition; `None` when there is no such line.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// [`sample`], reading an absent series as 0 (a counter not yet created).
pub fn sample_or_zero(metrics: &str, series: &str) -> f64 {
    sample(metrics, series).unwrap_or(0.0)
}
