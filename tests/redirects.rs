//! Redirects from the sink: only a 2xx answer to the POST of the event itself is delivery.
//! 301/302/303 are never followed (they would turn the POST into a body-less GET), 307/308
//! are followed only to the same origin with the same body and headers, and a cross-origin
//! 307/308 is not followed (no `Authorization` reaches another origin). A redirect not followed
//! is a failed attempt whose message names the `Location`; the sink-side record and the resume
//! token show that nothing is lost.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::json;
use support::exporter::{sample_or_zero, Exporter, ExporterOptions};
use support::peers::{answer, Peer, Seen};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer, EVENTS_PATH};
use support::token::{TokenConfig, TokenServer};

const WAIT: Duration = Duration::from_secs(20);

/// Exporter options aimed at `url` (the harness builds options from a sink; that one is unused).
async fn options_for(
    url: String,
    token: Option<&TokenServer>,
    env: Vec<(String, String)>,
) -> ExporterOptions {
    let unused = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&unused, token, env);
    options.sink_url = url;
    options.initial_backoff = "50ms".into();
    options.max_backoff = "200ms".into();
    options
}

fn redirect_failures(metrics: &str) -> f64 {
    sample_or_zero(
        metrics,
        "health_events_exporter_publish_attempt_failures_total{reason=\"redirect\"}",
    )
}

#[tokio::test]
async fn moved_found_and_see_other_are_failed_attempts_naming_the_location() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let posts = Arc::new(AtomicUsize::new(0));
    let peer = Peer::start({
        let posts = posts.clone();
        move |seen: &Seen| match (seen.method.as_str(), seen.path.as_str()) {
            ("GET", "/login") => {
                answer(200, &[("content-type", "text/html")], "<html>login</html>")
            }
            ("POST", EVENTS_PATH) => match posts.fetch_add(1, Ordering::SeqCst) {
                0 => answer(301, &[("location", "/login")], ""),
                1 => answer(302, &[("location", "/login")], ""),
                2 => answer(303, &[("location", "/login")], ""),
                _ => answer(202, &[], "{}"),
            },
            _ => answer(404, &[], "not found"),
        }
    })
    .await;
    let mut options = options_for(peer.url(EVENTS_PATH), None, db.env()).await;
    options.max_retries = 4;
    let mut exporter = Exporter::start(&options).await;

    let id = pg::insert_health_event(&client, &pg::health_event_doc("node-r", 1)).await;
    peer.wait_until(WAIT, |seen| seen.iter().any(Seen::is_success))
        .await;
    let seen = peer.seen();
    assert!(
        seen.iter()
            .all(|s| s.method == "POST" && s.path == EVENTS_PATH),
        "a redirect was followed: {:?}",
        seen.iter()
            .map(|s| (&s.method, &s.path))
            .collect::<Vec<_>>()
    );
    let statuses: Vec<u16> = seen.iter().map(|s| s.status).collect();
    assert_eq!(statuses, vec![301, 302, 303, 202]);
    assert!(
        seen.iter()
            .all(|s| s.event_id().as_deref() == Some(id.as_str())),
        "every POST carried the event"
    );
    assert_eq!(redirect_failures(&exporter.metrics().await), 3.0);
    let log = exporter.log();
    for status in [301, 302, 303] {
        assert!(
            log.contains(&format!("HTTP {status} redirecting to /login")),
            "the message names the Location for {status}:\n{log}"
        );
    }
    let max_id = pg::changelog_max_id(&client).await;
    exporter.terminate_cleanly().await;
    let token = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token");
    assert_eq!(token["eventID"], json!(max_id));
}

#[tokio::test]
async fn a_sink_that_always_redirects_to_a_login_page_delivers_nothing_and_keeps_the_token() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let peer = Peer::start(|seen: &Seen| match seen.method.as_str() {
        "GET" => answer(200, &[("content-type", "text/html")], "<html>login</html>"),
        _ => answer(302, &[("location", "/login")], ""),
    })
    .await;
    let mut options = options_for(peer.url(EVENTS_PATH), None, db.env()).await;
    options.max_retries = 2;
    let mut exporter = Exporter::start(&options).await;
    pg::insert_health_event(&client, &pg::health_event_doc("node-login", 1)).await;
    let event_changelog_id = pg::changelog_max_id(&client).await;

    let status = exporter.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "log:\n{}", exporter.log());
    let seen = peer.seen();
    assert_eq!(seen.len(), 3, "three POSTs, no GET");
    assert!(seen.iter().all(|s| s.method == "POST"));
    let log = exporter.log();
    assert!(log.contains("redirecting to /login"), "{log}");
    assert!(log.contains("was not delivered"), "{log}");
    let token = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME).await;
    let saved = token.as_ref().and_then(|t| t["eventID"].as_i64());
    assert!(
        saved.is_none_or(|saved| saved < event_changelog_id),
        "the token {token:?} passed the undelivered event at {event_changelog_id}"
    );
}

#[tokio::test]
async fn temporary_and_permanent_redirects_to_the_same_origin_resend_body_and_headers() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    let own_origin = Arc::new(OnceLock::<String>::new());
    let peer = Peer::start({
        let own_origin = own_origin.clone();
        move |seen: &Seen| match (seen.method.as_str(), seen.path.as_str()) {
            ("POST", EVENTS_PATH) => match seen.node_name().as_deref() {
                // Relative and absolute Locations, both on this origin.
                Some("node-307") => answer(307, &[("location", "/v2/events")], ""),
                _ => {
                    let to = format!("{}/v2/events", own_origin.get().map_or("", String::as_str));
                    answer(308, &[("location", to.as_str())], "")
                }
            },
            ("POST", "/v2/events") => answer(202, &[], "{}"),
            _ => answer(404, &[], "not found"),
        }
    })
    .await;
    own_origin.set(peer.origin()).expect("set once");
    let options = options_for(peer.url(EVENTS_PATH), Some(&token), db.env()).await;
    let mut exporter = Exporter::start(&options).await;

    let a = pg::insert_health_event(&client, &pg::health_event_doc("node-307", 1)).await;
    let b = pg::insert_health_event(&client, &pg::health_event_doc("node-308", 2)).await;
    peer.wait_until(WAIT, |seen| {
        seen.iter().filter(|s| s.is_success()).count() >= 2
    })
    .await;
    let seen = peer.seen();
    for (id, status) in [(&a, 307), (&b, 308)] {
        let requests: Vec<&Seen> = seen
            .iter()
            .filter(|s| s.event_id().as_deref() == Some(id.as_str()))
            .collect();
        assert_eq!(requests.len(), 2, "{status}: one POST and one re-POST");
        let (first, second) = (requests[0], requests[1]);
        assert_eq!(first.status, status);
        assert_eq!(
            (second.method.as_str(), second.path.as_str()),
            ("POST", "/v2/events")
        );
        assert_eq!(second.status, 202);
        assert_eq!(second.body, first.body, "{status}: same body");
        for header in ["content-type", "authorization"] {
            assert!(first.header(header).is_some(), "{header} sent");
            assert_eq!(
                second.header(header),
                first.header(header),
                "{status}: {header}"
            );
        }
    }
    let metrics = exporter.metrics().await;
    assert_eq!(
        redirect_failures(&metrics),
        0.0,
        "followed redirects are not failures"
    );
    let max_id = pg::changelog_max_id(&client).await;
    exporter.terminate_cleanly().await;
    let saved = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token");
    assert_eq!(saved["eventID"], json!(max_id));
}

#[tokio::test]
async fn a_redirect_to_another_origin_is_not_followed_and_gets_no_credentials() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    // Another origin: same host, another port.
    let other = Peer::start(|_: &Seen| answer(202, &[], "{}")).await;
    let elsewhere = other.url(EVENTS_PATH);
    let posts = Arc::new(AtomicUsize::new(0));
    let peer = Peer::start({
        let posts = posts.clone();
        let elsewhere = elsewhere.clone();
        move |_: &Seen| match posts.fetch_add(1, Ordering::SeqCst) {
            0 => answer(307, &[("location", elsewhere.as_str())], ""),
            1 => answer(308, &[("location", elsewhere.as_str())], ""),
            _ => answer(202, &[], "{}"),
        }
    })
    .await;
    let mut options = options_for(peer.url(EVENTS_PATH), Some(&token), db.env()).await;
    options.max_retries = 3;
    let mut exporter = Exporter::start(&options).await;

    let id = pg::insert_health_event(&client, &pg::health_event_doc("node-x", 1)).await;
    peer.wait_until(WAIT, |seen| seen.iter().any(Seen::is_success))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        other.seen().is_empty(),
        "the other origin got a request: {:?}",
        other.seen()
    );
    assert_eq!(peer.accepted_ids(), vec![id.clone()]);
    let statuses: Vec<u16> = peer.seen().iter().map(|s| s.status).collect();
    assert_eq!(statuses, vec![307, 308, 202]);
    assert_eq!(redirect_failures(&exporter.metrics().await), 2.0);
    let log = exporter.log();
    assert!(
        log.contains(&format!("HTTP 307 redirecting to {elsewhere}"))
            && log.contains(&format!("HTTP 308 redirecting to {elsewhere}")),
        "the message names the other origin's Location:\n{log}"
    );
    let max_id = pg::changelog_max_id(&client).await;
    exporter.terminate_cleanly().await;
    let saved = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME)
        .await
        .expect("token");
    assert_eq!(saved["eventID"], json!(max_id));
}

#[tokio::test]
async fn a_same_origin_redirect_loop_is_cut_after_five_hops() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let peer =
        Peer::start(|seen: &Seen| answer(307, &[("location", seen.path.as_str())], "")).await;
    let mut options = options_for(peer.url(EVENTS_PATH), None, db.env()).await;
    options.max_retries = 0;
    let mut exporter = Exporter::start(&options).await;
    pg::insert_health_event(&client, &pg::health_event_doc("node-loop", 1)).await;
    let event_changelog_id = pg::changelog_max_id(&client).await;
    assert_eq!(exporter.wait_exit(WAIT).await.code(), Some(1));
    assert_eq!(peer.seen().len(), 6, "the POST and five followed hops");
    let log = exporter.log();
    assert!(
        log.contains(&format!("HTTP 307 redirecting to {EVENTS_PATH}")),
        "{log}"
    );
    let token = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME).await;
    let saved = token.as_ref().and_then(|t| t["eventID"].as_i64());
    assert!(
        saved.is_none_or(|saved| saved < event_changelog_id),
        "{token:?}"
    );
}
