//! The sink's HTTP side: one dispatcher for every request (so the latency switch, the JSON
//! error bodies and the request registry apply to all answers, 404 and 405 included), the events
//! endpoint and the token endpoint.
//!
//! Every request but a token request is recorded (when recording is on) with the status it got,
//! rejected ones included; its body is read in full first (at most [`MAX_BATCH_BYTES`]), and a
//! body that could not be read is only an error once the checks before it have passed.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::faults::{Faults, Verdict};
use super::requests::{RecordedRequest, RequestLog};
use super::stats::{Counters, Reason};
use super::store::{EventStore, Stored};
use super::tokens::{bearer_token, Client, TokenEndpoint, TokenIssuer, TOKEN_PATH};
use super::validate::{validate_event, ValidEvent};
use super::{SinkArgs, SinkError};

/// Largest event body accepted (the exporter's events are a few KiB).
const MAX_EVENT_BYTES: usize = 1 << 20;
/// Largest token request body read.
const MAX_FORM_BYTES: usize = 16 << 10;
/// Largest body read (a batch: the exporter's `batch_max_bytes` is at most 64 MiB).
const MAX_BATCH_BYTES: usize = 64 << 20;
const EVENT_CONTENT_TYPE: &str = event_exporter::cloudevent::CONTENT_TYPE;
/// The batched content mode: a JSON array of structured events.
const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// Everything the handlers share.
pub(super) struct Shared {
    pub path: String,
    /// The token endpoint; `None` with `--no-auth`.
    pub auth: Option<Auth>,
    /// The tokens the events endpoint accepts (`None`: no token needed): the token
    /// endpoint's, or another endpoint's set at run time.
    pub accepted_tokens: RwLock<Option<Arc<TokenIssuer>>>,
    pub faults: Faults,
    pub store: EventStore,
    pub counters: Counters,
    pub requests: RequestLog,
}

pub(super) struct Auth {
    pub endpoint: TokenEndpoint,
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
        let accepted_tokens = auth.as_ref().map(|auth| auth.endpoint.issuer().clone());
        Ok(Shared {
            path: args.path.clone(),
            auth,
            accepted_tokens: RwLock::new(accepted_tokens),
            faults: Faults::new(
                args.latency,
                args.latency_jitter,
                args.fail_rate,
                args.fail_status,
                args.retry_after,
                args.capacity.and_then(|n| usize::try_from(n).ok()),
            )?,
            store,
            counters: Counters::default(),
            requests: RequestLog::new(args.keep_requests),
        })
    }

    /// Accepts the tokens of `issuer` from now on (`None`: no token needed).
    pub fn set_accepted_tokens(&self, issuer: Option<Arc<TokenIssuer>>) {
        *self
            .accepted_tokens
            .write()
            .unwrap_or_else(PoisonError::into_inner) = issuer;
    }

    fn accepted_tokens(&self) -> Option<Arc<TokenIssuer>> {
        self.accepted_tokens
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(dispatch).with_state(shared)
}

/// Routes by path and method itself (no router patterns, so any `--path` works literally).
async fn dispatch(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let _in_flight = shared.requests.enter();
    let received_at = Instant::now();
    shared.faults.delay().await;
    let path = request.uri().path();
    if let Some(auth) = &shared.auth {
        if path == TOKEN_PATH && path != shared.path {
            return token_request(&shared, auth, request).await;
        }
    }
    let (parts, body) = request.into_parts();
    let body = read_body(&parts.headers, body, MAX_BATCH_BYTES).await;
    let response = answer(&shared, &parts, body.clone()).await;
    if shared.requests.enabled() {
        let bytes = body.as_deref().unwrap_or_default();
        let mut recorded = RecordedRequest::new(
            &parts.method,
            &parts.uri,
            &parts.headers,
            bytes,
            received_at,
        );
        recorded.status = response.status().as_u16();
        shared.requests.record(recorded);
    }
    response
}

/// The answer to a request that is not a token request: 404, 405, or the events endpoint's.
async fn answer(shared: &Shared, parts: &Parts, body: Result<Bytes, Rejection>) -> Response {
    let path = parts.uri.path();
    if path != shared.path {
        let rejection = Rejection::new(Reason::NotFound, format!("nothing is served at {path}"));
        return reject(shared, rejection);
    }
    if parts.method != Method::POST {
        return reject(shared, Rejection::method_not_allowed());
    }
    match receive_event(shared, &parts.headers, body).await {
        Ok(response) => response,
        Err(rejection) => reject(shared, rejection),
    }
}

/// The token endpoint (POST only).
async fn token_request(shared: &Shared, auth: &Auth, request: Request) -> Response {
    if request.method() != Method::POST {
        shared.counters.count_token_error();
        return with_allow_post(Rejection::method_not_allowed().body());
    }
    issue_token(shared, auth, request).await
}

/// An event request turned away: the reason (status and counter) and a message for the body.
#[derive(Clone)]
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

/// The events endpoint: each check in turn, then the fault switches, then storage.
async fn receive_event(
    shared: &Shared,
    headers: &HeaderMap,
    body: Result<Bytes, Rejection>,
) -> Result<Response, Rejection> {
    check_bearer(shared, headers)?;
    let mode = check_content_type(headers)?;
    let body = body?;
    let events = match mode {
        Mode::Batch => validate_batch(&body)?,
        Mode::Structured => vec![(validate_structured(&body)?, body)],
    };
    let status = match shared.faults.verdict().await {
        Verdict::Accept(status) => status,
        Verdict::Fail(failure) => {
            shared.counters.count_injected_failure();
            return Ok(failure);
        }
    };
    let (accepted, duplicates) = store(shared, events)?;
    let answer = match mode {
        Mode::Batch => {
            json!({"status": "accepted", "accepted": accepted, "duplicates": duplicates})
        }
        Mode::Structured if duplicates > 0 => json!({"status": "accepted", "duplicate": true}),
        Mode::Structured => json!({"status": "accepted"}),
    };
    Ok(json_response(status, &answer))
}

/// One event (`application/cloudevents+json`), at most [`MAX_EVENT_BYTES`].
fn validate_structured(body: &[u8]) -> Result<ValidEvent, Rejection> {
    if body.len() > MAX_EVENT_BYTES {
        return Err(too_large(MAX_EVENT_BYTES));
    }
    validate_event(body)
        .map_err(|invalid| Rejection::new(Reason::from(&invalid), invalid.to_string()))
}

/// A batch (`application/cloudevents-batch+json`): a JSON array whose every element is a
/// valid event, else the whole batch is refused naming the first bad element. Returns each
/// event with its bytes (the sender's, sliced from the body: each element is parsed once).
fn validate_batch(body: &Bytes) -> Result<Vec<(ValidEvent, Bytes)>, Rejection> {
    let elements: Vec<&RawValue> = match serde_json::from_slice(body) {
        Ok(elements) => elements,
        Err(error) => return Err(not_a_batch(body, error)),
    };
    let mut events = Vec::with_capacity(elements.len());
    for (index, element) in elements.iter().enumerate() {
        let bytes = body.slice_ref(element.get().as_bytes());
        let event = validate_event(&bytes).map_err(|invalid| {
            Rejection::new(
                Reason::from(&invalid),
                format!("batch element {index}: {invalid}"),
            )
        })?;
        events.push((event, bytes));
    }
    Ok(events)
}

/// Why a body that is not an array of JSON values was refused: JSON that is not an array, or
/// not JSON at all.
fn not_a_batch(body: &[u8], error: serde_json::Error) -> Rejection {
    match serde_json::from_slice::<&RawValue>(body) {
        Ok(_) => Rejection::new(
            Reason::NotAnObject,
            "a batch must be a JSON array of events",
        ),
        Err(_) => Rejection::new(
            Reason::InvalidJson,
            format!("the batch is not JSON: {error}"),
        ),
    }
}

/// Stores each event (a duplicate is accepted again, counted, not stored); returns how many
/// were new and how many duplicates.
fn store(shared: &Shared, events: Vec<(ValidEvent, Bytes)>) -> Result<(u64, u64), Rejection> {
    let (mut accepted, mut duplicates) = (0u64, 0u64);
    for (event, bytes) in events {
        let stored = shared.store.accept(event, &bytes).map_err(|error| {
            tracing::error!(%error, "sink: cannot append the event to --out");
            Rejection::new(Reason::OutputFailed, "the sink could not store the event")
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
    Ok((accepted, duplicates))
}

/// A Bearer token of the accepted issuer, unexpired (no check when none is set).
fn check_bearer(shared: &Shared, headers: &HeaderMap) -> Result<(), Rejection> {
    let Some(issuer) = shared.accepted_tokens() else {
        return Ok(());
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    match token {
        None => Err(Rejection::new(
            Reason::Unauthorized,
            "an Authorization: Bearer token from the token endpoint is required",
        )),
        Some(token) if issuer.is_valid(token) => Ok(()),
        Some(_) => Err(Rejection::new(
            Reason::Unauthorized,
            "the Bearer token was not issued by the token endpoint or has expired",
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
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Rejection> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        Rejection::new(
            Reason::UnreadableBody,
            format!("cannot read the body: {error}"),
        )
    })
}

fn too_large(limit: usize) -> Rejection {
    Rejection::new(
        Reason::PayloadTooLarge,
        format!("a body may be at most {limit} bytes here"),
    )
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

pub(super) fn json_response(status: StatusCode, body: &Value) -> Response {
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
