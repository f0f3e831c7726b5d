//! What an SRE watches: /metrics moving during a run, and trace context reaching the sink.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::exporter::{sample, Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{Scripted, SinkOptions, SinkServer};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn metrics_follow_the_stream() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::answering_after(Duration::from_millis(1500)).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.workers = 2;
    let mut exporter = Exporter::start(&options).await;
    sink.push_responses(vec![Scripted::status(503)]);
    for i in 0..4 {
        pg::insert_health_event(&client, &pg::health_event_doc("node", i)).await;
    }

    // While events wait on the slow sink: some in flight, and the stream lags.
    let deadline = Instant::now() + WAIT;
    let during = loop {
        let metrics = exporter.metrics().await;
        let in_flight = sample(&metrics, "health_events_exporter_events_in_flight").unwrap_or(0.0);
        let lag = sample(&metrics, "health_events_exporter_stream_lag_seconds").unwrap_or(0.0);
        if in_flight >= 1.0 && lag > 0.0 {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "no in-flight events or lag seen:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(sample(&during, "health_events_exporter_changelog_ids_behind").unwrap_or(0.0) >= 1.0);
    assert!(sample(&during, "health_events_exporter_events_received_total").unwrap_or(0.0) >= 1.0);

    sink.wait_for_accepted(4, WAIT).await;
    // After the next checkpoint tick everything is caught up.
    let deadline = Instant::now() + WAIT;
    let after = loop {
        let metrics = exporter.metrics().await;
        if sample(&metrics, "health_events_exporter_changelog_ids_behind") == Some(0.0)
            && sample(&metrics, "health_events_exporter_stream_lag_seconds") == Some(0.0)
        {
            break metrics;
        }
        assert!(Instant::now() < deadline, "never caught up:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let series = [
        ("health_events_exporter_events_received_total", 4.0),
        (
            "health_events_exporter_events_published_total{status=\"success\"}",
            4.0,
        ),
        (
            "health_events_exporter_publish_attempt_failures_total{reason=\"status_503\"}",
            1.0,
        ),
        ("health_events_exporter_events_in_flight", 0.0),
        (
            "health_events_exporter_changelog_head_id",
            pg::changelog_max_id(&client).await as f64,
        ),
        ("health_events_exporter_build_info{version=\"0.1.0\"}", 1.0),
    ];
    for (name, value) in series {
        assert_eq!(sample(&after, name), Some(value), "{name} in:\n{after}");
    }
    // Every changelog read is timed: at least the reads that found the four events.
    assert!(
        sample(
            &after,
            "health_events_exporter_changelog_poll_duration_seconds_count"
        )
        .is_some_and(|count| count >= 1.0),
        "no changelog reads timed in:\n{after}"
    );
    for name in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(
            sample(&after, name).is_some_and(|v| v > 0.0),
            "{name} in:\n{after}"
        );
    }
    assert!(
        sample(
            &after,
            "health_events_exporter_resume_token_update_timestamp"
        )
        .unwrap_or(0.0)
            > 1.7e9
    );
    exporter.terminate_cleanly().await;
}

#[tokio::test]
async fn trace_context_reaches_the_sink() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let _exporter = Exporter::start(&ExporterOptions::new(&sink, None, db.env())).await;

    let mut traced = pg::health_event_doc("node", 1);
    traced["healthevent"]["metadata"]["trace_id"] = json!("4bf92f3577b34da6a3ce929d0e0e4736");
    traced["healtheventstatus"]["spanids"] = json!({"platform-connectors": "00f067aa0ba902b7"});
    let traced_id = pg::insert_health_event(&client, &traced).await;
    let plain_id = pg::insert_health_event(&client, &pg::health_event_doc("node", 2)).await;
    sink.wait_for_accepted(2, WAIT).await;

    let header_of = |id: &str| {
        sink.requests()
            .into_iter()
            .find(|r| r.json.as_ref().is_some_and(|j| j["id"] == id))
            .map(|r| r.header("traceparent").map(str::to_string))
            .expect("request for the event")
    };
    assert_eq!(
        header_of(&traced_id).as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(header_of(&plain_id), None);
}

#[tokio::test]
async fn failure_counters_move_before_the_exporter_stops() {
    let db = TestDb::create().await;
    let client = db.client().await;
    // Each answer takes a second, so the second event is still being tried when the first
    // gives up: the exporter then waits for it, with /metrics still served.
    let sink = SinkServer::answering_after(Duration::from_secs(1)).await;
    sink.fail_always(500);
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.workers = 2;
    options.max_retries = 1;
    options.initial_backoff = "100ms".into();
    options.shutdown_grace = "3s".into();
    let mut exporter = Exporter::start(&options).await;
    pg::insert_health_event(&client, &pg::health_event_doc("node", 1)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    pg::insert_health_event(&client, &pg::health_event_doc("node", 2)).await;

    let deadline = Instant::now() + WAIT;
    let seen = loop {
        let metrics = exporter.metrics().await;
        if sample(
            &metrics,
            "health_events_exporter_publish_errors_total{error_type=\"max_retries_exceeded\"}",
        )
        .is_some_and(|v| v >= 1.0)
        {
            break metrics;
        }
        assert!(
            exporter.try_status().is_none(),
            "exited before the failure was visible"
        );
        assert!(Instant::now() < deadline, "no failure counted:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        sample(
            &seen,
            "health_events_exporter_events_published_total{status=\"failure\"}"
        )
        .is_some_and(|v| v >= 1.0),
        "{seen}"
    );
    assert!(
        sample(
            &seen,
            "health_events_exporter_publish_attempt_failures_total{reason=\"status_500\"}"
        )
        .is_some_and(|v| v >= 2.0),
        "{seen}"
    );
    assert_eq!(exporter.wait_exit(WAIT).await.code(), Some(1));
}
