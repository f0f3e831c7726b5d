//! Hostile input and a broken datastore, end to end against the exporter binary and a real
//! PostgreSQL (issue 14): documents the decoder cannot take, times outside RFC 3339's years,
//! and a changelog whose ids went back under the resume token. In every case the exporter keeps
//! running, the bad row is skipped with a warning naming it and counted, its neighbours are
//! delivered, and the resume token passes it.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::exporter::{sample_or_zero, Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer};
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(25);

/// Inserts a health event whose document is the JSON text `document` (so it can hold what a
/// `serde_json::Value` cannot, such as 1e400); returns its UUID.
async fn insert_raw(client: &Client, document: &str) -> String {
    client
        .query_one(
            "INSERT INTO health_events (node_name, document) \
             VALUES ('node-hostile', $1::text::jsonb) RETURNING id::text",
            &[&document],
        )
        .await
        .unwrap_or_else(|e| panic!("insert raw document: {e}"))
        .get(0)
}

/// A valid health event document with `RawEvent` holding `depth` nested arrays.
fn nested(depth: usize) -> String {
    let mut doc = pg::health_event_doc("node-deep", 7);
    doc["RawEvent"] = json!(null);
    let text = doc.to_string();
    let raw = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    text.replacen("\"RawEvent\":null", &format!("\"RawEvent\":{raw}"), 1)
}

async fn changelog_id(client: &Client, record_id: &str) -> i64 {
    client
        .query_one(
            "SELECT id FROM datastore_changelog \
             WHERE record_id::text = $1 AND operation = 'INSERT'",
            &[&record_id],
        )
        .await
        .unwrap_or_else(|e| panic!("changelog id of {record_id}: {e}"))
        .get(0)
}

async fn token_id(client: &Client) -> Option<i64> {
    pg::read_resume_token(client, pg::EXPORTER_CLIENT_NAME)
        .await
        .and_then(|v| v["eventID"].as_i64())
}

async fn wait_for_token(client: &Client, want: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let current = token_id(client).await;
        if current == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "resume token never reached {want}; last {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_ids(sink: &SinkServer, exporter: &mut Exporter, ids: &[String]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let accepted: HashSet<String> = sink.accepted_ids().into_iter().collect();
        let missing: Vec<&String> = ids.iter().filter(|id| !accepted.contains(*id)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            exporter.try_status().is_none(),
            "exporter exited; log:\n{}",
            exporter.log()
        );
        assert!(
            Instant::now() < deadline,
            "{} of {} events never delivered: {missing:?}; log:\n{}",
            missing.len(),
            ids.len(),
            exporter.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `line` has the field `changelog_id=<id>` (not a longer number starting with it).
fn names_changelog_id(line: &str, id: i64) -> bool {
    let needle = format!("changelog_id={id}");
    line.match_indices(&needle).any(|(at, _)| {
        !line[at + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

fn options(sink: &SinkServer, db: &TestDb) -> ExporterOptions {
    ExporterOptions::new(sink, None, db.env())
}

async fn stop_cleanly(exporter: &mut Exporter) {
    let status = exporter.terminate().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", exporter.log());
}

/// Every CloudEvent the sink accepted has an RFC 3339 `time` with a 4-digit year and the
/// expected `source`.
fn assert_valid_cloudevents(sink: &SinkServer) {
    for event in sink.accepted() {
        let time = event["time"].as_str().unwrap_or_default();
        assert!(
            time.len() >= 20
                && time.as_bytes()[..4].iter().all(u8::is_ascii_digit)
                && chrono::DateTime::parse_from_rfc3339(time).is_ok(),
            "invalid time in {event}"
        );
        assert_eq!(event["source"], "nvsentinel://test-cluster/healthevents");
    }
}

/// The bad rows of one run and what each must be counted as.
struct Hostile {
    record_id: String,
    reason: &'static str,
}

/// Inserts the known-bad documents between good ones; returns (good ids, bad rows).
async fn insert_hostile_mix(client: &Client, tag: u32) -> (Vec<String>, Vec<Hostile>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    good.push(pg::insert_health_event(client, &pg::health_event_doc("node-ok", tag)).await);
    // serde_json's recursion limit (128) in the document's parse.
    for depth in [127, 128, 1000] {
        bad.push(Hostile {
            record_id: insert_raw(client, &nested(depth)).await,
            reason: "undecodable",
        });
    }
    good.push(pg::insert_health_event(client, &pg::health_event_doc("node-ok", tag + 1)).await);
    // A number no f64 holds.
    let mut huge = pg::health_event_doc("node-huge", tag).to_string();
    huge = huge.replacen('{', "{\"RawEvent\": 1e400, ", 1);
    bad.push(Hostile {
        record_id: insert_raw(client, &huge).await,
        reason: "undecodable",
    });
    // Documents that are not objects, and a health event that is not one.
    for text in ["[1, 2, 3]", "\"GPU fell off the bus\"", "42", "null"] {
        bad.push(Hostile {
            record_id: insert_raw(client, text).await,
            reason: "undecodable",
        });
    }
    // Times outside RFC 3339's years, and their neighbours.
    for generated in [
        json!({"seconds": 253402300800i64}),
        json!({"seconds": "253402300800"}),
        json!({"seconds": -62135596801i64}),
        json!({"seconds": i64::MAX}),
        json!({"seconds": 1, "nanos": -1}),
        json!({"seconds": 1, "nanos": 1_000_000_000}),
        json!("0000-01-01T00:00:00Z"),
        json!("9999-12-31T23:59:59-01:00"),
    ] {
        let mut doc = pg::health_event_doc("node-time", tag);
        doc["healthevent"]["generatedTimestamp"] = generated;
        bad.push(Hostile {
            record_id: pg::insert_health_event(client, &doc).await,
            reason: "invalid_time",
        });
    }
    // The last second RFC 3339 can write is fine.
    let mut edge = pg::health_event_doc("node-edge", tag);
    edge["healthevent"]["generatedTimestamp"] = json!({"seconds": 253402300799i64});
    good.push(pg::insert_health_event(client, &edge).await);
    good.push(pg::insert_health_event(client, &pg::health_event_doc("node-ok", tag + 2)).await);
    (good, bad)
}

/// Documents nested 128+ levels deep, numbers out of range, non-object documents and times
/// outside years 0001-9999 are each skipped with a warning naming their changelog id, counted,
/// and passed by the resume token, while the events around them are delivered; a restart does
/// not trip over them again.
#[tokio::test]
async fn undecodable_rows_in_the_stream_are_skipped_and_never_block_their_neighbours() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::start(&options(&sink, &db)).await;

    let (good, bad) = insert_hostile_mix(&client, 1).await;
    wait_for_ids(&sink, &mut exporter, &good).await;
    let head = pg::changelog_max_id(&client).await;
    wait_for_token(&client, head).await;

    let accepted: HashSet<String> = sink.accepted_ids().into_iter().collect();
    let log = exporter.log();
    for row in &bad {
        assert!(
            !accepted.contains(&row.record_id),
            "{} was delivered",
            row.record_id
        );
        let id = changelog_id(&client, &row.record_id).await;
        assert!(
            log.lines()
                .any(|line| line.contains("WARN") && names_changelog_id(line, id)),
            "no warning names changelog_id={id} ({}); log:\n{log}",
            row.reason
        );
    }
    assert!(!log.contains("panicked"), "{log}");
    let metrics = exporter.metrics().await;
    for reason in ["undecodable", "invalid_time"] {
        let want = bad.iter().filter(|row| row.reason == reason).count() as f64;
        let got = sample_or_zero(
            &metrics,
            &format!("health_events_exporter_events_skipped_total{{reason=\"{reason}\"}}"),
        );
        assert_eq!(got, want, "skipped{{reason={reason}}}; metrics:\n{metrics}");
    }
    assert_valid_cloudevents(&sink);
    assert_eq!(
        sink.accepted_ids().len(),
        good.len(),
        "nothing else was sent"
    );

    // A restart resumes past the bad rows: no crash loop, and new events flow.
    stop_cleanly(&mut exporter).await;
    let mut exporter = Exporter::start(&options(&sink, &db)).await;
    let after = pg::insert_health_event(&client, &pg::health_event_doc("node-after", 9)).await;
    wait_for_ids(&sink, &mut exporter, std::slice::from_ref(&after)).await;
    assert_eq!(sink.accepted_ids().len(), good.len() + 1);
    stop_cleanly(&mut exporter).await;
}

/// The same rows in the backfill: each bad row is skipped in its keyset page, the good rows of
/// that page and the pages after it are delivered, and the backfill completes.
#[tokio::test]
async fn undecodable_rows_in_a_backfill_page_cost_only_themselves() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let (good, bad) = insert_hostile_mix(&client, 20).await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = options(&sink, &db);
    options.workers = 2;
    options.backfill =
        "enabled = true\nmax_age = \"1h\"\nmax_events = 1000\nbatch_size = 3\nrate_limit = 0"
            .into();
    let mut exporter = Exporter::start(&options).await;
    wait_for_ids(&sink, &mut exporter, &good).await;

    let deadline = Instant::now() + WAIT;
    let record = loop {
        let record = pg::read_resume_token(&client, "event-exporter-backfill").await;
        if record.as_ref().is_some_and(|r| r["done"] == json!(true)) {
            break record.unwrap_or(Value::Null);
        }
        assert!(
            Instant::now() < deadline,
            "backfill never finished: {record:?}; log:\n{}",
            exporter.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        record["delivered"],
        json!(good.len() + bad.len()),
        "every row of the plan is passed: {record}"
    );
    let accepted: HashSet<String> = sink.accepted_ids().into_iter().collect();
    let log = exporter.log();
    for row in &bad {
        assert!(!accepted.contains(&row.record_id));
        assert!(
            log.lines()
                .any(|line| line.contains("WARN") && line.contains(&row.record_id)),
            "no warning names record {} ({}); log:\n{log}",
            row.record_id,
            row.reason
        );
    }
    assert!(!log.contains("panicked"), "{log}");
    assert_valid_cloudevents(&sink);
    assert_eq!(sink.accepted_ids().len(), good.len());
    stop_cleanly(&mut exporter).await;
}

/// `TRUNCATE datastore_changelog RESTART IDENTITY` under a running exporter: the ids restart
/// at 1, below the resume token. The exporter logs an error, counts the reset, and delivers
/// the new events; the token follows the new changelog.
#[tokio::test]
async fn changelog_ids_reset_while_running_are_detected_and_new_events_flow() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::start(&options(&sink, &db)).await;
    let mut before = Vec::new();
    for i in 0..20 {
        before.push(pg::insert_health_event(&client, &pg::health_event_doc("node-a", i)).await);
    }
    wait_for_ids(&sink, &mut exporter, &before).await;
    wait_for_token(&client, 20).await;

    client
        .batch_execute("TRUNCATE datastore_changelog RESTART IDENTITY")
        .await
        .expect("truncate");
    let mut after = Vec::new();
    for i in 0..5 {
        after.push(pg::insert_health_event(&client, &pg::health_event_doc("node-b", i)).await);
    }
    assert_eq!(pg::changelog_max_id(&client).await, 5);
    wait_for_ids(&sink, &mut exporter, &after).await;
    wait_for_token(&client, 5).await;

    let log = exporter.log();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("ids were reset")
            && l.contains("read_position=20")
            && l.contains("changelog_head=")),
        "{log}"
    );
    let metrics = exporter.metrics().await;
    assert_eq!(
        sample_or_zero(
            &metrics,
            "health_events_exporter_resume_token_resets_total{reason=\"ahead_while_running\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(sink.accepted_ids().len(), 25, "each event once");
    assert_eq!(exporter.probe("/readyz").await.map(|(s, _)| s), Some(200));

    // Still streaming on the new changelog, and a restart resumes from its token.
    let more = pg::insert_health_event(&client, &pg::health_event_doc("node-c", 1)).await;
    wait_for_ids(&sink, &mut exporter, std::slice::from_ref(&more)).await;
    wait_for_token(&client, 6).await;
    stop_cleanly(&mut exporter).await;
    let mut exporter = Exporter::start(&options(&sink, &db)).await;
    let last = pg::insert_health_event(&client, &pg::health_event_doc("node-c", 2)).await;
    wait_for_ids(&sink, &mut exporter, std::slice::from_ref(&last)).await;
    assert_eq!(
        sink.accepted_ids().len(),
        27,
        "nothing re-sent after the restart"
    );
    assert!(!exporter.log().contains("ahead of the changelog"));
    stop_cleanly(&mut exporter).await;
}

/// The changelog is reset while the exporter is down: at start the token (20) is ahead of the
/// head (5); the exporter says so, counts it, and delivers the 5 new events.
#[tokio::test]
async fn changelog_ids_reset_across_a_restart_are_detected_at_start() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::start(&options(&sink, &db)).await;
    let mut before = Vec::new();
    for i in 0..20 {
        before.push(pg::insert_health_event(&client, &pg::health_event_doc("node-a", i)).await);
    }
    wait_for_ids(&sink, &mut exporter, &before).await;
    wait_for_token(&client, 20).await;
    stop_cleanly(&mut exporter).await;

    client
        .batch_execute("TRUNCATE datastore_changelog RESTART IDENTITY")
        .await
        .expect("truncate");
    let mut after = Vec::new();
    for i in 0..5 {
        after.push(pg::insert_health_event(&client, &pg::health_event_doc("node-b", i)).await);
    }
    let mut exporter = Exporter::start(&options(&sink, &db)).await;
    wait_for_ids(&sink, &mut exporter, &after).await;
    wait_for_token(&client, 5).await;
    let log = exporter.log();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("ahead of the changelog's head")
            && l.contains("resume_token=20")
            && l.contains("changelog_head=5")),
        "{log}"
    );
    let metrics = exporter.metrics().await;
    assert_eq!(
        sample_or_zero(
            &metrics,
            "health_events_exporter_resume_token_resets_total{reason=\"ahead_at_start\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(sink.accepted_ids().len(), 25);
    stop_cleanly(&mut exporter).await;
}

/// A stored `{"eventID": 1000000, "contiguous": true}` with a changelog head of 10: detected at
/// start, the 10 events (inside the backfill window) and new ones are delivered.
#[tokio::test]
async fn a_bogus_token_far_ahead_of_the_head_is_detected() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let mut existing = Vec::new();
    for i in 0..10 {
        existing.push(pg::insert_health_event(&client, &pg::health_event_doc("node-a", i)).await);
    }
    assert_eq!(pg::changelog_max_id(&client).await, 10);
    pg::write_resume_token(
        &client,
        pg::EXPORTER_CLIENT_NAME,
        &json!({"timestamp": "2026-01-01T00:00:00Z", "eventID": 1000000, "contiguous": true}),
    )
    .await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::start(&options(&sink, &db)).await;
    wait_for_ids(&sink, &mut exporter, &existing).await;
    let new = pg::insert_health_event(&client, &pg::health_event_doc("node-b", 1)).await;
    wait_for_ids(&sink, &mut exporter, std::slice::from_ref(&new)).await;
    wait_for_token(&client, 11).await;
    let log = exporter.log();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("resume_token=1000000")
            && l.contains("changelog_head=10")),
        "{log}"
    );
    assert_eq!(sink.accepted_ids().len(), 11);
    stop_cleanly(&mut exporter).await;
}

/// Outside the backfill window nothing old is re-sent: with `max_events = 3`, only the newest
/// 3 changelog ids of the new changelog are read after a reset at start.
#[tokio::test]
async fn a_reset_restarts_within_max_events() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let mut existing = Vec::new();
    for i in 0..10 {
        existing.push(pg::insert_health_event(&client, &pg::health_event_doc("node-a", i)).await);
    }
    pg::write_resume_token(
        &client,
        pg::EXPORTER_CLIENT_NAME,
        &json!({"eventID": 500, "contiguous": true}),
    )
    .await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = options(&sink, &db);
    options.backfill = "enabled = false\nmax_events = 3".into();
    let mut exporter = Exporter::start(&options).await;
    wait_for_ids(&sink, &mut exporter, &existing[7..]).await;
    wait_for_token(&client, 10).await;
    let mut ids = sink.accepted_ids();
    ids.sort();
    let mut want = existing[7..].to_vec();
    want.sort();
    assert_eq!(ids, want, "only the newest max_events ids");
    stop_cleanly(&mut exporter).await;
}

/// What must not be taken for a reset: a token equal to the head, a token on a rolled-back id
/// at the head (a hole the sequence took), a transaction holding the head open, and an empty
/// changelog with token 0. Nothing old is re-sent, nothing is logged as an error, and new
/// events flow.
#[tokio::test]
async fn a_token_at_the_head_holes_and_open_transactions_are_not_a_reset() {
    let db = TestDb::create().await;
    let mut client = db.client().await;

    // Empty changelog, token 0.
    pg::write_resume_token(
        &client,
        pg::EXPORTER_CLIENT_NAME,
        &json!({"eventID": 0, "contiguous": true}),
    )
    .await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::start(&options(&sink, &db)).await;
    let first = pg::insert_health_event(&client, &pg::health_event_doc("node-a", 1)).await;
    wait_for_ids(&sink, &mut exporter, std::slice::from_ref(&first)).await;
    wait_for_token(&client, 1).await;
    stop_cleanly(&mut exporter).await;

    // Ten more, then a rolled-back insert takes id 12: the token says 12 (hole decided).
    for i in 0..10 {
        pg::insert_health_event(&client, &pg::health_event_doc("node-b", i)).await;
    }
    {
        let tx = client.transaction().await.expect("begin");
        pg::insert_health_event(&tx, &pg::health_event_doc("node-rb", 1)).await;
        tx.rollback().await.expect("rollback");
    }
    assert_eq!(pg::changelog_max_id(&client).await, 11);
    pg::write_resume_token(
        &client,
        pg::EXPORTER_CLIENT_NAME,
        &json!({"eventID": 12, "contiguous": true}),
    )
    .await;
    // A transaction holds id 13 open across the start.
    let holder = db.client().await;
    holder.batch_execute("BEGIN").await.expect("begin");
    let open = pg::insert_health_event(&holder, &pg::health_event_doc("node-open", 1)).await;
    let sent_before = sink.accepted_ids().len();
    let mut exporter = Exporter::start(&options(&sink, &db)).await;
    let next = pg::insert_health_event(&client, &pg::health_event_doc("node-c", 1)).await;
    wait_for_ids(&sink, &mut exporter, std::slice::from_ref(&next)).await;
    holder.batch_execute("COMMIT").await.expect("commit");
    wait_for_ids(&sink, &mut exporter, std::slice::from_ref(&open)).await;
    wait_for_token(&client, 14).await;
    assert_eq!(
        sink.accepted_ids().len(),
        sent_before + 2,
        "nothing before the token was re-sent"
    );

    // Token equal to the head at start.
    stop_cleanly(&mut exporter).await;
    let mut exporter = Exporter::start(&options(&sink, &db)).await;
    let last = pg::insert_health_event(&client, &pg::health_event_doc("node-d", 1)).await;
    wait_for_ids(&sink, &mut exporter, std::slice::from_ref(&last)).await;
    assert_eq!(sink.accepted_ids().len(), sent_before + 3);
    let metrics = exporter.metrics().await;
    // The reset counters exist from the first scrape, and stay at 0.
    let resets: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("health_events_exporter_resume_token_resets_total{"))
        .collect();
    assert_eq!(resets.len(), 2, "{metrics}");
    assert!(resets.iter().all(|l| l.ends_with(" 0")), "{resets:?}");
    assert!(!exporter.log().contains("ERROR"), "{}", exporter.log());
    stop_cleanly(&mut exporter).await;
}

/// Out-of-range numbers and a cluster that cannot be a URI host: `check-config` and the
/// exporter both exit 2 naming the key (before this, `backoff_multiplier = 1e300` passed
/// `check-config` and the exporter panicked with exit 101). A float with an integral value for
/// an integer key is accepted with a warning.
#[test]
fn hostile_numbers_and_cluster_names_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sink_url = "http://127.0.0.1:9/api/v1/events";
    let base = format!(
        "[exporter.metadata]\ncluster = \"test-cluster\"\n\n[exporter.sink]\nendpoint = \"{sink_url}\"\n\n\
         [exporter.oidc]\nenabled = false\n\n[exporter.backfill]\nmax_events = 10\n\n\
         [exporter.failure_handling]\nmax_retries = 3\nbackoff_multiplier = 2.0\n"
    );
    let env = vec![
        ("DATASTORE_PROVIDER".to_string(), "postgresql".to_string()),
        ("DATASTORE_USERNAME".to_string(), "postgres".to_string()),
        ("DATASTORE_SSLMODE".to_string(), "disable".to_string()),
    ];
    for (from, to, key) in [
        (
            "backoff_multiplier = 2.0",
            "backoff_multiplier = 1e300",
            "exporter.failure_handling.backoff_multiplier",
        ),
        (
            "backoff_multiplier = 2.0",
            "backoff_multiplier = nan",
            "exporter.failure_handling.backoff_multiplier",
        ),
        (
            "cluster = \"test-cluster\"",
            "cluster = \"my cluster\"",
            "exporter.metadata.cluster",
        ),
        (
            "max_events = 10",
            "max_events = 1.5",
            "exporter.backfill.max_events",
        ),
        (
            "max_retries = 3",
            "max_retries = 3\nmax_backoff = \"2562047h\"",
            "exporter.failure_handling.max_backoff",
        ),
    ] {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, base.replace(from, to)).expect("write config");
        let config = format!("--config={}", path.display());
        for args in [vec!["check-config", config.as_str()], vec![config.as_str()]] {
            let (code, output) = support::exporter::run_once(&args, &env);
            assert_eq!(code, Some(2), "{to} with {args:?}: {output}");
            assert!(output.contains(key), "{to}: {output}");
            assert!(!output.contains("panicked"), "{output}");
        }
    }
    let path = dir.path().join("config.toml");
    std::fs::write(&path, base.replace("max_events = 10", "max_events = 1e+06"))
        .expect("write config");
    let (code, output) = support::exporter::run_once(
        &["check-config", &format!("--config={}", path.display())],
        &env,
    );
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains("\"max_events\": 1000000")
            && output.contains("exporter.backfill.max_events: 1000000 is a float"),
        "{output}"
    );
}
