//! The alert rules (`deploy/prometheus/event-exporter-rules.yaml`) and the Grafana dashboard
//! (`deploy/grafana/event-exporter.json`) against the real Prometheus (Debian's `prometheus`
//! package: `promtool` and `prometheus`).
//!
//! - `promtool check rules` and `promtool test rules deploy/prometheus/tests.yaml`; every alert
//!   has a unit test that fires it and one where it must stay silent, and a README runbook
//!   section.
//! - A real Prometheus on loopback scrapes the real exporter every second while events flow
//!   and the sink then fails: the expected series exist, the stalled-export alert (its
//!   threshold and `for:` shortened) goes pending and firing, the readiness alert stays
//!   silent, and every PromQL expression of the dashboard parses and returns data.
//!
//! Without `promtool`/`prometheus` on PATH these tests fail; `scripts/test` installs Debian's
//! `prometheus` package.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::exporter::{free_port, Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const RULES: &str = "deploy/prometheus/event-exporter-rules.yaml";
const RULE_TESTS: &str = "deploy/prometheus/tests.yaml";
const DASHBOARD: &str = "deploy/grafana/event-exporter.json";

fn read(path: &str) -> String {
    let path = Path::new(ROOT).join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Fails unless `tool --version` runs. A missing tool fails the test (a check that cannot run is
/// never reported as passed): `scripts/test` installs Debian's `prometheus` package.
fn require(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not on PATH: run the tests with `scripts/test`, which installs Debian's \
         prometheus package"
    );
}

/// The `alert:` names of the rules file.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_string())
        .collect()
}

fn run(tool: &str, args: &[&str]) -> String {
    let output = Command::new(tool)
        .args(args)
        .current_dir(ROOT)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{tool} {args:?} failed ({}):\n{text}",
        output.status
    );
    text
}

#[test]
fn every_alert_has_firing_and_silent_tests_and_a_runbook() {
    let rules = read(RULES);
    let tests = read(RULE_TESTS);
    let readme = read("README.md");
    let names = alert_names(&rules);
    assert!(names.len() >= 7, "{names:?}");
    // Blocks of `- eval_time:` in the unit tests: firing ones list exp_labels, silent ones
    // `exp_alerts: []`.
    let blocks: Vec<&str> = tests.split("- eval_time:").skip(1).collect();
    for name in &names {
        let about = |block: &&&str| {
            block
                .lines()
                .any(|l| l.trim() == format!("alertname: {name}"))
        };
        assert!(
            blocks
                .iter()
                .filter(about)
                .any(|b| b.contains("exp_labels:")),
            "no unit test fires {name}"
        );
        assert!(
            blocks
                .iter()
                .filter(about)
                .any(|b| b.contains("exp_alerts: []")),
            "no unit test keeps {name} silent"
        );
        let anchor = format!("README.md#runbook-{}", name.to_lowercase());
        assert!(
            rules.contains(&anchor),
            "{name}: runbook_url is not {anchor}"
        );
        assert!(
            readme.contains(&format!("### Runbook: {name}")),
            "README.md has no section \"### Runbook: {name}\""
        );
        for key in ["summary:", "description:", "runbook_url:"] {
            let rule = rules
                .split("- alert:")
                .find(|r| r.trim_start().starts_with(name.as_str()))
                .unwrap_or_default();
            assert!(rule.contains(key), "{name} has no {key}");
        }
    }
}

/// The chart ships copies of the rules and the dashboard (Helm reads only files inside the
/// chart); they must be the same bytes.
#[test]
fn chart_copies_equal_the_plain_files() {
    for (plain, copy) in [
        (
            RULES,
            "deploy/helm/event-exporter/files/event-exporter-rules.yaml",
        ),
        (
            DASHBOARD,
            "deploy/helm/event-exporter/files/event-exporter-dashboard.json",
        ),
    ] {
        assert!(
            read(plain) == read(copy),
            "{copy} differs from {plain}: copy it over"
        );
    }
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    require("promtool");
    let checked = run("promtool", &["check", "rules", RULES]);
    let count = alert_names(&read(RULES)).len();
    assert!(
        checked.contains(&format!("SUCCESS: {count} rules found")),
        "{checked}"
    );
    let tested = run("promtool", &["test", "rules", RULE_TESTS]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Percent-encoding for a form value.
fn form_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server of our own on loopback; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `target` every second and evaluates `rules` every second.
    fn start(target: &str, rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let rules_path = dir.path().join("rules.yaml");
        std::fs::write(&rules_path, rules).expect("write rules");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: event-exporter\n    static_configs:\n      - targets: ['{target}']\n",
            rules_path.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        Prometheus {
            child,
            port,
            dir,
            http: support::tls::plain_reqwest_client(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let response = self
            .http
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        serde_json::from_slice(&response.bytes().await.ok()?).ok()
    }

    /// `/api/v1/query`: `(status, data.result)`; a parse error is status "error".
    async fn query(&self, expr: &str) -> (String, Vec<Value>, Value) {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            form_encode(expr)
        );
        let answer: Value = match self.http.get(url).send().await {
            Ok(response) => serde_json::from_slice(&response.bytes().await.unwrap_or_default())
                .unwrap_or_default(),
            // Not listening yet (starting up): callers retry until their deadline.
            Err(error) => serde_json::json!({"status": "unreachable", "error": error.to_string()}),
        };
        let status = answer["status"].as_str().unwrap_or_default().to_string();
        let result = answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        (status, result, answer)
    }

    /// Waits until `expr` returns at least one sample.
    async fn wait_for(&self, expr: &str, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, result, answer) = self.query(expr).await;
            if status == "success" && !result.is_empty() {
                return result;
            }
            assert!(
                Instant::now() < deadline,
                "{expr} returned no data within {timeout:?}: {answer}\nprometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The state (`pending`/`firing`) of alert `name`, if active.
    async fn alert_state(&self, name: &str) -> Option<String> {
        let alerts = self.get("/api/v1/alerts").await?;
        alerts["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .and_then(|a| a["state"].as_str())
            .map(str::to_string)
    }
}

/// The shipped rules with the stalled-export threshold at 3 s and every `for:` at 2 s, so the
/// alert can fire within a test; each replacement must hit.
fn fast_rules() -> String {
    let mut rules = read(RULES);
    for (from, to) in [
        (
            "health_events_exporter_stream_lag_seconds > 300",
            "health_events_exporter_stream_lag_seconds > 3",
        ),
        ("for: 5m", "for: 2s"),
        ("for: 10m", "for: 2s"),
        ("for: 15m", "for: 2s"),
    ] {
        assert!(rules.contains(from), "{RULES} no longer contains {from:?}");
        rules = rules.replace(from, to);
    }
    rules
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().cloned().unwrap_or_default() {
        for target in panel["targets"].as_array().cloned().unwrap_or_default() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push((
                    panel["title"].as_str().unwrap_or_default().to_string(),
                    expr.to_string(),
                ));
            }
        }
    }
    exprs
}

/// Right after start, before any event: every labelled counter the alerts use is there at 0,
/// and the readiness gauge is 1.
fn assert_first_scrape(metrics: &str) {
    let mut expected = vec!["health_events_exporter_ready 1".to_string()];
    for (name, label, values) in [
        (
            "health_events_exporter_events_published_total",
            "status",
            event_exporter::metrics::PUBLISHED_STATUSES,
        ),
        (
            "health_events_exporter_publish_errors_total",
            "error_type",
            event_exporter::metrics::PUBLISH_ERROR_TYPES,
        ),
        (
            "health_events_exporter_publish_attempt_failures_total",
            "reason",
            event_exporter::metrics::ATTEMPT_FAILURE_REASONS,
        ),
        (
            "health_events_exporter_events_skipped_total",
            "reason",
            event_exporter::metrics::SKIP_REASONS,
        ),
    ] {
        assert!(!values.is_empty(), "{name}: no known {label} values");
        for value in values {
            expected.push(format!("{name}{{{label}=\"{value}\"}} 0"));
        }
    }
    for series in expected {
        assert!(
            metrics.lines().any(|l| l == series),
            "{series} missing right after start:\n{metrics}"
        );
    }
}

/// Needs no Prometheus: the exporter's own first scrape.
#[tokio::test]
async fn labelled_counters_exist_at_zero_on_the_first_scrape() {
    let db = TestDb::create().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::start(&ExporterOptions::new(&sink, None, db.env())).await;
    assert_first_scrape(&exporter.metrics().await);
    exporter.terminate_cleanly().await;
}

#[tokio::test]
async fn real_prometheus_scrapes_alerts_on_a_failing_sink_and_runs_the_dashboard() {
    require("prometheus");
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    // Retries outlast the test: the exporter keeps trying instead of exiting.
    options.max_retries = 1000;
    options.initial_backoff = "100ms".into();
    options.max_backoff = "300ms".into();
    let exporter = Exporter::start(&options).await;

    assert_first_scrape(&exporter.metrics().await);

    let prometheus = Prometheus::start(
        &format!("127.0.0.1:{}", exporter.metrics_port),
        &fast_rules(),
    );
    prometheus
        .wait_for(
            "health_events_exporter_build_info{job=\"event-exporter\"}",
            Duration::from_secs(30),
        )
        .await;

    // Events flow while the sink accepts them.
    for i in 0..5 {
        pg::insert_health_event(&client, &pg::health_event_doc("node-ok", i)).await;
    }
    sink.wait_for_accepted(5, Duration::from_secs(20)).await;
    prometheus
        .wait_for(
            "health_events_exporter_events_published_total{status=\"success\"} >= 5",
            Duration::from_secs(20),
        )
        .await;

    // The sink goes down; events keep arriving.
    sink.fail_always(503);
    for i in 5..10 {
        pg::insert_health_event(&client, &pg::health_event_doc("node-down", i)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen_pending = false;
    loop {
        match prometheus
            .alert_state("EventExporterExportStalled")
            .await
            .as_deref()
        {
            Some("firing") => break,
            Some("pending") => seen_pending = true,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "EventExporterExportStalled never fired; alerts: {:?}\nprometheus log:\n{}",
            prometheus.get("/api/v1/alerts").await,
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Evaluated every second with `for: 2s`: it is pending for at least one evaluation.
    assert!(
        seen_pending,
        "the alert fired without going through pending"
    );

    // The series behind the alerts, as Prometheus stored them.
    for expr in [
        "health_events_exporter_publish_attempt_failures_total{reason=\"status_503\"} > 0",
        "health_events_exporter_stream_lag_seconds > 3",
        "health_events_exporter_changelog_ids_behind > 0",
        "health_events_exporter_publish_errors_total{error_type=\"max_retries_exceeded\"} == 0",
        "health_events_exporter_token_refresh_errors_total == 0",
        "health_events_exporter_datastore_reconnects_total == 0",
        "health_events_exporter_ready == 1",
        "health_events_exporter_resume_token_update_timestamp > 0",
        "health_events_exporter_backfill_in_progress == 0",
        "process_resident_memory_bytes > 0",
    ] {
        prometheus.wait_for(expr, Duration::from_secs(10)).await;
    }
    prometheus
        .wait_for(
            "ALERTS{alertname=\"EventExporterPublishFailing\"}",
            Duration::from_secs(20),
        )
        .await;
    // The datastore is up: the readiness alert must not be active.
    assert_eq!(prometheus.alert_state("EventExporterNotReady").await, None);

    // Every dashboard expression parses and returns data.
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 20, "{} dashboard expressions", exprs.len());
    for (panel, expr) in exprs {
        let concrete = expr
            .replace("$__rate_interval", "15s")
            .replace("$job", ".+")
            .replace("$instance", ".+");
        assert!(
            !concrete.contains('$'),
            "{panel}: unknown variable in {expr}"
        );
        let (status, result, answer) = prometheus.query(&concrete).await;
        assert_eq!(status, "success", "{panel}: {concrete}: {answer}");
        assert!(
            !result.is_empty(),
            "{panel}: {concrete} returned no data: {answer}"
        );
    }

    // The dashboard's template variables: `label_values(<selector>, <label>)` finds values.
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut label_queries = 0;
    for variable in variables {
        let Some(query) = variable["query"]["query"].as_str() else {
            continue;
        };
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(", "))
            .unwrap_or_else(|| panic!("unexpected variable query {query}"));
        let (selector, label) = (inner.0.replace("$job", ".+"), inner.1.trim());
        let result = prometheus.wait_for(&selector, Duration::from_secs(5)).await;
        assert!(
            result.iter().all(|r| r["metric"][label].is_string()),
            "variable {}: {selector} has no {label} label: {result:?}",
            variable["name"]
        );
        label_queries += 1;
    }
    assert_eq!(label_queries, 2, "the job and instance variables");

    // The sink recovers: everything is delivered and the stalled alert resolves.
    sink.clear_failures();
    sink.wait_for_accepted(10, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while prometheus
        .alert_state("EventExporterExportStalled")
        .await
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "EventExporterExportStalled never resolved"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(exporter);
}
