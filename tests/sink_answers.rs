//! How sink answers are read: at most 4 KiB of any response body (an endless body neither
//! fills memory nor runs into the timeout), and `Retry-After` only ever lengthens the computed
//! backoff (0, a past date, a future date, seconds).

mod support;

use std::time::{Duration, Instant};

use support::exporter::{sample_or_zero, Exporter, ExporterOptions};
use support::peers::{answer, endless, Peer, Seen};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer, EVENTS_PATH};

const WAIT: Duration = Duration::from_secs(20);

async fn options_for(url: String, env: Vec<(String, String)>) -> ExporterOptions {
    let unused = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&unused, None, env);
    options.sink_url = url;
    options
}

#[tokio::test]
async fn endless_bodies_are_cut_without_waiting_for_the_timeout() {
    let db = TestDb::create().await;
    let client = db.client().await;
    // Each event's first POST gets 500 with an endless body, the second 202 with one.
    let peer = Peer::start(|seen: &Seen| {
        if seen.node_name().is_some_and(|n| n.ends_with("-retried")) {
            endless(202)
        } else {
            endless(500)
        }
    })
    .await;
    let mut options = options_for(peer.url(EVENTS_PATH), db.env()).await;
    options.max_retries = 0;
    // sink.timeout is 5 s: an unbounded read would end only there, as a timeout.
    let mut exporter = Exporter::start(&options).await;
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(pg::insert_health_event(&client, &pg::health_event_doc("n-retried", i)).await);
    }
    peer.wait_until(WAIT, |seen| {
        seen.iter().filter(|s| s.is_success()).count() >= 5
    })
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "5 endless 2xx bodies took {took:?}"
    );
    let mut accepted = peer.accepted_ids();
    accepted.sort();
    ids.sort();
    assert_eq!(accepted, ids, "each delivered by its first POST");
    let metrics = exporter.metrics().await;
    assert_eq!(
        sample_or_zero(
            &metrics,
            "health_events_exporter_publish_attempt_failures_total{reason=\"timeout\"}"
        ),
        0.0
    );
    let rss = sample_or_zero(&metrics, "process_resident_memory_bytes");
    assert!(rss > 0.0 && rss < 200e6, "resident memory {rss}");
    exporter.terminate_cleanly().await;
    pg::assert_token_at_head(&client, "the token reached the last event").await;

    // An endless error body: the attempt fails at once with a cut excerpt.
    let db = TestDb::create().await;
    let client = db.client().await;
    options.env = db.env();
    options.max_retries = 1;
    let mut exporter = Exporter::start(&options).await;
    let id = pg::insert_health_event(&client, &pg::health_event_doc("n-error", 1)).await;
    assert_eq!(exporter.wait_exit(WAIT).await.code(), Some(1));
    let saved = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME).await;
    let event_changelog_id = pg::changelog_max_id(&client).await;
    assert!(
        saved
            .as_ref()
            .and_then(|t| t["eventID"].as_i64())
            .is_none_or(|saved| saved < event_changelog_id),
        "the token {saved:?} passed the undelivered event"
    );
    let posts: Vec<Seen> = peer
        .seen()
        .into_iter()
        .filter(|s| s.event_id().as_deref() == Some(id.as_str()))
        .collect();
    assert_eq!(posts.len(), 2);
    let gap = posts[1].received_at.duration_since(posts[0].received_at);
    assert!(
        gap < Duration::from_secs(3),
        "the first attempt waited {gap:?}"
    );
    let log = exporter.log();
    let excerpt = format!("sink answered HTTP 500: {}", "x".repeat(200));
    assert!(log.contains(&excerpt), "{log}");
    assert!(
        !log.contains(&"x".repeat(201)),
        "the excerpt is cut at 200 characters"
    );
    assert!(!log.contains("timed out"), "{log}");
}

/// `Retry-After` as an IMF-fixdate `offset` from now.
fn http_date(offset: chrono::Duration) -> String {
    (chrono::Utc::now() + offset)
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

#[tokio::test]
async fn retry_after_zero_or_past_never_shortens_the_backoff_and_a_future_date_lengthens_it() {
    let db = TestDb::create().await;
    let client = db.client().await;
    // Dates are taken when answering, as a real server would.
    let peer = Peer::start({
        let count = std::sync::atomic::AtomicUsize::new(0);
        move |_: &Seen| match count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => answer(503, &[("retry-after", "0")], ""),
            1 => answer(
                429,
                &[(
                    "retry-after",
                    http_date(chrono::Duration::hours(-1)).as_str(),
                )],
                "",
            ),
            2 => answer(
                503,
                &[(
                    "retry-after",
                    http_date(chrono::Duration::seconds(3)).as_str(),
                )],
                "",
            ),
            _ => answer(202, &[], "{}"),
        }
    })
    .await;
    let mut options = options_for(peer.url(EVENTS_PATH), db.env()).await;
    options.max_retries = 5;
    options.initial_backoff = "1s".into();
    options.backoff_multiplier = 0.0;
    options.max_backoff = "10s".into();
    let mut exporter = Exporter::start(&options).await;
    pg::insert_health_event(&client, &pg::health_event_doc("n-ra", 1)).await;
    let seen = peer
        .wait_until(WAIT, |seen| seen.iter().any(Seen::is_success))
        .await;
    assert_eq!(seen.len(), 4);
    let gaps: Vec<Duration> = seen
        .windows(2)
        .map(|w| w[1].received_at.duration_since(w[0].received_at))
        .collect();
    println!("gaps: {gaps:?}");
    // 0 and a past date: the computed 1 s backoff (+ up to 10 % jitter), not a hot loop.
    for gap in &gaps[..2] {
        assert!(*gap >= Duration::from_millis(990), "{gaps:?}");
    }
    // A date 3 s ahead (whole seconds, so at least 2 s): longer than the backoff, so it wins.
    assert!(gaps[2] >= Duration::from_millis(1990), "{gaps:?}");
    assert!(gaps[2] < Duration::from_secs(5), "{gaps:?}");
    exporter.terminate_cleanly().await;
    pg::assert_token_at_head(&client, "the token reached the last event").await;
}

#[tokio::test]
async fn a_retry_after_beyond_max_backoff_is_capped_but_never_below_the_backoff() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let peer = Peer::start({
        let count = std::sync::atomic::AtomicUsize::new(0);
        move |_: &Seen| match count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => answer(429, &[("retry-after", "3600")], ""),
            _ => answer(202, &[], "{}"),
        }
    })
    .await;
    let mut options = options_for(peer.url(EVENTS_PATH), db.env()).await;
    options.max_retries = 1;
    options.initial_backoff = "300ms".into();
    options.max_backoff = "1s".into();
    let mut exporter = Exporter::start(&options).await;
    pg::insert_health_event(&client, &pg::health_event_doc("n-cap", 1)).await;
    let seen = peer
        .wait_until(WAIT, |seen| seen.iter().any(Seen::is_success))
        .await;
    let gap = seen[1].received_at.duration_since(seen[0].received_at);
    assert!(
        gap >= Duration::from_millis(990) && gap < Duration::from_millis(2500),
        "Retry-After: 3600 capped at max_backoff 1s, got {gap:?}"
    );
    exporter.terminate_cleanly().await;
    pg::assert_token_at_head(&client, "the token reached the last event").await;
}
