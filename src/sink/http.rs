//! POSTs one CloudEvent to the sink, retrying on upstream's schedule.
//!
//! Any 2xx is success; everything else is retried (as upstream does) until the attempts are
//! used up. `Retry-After` on 429/503 replaces the computed delay (capped at `max_backoff`).
//! A 401 drops the cached token and retries at once with a fresh one. Every response body is
//! read so the keep-alive connection can be reused. An event that carries a trace id goes out
//! with a W3C `traceparent` header, so the sink can join the trace.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

use super::auth::{AuthError, TokenProvider};
use super::retry::Backoff;
use crate::cloudevent::CONTENT_TYPE as CLOUDEVENTS_JSON;
use crate::config::RetryPolicy;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("gave up after {attempts} attempts over {elapsed:.0?}; last error: {last}")]
    Exhausted {
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    #[error("stopped before the sink accepted it")]
    Cancelled,
}

/// Why one attempt failed, as a metric label and a message.
#[derive(Debug)]
pub struct AttemptFailure {
    pub reason: &'static str,
    pub message: String,
    retry_after: Option<Duration>,
}

pub struct Publisher {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    auth: Option<Arc<TokenProvider>>,
    policy: RetryPolicy,
}

impl Publisher {
    pub fn new(
        http: reqwest::Client,
        endpoint: reqwest::Url,
        auth: Option<Arc<TokenProvider>>,
        policy: RetryPolicy,
    ) -> Publisher {
        Publisher {
            http,
            endpoint,
            auth,
            policy,
        }
    }

    /// Delivers `body` (the CloudEvent `event_id`), retrying until the sink accepts it, the
    /// attempts are used up, or `cancel` fires during a wait.
    pub async fn publish(
        &self,
        body: &[u8],
        event_id: &str,
        traceparent: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<(), PublishError> {
        let started = Instant::now();
        let mut backoff = Backoff::new(&self.policy);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failure = match self.attempt(body, traceparent).await {
                Ok(()) => return Ok(()),
                Err(failure) => failure,
            };
            crate::metrics::get().record_attempt_failure(failure.reason);
            // A failed attempt is an outcome: a retry schedule that keeps failing is not a stall.
            crate::watchdog::global().progress();
            let Some(delay) = backoff.next_delay() else {
                return Err(PublishError::Exhausted {
                    attempts,
                    elapsed: started.elapsed(),
                    last: failure.message,
                });
            };
            let delay = match failure.retry_after {
                Some(asked) => asked.min(self.policy.max_backoff),
                None => delay,
            };
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

    /// One attempt, including at most one immediate retry after a 401 with a fresh token.
    async fn attempt(&self, body: &[u8], traceparent: Option<&str>) -> Result<(), AttemptFailure> {
        let mut refreshed = false;
        loop {
            let token = match &self.auth {
                Some(auth) => Some(auth.token().await.map_err(token_failure)?),
                None => None,
            };
            let mut request = self
                .http
                .post(self.endpoint.clone())
                .header(CONTENT_TYPE, HeaderValue::from_static(CLOUDEVENTS_JSON))
                .body(body.to_vec());
            if let Some(token) = &token {
                request = request.header(AUTHORIZATION, format!("Bearer {token}"));
            }
            if let Some(traceparent) = traceparent {
                request = request.header("traceparent", traceparent);
            }
            let response = request.send().await.map_err(|e| AttemptFailure {
                reason: if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "network"
                },
                message: describe_reqwest_error(&e),
                retry_after: None,
            })?;
            let status = response.status();
            let retry_after = retry_after(&response);
            // Read the body so the connection goes back to the pool.
            let text = response.bytes().await.unwrap_or_default();
            if status.is_success() {
                return Ok(());
            }
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                if let (Some(auth), Some(token)) = (&self.auth, &token) {
                    tracing::info!("sink answered 401; fetching a new token and retrying");
                    auth.invalidate(token).await;
                    refreshed = true;
                    continue;
                }
            }
            return Err(AttemptFailure {
                reason: status_reason(status),
                message: format!("sink answered HTTP {}{}", status.as_u16(), snippet(&text)),
                retry_after: if matches!(status.as_u16(), 429 | 503) {
                    retry_after
                } else {
                    None
                },
            });
        }
    }
}

fn token_failure(error: AuthError) -> AttemptFailure {
    AttemptFailure {
        reason: "token",
        message: error.to_string(),
        retry_after: None,
    }
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let text = response.headers().get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = chrono::DateTime::parse_from_rfc2822(text).ok()?;
    let wait = date.signed_duration_since(chrono::Utc::now());
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

fn status_reason(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "status_401",
        403 => "status_403",
        404 => "status_404",
        408 => "status_408",
        429 => "status_429",
        500 => "status_500",
        502 => "status_502",
        503 => "status_503",
        504 => "status_504",
        402..=499 => "status_4xx",
        501..=599 => "status_5xx",
        _ => "status_other",
    }
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {}", text.chars().take(200).collect::<String>())
    }
}

/// A reqwest error with its causes (reqwest's own message hides the interesting part).
pub fn describe_reqwest_error(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
