//! Delivery under sink and token-endpoint faults: retries on upstream's schedule,
//! `Retry-After`, 401 → token refresh, token expiry, secret rotation, retries exhausted,
//! SIGTERM during retries, and the secret never reaching the log.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::exporter::{Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{RecordedRequest, Scripted, SinkOptions, SinkServer};
use support::token::{self, TokenConfig, TokenServer};

const WAIT: Duration = Duration::from_secs(20);

/// Extra time a loaded 2-core machine may add to a sleep; only upper bounds use it.
const SLACK: Duration = Duration::from_millis(900);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

fn cloudevent_id(request: &RecordedRequest) -> Option<String> {
    request
        .json
        .as_ref()
        .and_then(|j| j.get("id"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Time between two requests as the sink received them.
fn gap(earlier: &RecordedRequest, later: &RecordedRequest) -> Duration {
    later.received_at.duration_since(earlier.received_at)
}

/// The requests that carried CloudEvent `id`, in arrival order.
fn requests_for(sink: &SinkServer, id: &str) -> Vec<RecordedRequest> {
    sink.requests()
        .into_iter()
        .filter(|r| cloudevent_id(r).as_deref() == Some(id))
        .collect()
}

fn eventid_of(token: &Option<Value>) -> Option<i64> {
    token.as_ref().and_then(|t| t["eventID"].as_i64())
}

/// `client_id:secret` from a `Basic …` Authorization header.
fn basic_credentials(authorization: Option<&str>) -> Option<String> {
    let encoded = authorization?.strip_prefix("Basic ")?;
    String::from_utf8(token::base64_decode(encoded.trim())?).ok()
}

#[tokio::test]
async fn retry_after_on_503_and_429_is_honoured_with_one_stable_event_id() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.initial_backoff = "100ms".into();
    options.max_backoff = "5s".into();
    let mut exporter = Exporter::start(&options).await;

    sink.push_responses(vec![
        Scripted {
            status: 503,
            retry_after: Some("1".into()),
            delay: None,
        },
        Scripted {
            status: 429,
            retry_after: Some("1".into()),
            delay: None,
        },
    ]);
    let record_id = pg::insert_health_event(&client, &pg::health_event_doc("node-ra", 1)).await;
    sink.wait_for_accepted(1, WAIT).await;

    let requests = sink.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 429, 202], "three attempts");
    for request in &requests {
        assert_eq!(cloudevent_id(request).as_deref(), Some(record_id.as_str()));
    }
    let gaps = [
        gap(&requests[0], &requests[1]),
        gap(&requests[1], &requests[2]),
    ];
    println!("Retry-After gaps: {gaps:?}");
    for g in gaps {
        // initial_backoff is 100 ms; only Retry-After explains a wait of a second.
        assert!(g >= ms(990), "Retry-After: 1 not honoured, gap {g:?}");
        assert!(g < ms(1100) + SLACK, "gap {g:?} is far above Retry-After");
    }
    exporter.terminate_cleanly().await;
}

#[tokio::test]
async fn retry_after_above_max_backoff_is_capped_at_max_backoff() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.initial_backoff = "100ms".into();
    options.max_backoff = "400ms".into();
    let mut exporter = Exporter::start(&options).await;

    sink.push_responses(vec![Scripted {
        status: 503,
        retry_after: Some("30".into()),
        delay: None,
    }]);
    pg::insert_health_event(&client, &pg::health_event_doc("node-cap", 1)).await;
    sink.wait_for_accepted(1, Duration::from_secs(10)).await;

    let requests = sink.requests();
    assert_eq!(requests.len(), 2, "one 503 then success");
    let g = gap(&requests[0], &requests[1]);
    println!("capped Retry-After gap: {g:?}");
    assert!(g >= ms(395), "waited less than max_backoff: {g:?}");
    assert!(
        g < ms(400) + SLACK + SLACK,
        "Retry-After: 30 not capped at 400ms: {g:?}"
    );
    exporter.terminate_cleanly().await;
}

#[tokio::test]
async fn server_errors_back_off_exponentially() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.initial_backoff = "200ms".into();
    options.max_backoff = "5s".into();
    options.backoff_multiplier = 2.0;
    let mut exporter = Exporter::start(&options).await;

    sink.push_responses(vec![Scripted::status(500), Scripted::status(500)]);
    let record_id = pg::insert_health_event(&client, &pg::health_event_doc("node-exp", 1)).await;
    sink.wait_for_accepted(1, WAIT).await;

    let requests = requests_for(&sink, &record_id);
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![500, 500, 202]);
    let (g1, g2) = (
        gap(&requests[0], &requests[1]),
        gap(&requests[1], &requests[2]),
    );
    println!("backoff gaps: {g1:?} {g2:?}");
    assert!(g1 >= ms(200), "first retry before initial_backoff: {g1:?}");
    assert!(g1 < ms(220) + SLACK, "first retry far too late: {g1:?}");
    assert!(
        g2 >= ms(400),
        "second retry did not double the wait: {g2:?}"
    );
    assert!(g2 < ms(440) + SLACK, "second retry far too late: {g2:?}");
    exporter.terminate_cleanly().await;
}

#[tokio::test]
async fn a_401_refreshes_the_token_and_retries_at_once() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    let sink = SinkServer::start(SinkOptions {
        token_registry: Some(token.registry()),
        ..SinkOptions::default()
    })
    .await;
    let mut options = ExporterOptions::new(&sink, Some(&token), db.env());
    // A backoff wait would show up as a 5 s gap.
    options.initial_backoff = "5s".into();
    options.max_backoff = "10s".into();
    let mut exporter = Exporter::start(&options).await;

    pg::insert_health_event(&client, &pg::health_event_doc("node-401", 1)).await;
    sink.wait_for_accepted(1, WAIT).await;
    assert_eq!(token.requests(), 1);

    token.revoke_all();
    let second = pg::insert_health_event(&client, &pg::health_event_doc("node-401", 2)).await;
    sink.wait_for_accepted(2, Duration::from_secs(4)).await;

    let requests = requests_for(&sink, &second);
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        vec![401, 202],
        "one 401, then the retry with a new token"
    );
    let g = gap(&requests[0], &requests[1]);
    println!("401 → retry gap: {g:?}");
    assert!(
        g < Duration::from_secs(1),
        "the retry after a 401 waited {g:?}"
    );
    assert_ne!(
        requests[0].header("authorization"),
        requests[1].header("authorization"),
        "the retry must carry the new token"
    );
    assert_eq!(token.requests(), 2, "exactly one refresh");
    exporter.terminate_cleanly().await;
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_but_not_per_event() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let token = TokenServer::start(TokenConfig {
        expires_in: 4,
        ..TokenConfig::default()
    })
    .await;
    let sink = SinkServer::start(SinkOptions {
        token_registry: Some(token.registry()),
        ..SinkOptions::default()
    })
    .await;
    let mut exporter = Exporter::start(&ExporterOptions::new(&sink, Some(&token), db.env())).await;

    const EVENTS: usize = 10;
    let started = Instant::now();
    for i in 0..EVENTS {
        pg::insert_health_event(&client, &pg::health_event_doc("node-exp", i as u32)).await;
        sink.wait_for_accepted(i + 1, WAIT).await;
        tokio::time::sleep(ms(1000)).await;
    }
    let spread = started.elapsed();
    let fetched = token.requests();
    println!("{EVENTS} events over {spread:?}: {fetched} token requests");
    assert!(spread > Duration::from_secs(8));
    assert!(
        fetched >= 2,
        "a 4 s token was used for {spread:?} without refresh"
    );
    assert!(
        fetched < EVENTS,
        "one token request per event ({fetched}): the cache is not used"
    );
    let unauthorized = sink.requests().iter().filter(|r| r.status == 401).count();
    assert_eq!(unauthorized, 0, "tokens are refreshed before they expire");
    exporter.terminate_cleanly().await;
}

#[tokio::test]
async fn a_rotated_secret_is_read_on_the_next_refresh_without_restart() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    let sink = SinkServer::start(SinkOptions {
        token_registry: Some(token.registry()),
        ..SinkOptions::default()
    })
    .await;
    let mut exporter = Exporter::start(&ExporterOptions::new(&sink, Some(&token), db.env())).await;
    let old_secret = token.secret();

    pg::insert_health_event(&client, &pg::health_event_doc("node-rot", 1)).await;
    sink.wait_for_accepted(1, WAIT).await;
    assert_eq!(token.requests(), 1);

    // What a Kubernetes Secret rotation looks like: new value at the IdP and in the mounted
    // file, old tokens revoked.
    let new_secret = "rotated-secret-value-42";
    token.set_secret(new_secret);
    std::fs::write(exporter.secret_path(), format!("{new_secret}\n")).expect("rewrite secret");
    token.revoke_all();

    let second = pg::insert_health_event(&client, &pg::health_event_doc("node-rot", 2)).await;
    sink.wait_for_accepted(2, WAIT).await;
    assert!(sink.accepted_ids().contains(&second));
    assert!(
        exporter.try_status().is_none(),
        "the exporter restarted or stopped"
    );

    let log = token.request_log();
    let credentials: Vec<Option<String>> = log
        .iter()
        .map(|r| basic_credentials(r.authorization.as_deref()))
        .collect();
    assert_eq!(
        credentials[0].as_deref(),
        Some(format!("event-exporter:{old_secret}").as_str())
    );
    let after: Vec<_> = log.iter().zip(&credentials).skip(1).collect();
    assert!(!after.is_empty(), "no token request after the rotation");
    for (request, creds) in &after {
        assert_eq!(
            creds.as_deref(),
            Some(format!("event-exporter:{new_secret}").as_str()),
            "token requested with a stale secret after rotation"
        );
        assert_eq!(request.status, 200);
    }
    exporter.terminate_cleanly().await;
}

#[tokio::test]
async fn exhausted_retries_stop_the_exporter_without_moving_the_token() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.max_retries = 2;
    options.initial_backoff = "100ms".into();
    let mut exporter = Exporter::start(&options).await;

    sink.fail_always(500);
    let record_id = pg::insert_health_event(&client, &pg::health_event_doc("node-x", 1)).await;
    let changelog_id = pg::changelog_max_id(&client).await;
    let status = exporter.wait_exit(Duration::from_secs(15)).await;
    let log = exporter.log();
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert_eq!(
        requests_for(&sink, &record_id).len(),
        3,
        "max_retries + 1 attempts"
    );
    let failure = log
        .lines()
        .find(|l| l.contains("was not delivered"))
        .unwrap_or_else(|| panic!("no 'was not delivered' line; log:\n{log}"));
    assert!(
        failure.contains(&record_id) || failure.contains(&format!("changelog id {changelog_id}")),
        "the failure does not name the event: {failure}"
    );
    let stored = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME).await;
    if let Some(id) = eventid_of(&stored) {
        assert!(
            id < changelog_id,
            "token {stored:?} moved past undelivered {changelog_id}"
        );
    }

    // With the sink healthy again, a restart delivers the event.
    sink.clear_failures();
    let mut exporter = Exporter::start(&options).await;
    let events = sink.wait_for_accepted(1, WAIT).await;
    assert_eq!(events[0]["id"].as_str(), Some(record_id.as_str()));
    exporter.terminate_cleanly().await;
    let stored = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME).await;
    assert_eq!(eventid_of(&stored), Some(changelog_id));
}

#[tokio::test]
async fn sigterm_during_retries_exits_zero_within_the_grace_period() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.max_retries = 100;
    options.initial_backoff = "200ms".into();
    options.max_backoff = "500ms".into();
    options.shutdown_grace = "2s".into();
    let mut exporter = Exporter::start(&options).await;

    sink.fail_always(503);
    let record_id = pg::insert_health_event(&client, &pg::health_event_doc("node-term", 1)).await;
    let changelog_id = pg::changelog_max_id(&client).await;
    sink.wait_for_requests(2, WAIT).await;

    let took = exporter.terminate_cleanly().await;
    println!("SIGTERM during retries: exit after {took:?}");
    assert!(
        took < Duration::from_secs(2) + Duration::from_secs(3),
        "exit took {took:?} with a 2 s grace period"
    );
    assert!(sink.accepted().is_empty());
    assert!(!requests_for(&sink, &record_id).is_empty());
    let stored = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME).await;
    if let Some(id) = eventid_of(&stored) {
        assert!(
            id < changelog_id,
            "token {stored:?} moved past undelivered {changelog_id}"
        );
    }
}

#[tokio::test]
async fn the_client_secret_never_reaches_the_log() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    let sink = SinkServer::start(SinkOptions {
        token_registry: Some(token.registry()),
        ..SinkOptions::default()
    })
    .await;
    let mut options = ExporterOptions::new(&sink, Some(&token), db.env());
    options.max_retries = 1;
    options.initial_backoff = "100ms".into();

    // A good run at debug level (the harness sets LOG_LEVEL=debug).
    let good_secret = token.secret();
    let mut exporter = Exporter::start(&options).await;
    pg::insert_health_event(&client, &pg::health_event_doc("node-s", 1)).await;
    sink.wait_for_accepted(1, WAIT).await;
    exporter.terminate_cleanly().await;
    let log = exporter.log();
    assert!(log.contains("fetched an access token"), "log:\n{log}");
    assert!(
        !log.contains(&good_secret),
        "the secret is in the log:\n{log}"
    );

    // A secret the token endpoint rejects with 401.
    let bad_secret = "wrong-secret-Zq81xPx";
    if let Some(oidc) = options.oidc.as_mut() {
        oidc.3 = bad_secret.to_string();
    }
    let mut exporter = Exporter::start(&options).await;
    pg::insert_health_event(&client, &pg::health_event_doc("node-s", 2)).await;
    let status = exporter.wait_exit(Duration::from_secs(15)).await;
    let log = exporter.log();
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert!(
        token.request_log().iter().any(|r| r.status == 401),
        "the token endpoint never rejected the secret"
    );
    assert!(log.contains("401"), "the rejection is not logged:\n{log}");
    for secret in [bad_secret, good_secret.as_str()] {
        assert!(
            !log.contains(secret),
            "secret {secret:?} is in the log:\n{log}"
        );
    }
    // Not even in the Basic credentials' encoded form.
    let encoded = token
        .request_log()
        .iter()
        .filter_map(|r| r.authorization.clone())
        .filter_map(|a| a.strip_prefix("Basic ").map(str::to_string))
        .collect::<Vec<_>>();
    assert!(!encoded.is_empty());
    for basic in encoded {
        assert!(
            !log.contains(&basic),
            "encoded credentials in the log:\n{log}"
        );
    }
}

/// `n` events of `node` in one transaction, so they become visible (and are dispatched) together.
async fn insert_batch(client: &mut tokio_postgres::Client, node: &str, n: u32) -> Vec<String> {
    let documents = (0..n).map(|i| pg::health_event_doc(node, i));
    pg::insert_health_events_at_once(client, documents).await
}

#[tokio::test]
async fn concurrent_workers_share_one_token_fetch_and_one_refresh() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    // Latency keeps all four publishes in flight at once.
    let sink = SinkServer::start(SinkOptions {
        token_registry: Some(token.registry()),
        latency: Some(ms(400)),
        ..SinkOptions::default()
    })
    .await;
    let mut options = ExporterOptions::new(&sink, Some(&token), db.env());
    options.workers = 4;
    options.initial_backoff = "5s".into();
    options.max_backoff = "10s".into();
    let mut exporter = Exporter::start(&options).await;

    insert_batch(&mut client, "node-sf", 4).await;
    sink.wait_for_accepted(4, WAIT).await;
    assert_eq!(
        token.requests(),
        1,
        "four workers without a token fetched it more than once"
    );

    // Every in-flight publish gets a 401 for the revoked token; one refresh serves them all.
    token.revoke_all();
    let second = insert_batch(&mut client, "node-sf", 4).await;
    sink.wait_for_accepted(8, Duration::from_secs(8)).await;
    let unauthorized = sink
        .requests()
        .iter()
        .filter(|r| r.status == 401)
        .filter(|r| cloudevent_id(r).is_some_and(|id| second.contains(&id)))
        .count();
    println!(
        "401s after revocation: {unauthorized}; token requests: {}",
        token.requests()
    );
    assert!(
        unauthorized >= 2,
        "the batch was not in flight concurrently ({unauthorized} 401s)"
    );
    assert_eq!(
        token.requests(),
        2,
        "concurrent 401s must share one refresh"
    );
    exporter.terminate_cleanly().await;
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_publish_finish_and_saves_the_token() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::answering_after(ms(2000)).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.shutdown_grace = "6s".into();
    let mut exporter = Exporter::start(&options).await;

    let record_id = pg::insert_health_event(&client, &pg::health_event_doc("node-if", 1)).await;
    let changelog_id = pg::changelog_max_id(&client).await;
    let deadline = Instant::now() + WAIT;
    while !exporter
        .metrics()
        .await
        .lines()
        .any(|l| l == "health_events_exporter_events_in_flight 1")
    {
        assert!(Instant::now() < deadline, "the event never went in flight");
        tokio::time::sleep(ms(50)).await;
    }
    assert!(
        sink.requests().is_empty(),
        "the sink answered before SIGTERM"
    );

    let took = exporter.terminate_cleanly().await;
    println!("SIGTERM with a publish in flight: exit after {took:?}");
    assert_eq!(
        sink.accepted_ids(),
        vec![record_id],
        "the in-flight publish was not finished"
    );
    assert!(
        took < Duration::from_secs(6),
        "waited out the whole grace period: {took:?}"
    );
    let stored = pg::read_resume_token(&client, pg::EXPORTER_CLIENT_NAME).await;
    assert_eq!(
        eventid_of(&stored),
        Some(changelog_id),
        "token not saved on the way out"
    );
}
