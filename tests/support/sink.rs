//! A real CloudEvents HTTP(S) sink on 127.0.0.1 that records every request
//! and can be scripted to fail, throttle or slow down.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use super::tls::{serve, ServerHandle, TestPki};
use super::token::TokenRegistry;

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
}

/// One scripted answer for a request that passed path, content-type and auth checks.
#[derive(Clone, Debug)]
pub struct Scripted {
    pub status: u16,
    /// Value of a `Retry-After` header, if any (e.g. "1").
    pub retry_after: Option<String>,
    /// Extra wait before answering (on top of the fixed latency).
    pub delay: Option<Duration>,
}

impl Scripted {
    pub fn status(status: u16) -> Scripted {
        Scripted {
            status,
            retry_after: None,
            delay: None,
        }
    }
}

/// One request as the sink saw it, with the status it answered (the same record the
/// misbehaving peers keep).
pub type RecordedRequest = super::peers::Seen;

struct SinkState {
    token_registry: Mutex<Option<Arc<TokenRegistry>>>,
    latency: Mutex<Option<Duration>>,
    scripted: Mutex<VecDeque<Scripted>>,
    fail_always: Mutex<Option<u16>>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Requests being answered right now, and the most there ever were at once.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// The running sink. Dropping it shuts the server down (idle keep-alive
/// connections are closed, so the exporter sees the sink disappear).
pub struct SinkServer {
    state: Arc<SinkState>,
    server: ServerHandle,
    scheme: &'static str,
}

impl SinkServer {
    /// Plain-HTTP sink.
    pub async fn start(opts: SinkOptions) -> SinkServer {
        Self::start_inner(opts, None).await
    }

    /// HTTPS sink with the PKI's server certificate (valid for 127.0.0.1).
    pub async fn start_tls(opts: SinkOptions, pki: &TestPki) -> SinkServer {
        Self::start_inner(opts, Some(pki)).await
    }

    async fn start_inner(opts: SinkOptions, pki: Option<&TestPki>) -> SinkServer {
        let state = Arc::new(SinkState {
            token_registry: Mutex::new(opts.token_registry),
            latency: Mutex::new(opts.latency),
            scripted: Mutex::new(VecDeque::new()),
            fail_always: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        // Every request goes through one handler so 404/405s are recorded too.
        let router = Router::new()
            .fallback(sink_handler)
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(state.clone());
        let server = serve(router, pki.map(|p| Arc::new(p.server_config()))).await;
        SinkServer {
            state,
            server,
            scheme: if pki.is_some() { "https" } else { "http" },
        }
    }

    /// Full endpoint URL, e.g. `http://127.0.0.1:PORT/api/v1/events`.
    pub fn url(&self) -> String {
        format!("{}{EVENTS_PATH}", self.base_url())
    }

    /// The listening address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr
    }

    /// `scheme://127.0.0.1:PORT` without a path.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.server.addr)
    }

    /// Shuts the sink down and waits until it stopped.
    pub async fn stop(self) {
        self.server.stop().await;
    }

    /// Requires bearer tokens from `registry` from now on (`None`: no auth).
    pub fn set_token_registry(&self, registry: Option<Arc<TokenRegistry>>) {
        *self.state.token_registry.lock().expect("sink mutex") = registry;
    }

    /// Fixed wait before every answer (`None` to answer at once).
    pub fn set_latency(&self, latency: Option<Duration>) {
        *self.state.latency.lock().expect("sink mutex") = latency;
    }

    /// Queues answers for the next requests that pass the checks.
    pub fn push_responses(&self, responses: Vec<Scripted>) {
        self.state
            .scripted
            .lock()
            .expect("sink mutex")
            .extend(responses);
    }

    /// Every request that passes the checks answers `status` until
    /// [`SinkServer::clear_failures`] (scripted answers are used first).
    pub fn fail_always(&self, status: u16) {
        *self.state.fail_always.lock().expect("sink mutex") = Some(status);
    }

    /// Drops `fail_always` and any queued scripted answers.
    pub fn clear_failures(&self) {
        *self.state.fail_always.lock().expect("sink mutex") = None;
        self.state.scripted.lock().expect("sink mutex").clear();
    }

    /// Forgets recorded requests.
    pub fn clear_requests(&self) {
        self.state.requests.lock().expect("sink mutex").clear();
    }

    /// The most requests the sink was answering at once so far.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Every request so far, in the order answered.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().expect("sink mutex").clone()
    }

    /// Parsed events of requests answered 2xx (a batch's events one by one).
    pub fn accepted(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(RecordedRequest::is_success)
            .filter_map(|r| r.json)
            .flat_map(|json| match json {
                Value::Array(events) => events,
                event => vec![event],
            })
            .collect()
    }

    /// CloudEvent `id`s of accepted events, in order.
    pub fn accepted_ids(&self) -> Vec<String> {
        self.accepted()
            .iter()
            .filter_map(|e| e.get("id").and_then(Value::as_str).map(str::to_string))
            .collect()
    }

    /// Waits until at least `n` events were accepted and returns them all.
    /// Panics after `timeout`, saying how many arrived and what else was seen.
    pub async fn wait_for_accepted(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let accepted = self.accepted();
            if accepted.len() >= n {
                return accepted;
            }
            if Instant::now() >= deadline {
                let requests = self.requests();
                let mut statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
                statuses.sort_unstable();
                statuses.dedup();
                panic!(
                    "sink {}: waited {timeout:?} for {n} accepted events, only {} arrived \
                     ({} requests in total, statuses seen: {statuses:?})",
                    self.url(),
                    accepted.len(),
                    requests.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until at least `n` requests (any status) were answered.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if requests.len() >= n {
                return requests;
            }
            if Instant::now() >= deadline {
                panic!(
                    "sink {}: waited {timeout:?} for {n} requests, only {} arrived",
                    self.url(),
                    requests.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn sink_handler(
    State(state): State<Arc<SinkState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received_at = Instant::now();
    let counted = InFlight::enter(&state);
    let latency = *state.latency.lock().expect("sink mutex");
    if let Some(latency) = latency {
        tokio::time::sleep(latency).await;
    }
    let (status, retry_after, body_json) = decide(&state, &method, &uri, &headers).await;
    drop(counted);

    let mut recorded = RecordedRequest::new(&method, &uri, &headers, &body, received_at);
    recorded.status = status.as_u16();
    state.requests.lock().expect("sink mutex").push(recorded);

    let mut response = (status, body_json.to_string()).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
        h.insert(header::RETRY_AFTER, value);
    }
    match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            h.insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        StatusCode::UNAUTHORIZED => {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        _ => {}
    }
    response
}

/// Counts one request as being answered until dropped (also when the client hangs up).
struct InFlight<'a>(&'a SinkState);

impl<'a> InFlight<'a> {
    fn enter(state: &'a SinkState) -> InFlight<'a> {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Status, optional Retry-After and JSON body for one request, in check order:
/// path, method, content type, bearer token, scripted/failing answers, 202.
async fn decide(
    state: &SinkState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> (StatusCode, Option<String>, Value) {
    if uri.path() != EVENTS_PATH {
        return (StatusCode::NOT_FOUND, None, json!({"error": "not found"}));
    }
    if method != Method::POST {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            json!({"error": "method not allowed"}),
        );
    }
    let content_type = headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes);
    if content_type != Some(CLOUDEVENTS_JSON.as_bytes())
        && content_type != Some(CLOUDEVENTS_BATCH_JSON.as_bytes())
    {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            json!({"error": format!("content-type must be {CLOUDEVENTS_JSON} or {CLOUDEVENTS_BATCH_JSON}")}),
        );
    }
    let registry = state.token_registry.lock().expect("sink mutex").clone();
    if let Some(registry) = registry {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(event_exporter_dev::sink::bearer_token);
        if !bearer.is_some_and(|t| registry.is_valid(t)) {
            return (
                StatusCode::UNAUTHORIZED,
                None,
                json!({"error": "missing, unknown or expired bearer token"}),
            );
        }
    }
    let scripted = state.scripted.lock().expect("sink mutex").pop_front();
    if let Some(scripted) = scripted {
        if let Some(delay) = scripted.delay {
            tokio::time::sleep(delay).await;
        }
        let status = StatusCode::from_u16(scripted.status).expect("scripted status must be valid");
        let body = if status.is_success() {
            json!({"status": "accepted"})
        } else {
            json!({"error": "scripted failure"})
        };
        return (status, scripted.retry_after, body);
    }
    let always = *state.fail_always.lock().expect("sink mutex");
    if let Some(code) = always {
        let status = StatusCode::from_u16(code).expect("fail_always status must be valid");
        return (status, None, json!({"error": "failing on purpose"}));
    }
    (StatusCode::ACCEPTED, None, json!({"status": "accepted"}))
}
