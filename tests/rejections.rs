//! Events the sink will never take (400, 413, 415, 422 …) under each `on_rejected` policy:
//! `stop` (the default) stops without moving the resume token; `dead_letter` writes the event
//! to an fsync'd NDJSON file and/or a second endpoint, then goes on; a dead-letter write that
//! fails is the stop path. `already_delivered_statuses` (e.g. 409) count as delivered. Statuses
//! outside `rejected_statuses` (404 by default) always stop. In each case the sink-side record
//! and the stored resume token prove nothing was lost.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use support::exporter::{sample_or_zero, Exporter, ExporterOptions};
use support::peers::{answer, endless, Peer, Seen};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer, EVENTS_PATH};

const WAIT: Duration = Duration::from_secs(30);

/// A sink that rejects every event whose node is `poison-<status>` with that status (413 with
/// an endless body) and accepts the rest.
async fn sink_rejecting_poison() -> Peer {
    Peer::start(|seen: &Seen| {
        let status = seen
            .node_name()
            .and_then(|n| n.strip_prefix("poison-")?.parse::<u16>().ok());
        match status {
            Some(413) => endless(413),
            Some(status) => answer(
                status,
                &[("content-type", "application/json")],
                &format!("{{\"error\":\"rejected with {status}\"}}"),
            ),
            None => answer(202, &[], "{}"),
        }
    })
    .await
}

async fn options_for(url: String, env: Vec<(String, String)>) -> ExporterOptions {
    let unused = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&unused, None, env);
    options.sink_url = url;
    options.max_retries = 2;
    options.initial_backoff = "50ms".into();
    options.max_backoff = "100ms".into();
    options
}

fn dead_letter_to(options: &mut ExporterOptions, destination: &str) {
    options.failure_extra = "on_rejected = \"dead_letter\"".into();
    options.extra_toml = format!("[exporter.failure_handling.dead_letter]\n{destination}\n");
}

/// Inserts a health event for `node` and returns (record id, its changelog id).
async fn insert(client: &tokio_postgres::Client, node: &str, i: u32) -> (String, i64) {
    let id = pg::insert_health_event(client, &pg::health_event_doc(node, i)).await;
    (id, pg::changelog_max_id(client).await)
}

/// The stored resume token is below `changelog_id` (or absent).
async fn assert_token_before(client: &tokio_postgres::Client, changelog_id: i64) {
    let token = pg::read_resume_token(client, pg::EXPORTER_CLIENT_NAME).await;
    let saved = token.as_ref().and_then(|t| t["eventID"].as_i64());
    assert!(
        saved.is_none_or(|saved| saved < changelog_id),
        "the resume token {token:?} passed the undelivered event at changelog id {changelog_id}"
    );
}

fn dead_letter_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("each dead-letter line is JSON"))
        .collect()
}

#[tokio::test]
async fn by_default_a_rejected_event_stops_the_exporter_after_the_retries_without_moving_the_token()
{
    let sink = sink_rejecting_poison().await;
    for status in [400, 404, 409, 413, 415, 422] {
        let db = TestDb::create().await;
        let client = db.client().await;
        let options = options_for(sink.url(EVENTS_PATH), db.env()).await;
        let mut exporter = Exporter::start(&options).await;
        let (id, changelog_id) = insert(&client, &format!("poison-{status}"), 1).await;
        let exit = exporter.wait_exit(WAIT).await;
        assert_eq!(exit.code(), Some(1), "{status}; log:\n{}", exporter.log());
        let posts = sink
            .seen()
            .iter()
            .filter(|s| s.event_id().as_deref() == Some(id.as_str()))
            .count();
        assert_eq!(posts, 3, "{status}: retried on the schedule first");
        let log = exporter.log();
        assert!(
            log.contains(&id) && log.contains(&format!("HTTP {status}")),
            "{status}: the error names the event and the status:\n{log}"
        );
        assert_token_before(&client, changelog_id).await;
    }
}

#[tokio::test]
async fn dead_letter_file_takes_each_permanently_rejected_event_and_the_stream_goes_on() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = sink_rejecting_poison().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dead-letter.ndjson");
    let mut options = options_for(sink.url(EVENTS_PATH), db.env()).await;
    dead_letter_to(&mut options, &format!("file = \"{}\"", file.display()));
    let mut exporter = Exporter::start(&options).await;

    let mut good = Vec::new();
    let mut poison = Vec::new();
    for (i, status) in [400u16, 413, 415, 422].into_iter().enumerate() {
        let i = i as u32;
        good.push(insert(&client, "good", 2 * i).await.0);
        let (id, changelog_id) = insert(&client, &format!("poison-{status}"), 2 * i + 1).await;
        poison.push((id, changelog_id, status));
    }
    good.push(insert(&client, "good", 100).await.0);
    sink.wait_until(WAIT, |seen| {
        seen.iter().filter(|s| s.is_success()).count() >= good.len()
    })
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    while dead_letter_lines(&file).len() < poison.len() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut accepted = sink.accepted_ids();
    accepted.sort();
    good.sort();
    assert_eq!(accepted, good, "every good event delivered once");
    let lines = dead_letter_lines(&file);
    assert_eq!(lines.len(), poison.len(), "{lines:?}");
    for (id, changelog_id, status) in &poison {
        let line = lines
            .iter()
            .find(|l| l["event_id"] == json!(id))
            .unwrap_or_else(|| panic!("{status}: {id} not in the dead letter: {lines:?}"));
        assert_eq!(line["status"], json!(status));
        assert_eq!(line["changelog_id"], json!(changelog_id));
        assert_eq!(
            line["attempts"],
            json!(3),
            "dead-lettered after the retries"
        );
        assert_eq!(line["event"]["id"], json!(id), "the CloudEvent itself");
        assert_eq!(
            line["event"]["data"]["healthEvent"]["nodeName"],
            json!(format!("poison-{status}"))
        );
        assert!(line["time"].as_str().is_some_and(|t| t.ends_with('Z')));
        let excerpt = line["body_excerpt"].as_str().expect("excerpt");
        if *status == 413 {
            // An endless body: the excerpt is cut and the attempt still completed.
            assert_eq!(excerpt, "x".repeat(1000));
        } else {
            assert_eq!(excerpt, format!("{{\"error\":\"rejected with {status}\"}}"));
        }
    }
    let metrics = exporter.metrics().await;
    for status in [400, 413, 415, 422] {
        assert_eq!(
            sample_or_zero(
                &metrics,
                &format!(
                    "health_events_exporter_events_dead_lettered_total{{status=\"{status}\"}}"
                )
            ),
            1.0,
            "{status}:\n{metrics}"
        );
    }
    assert_eq!(
        sample_or_zero(
            &metrics,
            "health_events_exporter_publish_attempt_failures_total{reason=\"timeout\"}"
        ),
        0.0,
        "the endless body did not run into the timeout"
    );
    let log = exporter.log();
    for (id, _, _) in &poison {
        assert!(
            log.lines().any(|l| l.contains("ERROR")
                && l.contains(id.as_str())
                && l.contains("dead letter")),
            "an ERROR line names {id}:\n{log}"
        );
    }
    let max_id = pg::changelog_max_id(&client).await;
    exporter.terminate_cleanly().await;
    let token = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token");
    assert_eq!(token["eventID"], json!(max_id), "the token moved past them");
}

#[tokio::test]
async fn statuses_outside_rejected_statuses_stop_even_with_a_dead_letter() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = sink_rejecting_poison().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dead-letter.ndjson");
    let mut options = options_for(sink.url(EVENTS_PATH), db.env()).await;
    dead_letter_to(&mut options, &format!("file = \"{}\"", file.display()));
    let mut exporter = Exporter::start(&options).await;
    // 404 is not permanent by default: a wrong endpoint path would send every event there.
    let (_, changelog_id) = insert(&client, "poison-404", 1).await;
    assert_eq!(exporter.wait_exit(WAIT).await.code(), Some(1));
    assert!(dead_letter_lines(&file).is_empty());
    assert_token_before(&client, changelog_id).await;

    // Listed, it is dead-lettered.
    let db = TestDb::create().await;
    let client = db.client().await;
    options.env = db.env();
    options.failure_extra += "\nrejected_statuses = [404]";
    let mut exporter = Exporter::start(&options).await;
    let (id, _) = insert(&client, "poison-404", 1).await;
    let after = insert(&client, "good", 2).await.0;
    sink.wait_until(WAIT, |seen| {
        seen.iter()
            .any(|s| s.is_success() && s.event_id() == Some(after.clone()))
    })
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    while dead_letter_lines(&file).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = dead_letter_lines(&file);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["event_id"], json!(id));
    assert_eq!(lines[0]["status"], json!(404));
    let max_id = pg::changelog_max_id(&client).await;
    exporter.terminate_cleanly().await;
    let token = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token");
    assert_eq!(token["eventID"], json!(max_id));
}

#[tokio::test]
async fn already_delivered_statuses_count_as_delivered_at_once() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = sink_rejecting_poison().await;
    let mut options = options_for(sink.url(EVENTS_PATH), db.env()).await;
    options.failure_extra = "already_delivered_statuses = [409]".into();
    let mut exporter = Exporter::start(&options).await;
    let (duplicate, _) = insert(&client, "poison-409", 1).await;
    let after = insert(&client, "good", 2).await.0;
    sink.wait_until(WAIT, |seen| {
        seen.iter()
            .any(|s| s.is_success() && s.event_id() == Some(after.clone()))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let posts: Vec<u16> = sink
        .seen()
        .iter()
        .filter(|s| s.event_id().as_deref() == Some(duplicate.as_str()))
        .map(|s| s.status)
        .collect();
    assert_eq!(posts, vec![409], "not retried");
    let metrics = exporter.metrics().await;
    assert_eq!(
        sample_or_zero(
            &metrics,
            "health_events_exporter_events_published_total{status=\"already_delivered\"}"
        ),
        1.0,
        "{metrics}"
    );
    let max_id = pg::changelog_max_id(&client).await;
    exporter.terminate_cleanly().await;
    let token = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token");
    assert_eq!(token["eventID"], json!(max_id));
}

#[tokio::test]
async fn a_dead_letter_file_that_cannot_be_written_leaves_the_event_undelivered() {
    let sink = sink_rejecting_poison().await;
    // /dev/full fails every write with ENOSPC (a full volume); /sys refuses new files (a
    // directory the exporter may not write to).
    for path in ["/dev/full", "/sys/event-exporter-dead-letter.ndjson"] {
        let db = TestDb::create().await;
        let client = db.client().await;
        let mut options = options_for(sink.url(EVENTS_PATH), db.env()).await;
        dead_letter_to(&mut options, &format!("file = \"{path}\""));
        let mut exporter = Exporter::start(&options).await;
        let (id, changelog_id) = insert(&client, "poison-422", 1).await;
        assert_eq!(
            exporter.wait_exit(WAIT).await.code(),
            Some(1),
            "{path}; log:\n{}",
            exporter.log()
        );
        let log = exporter.log();
        assert!(
            log.contains(&id) && log.contains(path) && log.contains("dead letter failed"),
            "{path}: the error names the event and the file:\n{log}"
        );
        assert_token_before(&client, changelog_id).await;
    }
}

#[tokio::test]
async fn a_dead_letter_endpoint_gets_the_record_and_its_failure_stops() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = sink_rejecting_poison().await;
    let dead_letters = Peer::start(|_: &Seen| answer(201, &[], "")).await;
    let mut options = options_for(sink.url(EVENTS_PATH), db.env()).await;
    dead_letter_to(
        &mut options,
        &format!("endpoint = \"{}\"", dead_letters.url("/dead")),
    );
    let mut exporter = Exporter::start(&options).await;
    let (id, changelog_id) = insert(&client, "poison-400", 1).await;
    let after = insert(&client, "good", 2).await.0;
    let seen = dead_letters.wait_until(WAIT, |seen| !seen.is_empty()).await;
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].header("content-type"), Some("application/json"));
    assert_eq!(seen[0].header("authorization"), None);
    let record = seen[0].json.clone().expect("JSON record");
    assert_eq!(record["event_id"], json!(id));
    assert_eq!(record["changelog_id"], json!(changelog_id));
    assert_eq!(record["status"], json!(400));
    assert_eq!(record["event"]["id"], json!(id));
    sink.wait_until(WAIT, |seen| {
        seen.iter()
            .any(|s| s.is_success() && s.event_id() == Some(after.clone()))
    })
    .await;
    exporter.terminate_cleanly().await;

    // The dead-letter endpoint fails: the event is undelivered.
    let db = TestDb::create().await;
    let client = db.client().await;
    let broken = Peer::start(|_: &Seen| answer(500, &[], "disk full")).await;
    options.env = db.env();
    dead_letter_to(
        &mut options,
        &format!("endpoint = \"{}\"", broken.url("/dead")),
    );
    let mut exporter = Exporter::start(&options).await;
    let (id, changelog_id) = insert(&client, "poison-400", 1).await;
    assert_eq!(exporter.wait_exit(WAIT).await.code(), Some(1));
    let log = exporter.log();
    assert!(
        log.contains(&id) && log.contains("answered HTTP 500: disk full"),
        "{log}"
    );
    assert_eq!(broken.seen().len(), 1);
    assert_token_before(&client, changelog_id).await;
}
