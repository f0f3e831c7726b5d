//! The sink's HTTP side: one dispatcher for every request (so the latency switch and the JSON
//! error bodies apply to all answers, 404 and 405 included), the events endpoint and the token
//! endpoint.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use super::stats::{Counters, Reason};
use super::store::{EventStore, Stored};
use super::tokens::{bearer_token, Client, TokenEndpoint, TokenIssuer, TOKEN_PATH};
use super::validate::validate_event;
use super::{SinkArgs, SinkError};

/// Largest event body read (the exporter's events are a few KiB).
const MAX_EVENT_BYTES: usize = 1 << 20;
/// Largest token request body read.
const MAX_FORM_BYTES: usize = 16 << 10;
/// Largest batch body read (the exporter's `batch_max_bytes` is at most 64 MiB).
const MAX_BATCH_BYTES: usize = 64 << 20;
const EVENT_CONTENT_TYPE: &str = event_exporter::cloudevent::CONTENT_TYPE;
/// The batched content mode: a JSON array of structured events.
const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// Everything the handlers share.
pub(super) struct Shared {
    pub path: String,
    /// `None` with `--no-auth`.
    pub auth: Option<Auth>,
    pub faults: Faults,
    pub store: EventStore,
    pub counters: Counters,
}

pub(super) struct Auth {
    pub endpoint: TokenEndpoint,
}

/// The test switches: delays and injected failures.
pub(super) struct Faults {
    latency: Duration,
    jitter: Duration,
    fail_rate: f64,
    fail_status: StatusCode,
    retry_after: Option<u64>,
}

impl Shared {
    pub fn new(args: &SinkArgs) -> Result<Shared, SinkError> {
        let store = EventStore::open(args.out.as_deref(), args.keep_events).map_err(|source| {
            SinkError::Output {
                path: args.out.clone().unwrap_or_default(),
                source,
            }
        })?;
        let auth = (!args.no_auth).then(|| Auth {
            endpoint: TokenEndpoint::new(
                Client::new(&args.client_id, &args.client_secret, &args.scope),
                Arc::new(TokenIssuer::new(args.token_lifetime)),
                args.token_lifetime,
            ),
        });
        let fail_status = StatusCode::from_u16(args.fail_status).map_err(|_| {
            SinkError::InvalidArgs(format!(
                "--fail-status: {} is not a status",
                args.fail_status
            ))
        })?;
        Ok(Shared {
            path: args.path.clone(),
            auth,
            faults: Faults {
                latency: args.latency,
                jitter: args.latency_jitter,
                fail_rate: args.fail_rate,
                fail_status,
                retry_after: args.retry_after,
            },
            store,
            counters: Counters::default(),
        })
    }
}

impl Faults {
    /// Waits `--latency` plus up to `--latency-jitter`, before any answer.
    async fn delay(&self) {
        let extra = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.jitter.mul_f64(fastrand::f64())
        };
        let total = self.latency + extra;
        if !total.is_zero() {
            tokio::time::sleep(total).await;
        }
    }

    /// The injected failure for this request, if the dice say so.
    fn roll(&self) -> Option<Response> {
        if self.fail_rate <= 0.0 || fastrand::f64() >= self.fail_rate {
            return None;
        }
        let body = json!({
            "error": "injected_failure",
            "message": "failure injected by --fail-rate",
        });
        let mut response = json_response(self.fail_status, &body);
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        Some(response)
    }
}

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(dispatch).with_state(shared)
}

/// Routes by path and method itself (no router patterns, so any `--path` works literally).
async fn dispatch(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.faults.delay().await;
    let path = request.uri().path();
    let is_post = request.method() == Method::POST;
    if path == shared.path {
        if !is_post {
            return reject(&shared, Rejection::method_not_allowed());
        }
        return match receive_event(&shared, request).await {
            Ok(response) => response,
            Err(rejection) => reject(&shared, rejection),
        };
    }
    match &shared.auth {
        Some(auth) if path == TOKEN_PATH => {
            if !is_post {
                shared.counters.count_token_error();
                return with_allow_post(Rejection::method_not_allowed().body());
            }
            issue_token(&shared, auth, request).await
        }
        _ => reject(
            &shared,
            Rejection::new(Reason::NotFound, format!("nothing is served at {path}")),
        ),
    }
}

/// An event request turned away: the reason (status and counter) and a message for the body.
struct Rejection {
    reason: Reason,
    message: String,
}

impl Rejection {
    fn new(reason: Reason, message: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            message: message.into(),
        }
    }

    fn method_not_allowed() -> Rejection {
        Rejection::new(Reason::MethodNotAllowed, "only POST is allowed here")
    }

    /// `{"error": <reason>, "message": <detail>}` with the reason's status.
    fn body(&self) -> Response {
        json_response(
            self.reason.status(),
            &json!({"error": self.reason.as_str(), "message": self.message}),
        )
    }
}

/// Counts the rejection and answers it, with the headers its status calls for.
fn reject(shared: &Shared, rejection: Rejection) -> Response {
    shared.counters.count_rejected(rejection.reason);
    let response = rejection.body();
    match rejection.reason {
        Reason::MethodNotAllowed => with_allow_post(response),
        Reason::Unauthorized => {
            let mut response = response;
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"event-exporter-sink\""),
            );
            response
        }
        _ => response,
    }
}

fn with_allow_post(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

/// The events endpoint: each check in turn, then fault injection, then storage.
async fn receive_event(shared: &Shared, request: Request) -> Result<Response, Rejection> {
    let (parts, body) = request.into_parts();
    check_bearer(shared, &parts.headers)?;
    if check_content_type(&parts.headers)? == Mode::Batch {
        let body = read_body(&parts.headers, body, MAX_BATCH_BYTES).await?;
        return receive_batch(shared, &body);
    }
    let body = read_body(&parts.headers, body, MAX_EVENT_BYTES).await?;
    let event = validate_event(&body)
        .map_err(|invalid| Rejection::new(Reason::from(&invalid), invalid.to_string()))?;
    if let Some(failure) = shared.faults.roll() {
        shared.counters.count_injected_failure();
        return Ok(failure);
    }
    let stored = shared.store.accept(event, &body).map_err(|error| {
        tracing::error!(%error, "sink: cannot append the event to --out");
        Rejection::new(Reason::OutputFailed, "the sink could not store the event")
    })?;
    let body = match stored {
        Stored::New => {
            shared.counters.count_accepted();
            json!({"status": "accepted"})
        }
        Stored::Duplicate => {
            shared.counters.count_duplicate();
            json!({"status": "accepted", "duplicate": true})
        }
    };
    Ok(json_response(StatusCode::ACCEPTED, &body))
}

/// A batch (`application/cloudevents-batch+json`): a JSON array whose every element is a
/// valid event, else the whole batch is refused naming the first bad element; then one fault
/// roll for the request; then each event is stored (duplicates are accepted again, counted).
fn receive_batch(shared: &Shared, body: &[u8]) -> Result<Response, Rejection> {
    let elements: Vec<Value> = match serde_json::from_slice(body) {
        Ok(Value::Array(elements)) => elements,
        Ok(_) => {
            return Err(Rejection::new(
                Reason::NotAnObject,
                "a batch must be a JSON array of events",
            ))
        }
        Err(error) => {
            return Err(Rejection::new(
                Reason::InvalidJson,
                format!("the batch is not JSON: {error}"),
            ))
        }
    };
    let mut events = Vec::with_capacity(elements.len());
    for (index, element) in elements.iter().enumerate() {
        let bytes = serde_json::to_vec(element).unwrap_or_default();
        let event = validate_event(&bytes).map_err(|invalid| {
            Rejection::new(
                Reason::from(&invalid),
                format!("batch element {index}: {invalid}"),
            )
        })?;
        events.push((event, bytes));
    }
    if let Some(failure) = shared.faults.roll() {
        shared.counters.count_injected_failure();
        return Ok(failure);
    }
    let (mut accepted, mut duplicates) = (0u64, 0u64);
    for (event, bytes) in events {
        let stored = shared.store.accept(event, &bytes).map_err(|error| {
            tracing::error!(%error, "sink: cannot append the event to --out");
            Rejection::new(Reason::OutputFailed, "the sink could not store the batch")
        })?;
        match stored {
            Stored::New => {
                shared.counters.count_accepted();
                accepted += 1;
            }
            Stored::Duplicate => {
                shared.counters.count_duplicate();
                duplicates += 1;
            }
        }
    }
    let body = json!({"status": "accepted", "accepted": accepted, "duplicates": duplicates});
    Ok(json_response(StatusCode::ACCEPTED, &body))
}

fn check_bearer(shared: &Shared, headers: &HeaderMap) -> Result<(), Rejection> {
    let Some(auth) = &shared.auth else {
        return Ok(());
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    match token {
        None => Err(Rejection::new(
            Reason::Unauthorized,
            format!("an Authorization: Bearer token from {TOKEN_PATH} is required"),
        )),
        Some(token) if auth.endpoint.issuer().is_valid(token) => Ok(()),
        Some(_) => Err(Rejection::new(
            Reason::Unauthorized,
            "the Bearer token was not issued by this sink or has expired",
        )),
    }
}

/// One event per request or a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Structured,
    Batch,
}

/// `application/cloudevents+json` or `application/cloudevents-batch+json`, optionally with
/// `charset=utf-8` (JSON is UTF-8 anyway).
fn check_content_type(headers: &HeaderMap) -> Result<Mode, Rejection> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok());
    if value.is_some_and(|v| is_media_type(v, EVENT_CONTENT_TYPE)) {
        return Ok(Mode::Structured);
    }
    if value.is_some_and(|v| is_media_type(v, BATCH_CONTENT_TYPE)) {
        return Ok(Mode::Batch);
    }
    Err(Rejection::new(
        Reason::UnsupportedMediaType,
        format!(
            "Content-Type must be {EVENT_CONTENT_TYPE} or {BATCH_CONTENT_TYPE}, got {}",
            value.map_or_else(|| "none".to_string(), |v| format!("{v:?}"))
        ),
    ))
}

#[cfg(test)]
fn is_cloudevents_json(value: &str) -> bool {
    is_media_type(value, EVENT_CONTENT_TYPE)
}

fn is_media_type(value: &str, wanted: &str) -> bool {
    let mut parts = value.split(';');
    let media_type_ok = parts
        .next()
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(wanted));
    media_type_ok
        && parts.all(|parameter| {
            let Some((name, value)) = parameter.split_once('=') else {
                return false;
            };
            name.trim().eq_ignore_ascii_case("charset")
                && value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        })
}

/// The body, refusing more than `limit` bytes (early when `Content-Length` says so).
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<axum::body::Bytes, Rejection> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    let too_large = || {
        Rejection::new(
            Reason::PayloadTooLarge,
            format!("a body may be at most {limit} bytes here"),
        )
    };
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        Rejection::new(
            Reason::UnreadableBody,
            format!("cannot read the body: {error}"),
        )
    })
}

/// The token endpoint: a token for the configured client, or an RFC 6749 error.
async fn issue_token(shared: &Shared, auth: &Auth, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let header_text = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    let body = axum::body::to_bytes(body, MAX_FORM_BYTES).await.ok();
    let (status, answer) = auth.endpoint.answer(
        header_text(header::AUTHORIZATION),
        header_text(header::CONTENT_TYPE),
        body.as_deref(),
    );
    if status.is_success() {
        shared.counters.count_token_issued();
    } else {
        shared.counters.count_token_error();
        tracing::debug!(error = %answer["error"], "sink: token request refused");
    }
    TokenEndpoint::response(status, &answer)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_rules() {
        for ok in [
            "application/cloudevents+json",
            "Application/CloudEvents+JSON",
            "application/cloudevents+json; charset=utf-8",
            "application/cloudevents+json;charset=\"UTF-8\"",
        ] {
            assert!(is_cloudevents_json(ok), "{ok}");
        }
        for bad in [
            "application/json",
            "application/cloudevents-batch+json",
            "application/cloudevents+json; charset=latin1",
            "application/cloudevents+json; foo=bar",
            "text/plain",
            "",
        ] {
            assert!(!is_cloudevents_json(bad), "{bad}");
        }
    }
}
