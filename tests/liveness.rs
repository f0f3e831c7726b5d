//! The process stays honest: logging failures never stop the export (stderr/stdout closed or
//! a broken pipe), a panic stops the process with an error instead of leaving a zombie, and
//! `/healthz` fails when events are pending and nothing progresses (the watchdog), while an
//! idle exporter stays alive.

mod support;

use std::io::Read;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::exporter::{binary, free_port, sample, Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer};

const WAIT: Duration = Duration::from_secs(30);

/// The exporter run with its stdout and stderr as pipes the test controls.
struct Piped {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    status: Option<ExitStatus>,
}

impl Piped {
    /// Starts the binary with `config` (TOML text); stdout and stderr are pipes.
    fn spawn(config: &str, env: &[(String, String)], extra_env: &[(&str, &str)]) -> Piped {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).expect("write config");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "").expect("write secret");
        let port = free_port();
        let child = Command::new(binary())
            .arg(format!("--config={}", path.display()))
            .arg(format!("--metrics-port={port}"))
            .arg(format!("--oidc-secret-path={}", secret.display()))
            .arg("--workers=2")
            .arg("--shutdown-grace=5s")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LOG_LEVEL", "debug")
            .envs(env.iter().cloned())
            .envs(
                extra_env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn event-exporter");
        Piped {
            child,
            port,
            _dir: dir,
            status: None,
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        support::exporter::http_get(self.port, path).await
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.try_status() {
                panic!("exporter exited early with {status}");
            }
            if let Some((200, _)) = self.get("/readyz").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "exporter not ready after {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "SIGTERM ignored: still running after {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until the stored resume token's `eventID` is `id`.
async fn wait_token(client: &tokio_postgres::Client, id: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let token = pg::read_resume_token(client, pg::EXPORTER_CLIENT_NAME).await;
        if token.as_ref().map(|t| t["eventID"].clone()) == Some(json!(id)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "resume token never reached {id}: {token:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn insert_events(client: &tokio_postgres::Client, from: u32, count: u32) -> i64 {
    for i in from..from + count {
        pg::insert_health_event(client, &pg::health_event_doc("node-log", i)).await;
    }
    pg::changelog_max_id(client).await
}

#[tokio::test]
async fn closed_stdout_and_stderr_do_not_stop_the_export() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let options = ExporterOptions::new(&sink, None, db.env());
    // JSON logs (the default format) at debug level: every event writes lines.
    let mut exporter = Piped::spawn(&options.config_toml(), &db.env(), &[]);
    // The log collector is gone before the first line: both pipes are broken (EPIPE).
    drop(exporter.child.stdout.take());
    drop(exporter.child.stderr.take());
    exporter.wait_ready().await;

    let head = insert_events(&client, 0, 5).await;
    sink.wait_for_accepted(5, WAIT).await;
    wait_token(&client, head).await;

    let (_, metrics) = exporter.get("/metrics").await.expect("/metrics answers");
    let dropped = sample(&metrics, "health_events_exporter_log_write_errors_total").unwrap_or(0.0);
    assert!(dropped >= 5.0, "dropped log lines are counted: {dropped}");
    assert_eq!(exporter.get("/healthz").await.map(|(s, _)| s), Some(200));

    let status = exporter.terminate().await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM with a broken stderr: {status}"
    );
}

#[tokio::test]
async fn stderr_closed_mid_run_does_not_stop_the_export() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let options = ExporterOptions::new(&sink, None, db.env());
    let mut exporter = Piped::spawn(&options.config_toml(), &db.env(), &[]);
    drop(exporter.child.stdout.take());
    let mut stderr: ChildStderr = exporter.child.stderr.take().expect("stderr pipe");
    // Read the log in the background until told to stop, then close the pipe.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while stop_rx.try_recv().is_err() {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        drop(stderr);
        String::from_utf8_lossy(&seen).into_owned()
    });
    exporter.wait_ready().await;
    let first = insert_events(&client, 0, 3).await;
    sink.wait_for_accepted(3, WAIT).await;
    wait_token(&client, first).await;

    // The collector goes away mid-run: the reader stops after its next read.
    stop_tx.send(()).expect("reader alive");
    let _ = insert_events(&client, 3, 1).await;
    let log = reader.join().expect("reader thread");
    assert!(
        log.contains("event exporter starting"),
        "log was read: {log}"
    );

    let head = insert_events(&client, 4, 5).await;
    sink.wait_for_accepted(9, WAIT).await;
    wait_token(&client, head).await;
    let (_, metrics) = exporter.get("/metrics").await.expect("/metrics answers");
    let dropped = sample(&metrics, "health_events_exporter_log_write_errors_total").unwrap_or(0.0);
    assert!(
        dropped >= 1.0,
        "lines after the pipe broke are dropped: {dropped}"
    );
    assert_eq!(exporter.get("/healthz").await.map(|(s, _)| s), Some(200));

    let status = exporter.terminate().await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM after the pipe broke: {status}"
    );
}

/// check-config with a closed stdout does not panic (exit 101) on its report.
#[test]
fn check_config_with_a_closed_stdout_does_not_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[exporter.metadata]\ncluster = \"c\"\n[exporter.sink]\nendpoint = \"http://127.0.0.1:1/\"\n[exporter.oidc]\nenabled = false\n",
    )
    .expect("write config");
    let mut child = Command::new(binary())
        .arg("check-config")
        .arg(format!("--config={}", path.display()))
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn check-config");
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test]
async fn a_panicking_publish_task_stops_the_process_with_an_error() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    // Read only by debug builds (the test binary is one).
    options
        .env
        .push(("EVENT_EXPORTER_DEBUG_PANIC".into(), "publish".into()));
    let mut exporter = Exporter::start(&options).await;
    assert_eq!(exporter.probe("/healthz").await.map(|(s, _)| s), Some(200));

    insert_events(&client, 0, 1).await;
    let started = Instant::now();
    let status = exporter.wait_exit(Duration::from_secs(20)).await;
    let log = exporter.log();
    assert_eq!(
        status.code(),
        Some(1),
        "exit status after a panic: {status}\n{log}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        log.contains("EVENT_EXPORTER_DEBUG_PANIC=publish: deliberate panic for testing"),
        "the panic message is logged:\n{log}"
    );
    assert!(log.contains("a task panicked"), "{log}");
    assert!(sink.accepted().is_empty(), "nothing was delivered");
    let token = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME).await;
    let max = pg::changelog_max_id(&client).await;
    assert!(
        token
            .as_ref()
            .and_then(|t| t["eventID"].as_i64())
            .is_none_or(|id| id < max),
        "the token did not pass the undelivered event: {token:?}"
    );
}

/// `[exporter] liveness_timeout` appended to a generated config.
fn with_liveness(config: String, timeout: &str) -> String {
    format!("{config}\n[exporter]\nliveness_timeout = \"{timeout}\"\n")
}

#[tokio::test]
async fn healthz_fails_when_a_delivery_hangs_and_readyz_stays_up() {
    let db = TestDb::create().await;
    let client = db.client().await;
    // A sink that accepts TCP connections and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hung_addr = hung.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            held.push(socket);
        }
    });
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.sink_url = format!("http://{hung_addr}/api/v1/events");
    // One attempt may take an hour; the watchdog allows 2 s without progress.
    let config = with_liveness(
        options
            .config_toml()
            .replace("timeout = \"5s\"", "timeout = \"1h\""),
        "2s",
    );
    let mut exporter = Piped::spawn(&config, &db.env(), &[]);
    drop(exporter.child.stdout.take());
    drop(exporter.child.stderr.take());
    exporter.wait_ready().await;
    assert_eq!(exporter.get("/healthz").await.map(|(s, _)| s), Some(200));

    let head = insert_events(&client, 0, 1).await;
    let inserted = Instant::now();
    let deadline = inserted + WAIT;
    let body = loop {
        match exporter.get("/healthz").await {
            Some((503, body)) => break body,
            Some((200, _)) => {}
            other => panic!("unexpected /healthz answer {other:?}"),
        }
        assert!(Instant::now() < deadline, "/healthz never failed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        inserted.elapsed() >= Duration::from_secs(2),
        "not before the timeout"
    );
    assert!(body.contains("stalled: 1 events pending"), "{body}");
    assert_eq!(
        exporter.get("/readyz").await.map(|(s, _)| s),
        Some(200),
        "readiness keeps its meaning"
    );
    let (_, metrics) = exporter.get("/metrics").await.expect("/metrics answers");
    let since = sample(
        &metrics,
        "health_events_exporter_liveness_seconds_since_progress",
    )
    .expect("gauge present");
    assert!(since >= 2.0, "{since}");
    assert_eq!(
        sample(&metrics, "health_events_exporter_liveness_pending_events"),
        Some(1.0)
    );

    // SIGTERM still stops it cleanly; the hung event was not passed by the token.
    let status = exporter.terminate().await;
    assert_eq!(status.code(), Some(0), "{status}");
    let token = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME).await;
    assert!(
        token
            .as_ref()
            .and_then(|t| t["eventID"].as_i64())
            .is_none_or(|id| id < head),
        "{token:?}"
    );
    holder.abort();
}

#[tokio::test]
async fn an_idle_exporter_stays_alive_longer_than_the_timeout() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let options = ExporterOptions::new(&sink, None, db.env());
    let config = with_liveness(options.config_toml(), "1s");
    let mut exporter = Piped::spawn(&config, &db.env(), &[]);
    drop(exporter.child.stdout.take());
    drop(exporter.child.stderr.take());
    exporter.wait_ready().await;

    // Idle before any event, then after delivering some: 200 throughout, 3× the timeout.
    for phase in ["before events", "after delivery"] {
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            assert_eq!(
                exporter.get("/healthz").await.map(|(s, _)| s),
                Some(200),
                "{phase}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if phase == "before events" {
            let head = insert_events(&client, 0, 3).await;
            sink.wait_for_accepted(3, WAIT).await;
            wait_token(&client, head).await;
        }
    }
    let (_, metrics) = exporter.get("/metrics").await.expect("/metrics answers");
    assert_eq!(
        sample(
            &metrics,
            "health_events_exporter_liveness_seconds_since_progress"
        ),
        Some(0.0)
    );
    assert_eq!(exporter.terminate().await.code(), Some(0));
}

/// `check-config` shows the effective `liveness_timeout` and rejects a bad one with exit 2
/// naming the key; the exporter refuses it the same way.
#[test]
fn check_config_shows_and_validates_liveness_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    let base = "[exporter.metadata]\ncluster = \"c\"\n[exporter.sink]\nendpoint = \"http://127.0.0.1:1/\"\n[exporter.oidc]\nenabled = false\n[exporter.failure_handling]\nmax_backoff = \"5m\"\n";
    std::fs::write(&path, base).expect("write config");
    let config_arg = format!("--config={}", path.display());
    let (code, output) = support::exporter::run_once(&["check-config", &config_arg], &[]);
    assert_eq!(code, Some(0), "{output}");
    // Derived: 2 × (30s + 5m).
    assert!(
        output.contains("\"liveness_timeout\": \"11m0s\""),
        "{output}"
    );

    std::fs::write(
        &path,
        format!("{base}[exporter]\nliveness_timeout = \"100ms\"\n"),
    )
    .expect("write config");
    let (code, output) = support::exporter::run_once(&["check-config", &config_arg], &[]);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("exporter.liveness_timeout"), "{output}");
    let (code, output) = support::exporter::run_once(&[&config_arg], &[]);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("exporter.liveness_timeout"), "{output}");
}
