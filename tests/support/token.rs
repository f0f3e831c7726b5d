//! A real OAuth2 client-credentials token endpoint (RFC 6749 §4.4) on
//! 127.0.0.1, checking requests as strictly as a production IdP, with knobs for
//! expiry, revocation, secret rotation and outages.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

use super::tls::{serve, ServerHandle, TestPki};

/// Tokens issued by a [`TokenServer`]; a [`super::sink::SinkServer`] given the
/// same registry accepts exactly the tokens that are issued and unexpired. The reference
/// sink's token store (one implementation, in `tools/`): `issue_for(ttl)`, `is_valid`,
/// `revoke_all`.
pub type TokenRegistry = event_exporter_dev::sink::TokenIssuer;

/// What the token endpoint accepts and how long its tokens live.
#[derive(Clone, Debug)]
pub struct TokenConfig {
    pub client_id: String,
    pub client_secret: String,
    /// The `scope` form value must equal this (an empty string means `scope=`
    /// or no scope parameter).
    pub scope: String,
    /// `expires_in` of issued tokens, in seconds.
    pub expires_in: u64,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            client_id: "event-exporter".into(),
            client_secret: "s3cret-test-value".into(),
            scope: "events.write".into(),
            expires_in: 3600,
        }
    }
}

/// One request as the token endpoint saw it.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    /// Decoded form fields, in order.
    pub form: Vec<(String, String)>,
    pub status: u16,
}

struct TokenState {
    client_id: String,
    secret: Mutex<String>,
    scope: String,
    expires_in: AtomicU64,
    registry: Arc<TokenRegistry>,
    requests: AtomicUsize,
    log: Mutex<Vec<TokenRequest>>,
    /// Statuses for the next requests, answered before any checks.
    failures: Mutex<VecDeque<u16>>,
    /// `Some(v)`: the `expires_in` sent instead of the numeric one (`v = None` omits the
    /// field); issued tokens still live `expires_in` seconds in the registry.
    expires_in_json: Mutex<Option<Option<Value>>>,
    /// Bytes of filler added to every answer (a `padding` member of successful answers,
    /// `error_description` of failures).
    padding: AtomicUsize,
}

/// The running token endpoint. Dropping it shuts the server down.
pub struct TokenServer {
    state: Arc<TokenState>,
    server: ServerHandle,
    scheme: &'static str,
}

impl TokenServer {
    /// Plain-HTTP token endpoint with a fresh registry.
    pub async fn start(config: TokenConfig) -> TokenServer {
        Self::start_inner(config, None).await
    }

    /// HTTPS token endpoint using the PKI's server certificate.
    pub async fn start_tls(config: TokenConfig, pki: &TestPki) -> TokenServer {
        Self::start_inner(config, Some(pki)).await
    }

    async fn start_inner(config: TokenConfig, pki: Option<&TestPki>) -> TokenServer {
        let state = Arc::new(TokenState {
            client_id: config.client_id,
            secret: Mutex::new(config.client_secret),
            scope: config.scope,
            expires_in: AtomicU64::new(config.expires_in),
            // Each token gets the lifetime `expires_in` says when it is issued (`issue_for`).
            registry: Arc::new(TokenRegistry::new(Duration::ZERO)),
            requests: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            failures: Mutex::new(VecDeque::new()),
            expires_in_json: Mutex::new(None),
            padding: AtomicUsize::new(0),
        });
        let router = Router::new()
            .route("/oauth2/token", post(token_handler))
            .with_state(state.clone());
        let server = serve(router, pki.map(|p| Arc::new(p.server_config()))).await;
        TokenServer {
            state,
            server,
            scheme: if pki.is_some() { "https" } else { "http" },
        }
    }

    /// Full token URL, e.g. `http://127.0.0.1:PORT/oauth2/token`.
    pub fn url(&self) -> String {
        format!("{}://{}/oauth2/token", self.scheme, self.server.addr)
    }

    pub fn client_id(&self) -> &str {
        &self.state.client_id
    }

    /// The secret currently accepted.
    pub fn secret(&self) -> String {
        self.state.secret.lock().expect("secret mutex").clone()
    }

    pub fn scope(&self) -> &str {
        &self.state.scope
    }

    /// Shared registry of issued tokens (attach it to a sink).
    pub fn registry(&self) -> Arc<TokenRegistry> {
        self.state.registry.clone()
    }

    /// Number of requests that reached `/oauth2/token` (any outcome).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Every request seen so far with the status it got.
    pub fn request_log(&self) -> Vec<TokenRequest> {
        self.state.log.lock().expect("token log mutex").clone()
    }

    /// `expires_in` for tokens issued from now on.
    pub fn set_expires_in(&self, seconds: u64) {
        self.state.expires_in.store(seconds, Ordering::SeqCst);
    }

    /// What answers say in `expires_in` from now on: `Some(Some(v))` sends `v` as is (a string,
    /// a huge or negative number…), `Some(None)` leaves the member out, `None` goes back to
    /// the numeric [`TokenServer::set_expires_in`] value. The registry lifetime is unchanged.
    pub fn set_expires_in_json(&self, value: Option<Option<Value>>) {
        *self.state.expires_in_json.lock().expect("expires_in mutex") = value;
    }

    /// Pads every answer with `bytes` of filler (0 = none).
    pub fn set_padding(&self, bytes: usize) {
        self.state.padding.store(bytes, Ordering::SeqCst);
    }

    /// Rotates the client secret: the old one gets 401 from now on.
    pub fn set_secret(&self, secret: &str) {
        *self.state.secret.lock().expect("secret mutex") = secret.to_string();
    }

    /// Invalidates every token issued so far.
    pub fn revoke_all(&self) {
        self.state.registry.revoke_all();
    }

    /// The next `n` requests answer `status` (e.g. 503) without issuing a token.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut failures = self.state.failures.lock().expect("failure mutex");
        failures.extend(std::iter::repeat_n(status, n));
    }
}

async fn token_handler(
    State(state): State<Arc<TokenState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let header_text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header_text(header::CONTENT_TYPE);
    let authorization = header_text(header::AUTHORIZATION);
    let form = parse_form(&body);

    let (status, mut body) = decide(
        &state,
        content_type.as_deref(),
        authorization.as_deref(),
        &form,
    );
    let padding = state.padding.load(Ordering::SeqCst);
    if padding > 0 {
        let member = if status.is_success() {
            "padding"
        } else {
            "error_description"
        };
        body[member] = Value::String("x".repeat(padding));
    }
    state
        .log
        .lock()
        .expect("token log mutex")
        .push(TokenRequest {
            content_type,
            authorization,
            form,
            status: status.as_u16(),
        });

    let mut response = (status, body.to_string()).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"test-token-server\""),
        );
    }
    response
}

/// The endpoint's decision: status and JSON body.
fn decide(
    state: &TokenState,
    content_type: Option<&str>,
    authorization: Option<&str>,
    form: &[(String, String)],
) -> (StatusCode, Value) {
    if let Some(code) = state.failures.lock().expect("failure mutex").pop_front() {
        let status = StatusCode::from_u16(code).expect("scripted status must be valid");
        return (status, json!({"error": "temporarily_unavailable"}));
    }
    let media_type = content_type
        .and_then(|ct| ct.split(';').next())
        .map(|ct| ct.trim().to_ascii_lowercase());
    if media_type.as_deref() != Some("application/x-www-form-urlencoded") {
        return (
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "error_description": "form content type required"}),
        );
    }
    let credentials = authorization
        .and_then(|a| a.strip_prefix("Basic "))
        .and_then(|b64| base64_decode(b64.trim()))
        .and_then(|raw| String::from_utf8(raw).ok());
    let expected = format!(
        "{}:{}",
        state.client_id,
        state.secret.lock().expect("secret mutex")
    );
    if credentials.as_deref() != Some(expected.as_str()) {
        return (StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
    }
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if field("grant_type") != Some("client_credentials") {
        return (
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type"}),
        );
    }
    if field("scope").unwrap_or("") != state.scope {
        return (StatusCode::BAD_REQUEST, json!({"error": "invalid_scope"}));
    }
    let expires_in = state.expires_in.load(Ordering::SeqCst);
    let token = state.registry.issue_for(Duration::from_secs(expires_in));
    let mut answer =
        json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in});
    match state
        .expires_in_json
        .lock()
        .expect("expires_in mutex")
        .clone()
    {
        None => {}
        Some(None) => {
            if let Some(object) = answer.as_object_mut() {
                object.remove("expires_in");
            }
        }
        Some(Some(value)) => answer["expires_in"] = value,
    }
    (StatusCode::OK, answer)
}

/// The reference sink's decoders (one implementation, in `tools/`): form bodies (`+` is a
/// space) and standard base64 with or without padding (`None` on invalid input).
pub use event_exporter_dev::sink::{base64_decode, parse_form};
