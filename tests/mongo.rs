//! End to end through the binary with MongoDB, NVSentinel's default datastore: the MongoDB wire
//! peer (`tests/mongo_peer/peer.py`, a stateful one-node replica set on loopback: no MongoDB
//! server can be installed here) → the exporter → a real HTTP sink. Events are written with the
//! official Rust driver, shaped as platform-connectors store them.
//!
//! Run with `scripts/test --test mongo` (it installs pymongo for the peer).

#[path = "mongo_peer/launch.rs"]
mod mongo_peer_launch;
mod support;

use std::time::Duration;

use mongo_peer_launch::{health_event, Store, EVENTS, TOKENS};
use mongodb::bson::{doc, Bson, Document};
use mongodb::Client;
use serde_json::{json, Value};
use support::exporter::{sample_or_zero, Exporter, ExporterOptions};
use support::sink::{SinkOptions, SinkServer};

const WAIT: Duration = Duration::from_secs(30);

impl Store {
    /// The chart's environment, with `APP_NAME` as the chart sets it.
    fn exporter_env(&self) -> Vec<(String, String)> {
        let mut env = self.env();
        env.push(("APP_NAME".into(), "event-exporter".into()));
        env
    }

    async fn token_document(&self) -> Option<Document> {
        self.tokens()
            .find_one(doc! {"clientName": "event-exporter"})
            .await
            .expect("find token")
    }

    /// The backfill's progress record, which must exist.
    async fn backfill_progress(&self) -> BackfillProgress {
        let record = self
            .tokens()
            .find_one(doc! {"clientName": "event-exporter-backfill"})
            .await
            .expect("find")
            .expect("the backfill's progress record");
        let plan = record.get_document("plan").expect("plan");
        let done = plan.get_bool("done").expect("plan.done");
        let delivered = plan
            .get_i64("delivered")
            .map(|d| d as usize)
            .unwrap_or_else(|_| plan.get_i32("delivered").map(|d| d as usize).unwrap_or(0));
        BackfillProgress {
            record,
            done,
            delivered,
        }
    }
}

/// `change_stream_resume_token_recoveries_total{phase}` is exactly 1.
async fn assert_recovered_once(exporter: &Exporter, phase: &str) {
    let metrics = exporter.metrics().await;
    let series = format!(
        "change_stream_resume_token_recoveries_total{{client=\"event-exporter\",phase=\"{phase}\"}}"
    );
    assert_eq!(sample_or_zero(&metrics, &series), 1.0, "{metrics}");
}

fn options(sink: &SinkServer, store: &Store) -> ExporterOptions {
    ExporterOptions::new(sink, None, store.exporter_env())
}

async fn sink() -> SinkServer {
    SinkServer::start(SinkOptions::default()).await
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_a_platform_connector_document_as_upstreams_cloudevent() {
    let store = Store::start(&[]).await;
    let sink = sink().await;
    let mut exporter = Exporter::start(&options(&sink, &store)).await;
    let id = store.insert("node-7", 3..4).await.remove(0);
    let events = sink.wait_for_accepted(1, WAIT).await;
    let expected = json!({
        "specversion": "1.0",
        "type": "com.nvidia.nvsentinel.health.v1",
        "source": "nvsentinel://test-cluster/healthevents",
        "id": id,
        "time": "2026-01-01T00:00:03.25Z",
        "data": {
            "healthEvent": {
                "agent": "gpu-health-monitor",
                "checkName": "GpuXidError",
                "componentClass": "GPU",
                "entitiesImpacted": [{"entityType": "GPU", "entityValue": "3"}],
                "errorCode": ["79"],
                "generatedTimestamp": "2026-01-01T00:00:03.25Z",
                "isFatal": true,
                "isHealthy": false,
                "message": "XID 79 #3",
                "metadata": {"idempotencyKey": "node-7#3"},
                "nodeName": "node-7",
                "processingStrategy": "EXECUTE_REMEDIATION",
                "recommendedAction": "RESTART_BM",
                "version": 1,
            },
            "metadata": {"cluster": "test-cluster", "environment": "test"},
        },
    });
    assert_eq!(events[0], expected, "log:\n{}", exporter.log());
    // Upstream's lag metrics: known once the stream read an event or an empty batch.
    let metrics = exporter.metrics().await;
    let client = "{client=\"event-exporter\"}";
    assert_eq!(
        sample_or_zero(&metrics, &format!("change_stream_lag_known{client}")),
        1.0,
        "{metrics}"
    );
    let lag = support::exporter::sample(&metrics, &format!("change_stream_lag_seconds{client}"));
    assert!(lag.is_some_and(|l| (0.0..60.0).contains(&l)), "{metrics}");

    // A clean stop writes upstream's token document: the event's own change-stream _id.
    let status = exporter.terminate().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", exporter.log());
    let token = store
        .token_document()
        .await
        .expect("token document written");
    let resume = token
        .get_document("resumeToken")
        .expect("resumeToken document");
    assert!(resume.get_str("_data").is_ok(), "{token}");
    assert!(
        matches!(token.get("lastExportedAt"), Some(Bson::DateTime(_))),
        "{token}"
    );
    // The stream was opened on inserts only, with updateLookup and the app name.
    let aggregate = store.peer.commands("aggregate").await;
    let text = serde_json::to_string(&aggregate).unwrap_or_default();
    assert!(text.contains("updateLookup"), "{text}");
    assert!(text.contains("\"insert\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_a_restart_and_after_kill_9_with_nothing_lost() {
    let store = Store::start(&[]).await;
    let sink = sink().await;
    let mut exporter = Exporter::start(&options(&sink, &store)).await;
    let first = store.insert("node-1", 0..5).await;
    sink.wait_for_accepted(5, WAIT).await;
    exporter.terminate_cleanly().await;

    // Written while the exporter is down: delivered after the restart, nothing re-sent.
    let second = store.insert("node-1", 5..10).await;
    let mut exporter = Exporter::start(&options(&sink, &store)).await;
    let events = sink.wait_for_accepted(10, WAIT).await;
    let mut expected = first.clone();
    expected.extend(second.clone());
    assert_eq!(sorted(ids(&events)), sorted(expected.clone()));

    // kill -9 mid-stream: every event is delivered after the restart (re-sends allowed).
    let third = store.insert("node-1", 10..20).await;
    exporter.kill();
    let fourth = store.insert("node-1", 20..25).await;
    let _exporter = Exporter::start(&options(&sink, &store)).await;
    expected.extend(third);
    expected.extend(fourth);
    let delivered = wait_for_ids(&sink, &expected).await;
    assert!(
        delivered,
        "missing events after kill -9: {:?}",
        ids(&sink.accepted())
    );
    // Nothing delivered before the clean stop was sent again (after kill -9 the events since
    // the last checkpoint write may be: at least once).
    let accepted = ids(&sink.accepted());
    for id in &first {
        assert_eq!(
            accepted.iter().filter(|a| *a == id).count(),
            1,
            "{id} re-sent"
        );
    }
}

/// SIGTERM in the middle of a change-stream backlog (events written while the exporter was
/// down, read back from its resume token): the reader has filled its queue to the pipeline
/// and waits to hand over the next batch when intake stops. The exporter must stop within the
/// grace period with status 0 and its resume token moved over what it delivered, and a
/// restart delivers the rest. (The same door as the PostgreSQL changelog's, `ReaderTask`,
/// which `tests/delivery.rs` checks for PostgreSQL.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_change_stream_backlog_stops_promptly_and_saves_the_token() {
    const BACKLOG: i64 = 1_000; // ten batches of the driver's 101: more than the reader queues
    let store = Store::start(&[]).await;
    let sink = SinkServer::answering_after(Duration::from_millis(5)).await;
    let mut options = options(&sink, &store);
    options.workers = 2;
    let mut exporter = Exporter::start(&options).await;
    let mut expected = store.insert("node-9", 0..1).await;
    sink.wait_for_accepted(1, WAIT).await;
    exporter.terminate_cleanly().await;
    let resume_token =
        |token: Option<Document>| token.and_then(|t| t.get_document("resumeToken").ok().cloned());
    let before = resume_token(store.token_document().await);
    assert!(before.is_some(), "a resume token after the clean stop");

    expected.extend(store.insert("node-9", 1..BACKLOG + 1).await);
    let mut exporter = Exporter::start(&options).await;
    sink.wait_for_accepted(100, WAIT).await;
    let stopped_in = exporter.terminate_cleanly().await;
    assert!(
        sink.accepted().len() <= BACKLOG as usize,
        "the backlog was delivered before the SIGTERM; the test proves nothing"
    );
    assert!(
        stopped_in < Duration::from_secs(15),
        "stopping took {stopped_in:?} (grace 20 s, 2 events in flight of 5 ms each)"
    );
    let after = resume_token(store.token_document().await);
    assert_ne!(
        after, before,
        "the resume token moved over the delivered events"
    );

    let mut exporter = Exporter::start(&options).await;
    assert!(
        wait_for_ids(&sink, &expected).await,
        "every event delivered after the restart"
    );
    exporter.terminate_cleanly().await;
}

/// The backfill's progress record (`clientName: "event-exporter-backfill"`).
struct BackfillProgress {
    record: Document,
    /// `plan.done`.
    done: bool,
    /// `plan.delivered` (stored as an int32 or an int64); 0 when absent.
    delivered: usize,
}

/// Waits until every id in `expected` was accepted at least once.
async fn wait_for_ids(sink: &SinkServer, expected: &[String]) -> bool {
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        let accepted = ids(&sink.accepted());
        if expected.iter().all(|id| accepted.contains(id)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takes_over_a_go_exporters_token_with_nothing_re_sent() {
    let store = Store::start(&[]).await;
    // The Go exporter's state: it exported up to event 2 and stored that event's _id.
    let mut watch = store
        .events()
        .watch()
        .max_await_time(Duration::from_millis(200))
        .await
        .expect("watch");
    let ids_all = store.insert("node-2", 0..6).await;
    let mut tokens = Vec::new();
    while tokens.len() < 3 {
        if let Some(event) = watch.next_if_any().await.expect("next") {
            tokens.push(event.id);
        }
    }
    drop(watch);
    let token = mongodb::bson::to_bson(&tokens[2]).expect("token as BSON");
    store
        .tokens()
        .insert_one(doc! {"clientName": "event-exporter", "resumeToken": token})
        .await
        .expect("Go token");
    let sink = sink().await;
    let mut exporter = Exporter::start(&options(&sink, &store)).await;
    let events = sink.wait_for_accepted(3, WAIT).await;
    assert_eq!(
        sorted(ids(&events)),
        sorted(ids_all[3..].to_vec()),
        "log:\n{}",
        exporter.log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.accepted().len(),
        3,
        "nothing before the Go token is re-sent"
    );
    exporter.terminate_cleanly().await;
    assert_eq!(
        store
            .tokens()
            .count_documents(doc! {"clientName": "event-exporter"})
            .await
            .expect("count"),
        1,
        "the token document is upserted, not duplicated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_stream_reconnects_and_readiness_follows() {
    let store = Store::start(&[]).await;
    let sink = sink().await;
    let exporter = Exporter::start(&options(&sink, &store)).await;
    store.insert("node-3", 0..2).await;
    sink.wait_for_accepted(2, WAIT).await;
    // A dropped connection, then a primary stepping down on the next getMores.
    store
        .peer
        .control("POST", "/drop-connections", Some(json!({})))
        .await;
    store.insert("node-3", 2..4).await;
    sink.wait_for_accepted(4, WAIT).await;
    store
        .peer
        .control(
            "POST",
            "/fail",
            Some(json!({"commands": ["getMore", "aggregate"], "code": 10107, "times": 3})),
        )
        .await;
    store.insert("node-3", 4..6).await;
    let events = sink.wait_for_accepted(6, WAIT).await;
    assert_eq!(events.len(), 6, "log:\n{}", exporter.log());
    // Failing for good: /readyz turns 503 while the stream cannot be opened.
    store
        .peer
        .control(
            "POST",
            "/fail",
            Some(json!({"commands": ["getMore", "aggregate"], "closeConnection": true, "alwaysOn": true})),
        )
        .await;
    let mut saw_unready = false;
    for _ in 0..100 {
        if let Some((503, _)) = exporter.probe("/readyz").await {
            saw_unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        saw_unready,
        "readyz stayed 200 while the stream failed; log:\n{}",
        exporter.log()
    );
    store.peer.control("POST", "/fail/off", None).await;
    store.insert("node-3", 6..7).await;
    sink.wait_for_accepted(7, WAIT).await;
    let metrics = exporter.metrics().await;
    assert!(
        sample_or_zero(
            &metrics,
            "health_events_exporter_datastore_reconnects_total"
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_history_is_recovered_by_a_backfill_from_the_last_exported_event() {
    let store = Store::start(&["--oplog-size", "50"]).await;
    let sink = sink().await;
    let mut exporter = Exporter::start(&options(&sink, &store)).await;
    let before = store.insert("node-4", 0..3).await;
    sink.wait_for_accepted(3, WAIT).await;
    exporter.terminate_cleanly().await;
    // Down long enough for the oplog to roll past the stored token (upstream: silent loss).
    let missed = store.insert("node-4", 3..80).await;
    store
        .peer
        .control("POST", "/trim", Some(json!({"keep": 10})))
        .await;
    let exporter = Exporter::start(&options(&sink, &store)).await;
    let after = store.insert("node-4", 80..83).await;
    let mut expected = missed.clone();
    expected.extend(after);
    assert!(
        wait_for_ids(&sink, &expected).await,
        "events lost with the history; log:\n{}",
        exporter.log()
    );
    let accepted = ids(&sink.accepted());
    for id in &expected {
        assert_eq!(
            accepted.iter().filter(|a| *a == id).count(),
            1,
            "{id} delivered twice"
        );
    }
    // The recovery re-reads from 2 s (writers' clock margin) before the last exported event:
    // events written that close to it may be sent once more, nothing older.
    for id in &before {
        assert!(
            accepted.iter().filter(|a| *a == id).count() <= 2,
            "{id} sent 3 times"
        );
    }
    assert_recovered_once(&exporter, "initialization").await;
    assert!(exporter.log().contains("history"), "the loss is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_backfills_stored_events_and_hands_off_to_the_stream() {
    let store = Store::start(&[]).await;
    let old = store.insert("node-5", 0..25).await;
    let sink = sink().await;
    let mut options = options(&sink, &store);
    options.backfill = "enabled = true\nmax_age = \"1h\"\nmax_events = 20\nbatch_size = 7".into();
    let mut exporter = Exporter::start(&options).await;
    let new = store.insert("node-5", 25..30).await;
    let mut expected = old[5..].to_vec();
    expected.extend(new);
    assert!(
        wait_for_ids(&sink, &expected).await,
        "log:\n{}",
        exporter.log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = ids(&sink.accepted());
    assert_eq!(
        sorted(accepted.clone()),
        sorted(expected),
        "newest max_events, no duplicates"
    );
    exporter.terminate_cleanly().await;
    let progress = store.backfill_progress().await;
    assert!(progress.done, "{}", progress.record);

    // A restart with a token does not backfill again.
    let _exporter = Exporter::start(&options).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.accepted().len(), accepted.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lost_while_running_recovers_without_a_restart() {
    // The open cursor fell behind the oplog: the next getMore fails with 286.
    history_lost_while_running(286).await;
}

/// The other codes that mean the same (InvalidResumeToken 260, ChangeStreamFatalError 280) take
/// the same recovery: one rule, checked through the binary for each code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_resume_token_while_running_recovers_too() {
    history_lost_while_running(260).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_stream_fatal_error_while_running_recovers_too() {
    history_lost_while_running(280).await;
}

async fn history_lost_while_running(code: i32) {
    let store = Store::start(&[]).await;
    let sink = sink().await;
    let exporter = Exporter::start(&options(&sink, &store)).await;
    let mut expected = store.insert("node-6", 0..3).await;
    sink.wait_for_accepted(3, WAIT).await;
    store
        .peer
        .control(
            "POST",
            "/fail",
            Some(json!({"commands": ["getMore"], "code": code, "times": 1})),
        )
        .await;
    expected.extend(store.insert("node-6", 3..8).await);
    assert!(
        wait_for_ids(&sink, &expected).await,
        "events lost after a runtime {code}; log:\n{}",
        exporter.log()
    );
    expected.extend(store.insert("node-6", 8..10).await);
    assert!(
        wait_for_ids(&sink, &expected).await,
        "the new stream delivers"
    );
    assert_recovered_once(&exporter, "runtime").await;
    let accepted = ids(&sink.accepted());
    for id in &expected[3..] {
        assert_eq!(
            accepted.iter().filter(|a| *a == id).count(),
            1,
            "{id} twice"
        );
    }
}

/// A stored token the server refuses at start (code 9, FailedToParse: a token of another
/// server version or a corrupted one) is history lost too: recovery from the last exported
/// `createdAt`, not upstream's silent start from now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_server_cannot_parse_at_start_is_recovered() {
    let store = Store::start(&[]).await;
    let sink = sink().await;
    let mut exporter = Exporter::start(&options(&sink, &store)).await;
    store.insert("node-8", 0..3).await;
    sink.wait_for_accepted(3, WAIT).await;
    exporter.terminate_cleanly().await;
    let missed = store.insert("node-8", 3..9).await;
    store
        .peer
        .control(
            "POST",
            "/fail",
            Some(json!({"commands": ["aggregate"], "code": 9, "times": 1})),
        )
        .await;
    let exporter = Exporter::start(&options(&sink, &store)).await;
    let mut expected = missed;
    expected.extend(store.insert("node-8", 9..11).await);
    assert!(
        wait_for_ids(&sink, &expected).await,
        "events lost after code 9 at start; log:\n{}",
        exporter.log()
    );
    assert_recovered_once(&exporter, "initialization").await;
}

/// Against a real replica set: runs only with `MONGODB_URI` set (`cargo test --test mongo --
/// --ignored`); CI exercises MongoDB through the wire peer only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs MONGODB_URI of a real replica set (CI has none)"]
async fn a_real_replica_set_when_mongodb_uri_is_set() {
    let uri = std::env::var("MONGODB_URI").expect("MONGODB_URI of a real replica set");
    let client = Client::with_uri_str(&uri).await.expect("client");
    let database = format!("ExporterTest{}", std::process::id());
    let db = client.database(&database);
    db.create_collection(EVENTS).await.expect("create events");
    db.create_collection(TOKENS).await.expect("create tokens");
    let sink = sink().await;
    let env = vec![
        ("MONGODB_URI".to_string(), uri.clone()),
        ("MONGODB_DATABASE_NAME".to_string(), database.clone()),
    ];
    let mut exporter = Exporter::start(&ExporterOptions::new(&sink, None, env)).await;
    let collection = db.collection::<Document>(EVENTS);
    for i in 0..5 {
        collection
            .insert_one(health_event("real-node", i))
            .await
            .expect("insert");
    }
    let events = sink.wait_for_accepted(5, WAIT).await;
    assert_eq!(events.len(), 5);
    exporter.terminate_cleanly().await;
    db.drop().await.expect("drop the test database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_killed_midway_continues_where_it_stopped() {
    let store = Store::start(&[]).await;
    let old = store.insert("node-8", 0..100).await;
    let sink = sink().await;
    let mut options = options(&sink, &store);
    options.backfill =
        "enabled = true\nmax_age = \"1h\"\nmax_events = 1000\nbatch_size = 10\nrate_limit = 20"
            .into();
    let mut exporter = Exporter::start(&options).await;
    sink.wait_for_accepted(25, WAIT).await;
    // Let the progress record catch up with a few deliveries, then kill -9.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    exporter.kill();
    let before_restart = sink.accepted().len();
    assert!(
        before_restart < 100,
        "the backfill finished before the kill: slow it down"
    );
    let BackfillProgress {
        record,
        done,
        delivered,
    } = store.backfill_progress().await;
    assert!(!done, "{record}");
    assert!(delivered > 0, "progress was saved: {record}");

    let _exporter = Exporter::start(&options).await;
    assert!(
        wait_for_ids(&sink, &old).await,
        "every stored event delivered after the restart"
    );
    let accepted = ids(&sink.accepted());
    // Only what was delivered after the last saved progress is sent again, not the whole plan.
    let resent = accepted.len() - old.len();
    assert!(
        resent <= before_restart - delivered,
        "re-sent {resent}, delivered {before_restart} before the kill, progress said {delivered}"
    );
}

/// SIGTERM in the middle of a backfill whose reader runs ahead (1,000 stored events in
/// 100-event pages, 2 workers at a 20 ms sink: slower than the peer's pages come, so the
/// reader's queue is full when intake stops): the exporter stops within the grace period with
/// status 0 and the backfill's progress written, and a restart resumes it and delivers the
/// rest. The backfill's door of the hang `tests/delivery.rs` and the change-stream test above
/// check for the stream: with a45915d's `ReaderTask::stop` order reverted it hangs (at a 5 ms
/// sink it did not: the queue never filled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_backfill_stops_promptly_and_a_restart_resumes_it() {
    const STORED: i64 = 1_000;
    let store = Store::start(&[]).await;
    let old = store.insert("node-7", 0..STORED).await;
    let sink = SinkServer::answering_after(Duration::from_millis(20)).await;
    let mut options = options(&sink, &store);
    options.workers = 2;
    options.backfill =
        "enabled = true\nmax_age = \"1h\"\nmax_events = 10000\nbatch_size = 100\nrate_limit = 0"
            .into();
    let mut exporter = Exporter::start(&options).await;
    sink.wait_for_accepted(100, WAIT).await;
    let stopped_in = exporter.terminate_cleanly().await;
    let before_restart = sink.accepted().len();
    assert!(
        before_restart < STORED as usize,
        "the backfill finished before the SIGTERM; the test proves nothing"
    );
    assert!(
        stopped_in < Duration::from_secs(15),
        "stopping took {stopped_in:?} (grace 20 s, 2 events in flight of 20 ms each)"
    );
    let BackfillProgress {
        record,
        done,
        delivered,
    } = store.backfill_progress().await;
    assert!(!done, "{record}");
    assert!(
        delivered > 0 && delivered <= before_restart,
        "progress over the delivered events ({before_restart}): {record}"
    );

    let mut exporter = Exporter::start(&options).await;
    assert!(
        wait_for_ids(&sink, &old).await,
        "every stored event delivered after the restart"
    );
    let resent = ids(&sink.accepted()).len() - old.len();
    assert!(
        resent <= before_restart - delivered,
        "re-sent {resent}, delivered {before_restart} before the SIGTERM, progress said {delivered}"
    );
    exporter.terminate_cleanly().await;
}

/// As a platform connector writes them, with pymongo (a second, independent client): each is
/// delivered once, with the document's `_id` as the CloudEvent id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_with_pymongo_are_delivered() {
    let store = Store::start(&[]).await;
    let sink = sink().await;
    let exporter = Exporter::start(&options(&sink, &store)).await;
    let script = r#"
import sys, datetime
from pymongo import MongoClient
client = MongoClient(sys.argv[1])
coll = client["HealthEventsDatabase"]["HealthEvents"]
docs = [{
    "createdAt": datetime.datetime.now(datetime.timezone.utc),
    "healthevent": {"agent": "syslog-health-monitor", "componentclass": "NIC",
                    "checkname": "SysLogsXIDError", "isfatal": False, "ishealthy": False,
                    "message": "link down %d" % i, "recommendedaction": 5,
                    "generatedtimestamp": {"seconds": 1767225600 + i, "nanos": 0},
                    "nodename": "py-node", "processingstrategy": 2},
    "healtheventstatus": None,
} for i in range(4)]
result = coll.insert_many(docs)
print(" ".join(str(i) for i in result.inserted_ids))
"#;
    let output = std::process::Command::new(mongo_peer_launch::python())
        .args(["-c", script, &store.peer.uri])
        .output()
        .expect("run pymongo");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let written: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(written.len(), 4);
    let events = sink.wait_for_accepted(4, WAIT).await;
    assert_eq!(
        sorted(ids(&events)),
        sorted(written),
        "log:\n{}",
        exporter.log()
    );
    for event in &events {
        let health = &event["data"]["healthEvent"];
        assert_eq!(health["recommendedAction"], "CONTACT_SUPPORT", "{event}");
        assert_eq!(health["processingStrategy"], "STORE_ONLY", "{event}");
        assert_eq!(health["componentClass"], "NIC", "{event}");
    }
}

/// `status` on MongoDB: no token → unhealthy (exit 1); while the exporter leads and is caught up
/// → exit 0 with the token, `lastExportedAt`, 0 waiting and the lease holder; events stored
/// after the last exported one while it is down → counted as waiting, unhealthy past
/// `--max-behind`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_token_lag_and_leader() {
    let store = Store::start(&[]).await;
    let sink = sink().await;
    let options = options(&sink, &store);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, options.config_toml()).expect("config");
    let status = |args: &[&str]| -> (i32, Value) {
        let output = std::process::Command::new(support::exporter::binary())
            .arg("status")
            .arg(format!("--config={}", config.display()))
            .arg("--output=json")
            .args(args)
            .env_clear()
            .envs(store.exporter_env())
            .output()
            .expect("run status");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output.status.code().unwrap_or(-1), value)
    };
    let (code, report) = status(&[]);
    assert_eq!(code, 1, "{report}");
    assert!(report["resumeToken"].is_null(), "{report}");

    let mut exporter = Exporter::start(&options).await;
    store.insert("node-s", 0..3).await;
    sink.wait_for_accepted(3, WAIT).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, report) = status(&[]);
    assert_eq!(code, 0, "{report}");
    assert!(
        report["resumeToken"]["resumeToken"]["_data"].is_string(),
        "{report}"
    );
    assert!(
        report["resumeToken"]["lastExportedAt"].is_string(),
        "{report}"
    );
    assert_eq!(report["behind"]["waitingEvents"], 0, "{report}");
    assert!(report["leader"]["replica"].is_string(), "{report}");
    exporter.terminate_cleanly().await;

    tokio::time::sleep(Duration::from_millis(50)).await;
    store.insert("node-s", 3..5).await;
    let (code, report) = status(&["--max-behind=1h"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["behind"]["waitingEvents"], 2, "{report}");
    assert!(report["leader"].is_null(), "released on SIGTERM: {report}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, report) = status(&["--max-behind=100ms"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        report["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("--max-behind")),
        "{report}"
    );
}
