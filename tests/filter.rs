//! The CEL filter end to end: real PostgreSQL → the exporter binary with
//! `exporter.filter.expression` → a real HTTP sink.

mod support;

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};
use support::exporter::{Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer};
use tokio_postgres::GenericClient;

const WAIT: Duration = Duration::from_secs(30);

/// The `[exporter.filter]` table for `expression`.
fn filter_toml(expression: &str) -> String {
    // A JSON string is a valid TOML basic string for these expressions.
    format!(
        "[exporter.filter]\nexpression = {}\n",
        serde_json::to_string(expression).expect("string")
    )
}

/// A health event whose recommended action is `action` (0 = NONE is omitted, as Go's
/// `omitempty` writes it).
fn doc_with_action(node: &str, i: u32, action: i64) -> Value {
    let mut doc = pg::health_event_doc(node, i);
    let health = doc["healthevent"].as_object_mut().expect("healthevent");
    if action == 0 {
        health.remove("recommendedAction");
    } else {
        health.insert("recommendedAction".into(), json!(action));
    }
    doc
}

/// The value of an unlabelled series in an OpenMetrics text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until the series `name` reaches `value`; returns the last scrape.
async fn wait_for_metric(exporter: &Exporter, name: &str, value: f64) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = exporter.metrics().await;
        if metric(&text, name) == Some(value) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn filtered_events_are_not_published_and_still_advance_the_resume_token() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.extra_toml = filter_toml("event.recommendedAction != 'NONE'");
    let mut exporter = Exporter::start(&options).await;

    // NONE and RESTART_VM interleaved, ending with NONE: only filtered events can move the
    // token to the last row.
    let mut restart_vm = Vec::new();
    let mut none = 0;
    for i in 0..8u32 {
        let action = if i % 2 == 0 { 15 } else { 0 };
        let id = pg::insert_health_event(&client, &doc_with_action("node-f", i, action)).await;
        if action == 15 {
            restart_vm.push(id);
        } else {
            none += 1;
        }
    }
    sink.wait_for_accepted(restart_vm.len(), WAIT).await;
    let metrics = wait_for_metric(
        &exporter,
        "health_events_exporter_events_filtered_total",
        none as f64,
    )
    .await;
    assert_eq!(
        metric(&metrics, "health_events_exporter_events_filtered_total"),
        Some(none as f64),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "health_events_exporter_filter_errors_total"),
        Some(0.0),
        "{metrics}"
    );
    // The sink counts an event accepted before its answer reaches the exporter, which counts
    // it published on reading that answer: wait for the exporter's side too.
    let published = "health_events_exporter_events_published_total{status=\"success\"} 4";
    let deadline = Instant::now() + WAIT;
    let mut metrics = metrics;
    while !metrics.lines().any(|l| l == published) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        metrics = exporter.metrics().await;
    }
    assert!(metrics.lines().any(|l| l == published), "{metrics}");
    for help in [
        "# HELP health_events_exporter_events_filtered Total number of events not published \
         because the filter expression evaluated false.",
        "# HELP health_events_exporter_filter_errors Total number of filter evaluation errors. \
         The event is exported anyway.",
    ] {
        assert!(
            metrics.lines().any(|l| l == help),
            "no {help:?} in:\n{metrics}"
        );
    }

    let max_id = pg::changelog_max_id(&client).await;
    let status = exporter.terminate().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", exporter.log());
    let mut delivered = sink.accepted_ids();
    delivered.sort();
    restart_vm.sort();
    assert_eq!(delivered, restart_vm, "only the RESTART_VM events");
    assert!(sink
        .accepted()
        .iter()
        .all(|e| e["data"]["healthEvent"]["recommendedAction"] == "RESTART_VM"));
    let token = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token written");
    assert_eq!(token["eventID"], json!(max_id), "{token}");
}

#[tokio::test]
async fn an_invalid_expression_exits_2_naming_the_key() {
    let db = TestDb::create().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    for (expression, reason) in [
        ("event.recommendedAction !=", "CEL compilation failed"),
        ("1 + 1", "expression must return boolean, got int"),
        ("event.isFatal", "expression must return boolean, got dyn"),
        ("event.agent", "a bare field read is untyped"),
    ] {
        let mut options = ExporterOptions::new(&sink, None, db.env());
        options.extra_toml = filter_toml(expression);
        let mut exporter = Exporter::spawn(&options);
        let status = exporter.wait_exit(WAIT).await;
        let log = exporter.log();
        assert_eq!(status.code(), Some(2), "{expression}: {log}");
        assert!(
            log.contains("exporter.filter.expression: ") && log.contains(reason),
            "{expression}: no {reason:?} in:\n{log}"
        );
    }
    assert!(sink.requests().is_empty());
}

#[tokio::test]
async fn an_expression_that_cannot_be_evaluated_exports_everything_and_counts_errors() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.extra_toml = filter_toml("event.notAField == 'x'");
    let mut exporter = Exporter::start(&options).await;

    let mut ids = Vec::new();
    for i in 0..3u32 {
        ids.push(
            pg::insert_health_event(
                &client,
                &doc_with_action("node-e", i, i64::from(i % 2) * 15),
            )
            .await,
        );
    }
    sink.wait_for_accepted(3, WAIT).await;
    let metrics =
        wait_for_metric(&exporter, "health_events_exporter_filter_errors_total", 3.0).await;
    assert_eq!(
        metric(&metrics, "health_events_exporter_filter_errors_total"),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "health_events_exporter_events_filtered_total"),
        Some(0.0),
        "{metrics}"
    );
    let max_id = pg::changelog_max_id(&client).await;
    exporter.terminate_cleanly().await;
    let mut delivered = sink.accepted_ids();
    delivered.sort();
    ids.sort();
    assert_eq!(delivered, ids);
    let log = exporter.log();
    assert!(
        log.lines()
            .filter(|l| l.contains("Filter evaluation failed, exporting event"))
            .all(|l| l.contains("changelog_id") && l.contains("notAField")),
        "{log}"
    );
    assert_eq!(
        log.matches("Filter evaluation failed, exporting event")
            .count(),
        3,
        "{log}"
    );
    let token = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token written");
    assert_eq!(token["eventID"], json!(max_id), "{token}");
}

/// Inserts `doc` as if it had been written an hour ago.
async fn insert_history<C: GenericClient>(client: &C, doc: &Value) -> String {
    client
        .query_one(
            "INSERT INTO health_events (node_name, event_type, severity, recommended_action, document, created_at) \
             VALUES ('node-b', 'GpuXidError', 'GPU', 'RESTART_VM', $1, $2) RETURNING id::text",
            &[doc, &(Utc::now() - chrono::Duration::hours(1))],
        )
        .await
        .expect("insert history")
        .get(0)
}

#[tokio::test]
async fn the_filter_applies_to_the_backfill() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let mut restart_vm = Vec::new();
    for i in 0..10u32 {
        let action = if i % 3 == 0 { 15 } else { 0 };
        let id = insert_history(&client, &doc_with_action("node-b", i, action)).await;
        if action == 15 {
            restart_vm.push(id);
        }
    }
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.backfill =
        "enabled = true\nmax_age = \"24h\"\nmax_events = 1000\nbatch_size = 4\nrate_limit = 0"
            .into();
    options.extra_toml = filter_toml("event.recommendedAction != 'NONE'");
    let mut exporter = Exporter::start(&options).await;

    sink.wait_for_accepted(restart_vm.len(), WAIT).await;
    let deadline = Instant::now() + WAIT;
    let record = loop {
        let record = pg::read_resume_token(&client, "event-exporter-backfill").await;
        if record.as_ref().is_some_and(|r| r["done"] == json!(true)) || Instant::now() > deadline {
            break record.expect("backfill record");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(record["done"], json!(true), "{record}");
    let metrics = exporter.metrics().await;
    assert_eq!(
        metric(&metrics, "health_events_exporter_events_filtered_total"),
        Some((10 - restart_vm.len()) as f64),
        "{metrics}"
    );
    exporter.terminate_cleanly().await;
    let mut delivered = sink.accepted_ids();
    delivered.sort();
    restart_vm.sort();
    assert_eq!(delivered, restart_vm, "only the RESTART_VM history");
}
