//! The reconnect backoff resets after a healthy connection: a LISTEN connection that PostgreSQL
//! drops again and again (here `pg_terminate_backend`, as a failover or an idle-timeout proxy
//! would) is re-established quickly every time, instead of waiting longer after each drop.

mod support;

use std::time::{Duration, Instant};

use support::exporter::{Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer};
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(30);
/// `reconnect::HEALTHY_PERIOD` plus a margin.
const HEALTHY: Duration = Duration::from_millis(5_500);
/// The first reconnect wait is 500 ms; without the reset the 4th and 5th would be 4 s and 8 s.
const QUICK: Duration = Duration::from_secs(3);

/// The pid of the exporter's LISTEN connection other than `not`, waiting for one to exist.
async fn listener_pid(client: &Client, not: Option<i32>) -> i32 {
    let started = Instant::now();
    loop {
        let row = client
            .query_opt(
                "SELECT pid FROM pg_stat_activity \
                 WHERE datname = current_database() AND query = 'LISTEN nvsentinel_changes' \
                   AND pid <> pg_backend_pid() AND pid IS DISTINCT FROM $1 \
                 ORDER BY backend_start DESC LIMIT 1",
                &[&not],
            )
            .await
            .expect("pg_stat_activity");
        if let Some(row) = row {
            return row.get(0);
        }
        assert!(started.elapsed() < WAIT, "no LISTEN connection came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_connection_dropped_after_a_healthy_period_reconnects_quickly_each_time() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::start(&ExporterOptions::new(&sink, None, db.env())).await;

    let mut pid = listener_pid(&client, None).await;
    let mut written = Vec::new();
    for round in 0..5u32 {
        tokio::time::sleep(HEALTHY).await;
        let dropped_at = Instant::now();
        let terminated: bool = client
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .expect("terminate")
            .get(0);
        assert!(
            terminated,
            "round {round}: the LISTEN backend {pid} was terminated"
        );
        pid = listener_pid(&client, Some(pid)).await;
        let took = dropped_at.elapsed();
        assert!(
            took < QUICK,
            "round {round}: the LISTEN connection came back after {took:?}, not within {QUICK:?}"
        );
        written.push(pg::insert_health_event(&client, &pg::health_event_doc("r", round)).await);
    }
    sink.wait_for_accepted(written.len(), WAIT).await;
    let mut received = sink.accepted_ids();
    received.sort();
    written.sort();
    assert_eq!(received, written, "every event delivered once");
    exporter.terminate_cleanly().await;
}
