//! A real CloudEvents HTTP(S) sink on 127.0.0.1 that records every request and can be scripted
//! to fail, throttle or slow down: the reference sink of the development tools
//! (`event_exporter_dev::sink`, one implementation) started in-process with the request
//! registry on, no token endpoint of its own and no `--out` file, and with panics for the
//! tests instead of errors.
//!
//! What the tests rely on: every request is recorded with the status it got (404, 405, 401, 415
//! and 400 included); [`SinkServer::accepted`] is the events of requests answered 2xx, in order,
//! duplicates included; a valid request gets the next scripted answer, else the "fail always"
//! status, else 202.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use event_exporter_dev::sink::{self, RunningSink, SinkArgs};
use serde_json::Value;

use super::tls::TestPki;
use super::token::TokenRegistry;

pub use event_exporter_dev::sink::Scripted;

/// The only path the sink accepts events on.
pub const EVENTS_PATH: &str = "/api/v1/events";

/// The content type of one event (structured-mode CloudEvents, no parameters).
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// The content type of a batch (a JSON array of structured events, no parameters).
pub const CLOUDEVENTS_BATCH_JSON: &str = "application/cloudevents-batch+json";

/// How the sink behaves at start; everything can be changed later too.
#[derive(Clone, Default)]
pub struct SinkOptions {
    /// When set, requests need `Authorization: Bearer <t>` with `t` issued
    /// by the matching token server and not expired (else 401).
    pub token_registry: Option<Arc<TokenRegistry>>,
    /// Added before every answer.
    pub latency: Option<Duration>,
    /// Every new connection is held this long before it is served (before the TLS handshake
    /// with TLS): a sink across a WAN, whose handshakes cost round trips.
    pub handshake_delay: Option<Duration>,
}

/// One request as the sink saw it, with the status it answered (the same record the
/// misbehaving peers keep).
pub type RecordedRequest = super::peers::Seen;

/// The running sink. Dropping it shuts the server down (idle keep-alive
/// connections are closed, so the exporter sees the sink disappear).
pub struct SinkServer {
    sink: RunningSink,
}

impl SinkServer {
    /// Plain-HTTP sink.
    pub async fn start(opts: SinkOptions) -> SinkServer {
        Self::start_inner(opts, None).await
    }

    /// Plain-HTTP sink answering every request after `latency` (no auth).
    pub async fn answering_after(latency: Duration) -> SinkServer {
        Self::start(SinkOptions {
            latency: Some(latency),
            ..SinkOptions::default()
        })
        .await
    }

    /// HTTPS sink with the PKI's server certificate (valid for 127.0.0.1).
    pub async fn start_tls(opts: SinkOptions, pki: &TestPki) -> SinkServer {
        Self::start_inner(opts, Some(Arc::new(pki.server_config()))).await
    }

    async fn start_inner(opts: SinkOptions, tls: Option<Arc<rustls::ServerConfig>>) -> SinkServer {
        let args = SinkArgs {
            listen: "127.0.0.1:0".parse().expect("loopback address"),
            path: EVENTS_PATH.into(),
            no_auth: true,
            latency: opts.latency.unwrap_or_default(),
            handshake_delay: opts.handshake_delay.unwrap_or_default(),
            keep_events: 0,
            keep_requests: usize::MAX,
            tls,
            ..SinkArgs::default()
        };
        let sink = sink::start(args).await.expect("start the reference sink");
        sink.set_token_registry(opts.token_registry);
        SinkServer { sink }
    }

    /// Full endpoint URL, e.g. `http://127.0.0.1:PORT/api/v1/events`.
    pub fn url(&self) -> String {
        self.sink.events_url()
    }

    /// The listening address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.sink.local_addr()
    }

    /// `scheme://127.0.0.1:PORT` without a path.
    pub fn base_url(&self) -> String {
        self.sink.base_url()
    }

    /// Shuts the sink down and waits until it stopped.
    pub async fn stop(self) {
        self.sink.shutdown().await.expect("the sink stops");
    }

    /// Requires bearer tokens from `registry` from now on (`None`: no auth).
    pub fn set_token_registry(&self, registry: Option<Arc<TokenRegistry>>) {
        self.sink.set_token_registry(registry);
    }

    /// Fixed wait before every answer (`None` to answer at once).
    pub fn set_latency(&self, latency: Option<Duration>) {
        self.sink.set_latency(latency.unwrap_or_default());
    }

    /// At most `capacity` requests in their latency at once (`None`: no limit): past it the
    /// sink queues, so its latency grows with the exporter's concurrency.
    pub fn set_capacity(&self, capacity: Option<usize>) {
        self.sink.set_capacity(capacity);
    }

    /// Queues answers for the next requests that pass the checks.
    pub fn push_responses(&self, responses: Vec<Scripted>) {
        self.sink
            .push_responses(responses)
            .expect("scripted answers must be valid");
    }

    /// Every request that passes the checks answers `status` until
    /// [`SinkServer::clear_failures`] (scripted answers are used first).
    pub fn fail_always(&self, status: u16) {
        self.sink
            .fail_always(status)
            .expect("fail_always status must be valid");
    }

    /// Drops `fail_always` and any queued scripted answers.
    pub fn clear_failures(&self) {
        self.sink.clear_failures();
    }

    /// Forgets recorded requests.
    pub fn clear_requests(&self) {
        self.sink.clear_requests();
    }

    /// The most requests the sink was answering at once so far.
    pub fn max_in_flight(&self) -> usize {
        self.sink.max_in_flight()
    }

    /// Every request so far, in the order answered.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.sink.requests()
    }

    /// Parsed events of requests answered 2xx (a batch's events one by one).
    pub fn accepted(&self) -> Vec<Value> {
        self.sink.accepted_events()
    }

    /// CloudEvent `id`s of accepted events, in order.
    pub fn accepted_ids(&self) -> Vec<String> {
        self.sink.accepted_ids()
    }

    /// Waits until at least `n` events were accepted and returns them all.
    /// Panics after `timeout`, saying how many arrived and what else was seen.
    pub async fn wait_for_accepted(&self, n: usize, timeout: Duration) -> Vec<Value> {
        self.sink
            .wait_for_accepted(n, timeout)
            .await
            .unwrap_or_else(|timed_out| panic!("sink {}: {timed_out}", self.url()))
    }

    /// Waits until every id in `ids` was accepted at least once (re-sends and other events
    /// may come too). Panics after `timeout`, saying how many never arrived.
    pub async fn wait_for_ids(&self, ids: &BTreeSet<String>, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let seen: BTreeSet<String> = self.accepted_ids().into_iter().collect();
            if ids.is_subset(&seen) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sink {}: {} of {} events never arrived within {timeout:?}",
                self.url(),
                ids.difference(&seen).count(),
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until at least `n` requests (any status) were answered.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        self.sink
            .wait_for_requests(n, timeout)
            .await
            .unwrap_or_else(|timed_out| panic!("sink {}: {timed_out}", self.url()))
    }
}
