//! End to end: real PostgreSQL with NVSentinel's schema → the exporter binary → a real HTTP
//! sink with a real token endpoint.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::exporter::{Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer};
use support::token::{TokenConfig, TokenServer};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn delivers_each_new_event_as_upstreams_cloudevent_and_stops_cleanly() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    let sink = SinkServer::start(SinkOptions {
        token_registry: Some(token.registry()),
        ..SinkOptions::default()
    })
    .await;
    let mut exporter = Exporter::start(&ExporterOptions::new(&sink, Some(&token), db.env())).await;

    let doc = pg::health_event_doc("node-7", 1);
    let record_id = pg::insert_health_event(&client, &doc).await;
    let events = sink.wait_for_accepted(1, WAIT).await;
    let event = &events[0];

    let health = &doc["healthevent"];
    let time = pg::rfc3339_nano(
        chrono::DateTime::from_timestamp(
            health["generatedTimestamp"]["seconds"]
                .as_i64()
                .expect("seconds"),
            health["generatedTimestamp"]["nanos"].as_u64().unwrap_or(0) as u32,
        )
        .expect("valid time"),
    );
    let mut expected_health = json!({
        "agent": health["agent"],
        "checkName": health["checkName"],
        "componentClass": health["componentClass"],
        "entitiesImpacted": health["entitiesImpacted"],
        "errorCode": health["errorCode"],
        "generatedTimestamp": time,
        "isFatal": health["isFatal"],
        "isHealthy": false,
        "message": health["message"],
        "nodeName": "node-7",
        "processingStrategy": "EXECUTE_REMEDIATION",
        "recommendedAction": pg::recommended_action_name(health["recommendedAction"].as_i64().expect("action")),
        "version": health["version"],
    });
    if let Some(metadata) = health.get("metadata") {
        expected_health["metadata"] = metadata.clone();
    }
    let expected = json!({
        "specversion": "1.0",
        "type": "com.nvidia.nvsentinel.health.v1",
        "source": "nvsentinel://test-cluster/healthevents",
        "id": record_id,
        "time": time,
        "data": {
            "healthEvent": expected_health,
            "metadata": {"cluster": "test-cluster", "environment": "test"},
        },
    });
    assert_eq!(event, &expected);
    // Upstream's lag metrics, PostgreSQL side: known after the first poll.
    let metrics = exporter.metrics().await;
    assert_eq!(
        support::exporter::sample_or_zero(
            &metrics,
            "change_stream_lag_known{client=\"event-exporter\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert!(
        support::exporter::sample(
            &metrics,
            "change_stream_lag_seconds{client=\"event-exporter\"}"
        )
        .is_some_and(|l| (0.0..60.0).contains(&l)),
        "{metrics}"
    );

    // Wire details: key order as upstream's Go struct, headers as the spec requires.
    let request = sink
        .requests()
        .into_iter()
        .find(|r| r.is_success())
        .expect("an accepted request");
    let body = String::from_utf8(request.body.clone()).expect("utf-8 body");
    let order: Vec<usize> = [
        "\"specversion\"",
        "\"type\"",
        "\"source\"",
        "\"id\"",
        "\"time\"",
        "\"data\"",
    ]
    .iter()
    .map(|key| body.find(key).expect("key present"))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "key order: {body}");
    assert_eq!(request.method, "POST");
    assert_eq!(
        request.header("content-type"),
        Some("application/cloudevents+json")
    );
    assert!(request
        .header("authorization")
        .is_some_and(|a| a.starts_with("Bearer ")));

    // A clean stop exits 0 and leaves the token at the event's changelog row.
    let max_id = pg::changelog_max_id(&client).await;
    let status = exporter.terminate().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", exporter.log());
    let token_value = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token written");
    assert_eq!(token_value["eventID"], json!(max_id), "{token_value}");
    assert!(
        token_value["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{token_value}"
    );
    assert_eq!(token.requests(), 1, "one token fetched and cached");
}

#[tokio::test]
async fn resumes_after_a_clean_restart_without_loss_or_duplicates() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let options = ExporterOptions::new(&sink, None, db.env());

    let mut exporter = Exporter::start(&options).await;
    let mut written = Vec::new();
    for i in 0..20 {
        written.push(pg::insert_health_event(&client, &pg::health_event_doc("node-a", i)).await);
    }
    sink.wait_for_accepted(20, WAIT).await;
    exporter.terminate_cleanly().await;

    // Written while the exporter is down: must be delivered after the restart.
    for i in 20..40 {
        written.push(pg::insert_health_event(&client, &pg::health_event_doc("node-b", i)).await);
    }
    let mut exporter = Exporter::start(&options).await;
    for i in 40..50 {
        written.push(pg::insert_health_event(&client, &pg::health_event_doc("node-c", i)).await);
    }
    sink.wait_for_accepted(50, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut received = sink.accepted_ids();
    received.sort();
    written.sort();
    assert_eq!(received, written, "every event exactly once");
    exporter.terminate_cleanly().await;
}

/// SIGTERM in the middle of a backlog: the changelog reader has filled its queue to the
/// pipeline and waits to hand over the next page when intake stops. The exporter must still
/// stop within the grace period, with status 0 and its final resume token written (it waited
/// forever in the reader's hand-over before), and a restart delivers the rest.
#[tokio::test]
async fn sigterm_during_a_backlog_stops_promptly_and_saves_the_token() {
    const BACKLOG: u32 = 2_000; // four 500-row pages: more than the reader may queue
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let sink = SinkServer::answering_after(Duration::from_millis(5)).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.workers = 2;
    let mut exporter = Exporter::start(&options).await;
    // Past the first token write of a fresh start.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let token_id = |token: Option<Value>| token.and_then(|t| t["eventID"].as_i64());
    let before = token_id(pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME).await);
    let backlog = (0..BACKLOG).map(|i| pg::health_event_doc("backlog", i));
    let written = pg::insert_health_events_at_once(&mut client, backlog).await;
    sink.wait_for_accepted(100, WAIT).await;
    let stopped_in = exporter.terminate_cleanly().await;
    let delivered = sink.accepted().len();
    assert!(
        delivered < BACKLOG as usize,
        "the backlog was delivered before the SIGTERM; the test proves nothing"
    );
    assert!(
        stopped_in < Duration::from_secs(15),
        "stopping took {stopped_in:?} (grace 20 s, 2 events in flight of 5 ms each)"
    );
    let after = token_id(pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME).await);
    assert!(
        after > before,
        "the resume token moved over the delivered events: {before:?} -> {after:?}"
    );

    let mut exporter = Exporter::start(&options).await;
    sink.wait_for_ids(&written.iter().cloned().collect(), WAIT * 3)
        .await;
    exporter.terminate_cleanly().await;
}

#[tokio::test]
async fn without_authentication_no_authorization_header_is_sent() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let _exporter = Exporter::start(&ExporterOptions::new(&sink, None, db.env())).await;
    pg::insert_health_event(&client, &pg::health_event_doc("n", 1)).await;
    sink.wait_for_accepted(1, WAIT).await;
    let request = &sink.requests()[0];
    assert_eq!(request.header("authorization"), None);
}

/// `user:password@` in `exporter.sink.endpoint` goes as `Authorization: Basic` (as reqwest
/// and Go's net/http send it), never as part of the URL (nor in the `Host` header), and the
/// start-up log shows the endpoint with its password masked.
#[tokio::test]
async fn endpoint_credentials_are_sent_as_basic_auth_not_in_the_url() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.sink_url = sink.url().replacen("http://", "http://ingest:p%40ss@", 1);
    let exporter = Exporter::start(&options).await;
    pg::insert_health_event(&client, &pg::health_event_doc("n", 1)).await;
    sink.wait_for_accepted(1, WAIT).await;
    let log = exporter.log();
    assert!(
        log.contains("ingest:***@"),
        "the start line names the sink:\n{log}"
    );
    assert!(!log.contains("p%40ss"), "the password is logged:\n{log}");
    let request = &sink.requests()[0];
    // base64("ingest:p@ss")
    assert_eq!(
        request.header("authorization"),
        Some("Basic aW5nZXN0OnBAc3M=")
    );
    let host = request.header("host").unwrap_or_default();
    assert!(!host.contains('@'), "credentials in Host: {host}");
}

#[tokio::test]
async fn changes_that_are_not_new_health_events_are_passed_over() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::start(&ExporterOptions::new(&sink, None, db.env())).await;

    let first = pg::insert_health_event(&client, &pg::health_event_doc("n", 1)).await;
    pg::insert_maintenance_event(&client).await;
    client
        .execute(
            "UPDATE health_events SET node_quarantined = 'Quarantined', updated_at = NOW() WHERE id::text = $1",
            &[&first],
        )
        .await
        .expect("update");
    let last = pg::insert_health_event(&client, &pg::health_event_doc("n", 2)).await;
    let events = sink.wait_for_accepted(2, WAIT).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ids: Vec<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(
        sink.accepted().len(),
        2,
        "only the two inserts are exported"
    );
    assert!(ids.contains(&first.as_str()) && ids.contains(&last.as_str()));
    let max_id = pg::changelog_max_id(&client).await;
    exporter.terminate_cleanly().await;
    let token_value: Value = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token");
    assert_eq!(
        token_value["eventID"],
        json!(max_id),
        "token passes skipped rows"
    );
}

#[tokio::test]
async fn a_sequence_jump_of_millions_of_ids_is_passed_over_at_once() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::start(&ExporterOptions::new(&sink, None, db.env())).await;

    pg::insert_health_event(&client, &pg::health_event_doc("n", 1)).await;
    // An operator resets the sequence far ahead (or a restored backup does).
    client
        .execute(
            "SELECT setval('datastore_changelog_id_seq', (SELECT max(id) FROM datastore_changelog) + 50000000)",
            &[],
        )
        .await
        .expect("setval");
    let after = pg::insert_health_event(&client, &pg::health_event_doc("n", 2)).await;
    sink.wait_for_accepted(2, WAIT).await;
    assert!(sink.accepted_ids().contains(&after));
    let max_id = pg::changelog_max_id(&client).await;
    assert!(max_id > 50_000_000);
    // The jumped-over ids are one hole, decided once every transaction older than its tag has
    // ended (on a shared server that can take a poll or two): wait for the token to pass it,
    // then check it survives a clean stop.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let token = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME).await;
        if token.as_ref().map(|t| &t["eventID"]) == Some(&json!(max_id)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the token never passed the jumped-over ids: {token:?}\nlog:\n{}",
            exporter.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    exporter.terminate_cleanly().await;
    let token_value = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token");
    assert_eq!(
        token_value["eventID"],
        json!(max_id),
        "the token passes the jumped-over ids"
    );
}

/// `exporter.cloudevent.subject = "node_name"` adds the CloudEvents `subject` attribute (the
/// node name) so a receiver can route on it; the rest of the event keeps upstream's shape.
#[tokio::test]
async fn subject_carries_the_node_name_when_asked_for() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.extra_toml = "[exporter.cloudevent]\nsubject = \"node_name\"\n".into();
    let mut exporter = Exporter::start(&options).await;
    pg::insert_health_event(&client, &pg::health_event_doc("node-subject", 1)).await;
    let events = sink.wait_for_accepted(1, WAIT).await;
    assert_eq!(events[0]["subject"], "node-subject", "{}", events[0]);
    assert_eq!(events[0]["data"]["healthEvent"]["nodeName"], "node-subject");
    exporter.terminate_cleanly().await;
}
