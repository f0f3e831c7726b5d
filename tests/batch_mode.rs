//! `exporter.sink.mode = "batch"` through the binary against the loopback sink: the body is a
//! JSON array of the events with `application/cloudevents-batch+json`; a failed batch is
//! re-sent whole and nothing is lost; the resume token never passes an undelivered batch.
//! No timing is asserted.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use event_exporter_dev::sink::SinkArgs;
use serde_json::Value;
use support::exporter::{Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{Scripted, SinkOptions, SinkServer, CLOUDEVENTS_BATCH_JSON};

const WAIT: Duration = Duration::from_secs(30);

fn batch_options(
    sink: &SinkServer,
    db: &TestDb,
    max_events: usize,
    linger: &str,
) -> ExporterOptions {
    let mut options = ExporterOptions::new(sink, None, db.env());
    options.sink_extra =
        format!("mode = \"batch\"\nbatch_max_events = {max_events}\nbatch_linger = \"{linger}\"");
    options
}

/// Inserts `n` events in one transaction (so they become visible together); their ids.
async fn insert_together(db: &TestDb, node: &str, n: u32) -> Vec<String> {
    let documents: Vec<Value> = (0..n).map(|i| pg::health_event_doc(node, i)).collect();
    insert_documents(db, &documents).await
}

/// Inserts `documents` in one transaction; their ids.
async fn insert_documents(db: &TestDb, documents: &[Value]) -> Vec<String> {
    let mut client = db.client().await;
    pg::insert_health_events_at_once(&mut client, documents.iter().cloned()).await
}

fn ids_of(array: &Value) -> Vec<String> {
    array
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test]
async fn a_batch_is_one_json_array_of_the_events_in_order() {
    let db = TestDb::create().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = batch_options(&sink, &db, 3, "1s");
    options.workers = 1;
    let mut exporter = Exporter::start(&options).await;
    let documents: Vec<Value> = (0..3)
        .map(|i| pg::health_event_doc("batch-node", i))
        .collect();
    let ids = insert_documents(&db, &documents).await;
    sink.wait_for_accepted(3, WAIT).await;
    let requests = sink.requests();
    assert_eq!(requests.len(), 1, "three events, one request");
    let request = &requests[0];
    assert_eq!(request.status, 202);
    assert_eq!(request.header("content-type"), Some(CLOUDEVENTS_BATCH_JSON));
    assert_eq!(request.header("traceparent"), None);
    let body = String::from_utf8(request.body.clone()).expect("UTF-8");
    assert!(
        body.starts_with("[{") && body.ends_with("}]"),
        "a bare array: {body}"
    );
    let array = request.json.as_ref().expect("JSON body");
    assert_eq!(ids_of(array), ids, "the events, in changelog order");
    // Byte for byte: `[`, the structured-mode bodies joined by `,`, `]`.
    let transformer = event_exporter::cloudevent::Transformer::new(
        [("cluster", "test-cluster"), ("environment", "test")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    let structured: Vec<String> = ids
        .iter()
        .zip(&documents)
        .map(|(id, document)| {
            let event = event_exporter::model::decode_document(document)
                .expect("decodes")
                .expect("a health event");
            String::from_utf8(transformer.encode(id, &event, None)).expect("UTF-8")
        })
        .collect();
    assert_eq!(body, format!("[{}]", structured.join(",")));
    for event in array.as_array().expect("array") {
        assert_eq!(event["specversion"], "1.0");
        assert!(event["data"].is_object(), "{event}");
    }
    exporter.terminate_cleanly().await;
}

#[tokio::test]
async fn a_failed_batch_is_resent_whole_and_nothing_is_lost() {
    let db = TestDb::create().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = batch_options(&sink, &db, 5, "10ms");
    options.workers = 2;
    sink.push_responses(vec![Scripted::status(503)]);
    let mut exporter = Exporter::start(&options).await;
    let ids = insert_together(&db, "retry-node", 20).await;
    sink.wait_for_accepted(20, WAIT).await;
    let requests = sink.requests();
    let failed: Vec<_> = requests.iter().filter(|r| r.status == 503).collect();
    assert_eq!(failed.len(), 1, "one scripted 503");
    let failed_ids = ids_of(failed[0].json.as_ref().expect("array"));
    assert!(!failed_ids.is_empty() && failed_ids.len() <= 5);
    let resent = requests
        .iter()
        .filter(|r| r.is_success())
        .any(|r| r.json.as_ref().map(ids_of) == Some(failed_ids.clone()));
    assert!(resent, "the batch {failed_ids:?} was re-sent whole");
    for request in &requests {
        let n = request.json.as_ref().map_or(0, |a| ids_of(a).len());
        assert!((1..=5).contains(&n), "batch_max_events = 5, got {n}");
    }
    let delivered: BTreeSet<String> = sink.accepted_ids().into_iter().collect();
    assert_eq!(delivered, ids.into_iter().collect::<BTreeSet<_>>());
    exporter.terminate_cleanly().await;
    let client = db.client().await;
    pg::assert_token_at_head(&client, "no gap: the token reached the last event").await;
}

#[tokio::test]
async fn the_token_stops_below_a_batch_that_was_not_delivered() {
    let db = TestDb::create().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = batch_options(&sink, &db, 10, "10ms");
    options.max_retries = 1;
    let mut exporter = Exporter::start(&options).await;
    let first = insert_together(&db, "delivered", 4).await;
    sink.wait_for_accepted(first.len(), WAIT).await;
    let client = db.client().await;
    let delivered_up_to = pg::changelog_max_id(&client).await;
    sink.fail_always(503);
    let second = insert_together(&db, "refused", 4).await;
    assert_eq!(exporter.wait_exit(WAIT).await.code(), Some(1));
    let saved = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token");
    assert_eq!(
        saved["eventID"],
        serde_json::json!(delivered_up_to),
        "the token stays at the last delivered batch"
    );
    let accepted: BTreeSet<String> = sink.accepted_ids().into_iter().collect();
    assert!(second.iter().all(|id| !accepted.contains(id)));
    assert!(
        exporter.log().contains("its batch was not delivered"),
        "{}",
        exporter.log()
    );
}

/// The reference sink (`event-exporter-dev sink`, started in-process) takes the exporter's
/// batches: every event arrives, none is refused.
#[tokio::test]
async fn the_exporter_in_batch_mode_delivers_everything_to_the_reference_sink() {
    let sink = event_exporter_dev::sink::start(SinkArgs {
        listen: "127.0.0.1:0".parse().expect("address"),
        no_auth: true,
        ..SinkArgs::default()
    })
    .await
    .expect("the reference sink starts");
    let db = TestDb::create().await;
    let unused = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&unused, None, db.env());
    options.sink_url = sink.events_url();
    options.sink_extra = "mode = \"batch\"\nbatch_max_events = 7".into();
    let mut exporter = Exporter::start(&options).await;
    let client = db.client().await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let doc = pg::health_event_doc("node-ref", i);
        ids.push(pg::insert_health_event(&client, &doc).await);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.accepted() < 40 {
        assert!(
            Instant::now() < deadline,
            "only {} of 40 arrived; log:\n{}",
            sink.accepted(),
            exporter.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    exporter.terminate_cleanly().await;
    let mut received: Vec<String> = sink
        .events()
        .into_iter()
        .map(|r| r.event["id"].as_str().expect("id").to_string())
        .collect();
    received.sort();
    ids.sort();
    assert_eq!(received, ids);
    assert_eq!(sink.rejected(), 0);
    let exported = unused.requests();
    assert!(exported.is_empty(), "nothing went to the unused sink");
}

#[tokio::test]
async fn a_permanently_rejected_batch_goes_to_the_dead_letter_event_by_event() {
    let db = TestDb::create().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dead-letter.ndjson");
    let mut options = batch_options(&sink, &db, 10, "1s");
    options.workers = 1;
    options.max_retries = 1;
    options.failure_extra = "on_rejected = \"dead_letter\"".into();
    options.extra_toml = format!(
        "[exporter.failure_handling.dead_letter]\nfile = \"{}\"\n",
        file.display()
    );
    sink.push_responses(vec![Scripted::status(422), Scripted::status(422)]);
    let mut exporter = Exporter::start(&options).await;
    let rejected = insert_together(&db, "rejected", 3).await;
    let deadline = Instant::now() + WAIT;
    let lines = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect();
        if lines.len() >= rejected.len() {
            break lines;
        }
        assert!(Instant::now() < deadline, "dead letter: {lines:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let written: Vec<&str> = lines
        .iter()
        .map(|l| l["event_id"].as_str().expect("event_id"))
        .collect();
    assert_eq!(written, rejected, "each event of the batch, in order");
    for line in &lines {
        assert_eq!(line["status"], 422);
        assert_eq!(line["event"]["id"], line["event_id"], "the event itself");
    }
    // The stream goes on, and the token passes the dead-lettered batch.
    let delivered = insert_together(&db, "after", 2).await;
    sink.wait_for_accepted(2, WAIT).await;
    assert_eq!(sink.accepted_ids(), delivered);
    exporter.terminate_cleanly().await;
    let client = db.client().await;
    pg::assert_token_at_head(&client, "the token reached the last event").await;
}
