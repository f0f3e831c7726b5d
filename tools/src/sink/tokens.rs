//! The OAuth2 client-credentials grant (RFC 6749 §4.4) for one configured client, and the
//! tokens it issued: the events endpoint accepts exactly those, until they expire.
//!
//! Tokens are 128 random bits from `fastrand`: unguessable enough for a development and test
//! sink, not a production identity provider.
//!
//! [`TokenEndpoint`] is the one token endpoint: the sink serves it beside its events path, the
//! integration tests serve it alone ([`token_router`]) and use its knobs (secret rotation,
//! scripted failures, odd `expires_in`, padded answers, a request log).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

/// Where the token endpoint is served (beside the events path).
pub const TOKEN_PATH: &str = "/oauth2/token";

/// The one client the token endpoint knows; its secret can be rotated.
pub struct Client {
    id: String,
    secret: RwLock<String>,
    scope: String,
}

/// Why a token request was refused, as RFC 6749 §5.2 names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantError {
    InvalidRequest(&'static str),
    InvalidClient,
    UnsupportedGrantType,
    InvalidScope,
}

impl GrantError {
    pub fn status(&self) -> StatusCode {
        match self {
            GrantError::InvalidClient => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The `error` code of the JSON answer.
    pub fn code(&self) -> &'static str {
        match self {
            GrantError::InvalidRequest(_) => "invalid_request",
            GrantError::InvalidClient => "invalid_client",
            GrantError::UnsupportedGrantType => "unsupported_grant_type",
            GrantError::InvalidScope => "invalid_scope",
        }
    }

    /// The `error_description`; never echoes what the client sent (it may be a secret).
    pub fn description(&self) -> &'static str {
        match self {
            GrantError::InvalidRequest(what) => what,
            GrantError::InvalidClient => "unknown client or wrong secret",
            GrantError::UnsupportedGrantType => "only grant_type=client_credentials is supported",
            GrantError::InvalidScope => "the requested scope is not the one this client may use",
        }
    }
}

impl Client {
    pub fn new(id: &str, secret: &str, scope: &str) -> Client {
        Client {
            id: id.to_string(),
            secret: RwLock::new(secret.to_string()),
            scope: scope.to_string(),
        }
    }

    /// The secret accepted now.
    pub fn secret(&self) -> String {
        self.secret
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Rotates the secret: the old one is refused (`invalid_client`) from now on.
    pub fn set_secret(&self, secret: &str) {
        *self.secret.write().unwrap_or_else(PoisonError::into_inner) = secret.to_string();
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Checks a token request: form body, client authentication (HTTP Basic, or the
    /// `client_id`/`client_secret` form fields), then grant type, then scope.
    pub fn authorize(
        &self,
        authorization: Option<&str>,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<(), GrantError> {
        if !is_form(content_type) {
            return Err(GrantError::InvalidRequest(
                "the body must be application/x-www-form-urlencoded",
            ));
        }
        let form = parse_form(body);
        let field = |name: &str| {
            form.iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        let authenticated = match authorization {
            Some(header) => self.basic_matches(header),
            None => match (field("client_id"), field("client_secret")) {
                (Some(id), Some(secret)) => self.matches(id, secret),
                _ => false,
            },
        };
        if !authenticated {
            return Err(GrantError::InvalidClient);
        }
        match field("grant_type") {
            None => return Err(GrantError::InvalidRequest("grant_type is required")),
            Some("client_credentials") => {}
            Some(_) => return Err(GrantError::UnsupportedGrantType),
        }
        if !same_scope(field("scope").unwrap_or(""), &self.scope) {
            return Err(GrantError::InvalidScope);
        }
        Ok(())
    }

    /// `Basic base64(id:secret)`. RFC 6749 §2.3.1 form-encodes both parts first; many clients
    /// do not, so either spelling is accepted.
    fn basic_matches(&self, header: &str) -> bool {
        let Some((scheme, encoded)) = header.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let Some(decoded) = base64_decode(encoded.trim()) else {
            return false;
        };
        let Ok(text) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((id, secret)) = text.split_once(':') else {
            return false;
        };
        self.matches(id, secret) || self.matches(&form_decode(id), &form_decode(secret))
    }

    fn matches(&self, id: &str, secret: &str) -> bool {
        // Both comparisons always run, so the timing does not tell which one failed.
        let id_ok = constant_time_eq(id.as_bytes(), self.id.as_bytes());
        let secret_ok = constant_time_eq(secret.as_bytes(), self.secret().as_bytes());
        id_ok & secret_ok
    }
}

/// Tokens issued and when each expires: the reference sink's token store, and the test
/// harness's (`tests/support/token.rs` issues with [`TokenIssuer::issue_for`] and revokes).
pub struct TokenIssuer {
    lifetime: Duration,
    tokens: RwLock<HashMap<String, Instant>>,
}

impl TokenIssuer {
    pub fn new(lifetime: Duration) -> TokenIssuer {
        TokenIssuer {
            lifetime,
            tokens: RwLock::new(HashMap::new()),
        }
    }

    /// `expires_in` for the token answer: whole seconds, rounded up.
    pub fn expires_in(&self) -> u64 {
        whole_seconds(self.lifetime)
    }

    /// A new random token valid for the configured lifetime; expired ones are forgotten here
    /// (token requests are rare, event requests are not).
    pub fn issue(&self) -> String {
        self.issue_for(self.lifetime)
    }

    /// A new random token valid for `lifetime` (not the configured one); expired ones are
    /// forgotten here.
    pub fn issue_for(&self, lifetime: Duration) -> String {
        let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        let now = Instant::now();
        let mut tokens = self.tokens.write().unwrap_or_else(PoisonError::into_inner);
        tokens.retain(|_, expiry| *expiry > now);
        tokens.insert(token.clone(), now + lifetime);
        token
    }

    /// Invalidates every token issued so far (the next event request must refetch one).
    pub fn revoke_all(&self) {
        self.tokens
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// True when `token` was issued here and has not expired.
    pub fn is_valid(&self, token: &str) -> bool {
        let tokens = self.tokens.read().unwrap_or_else(PoisonError::into_inner);
        tokens
            .get(token)
            .is_some_and(|expiry| Instant::now() < *expiry)
    }
}

/// One token request as the endpoint saw it, with the status it got.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    /// Decoded form fields, in order.
    pub form: Vec<(String, String)>,
    pub status: u16,
}

/// Requests kept in [`TokenEndpoint::request_log`] (the oldest go first).
const LOG_LIMIT: usize = 10_000;

/// What the endpoint does besides the grant (all off by default).
#[derive(Default)]
struct Knobs {
    /// Statuses for the next requests, answered before any check.
    failures: VecDeque<u16>,
    /// `Some(v)`: the `expires_in` sent instead of the lifetime's (`v = None` omits it).
    expires_in_json: Option<Option<Value>>,
    /// Bytes of filler in every answer (`padding` of a grant, `error_description` else).
    padding: usize,
}

/// The token endpoint: the client credentials grant for one [`Client`], tokens from a
/// [`TokenIssuer`] living `lifetime` (changeable), and the test knobs.
pub struct TokenEndpoint {
    client: Client,
    issuer: Arc<TokenIssuer>,
    lifetime: Mutex<Duration>,
    knobs: Mutex<Knobs>,
    log: Mutex<VecDeque<TokenRequest>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whole seconds, rounded up (`expires_in` of a token answer).
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

impl TokenEndpoint {
    /// An endpoint granting `client` tokens of `issuer` that live `lifetime`.
    pub fn new(client: Client, issuer: Arc<TokenIssuer>, lifetime: Duration) -> TokenEndpoint {
        TokenEndpoint {
            client,
            issuer,
            lifetime: Mutex::new(lifetime),
            knobs: Mutex::default(),
            log: Mutex::default(),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The issued tokens (an events endpoint accepts exactly the valid ones).
    pub fn issuer(&self) -> &Arc<TokenIssuer> {
        &self.issuer
    }

    /// The answer to one request (`body`: `None` when it could not be read), logged.
    pub fn answer(
        &self,
        authorization: Option<&str>,
        content_type: Option<&str>,
        body: Option<&[u8]>,
    ) -> (StatusCode, Value) {
        let (status, mut answer) = self.decide(authorization, content_type, body);
        let padding = lock(&self.knobs).padding;
        if padding > 0 {
            let member = if status.is_success() {
                "padding"
            } else {
                "error_description"
            };
            answer[member] = Value::String("x".repeat(padding));
        }
        let mut log = lock(&self.log);
        if log.len() >= LOG_LIMIT {
            log.pop_front();
        }
        log.push_back(TokenRequest {
            content_type: content_type.map(str::to_string),
            authorization: authorization.map(str::to_string),
            form: body.map(parse_form).unwrap_or_default(),
            status: status.as_u16(),
        });
        (status, answer)
    }

    fn decide(
        &self,
        authorization: Option<&str>,
        content_type: Option<&str>,
        body: Option<&[u8]>,
    ) -> (StatusCode, Value) {
        let scripted = lock(&self.knobs).failures.pop_front();
        if let Some(status) = scripted.and_then(|code| StatusCode::from_u16(code).ok()) {
            return (status, json!({"error": "temporarily_unavailable"}));
        }
        let granted = match body {
            Some(body) => self.client.authorize(authorization, content_type, body),
            None => Err(GrantError::InvalidRequest(
                "the body could not be read or is too large",
            )),
        };
        if let Err(error) = granted {
            let body = json!({"error": error.code(), "error_description": error.description()});
            return (error.status(), body);
        }
        let lifetime = *lock(&self.lifetime);
        let mut answer = json!({
            "access_token": self.issuer.issue_for(lifetime),
            "token_type": "Bearer",
            "expires_in": whole_seconds(lifetime),
        });
        match lock(&self.knobs).expires_in_json.clone() {
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

    /// The HTTP response for an answer: JSON, never cached, a Basic challenge with 401.
    pub fn response(status: StatusCode, body: &Value) -> Response {
        let mut response = (status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"event-exporter-sink\""),
            );
        }
        response
    }

    /// Lifetime (and `expires_in`) of the tokens issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        *lock(&self.lifetime) = lifetime;
    }

    /// What grants say in `expires_in` from now on: `Some(Some(v))` sends `v` as is (a string,
    /// a huge or negative number…), `Some(None)` leaves the member out, `None` goes back to
    /// the lifetime in seconds. Tokens still live the lifetime.
    pub fn set_expires_in_json(&self, value: Option<Option<Value>>) {
        lock(&self.knobs).expires_in_json = value;
    }

    /// Pads every answer with `bytes` of filler (0 = none).
    pub fn set_padding(&self, bytes: usize) {
        lock(&self.knobs).padding = bytes;
    }

    /// The next `n` requests get `status` (e.g. 503) and no token, before any check.
    pub fn fail_next(&self, n: usize, status: u16) {
        lock(&self.knobs)
            .failures
            .extend(std::iter::repeat_n(status, n));
    }

    /// Requests answered so far (any outcome; the log keeps the last 10 000).
    pub fn requests(&self) -> Vec<TokenRequest> {
        lock(&self.log).iter().cloned().collect()
    }
}

/// A router serving only `endpoint` at [`TOKEN_PATH`] (POST), for a token endpoint apart from
/// any sink.
pub fn token_router(endpoint: Arc<TokenEndpoint>) -> Router {
    Router::new()
        .route(TOKEN_PATH, post(serve_token))
        .with_state(endpoint)
}

async fn serve_token(
    State(endpoint): State<Arc<TokenEndpoint>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let (status, answer) = endpoint.answer(
        text(header::AUTHORIZATION),
        text(header::CONTENT_TYPE),
        Some(&body),
    );
    TokenEndpoint::response(status, &answer)
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn is_form(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| {
            media
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// Scopes are space-separated sets (RFC 6749 §3.3): the order does not matter.
fn same_scope(requested: &str, allowed: &str) -> bool {
    let mut requested: Vec<&str> = requested.split_whitespace().collect();
    let mut allowed: Vec<&str> = allowed.split_whitespace().collect();
    requested.sort_unstable();
    requested.dedup();
    allowed.sort_unstable();
    allowed.dedup();
    requested == allowed
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes an `application/x-www-form-urlencoded` body into its pairs, in order (`+` is a
/// space; a malformed escape is kept literally), with the `form_urlencoded` crate.
pub fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// One form-encoded component (`+` is a space, `%XX` a byte; a malformed escape is kept
/// literally), decoded with the `percent-encoding` crate; invalid UTF-8 becomes U+FFFD.
fn form_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(&text.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

/// Standard base64 (RFC 4648 §4), padding optional; `None` for anything else.
pub fn base64_decode(input: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    const STANDARD_PADDING_OPTIONAL: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    STANDARD_PADDING_OPTIONAL.decode(input).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

    fn client() -> Client {
        Client::new("exporter", "s3cr+t", "events:write audit")
    }

    #[test]
    fn decodes_base64_with_and_without_padding() {
        assert_eq!(
            base64_decode("Zm9vOmJhcg==").as_deref(),
            Some(&b"foo:bar"[..])
        );
        assert_eq!(
            base64_decode("Zm9vOmJhcg").as_deref(),
            Some(&b"foo:bar"[..])
        );
        assert_eq!(base64_decode("Zm9v!"), None);
    }

    #[test]
    fn basic_credentials_raw_or_form_encoded() {
        // base64("exporter:s3cr+t") and base64("exporter:s3cr%2Bt")
        let body = b"grant_type=client_credentials&scope=audit+events%3Awrite";
        for header in [
            "Basic ZXhwb3J0ZXI6czNjcit0",
            "basic ZXhwb3J0ZXI6czNjciUyQnQ=",
        ] {
            assert_eq!(
                client().authorize(Some(header), FORM, body),
                Ok(()),
                "{header}"
            );
        }
        // base64("exporter:wrong")
        assert_eq!(
            client().authorize(Some("Basic ZXhwb3J0ZXI6d3Jvbmc="), FORM, body),
            Err(GrantError::InvalidClient)
        );
    }

    #[test]
    fn form_credentials_grant_and_scope() {
        let check = |body: &str| client().authorize(None, FORM, body.as_bytes());
        let creds = "client_id=exporter&client_secret=s3cr%2Bt";
        assert_eq!(
            check(&format!(
                "{creds}&grant_type=client_credentials&scope=events:write+audit"
            )),
            Ok(())
        );
        assert_eq!(
            check("client_id=exporter&grant_type=client_credentials"),
            Err(GrantError::InvalidClient)
        );
        assert_eq!(
            check(&format!("{creds}&grant_type=password&scope=audit")),
            Err(GrantError::UnsupportedGrantType)
        );
        assert!(matches!(
            check(&format!("{creds}&scope=audit")),
            Err(GrantError::InvalidRequest(_))
        ));
        assert_eq!(
            check(&format!(
                "{creds}&grant_type=client_credentials&scope=audit"
            )),
            Err(GrantError::InvalidScope)
        );
        assert!(matches!(
            client().authorize(None, Some("application/json"), b"{}"),
            Err(GrantError::InvalidRequest(_))
        ));
    }

    #[test]
    fn tokens_expire() {
        let issuer = TokenIssuer::new(Duration::from_millis(30));
        let token = issuer.issue();
        assert!(issuer.is_valid(&token));
        assert!(!issuer.is_valid("not-issued"));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!issuer.is_valid(&token));
        assert_eq!(issuer.expires_in(), 1);
    }

    #[test]
    fn bearer_scheme() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }
}
