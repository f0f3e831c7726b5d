//! POSTs one CloudEvent to the sink, retrying on upstream's schedule.
//!
//! Only a 2xx answer to the POST of that very event is delivery. A 3xx that the redirect rule
//! does not follow (see [`super::redirect_policy`]) is a failed attempt naming the `Location`.
//! Everything else is retried (as upstream does) until the attempts are used up; an answer in
//! `already_delivered_statuses` counts as delivered at once, and a last answer in
//! `rejected_statuses` is reported as [`PublishError::Rejected`] so the caller can apply
//! `on_rejected`. `Retry-After` on 429/503 can only lengthen the computed delay (capped at
//! `max_backoff`), never shorten it. A 401 drops the cached token and retries at once with a
//! fresh one. At most [`BODY_LIMIT`] bytes of a response body are read (enough for the error
//! excerpt); a longer body is dropped with its connection instead of being buffered. An event
//! that carries a trace id goes out with a W3C `traceparent` header, so the sink can join the
//! trace.
//!
//! The body is one [`Bytes`] shared by every attempt and redirect, and the `Authorization`
//! value is built once per token ([`super::auth::Bearer`]): an attempt copies neither. The
//! requests go through [`SinkClient`], which owns the TLS, timeout, proxy and redirect rules.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER,
};
use hyper::StatusCode;
use smallvec::SmallVec;
use tokio_util::sync::CancellationToken;

use super::auth::{AuthError, Bearer, TokenProvider};
use super::client::{SendError, SinkClient};
use super::concurrency::{Concurrency, RoundTrip, Signal};
use super::retry::Backoff;
use crate::cloudevent::CONTENT_TYPE as CLOUDEVENTS_JSON;
use crate::config::RetryPolicy;

/// The CloudEvents HTTP binding's batched content mode: a JSON array of structured events.
pub const CLOUDEVENTS_BATCH_JSON: &str = "application/cloudevents-batch+json";

/// At most this many bytes of a sink response body are read.
pub const BODY_LIMIT: usize = 4 * 1024;

/// How an event counts as delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The sink answered 2xx to the POST.
    Accepted,
    /// The sink answered one of `already_delivered_statuses` (e.g. 409 from a sink that
    /// deduplicates on write).
    AlreadyDelivered(u16),
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("gave up after {attempts} attempts over {elapsed:.0?}; last error: {last}")]
    Exhausted {
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    /// The last attempt was answered with one of `rejected_statuses`: the sink will not take
    /// this event.
    #[error(
        "the sink rejected it with HTTP {status} after {attempts} attempts over {elapsed:.0?}; last error: {last}"
    )]
    Rejected {
        status: u16,
        attempts: u32,
        elapsed: Duration,
        /// At most 1,000 characters of the last response body.
        excerpt: String,
        last: String,
    },
    #[error("stopped before the sink accepted it")]
    Cancelled,
}

/// Why an attempt failed: the `reason` label of
/// `health_events_exporter_publish_attempt_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// The attempt, or connecting, outlasted the sink `timeout`.
    Timeout,
    /// No connection to the sink (or its proxy).
    Connect,
    /// The connection failed otherwise (reset, protocol error).
    Network,
    /// No bearer token could be had from the token endpoint.
    Token,
    /// A 3xx that is not followed.
    Redirect,
    Status401,
    Status403,
    Status404,
    Status408,
    Status429,
    Status500,
    Status502,
    Status503,
    Status504,
    /// Another 4xx.
    Status4xx,
    /// Another 5xx.
    Status5xx,
    /// A status outside 300–599 that is not success (1xx).
    StatusOther,
}

impl FailureReason {
    /// Every reason, in the order of [`crate::metrics::ATTEMPT_FAILURE_REASONS`] (a unit test
    /// there checks the two agree).
    #[cfg(test)]
    pub const ALL: [FailureReason; 17] = [
        FailureReason::Timeout,
        FailureReason::Connect,
        FailureReason::Network,
        FailureReason::Token,
        FailureReason::Redirect,
        FailureReason::Status401,
        FailureReason::Status403,
        FailureReason::Status404,
        FailureReason::Status408,
        FailureReason::Status429,
        FailureReason::Status500,
        FailureReason::Status502,
        FailureReason::Status503,
        FailureReason::Status504,
        FailureReason::Status4xx,
        FailureReason::Status5xx,
        FailureReason::StatusOther,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Timeout => "timeout",
            FailureReason::Connect => "connect",
            FailureReason::Network => "network",
            FailureReason::Token => "token",
            FailureReason::Redirect => "redirect",
            FailureReason::Status401 => "status_401",
            FailureReason::Status403 => "status_403",
            FailureReason::Status404 => "status_404",
            FailureReason::Status408 => "status_408",
            FailureReason::Status429 => "status_429",
            FailureReason::Status500 => "status_500",
            FailureReason::Status502 => "status_502",
            FailureReason::Status503 => "status_503",
            FailureReason::Status504 => "status_504",
            FailureReason::Status4xx => "status_4xx",
            FailureReason::Status5xx => "status_5xx",
            FailureReason::StatusOther => "status_other",
        }
    }

    /// The reason for an error status (not 2xx, not a redirect).
    fn of_status(status: StatusCode) -> FailureReason {
        match status.as_u16() {
            401 => FailureReason::Status401,
            403 => FailureReason::Status403,
            404 => FailureReason::Status404,
            408 => FailureReason::Status408,
            429 => FailureReason::Status429,
            500 => FailureReason::Status500,
            502 => FailureReason::Status502,
            503 => FailureReason::Status503,
            504 => FailureReason::Status504,
            402..=499 => FailureReason::Status4xx,
            501..=599 => FailureReason::Status5xx,
            _ => FailureReason::StatusOther,
        }
    }
}

/// Why one attempt failed, as a metric label and a message.
#[derive(Debug)]
pub struct AttemptFailure {
    pub reason: FailureReason,
    pub message: String,
    retry_after: Option<Duration>,
    /// The HTTP status, when the sink answered.
    status: Option<u16>,
    /// The start of the response body (lossy UTF-8, trimmed).
    excerpt: String,
}

/// What one attempt ended with.
enum Attempt {
    Delivered(Delivery),
    Failed(AttemptFailure),
}

impl Attempt {
    /// What the attempt says about the sink's load: 429, 503 and timeouts are back-pressure;
    /// any other answer is a round trip; no answer (connect, token) says nothing.
    fn signal(&self) -> Signal {
        match self {
            Attempt::Delivered(_) => Signal::Answered,
            Attempt::Failed(failure) => match (failure.status, failure.reason) {
                (Some(429 | 503), _) | (_, FailureReason::Timeout) => Signal::Backpressure,
                (Some(_), _) => Signal::Answered,
                (None, _) => Signal::Ignored,
            },
        }
    }
}

pub struct Publisher {
    client: SinkClient,
    auth: Option<Arc<TokenProvider>>,
    policy: RetryPolicy,
    rejected_statuses: Vec<u16>,
    already_delivered_statuses: Vec<u16>,
    /// Told each attempt's round trip and outcome (adaptive concurrency).
    concurrency: Option<Arc<Concurrency>>,
}

impl Publisher {
    pub fn new(
        client: SinkClient,
        auth: Option<Arc<TokenProvider>>,
        policy: RetryPolicy,
    ) -> Publisher {
        Publisher {
            client,
            auth,
            policy,
            rejected_statuses: Vec::new(),
            already_delivered_statuses: Vec::new(),
            concurrency: None,
        }
    }

    /// Reports every attempt's round trip and outcome to `concurrency`, whose adaptive limit
    /// follows them.
    pub fn with_concurrency(mut self, concurrency: Arc<Concurrency>) -> Publisher {
        self.concurrency = Some(concurrency);
        self
    }

    /// Sets which final statuses mean "the sink will never take this event"
    /// (`exporter.failure_handling.rejected_statuses`) and which mean "the sink already has
    /// it" (`exporter.failure_handling.already_delivered_statuses`).
    pub fn with_statuses(mut self, rejected: Vec<u16>, already_delivered: Vec<u16>) -> Publisher {
        self.rejected_statuses = rejected;
        self.already_delivered_statuses = already_delivered;
        self
    }

    /// Delivers `body` (the CloudEvent `event_id`), retrying until the sink accepts it, the
    /// attempts are used up, or `cancel` fires during a wait.
    ///
    /// Returns how the event counts as delivered; [`PublishError::Rejected`] when the attempts
    /// are used up and the last answer was one of `rejected_statuses`,
    /// [`PublishError::Exhausted`] for any other last failure (network, 5xx, 3xx not followed,
    /// …), [`PublishError::Cancelled`] on shutdown.
    pub async fn publish(
        &self,
        body: &Bytes,
        event_id: &str,
        traceparent: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Delivery, PublishError> {
        self.publish_as(body, CLOUDEVENTS_JSON, event_id, traceparent, cancel)
            .await
    }

    /// [`Publisher::publish`] with another content type (`application/cloudevents-batch+json`
    /// for a batch, whose `event_id` names its first event in logs).
    pub async fn publish_as(
        &self,
        body: &Bytes,
        content_type: &'static str,
        event_id: &str,
        traceparent: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Delivery, PublishError> {
        let started = Instant::now();
        let mut backoff = Backoff::new(&self.policy);
        let mut attempts: u32 = 0;
        loop {
            attempts = attempts.saturating_add(1);
            // Only the leader publishes (issue 16): a replica that cannot prove it leads waits.
            if !crate::leader::gate().may_act() {
                tokio::select! {
                    _ = cancel.cancelled() => return Err(PublishError::Cancelled),
                    _ = crate::leader::gate().leading() => {}
                }
            }
            let (attempt, round_trip) = self.attempt(body, content_type, traceparent).await;
            if let (Some(concurrency), Some(round_trip)) = (&self.concurrency, round_trip) {
                concurrency.observe(round_trip, attempt.signal());
            }
            let failure = match attempt {
                Attempt::Delivered(delivery) => return Ok(delivery),
                Attempt::Failed(failure) => failure,
            };
            crate::metrics::get().record_attempt_failure(failure.reason.as_str());
            // A failed attempt is an outcome: a retry schedule that keeps failing is not a stall.
            crate::watchdog::global().progress();
            let Some(delay) = backoff.next_delay() else {
                return Err(self.given_up(failure, attempts, started.elapsed()));
            };
            let delay = retry_delay(delay, failure.retry_after, self.policy.max_backoff);
            tracing::warn!(
                event_id,
                attempt = attempts,
                error = %failure.message,
                retry_in = ?delay,
                "publish attempt failed"
            );
            tokio::select! {
                _ = cancel.cancelled() => return Err(PublishError::Cancelled),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The error once the attempts are used up and `last` was the last failure: `Rejected`
    /// when the sink answered one of `rejected_statuses`, else `Exhausted`.
    fn given_up(&self, last: AttemptFailure, attempts: u32, elapsed: Duration) -> PublishError {
        match last.status {
            Some(status) if self.rejected_statuses.contains(&status) => PublishError::Rejected {
                status,
                attempts,
                elapsed,
                excerpt: last.excerpt,
                last: last.message,
            },
            _ => PublishError::Exhausted {
                attempts,
                elapsed,
                last: last.message,
            },
        }
    }

    /// One attempt, including at most one immediate retry after a 401 with a fresh token, and
    /// the round trip of its last POST (`None` if no POST was sent): the sink's own time, which
    /// is what adaptive concurrency judges. Fetching a token is not in it: a slow identity
    /// provider, or the first request's fetch, would look like a sink that queues (or, in the
    /// first window, set a baseline too slow to see the sink's queue later). Nor is waiting
    /// for a connection or a new connection's handshakes ([`super::client::Answer::round_trip`]).
    async fn attempt(
        &self,
        body: &Bytes,
        content_type: &'static str,
        traceparent: Option<&str>,
    ) -> (Attempt, Option<RoundTrip>) {
        let mut refreshed = false;
        loop {
            let bearer = match &self.auth {
                Some(auth) => match auth.bearer().await {
                    Ok(bearer) => Some(bearer),
                    Err(error) => return (Attempt::Failed(token_failure(error)), None),
                },
                None => None,
            };
            let headers = headers(content_type, traceparent, bearer.as_ref());
            let sent = Instant::now();
            let posted = self.client.post(&headers, body, BODY_LIMIT).await;
            let age = sent.elapsed();
            let answer = match posted {
                Ok(answer) => answer,
                Err(e) => {
                    let round_trip = RoundTrip { rtt: age, age };
                    return (Attempt::Failed(send_failure(&e)), Some(round_trip));
                }
            };
            let round_trip = Some(RoundTrip {
                rtt: answer.round_trip.unwrap_or(age),
                age,
            });
            let status = answer.status;
            let retry_after = retry_after_header(&answer.headers);
            let location = location(&answer.headers);
            let text = answer.body;
            if status.is_success() {
                return (Attempt::Delivered(Delivery::Accepted), round_trip);
            }
            if self.already_delivered_statuses.contains(&status.as_u16()) {
                let delivery = Delivery::AlreadyDelivered(status.as_u16());
                return (Attempt::Delivered(delivery), round_trip);
            }
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                if let (Some(auth), Some(bearer)) = (&self.auth, &bearer) {
                    tracing::info!("sink answered 401; fetching a new token and retrying");
                    auth.invalidate(&bearer.token).await;
                    refreshed = true;
                    continue;
                }
            }
            let refused = refusal(status, &text, location, retry_after);
            return (Attempt::Failed(refused), round_trip);
        }
    }
}

/// The headers of one POST: its content type, bearer token and trace context (the client
/// sets them on the request it builds; no map of their own). A `traceparent` that is not a
/// valid header value is left out (it is built from the event's own trace id, so that would
/// be a bug, not a reason to fail the delivery).
fn headers(
    content_type: &'static str,
    traceparent: Option<&str>,
    bearer: Option<&Bearer>,
) -> SmallVec<[(HeaderName, HeaderValue); 3]> {
    let mut headers = SmallVec::new();
    headers.push((CONTENT_TYPE, HeaderValue::from_static(content_type)));
    if let Some(bearer) = bearer {
        headers.push((AUTHORIZATION, bearer.header.clone()));
    }
    if let Some(value) = traceparent.and_then(|t| HeaderValue::from_str(t).ok()) {
        headers.push((HeaderName::from_static("traceparent"), value));
    }
    headers
}

fn token_failure(error: AuthError) -> AttemptFailure {
    AttemptFailure {
        reason: FailureReason::Token,
        message: error.to_string(),
        retry_after: None,
        status: None,
        excerpt: String::new(),
    }
}

/// The `Retry-After` header of an answer, as a wait from now.
fn retry_after_header(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(text, chrono::Utc::now())
}

/// `Retry-After` (RFC 9110 §10.2.3) as delay-seconds or an HTTP date, as a wait from `now`;
/// a date in the past is a zero wait. `None` when the value is neither.
pub fn parse_retry_after(text: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = chrono::DateTime::parse_from_rfc2822(text).ok()?;
    Some(
        date.signed_duration_since(now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// The wait before the next attempt: the computed backoff, or the server's `Retry-After` when
/// that is longer (the server's ask capped at `max_backoff`). A `Retry-After` of 0 or in the
/// past therefore never turns the backoff into a hot loop.
pub fn retry_delay(
    computed: Duration,
    retry_after: Option<Duration>,
    max_backoff: Duration,
) -> Duration {
    match retry_after {
        Some(asked) => computed.max(asked.min(max_backoff)),
        None => computed,
    }
}

/// The `Location` header of an answer, as text.
fn location(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(LOCATION)?;
    Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
}

/// Reads at most `limit` bytes of the body; returns them and whether the body ended within the
/// limit. A longer body (or one that fails midway) is dropped with its connection.
pub async fn read_bounded(mut response: reqwest::Response, limit: usize) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit.saturating_sub(body.len());
                if chunk.len() > room {
                    body.extend_from_slice(chunk.get(..room).unwrap_or_default());
                    return (body, false);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return (body, true),
            Err(_) => return (body, false),
        }
    }
}

/// At most `max_chars` characters of the body, lossy UTF-8, trimmed.
pub fn excerpt(body: &[u8], max_chars: usize) -> String {
    String::from_utf8_lossy(body)
        .trim()
        .chars()
        .take(max_chars)
        .collect()
}

fn snippet(body: &[u8]) -> String {
    let text = excerpt(body, 200);
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// An error with its causes, `: `-separated (reqwest's and hyper's own messages hide the
/// interesting part).
pub fn describe_error(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// A request that got no answer: timeout (of the attempt or of connecting), connect or
/// network. (Too many redirects is an answer: the last 3xx, see [`refusal`].)
fn send_failure(e: &SendError) -> AttemptFailure {
    AttemptFailure {
        reason: if e.is_timeout() {
            FailureReason::Timeout
        } else if e.is_connect() {
            FailureReason::Connect
        } else {
            FailureReason::Network
        },
        message: describe_error(e),
        retry_after: None,
        status: None,
        excerpt: String::new(),
    }
}

/// An answer that is not delivery: a redirect that is not followed, or an error status
/// (`Retry-After` kept for 429 and 503 only).
fn refusal(
    status: StatusCode,
    text: &[u8],
    location: Option<String>,
    retry_after: Option<Duration>,
) -> AttemptFailure {
    let excerpt = excerpt(text, 1000);
    if status.is_redirection() {
        let to = location.as_deref().unwrap_or("(no Location header)");
        return AttemptFailure {
            reason: FailureReason::Redirect,
            message: format!(
                "sink answered HTTP {} redirecting to {to}, which is not followed (only 307/308 \
                 to the same origin are); a redirect is not delivery: point \
                 exporter.sink.endpoint at the final URL",
                status.as_u16()
            ),
            retry_after: None,
            status: Some(status.as_u16()),
            excerpt,
        };
    }
    AttemptFailure {
        reason: FailureReason::of_status(status),
        message: format!("sink answered HTTP {}{}", status.as_u16(), snippet(text)),
        retry_after: if matches!(status.as_u16(), 429 | 503) {
            retry_after
        } else {
            None
        },
        status: Some(status.as_u16()),
        excerpt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn retry_after_only_lengthens_the_backoff_up_to_max_backoff() {
        let cap = s(60);
        // No header: the computed backoff.
        assert_eq!(retry_delay(s(4), None, cap), s(4));
        // 0 or a past date (parsed as zero): still the computed backoff, never a hot loop.
        assert_eq!(retry_delay(s(4), Some(Duration::ZERO), cap), s(4));
        // Shorter than the backoff: the backoff wins.
        assert_eq!(retry_delay(s(4), Some(s(1)), cap), s(4));
        // Longer: the server's ask.
        assert_eq!(retry_delay(s(4), Some(s(10)), cap), s(10));
        // Longer than max_backoff: capped.
        assert_eq!(retry_delay(s(4), Some(s(3600)), cap), cap);
    }

    #[test]
    fn retry_after_parses_seconds_future_and_past_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
            .expect("valid time")
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(" 120 ", now), Some(s(120)));
        assert_eq!(
            parse_retry_after("Sun, 01 Mar 2026 12:00:30 GMT", now),
            Some(s(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 01 Mar 2026 11:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn excerpt_is_bounded_and_trimmed() {
        assert_eq!(excerpt(b"  hello  ", 10), "hello");
        assert_eq!(excerpt("ééééé".as_bytes(), 3), "ééé");
        assert_eq!(excerpt(&[0xff, b'a'], 10), "\u{fffd}a");
    }
}
