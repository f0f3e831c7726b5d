//! `event-exporter status` against the real PostgreSQL: the resume token, the changelog head,
//! how far behind the token is (rows waiting, open ids, seconds), an unfinished backfill, and
//! the exit status (0 healthy, 1 behind or no token, 2 bad input); once with the real exporter
//! having caught up.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::exporter::{binary, free_port, Exporter, ExporterOptions};
use support::pg::{self, TestDb, EXPORTER_CLIENT_NAME};
use support::sink::{SinkOptions, SinkServer};

const CONFIG: &str = r#"[exporter.metadata]
cluster = "test-cluster"

[exporter.sink]
endpoint = "http://127.0.0.1:9/events"

[exporter.oidc]
enabled = false

[exporter.backfill]
enabled = true
max_events = 1000
max_age = "720h"
"#;

/// Runs `status` with `args` and the datastore environment; returns (exit code, stdout, stderr).
fn status(
    config: &std::path::Path,
    args: &[&str],
    env: &[(String, String)],
) -> (i32, String, String) {
    let output = std::process::Command::new(binary())
        .arg("status")
        .arg(format!("--config={}", config.display()))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run event-exporter status");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn json_status(config: &std::path::Path, args: &[&str], env: &[(String, String)]) -> (i32, Value) {
    let mut all = vec!["--output=json"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = status(config, &all, env);
    let value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("status --output json is not JSON ({e}):\n{stdout}\n{stderr}"));
    (code, value)
}

fn config_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, CONFIG).expect("write config");
    (dir, path)
}

#[tokio::test]
async fn reports_token_head_lag_open_ids_and_backfill() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let (_dir, config) = config_file();
    let env = db.env();

    // No token yet: unhealthy (1), and it says why.
    let (code, stdout, _) = status(&config, &[], &env);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("no resume token"), "{stdout}");

    for i in 0..2 {
        pg::insert_health_event(&client, &pg::health_event_doc("node-a", i)).await;
    }
    let position = pg::changelog_max_id(&client).await;
    pg::write_resume_token(
        &client,
        EXPORTER_CLIENT_NAME,
        &json!({"timestamp": "2026-01-01T00:00:00Z", "eventID": position, "contiguous": true}),
    )
    .await;
    // One transaction stays open (its id is taken, its row invisible) while three commit.
    let mut holder = db.client().await;
    let open = holder.transaction().await.expect("begin");
    pg::insert_health_event(&open, &pg::health_event_doc("node-open", 9)).await;
    for i in 2..5 {
        pg::insert_health_event(&client, &pg::health_event_doc("node-a", i)).await;
    }
    let head = pg::changelog_max_id(&client).await;
    assert_eq!(head, position + 4);

    let (code, report) = json_status(&config, &["--max-behind=1h"], &env);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["clientName"], "event-exporter");
    assert_eq!(report["resumeToken"]["position"], json!(position));
    assert_eq!(report["resumeToken"]["kind"], "contiguous");
    assert!(report["resumeToken"]["changedAt"].is_string(), "{report:#}");
    assert_eq!(report["changelogHead"]["id"], json!(head));
    assert_eq!(report["behind"]["ids"], json!(4));
    assert_eq!(report["behind"]["waitingRows"], json!(3));
    assert_eq!(report["behind"]["openIds"], json!(1));
    assert!(report["behind"]["seconds"].as_f64().unwrap_or(-1.0) >= 0.0);
    assert_eq!(report["backfill"], Value::Null);
    assert_eq!(report["backfillEnabled"], json!(true));
    assert_eq!(report["healthy"], json!(true));

    // Behind by more than --max-behind: exit 1 naming the lag.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (code, report) = json_status(&config, &["--max-behind=1s"], &env);
    assert_eq!(code, 1, "{report:#}");
    assert!(report["behind"]["seconds"].as_f64().unwrap_or(0.0) > 1.0);
    assert_eq!(report["healthy"], json!(false));
    assert!(
        report["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("--max-behind 1s")),
        "{report:#}"
    );
    let (code, text, _) = status(&config, &["--max-behind=1s"], &env);
    assert_eq!(code, 1);
    assert!(text.contains("4 ids: 3 rows waiting, 1 open ids"), "{text}");
    assert!(text.contains("UNHEALTHY"), "{text}");

    // The open transaction commits: no open ids remain.
    open.commit().await.expect("commit");
    let (_, report) = json_status(&config, &["--max-behind=1h"], &env);
    assert_eq!(report["behind"]["waitingRows"], json!(4));
    assert_eq!(report["behind"]["openIds"], json!(0));

    // An unfinished backfill and its progress.
    pg::write_resume_token(
        &client,
        "event-exporter-backfill",
        &json!({
            "startedAt": "2026-11-01T00:00:00Z", "from": "2026-10-01T00:00:00Z", "first": null,
            "changelogEnd": position, "openIds": [], "total": 10, "delivered": 4,
            "cursor": null, "done": false
        }),
    )
    .await;
    let (_, report) = json_status(&config, &["--max-behind=1h"], &env);
    let backfill = &report["backfill"];
    assert_eq!(backfill["done"], json!(false), "{report:#}");
    assert_eq!(backfill["total"], json!(10));
    assert_eq!(backfill["delivered"], json!(4));
    assert_eq!(backfill["remaining"], json!(6));
    assert_eq!(backfill["percent"], json!(40.0));
    let (_, text, _) = status(&config, &["--max-behind=1h"], &env);
    assert!(
        text.contains("unfinished: 4/10 delivered (40.0%), 6 remaining"),
        "{text}"
    );

    // The Go exporter's keyset bookmark is read too.
    pg::write_resume_token(
        &client,
        EXPORTER_CLIENT_NAME,
        &json!({"timestamp": "2026-01-01T00:00:00.123456Z", "eventID": head}),
    )
    .await;
    let (code, report) = json_status(&config, &["--max-behind=1s"], &env);
    assert_eq!(report["resumeToken"]["kind"], "keyset", "{report:#}");
    assert_eq!(report["behind"]["ids"], json!(0));
    assert_eq!(code, 0, "{report:#}");
}

#[tokio::test]
async fn bad_input_exits_2_naming_the_fault() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let (dir, config) = config_file();

    // A config file that does not load.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, CONFIG.replace("cluster = \"test-cluster\"", "")).expect("write");
    let (code, _, stderr) = status(&bad, &[], &db.env());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("exporter.metadata.cluster"), "{stderr}");

    // No datastore environment: MongoDB at its default address (as upstream), not reachable.
    let (code, _, stderr) = status(&config, &["--timeout=2s"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("mongodb localhost:27017"), "{stderr}");

    // PostgreSQL named without its variables.
    let provider = [("DATASTORE_PROVIDER".to_string(), "postgresql".to_string())];
    let (code, _, stderr) = status(&config, &[], &provider);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("DATASTORE_"), "{stderr}");

    // Nothing listens on the port.
    let mut env = db.env();
    for (key, value) in &mut env {
        if key == "DATASTORE_PORT" {
            *value = free_port().to_string();
        }
    }
    let (code, _, stderr) = status(&config, &[], &env);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("datastore"), "{stderr}");

    // A resume token that cannot be read names the client.
    pg::write_resume_token(&client, EXPORTER_CLIENT_NAME, &json!({"eventID": "x"})).await;
    let (code, _, stderr) = status(&config, &[], &db.env());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("\"event-exporter\""), "{stderr}");
}

#[tokio::test]
async fn caught_up_after_the_real_exporter_delivered_everything() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::start(&ExporterOptions::new(&sink, None, db.env())).await;
    for i in 0..5 {
        pg::insert_health_event(&client, &pg::health_event_doc("node-b", i)).await;
    }
    sink.wait_for_accepted(5, Duration::from_secs(20)).await;
    let head = pg::changelog_max_id(&client).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while pg::read_resume_token(&client, EXPORTER_CLIENT_NAME)
        .await
        .and_then(|t| t["eventID"].as_i64())
        != Some(head)
    {
        assert!(Instant::now() < deadline, "token never reached {head}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_dir, config) = config_file();
    let (code, stdout, stderr) = status(&config, &["--max-behind=1s"], &db.env());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("changelog id {head} (contiguous)")),
        "{stdout}"
    );
    assert!(stdout.contains("caught up (0 ids)"), "{stdout}");
    assert!(stdout.contains("status          OK"), "{stdout}");
    // Who leads: the running exporter's lock session, by its pid.
    let (_, json) = json_status(&config, &[], &db.env());
    let replica = json["leader"]["replica"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(replica.ends_with(&format!("/{}", exporter.pid())), "{json}");
    assert!(
        stdout.contains(&format!("leader          {replica}")),
        "{stdout}"
    );
    exporter.terminate().await;
    // Stopped: nobody leads.
    let (_, stdout, _) = status(&config, &[], &db.env());
    assert!(
        stdout.contains("leader          none: no exporter holds the leadership lock"),
        "{stdout}"
    );
}
