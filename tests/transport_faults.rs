//! Faults below HTTP between the exporter and the sink: connections refused and reset, and
//! kept-alive connections cut. Nothing is lost; the exporter reconnects.

mod support;

use std::time::Duration;

use support::exporter::{Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::proxy::FaultProxy;
use support::sink::{SinkOptions, SinkServer, EVENTS_PATH};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_cut_connections_cost_retries_not_events() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let proxy = FaultProxy::start(sink.addr()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.sink_url = format!("http://{}{EVENTS_PATH}", proxy.addr);
    options.max_retries = 10;
    options.initial_backoff = "100ms".into();
    options.max_backoff = "500ms".into();
    let mut exporter = Exporter::start(&options).await;

    let mut written = Vec::new();
    for i in 0..3 {
        written.push(pg::insert_health_event(&client, &pg::health_event_doc("a", i)).await);
    }
    sink.wait_for_accepted(3, WAIT).await;

    // Every new connection is dropped, and the kept-alive ones are cut.
    proxy.drop_new_connections(true);
    proxy.cut_all();
    for i in 3..8 {
        written.push(pg::insert_health_event(&client, &pg::health_event_doc("b", i)).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        sink.accepted().len(),
        3,
        "nothing gets through while connections drop"
    );
    proxy.drop_new_connections(false);
    sink.wait_for_accepted(8, WAIT).await;

    // Cut the connections again mid-run: the next events go out on new ones.
    proxy.cut_all();
    for i in 8..12 {
        written.push(pg::insert_health_event(&client, &pg::health_event_doc("c", i)).await);
    }
    sink.wait_for_accepted(12, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut received = sink.accepted_ids();
    received.sort();
    received.dedup();
    written.sort();
    assert_eq!(received, written, "every event delivered");
    let metrics = exporter.metrics().await;
    let failures: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("health_events_exporter_publish_attempt_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        failures >= 5.0,
        "the dropped connections were retried:\n{metrics}"
    );
    exporter.terminate_cleanly().await;
    let max_id = pg::changelog_max_id(&client).await;
    let token = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token");
    assert_eq!(token["eventID"], serde_json::json!(max_id));
}
