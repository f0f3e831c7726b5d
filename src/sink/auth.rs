//! OAuth2 client credentials (RFC 6749 §4.4), as upstream does it: POST the token URL with
//! `grant_type=client_credentials&scope=…`, authenticating the client with HTTP Basic
//! `client_id:secret` (or, by `exporter.oidc.client_auth_method`, the RFC 6749 §2.3.1
//! form-encoded Basic or `client_secret_post`); the answer must carry `access_token`.
//!
//! Token lifetime rules ([`parse_token_response`]):
//! - `expires_in` is a JSON number or a numeric string (Azure AD sends `"3599"`);
//! - missing, `null`, `0` or negative: the token is used for `default_token_lifetime`
//!   (RFC 6749 §5.1 makes `expires_in` optional); a sink's 401 still drops it at once;
//! - larger than [`MAX_TOKEN_LIFETIME`] (24 h; `9223372036854775807` or `1e300` meaning
//!   "never expires"): capped, so the token is fetched again at least daily;
//! - refreshed `min(60 s, lifetime / 2)` before it expires, so a short-lived token is still
//!   reused for half its life instead of being fetched once per event.
//!
//! All time arithmetic is checked: no answer can overflow an `Instant` or panic.
//! At most [`MAX_TOKEN_RESPONSE_BYTES`] of an answer are read; a longer one fails the request
//! and its connection is dropped.
//!
//! The token is cached until shortly before it expires. Refreshes are single-flight; while a
//! refresh runs, workers whose cached token is still valid keep using it instead of waiting.
//! The secret file is re-read on every refresh, so a rotated Kubernetes Secret takes effect
//! without a restart. The secret never appears in a log line or an error.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{Mutex, RwLock};

use crate::config::{ClientAuthMethod, OidcConfig};

pub use crate::config::MAX_TOKEN_LIFETIME;

/// Refresh this long before expiry (upstream's margin), or at half-life for short tokens.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes of a token endpoint's answer that are read (64 KiB).
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;
/// Characters of an error answer quoted in [`AuthError::Status`].
const ERROR_EXCERPT_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the OIDC client secret from {path}: {reason}")]
    Secret { path: PathBuf, reason: String },
    #[error("token request to {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error("token endpoint {url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("token endpoint {url} sent an invalid answer: {source}")]
    Response {
        url: String,
        #[source]
        source: TokenResponseError,
    },
}

/// Why a token endpoint's 2xx answer was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TokenResponseError {
    #[error("the body is longer than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the body is not a JSON token response: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("access_token is missing or empty")]
    MissingAccessToken,
    #[error("expires_in is {found}, not a number of seconds")]
    InvalidExpiresIn { found: String },
    #[error("the token lifetime does not fit this machine's clock")]
    ClockOverflow,
    #[error("access_token cannot be sent in an Authorization header: {0}")]
    NotAHeaderValue(#[source] hyper::header::InvalidHeaderValue),
}

/// Where a token's lifetime came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifetimeSource {
    /// `expires_in` as sent.
    ExpiresIn,
    /// `expires_in` was above [`MAX_TOKEN_LIFETIME`] and was capped.
    Capped,
    /// `expires_in` was missing, `null`, zero or negative: `default_token_lifetime`.
    Assumed,
}

/// A parsed token response: the token and the instants at which to refresh it and to stop
/// using it (`refresh_at = expires_at − min(60 s, lifetime / 2)`).
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedToken {
    pub access_token: String,
    /// Lifetime used: at most [`MAX_TOKEN_LIFETIME`], never zero.
    pub lifetime: Duration,
    pub lifetime_source: LifetimeSource,
    pub refresh_at: Instant,
    pub expires_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
}

/// Parses a token endpoint's 2xx answer (RFC 6749 §5.1) received at `now`; `default_lifetime`
/// is used when `expires_in` is missing, `null`, `0` or negative. Never panics, whatever
/// `body` holds.
///
/// Errors: [`TokenResponseError::TooLarge`] above [`MAX_TOKEN_RESPONSE_BYTES`], `NotJson`,
/// `MissingAccessToken`, `InvalidExpiresIn` (a string that is not a number, a boolean, an
/// array or an object), `ClockOverflow` (`now + lifetime` is not representable).
pub fn parse_token_response(
    body: &[u8],
    now: Instant,
    default_lifetime: Duration,
) -> Result<ParsedToken, TokenResponseError> {
    if body.len() > MAX_TOKEN_RESPONSE_BYTES {
        return Err(TokenResponseError::TooLarge {
            limit: MAX_TOKEN_RESPONSE_BYTES,
        });
    }
    let parsed: TokenResponse =
        serde_json::from_slice(body).map_err(TokenResponseError::NotJson)?;
    let access_token = parsed
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or(TokenResponseError::MissingAccessToken)?;
    let seconds = match &parsed.expires_in {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(text)) => Some(
            text.trim()
                .parse::<f64>()
                .ok()
                .filter(|s| !s.is_nan())
                .ok_or_else(|| TokenResponseError::InvalidExpiresIn {
                    found: format!("{:?}", text.chars().take(40).collect::<String>()),
                })?,
        ),
        Some(other) => {
            return Err(TokenResponseError::InvalidExpiresIn {
                found: format!("a JSON {}", json_kind(other)),
            })
        }
    };
    let default_lifetime = if default_lifetime.is_zero() {
        crate::config::DEFAULT_TOKEN_LIFETIME
    } else {
        default_lifetime.min(MAX_TOKEN_LIFETIME)
    };
    let (lifetime, lifetime_source) = match seconds {
        Some(s) if s > 0.0 => match Duration::try_from_secs_f64(s) {
            Ok(d) if d <= MAX_TOKEN_LIFETIME && !d.is_zero() => (d, LifetimeSource::ExpiresIn),
            Ok(d) if d.is_zero() => (default_lifetime, LifetimeSource::Assumed),
            // Too large for a Duration, or above the cap (this includes +infinity).
            _ => (MAX_TOKEN_LIFETIME, LifetimeSource::Capped),
        },
        _ => (default_lifetime, LifetimeSource::Assumed),
    };
    let margin = REFRESH_MARGIN.min(lifetime.checked_div(2).unwrap_or_default());
    let expires_at = now
        .checked_add(lifetime)
        .ok_or(TokenResponseError::ClockOverflow)?;
    let refresh_at = expires_at
        .checked_sub(margin)
        .ok_or(TokenResponseError::ClockOverflow)?;
    Ok(ParsedToken {
        access_token,
        lifetime,
        lifetime_source,
        refresh_at,
        expires_at,
    })
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// Encodes one client credential as RFC 6749 §2.3.1 asks before it goes into HTTP Basic
/// (the `application/x-www-form-urlencoded` algorithm: space → `+`, reserved bytes → `%XX`).
pub fn form_encode_credential(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// Reads at most `limit` bytes of `response`'s body. `Ok(Err(prefix))` when the body is longer
/// (the rest is not read; dropping the response closes the connection).
async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Result<Vec<u8>, Vec<u8>>, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|length| u64::try_from(limit).is_ok_and(|limit| length > limit))
    {
        let mut prefix = Vec::new();
        if let Some(chunk) = response.chunk().await? {
            prefix.extend_from_slice(chunk.get(..limit.min(chunk.len())).unwrap_or_default());
        }
        return Ok(Err(prefix));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit.saturating_sub(body.len());
        if chunk.len() > room {
            body.extend_from_slice(chunk.get(..room).unwrap_or_default());
            return Ok(Err(body));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body))
}

#[derive(Clone)]
struct CachedToken {
    bearer: Bearer,
    refresh_at: Instant,
    expires_at: Instant,
}

/// An access token with its `Authorization: Bearer …` header value, built once per token
/// (marked sensitive, so it is never logged) and shared by every request that sends it.
#[derive(Clone)]
pub struct Bearer {
    pub token: Arc<str>,
    pub header: hyper::header::HeaderValue,
}

impl Bearer {
    fn new(token: &str) -> Result<Bearer, TokenResponseError> {
        let mut header = hyper::header::HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(TokenResponseError::NotAHeaderValue)?;
        header.set_sensitive(true);
        Ok(Bearer {
            token: token.into(),
            header,
        })
    }
}

pub struct TokenProvider {
    http: reqwest::Client,
    config: OidcConfig,
    secret_path: PathBuf,
    cached: RwLock<Option<CachedToken>>,
    refresh: Mutex<()>,
}

impl TokenProvider {
    pub fn new(
        config: OidcConfig,
        secret_path: PathBuf,
    ) -> Result<TokenProvider, super::HttpClientError> {
        let http = super::http_client(
            TOKEN_REQUEST_TIMEOUT,
            config.insecure_skip_verify,
            config.ca_file.as_deref(),
            1,
            "OIDC token endpoint",
        )?;
        super::log_proxy("OIDC token endpoint", &config.token_url);
        Ok(TokenProvider {
            http,
            config,
            secret_path,
            cached: RwLock::new(None),
            refresh: Mutex::new(()),
        })
    }

    /// Checks at start that the secret file is readable, so a missing Secret mount is reported
    /// at once rather than on the first event.
    pub fn check_secret(&self) -> Result<(), AuthError> {
        self.read_secret().map(|_| ())
    }

    /// A valid access token, fetching one when needed.
    pub async fn token(&self) -> Result<Arc<str>, AuthError> {
        self.bearer().await.map(|bearer| bearer.token)
    }

    /// [`TokenProvider::token`] with its `Authorization` header value.
    pub async fn bearer(&self) -> Result<Bearer, AuthError> {
        let now = Instant::now();
        let current = self.cached.read().await.clone();
        if let Some(token) = &current {
            if now < token.refresh_at {
                return Ok(token.bearer.clone());
            }
            if now < token.expires_at {
                // Due for refresh but still valid: refresh only if nobody else is.
                return match self.refresh.try_lock() {
                    Ok(_guard) => self.refresh_locked().await.or_else(|error| {
                        tracing::warn!(%error, "token refresh failed; using the current token until it expires");
                        Ok(token.bearer.clone())
                    }),
                    Err(_) => Ok(token.bearer.clone()),
                };
            }
        }
        let _guard = self.refresh.lock().await;
        // Another worker may have refreshed while this one waited.
        if let Some(token) = self.cached.read().await.as_ref() {
            if Instant::now() < token.refresh_at {
                return Ok(token.bearer.clone());
            }
        }
        self.refresh_locked().await
    }

    /// Drops `rejected` (a token the sink answered 401 to) so the next call fetches a new one.
    /// A newer token fetched meanwhile by another worker is kept.
    pub async fn invalidate(&self, rejected: &str) {
        let mut cached = self.cached.write().await;
        if cached
            .as_ref()
            .is_some_and(|t| &*t.bearer.token == rejected)
        {
            *cached = None;
        }
    }

    async fn refresh_locked(&self) -> Result<Bearer, AuthError> {
        match self.fetch().await {
            Ok(token) => {
                let value = token.bearer.clone();
                *self.cached.write().await = Some(token);
                Ok(value)
            }
            Err(error) => {
                crate::metrics::get().token_refresh_errors.inc();
                Err(error)
            }
        }
    }

    fn read_secret(&self) -> Result<String, AuthError> {
        let secret_error = |reason: String| AuthError::Secret {
            path: self.secret_path.clone(),
            reason,
        };
        let text =
            std::fs::read_to_string(&self.secret_path).map_err(|e| secret_error(e.to_string()))?;
        let secret = text.trim().to_string();
        if secret.is_empty() {
            return Err(secret_error("the file is empty".into()));
        }
        Ok(secret)
    }

    async fn fetch(&self) -> Result<CachedToken, AuthError> {
        let url = &self.config.token_url;
        let started = Instant::now();
        let request = self.token_request(&self.read_secret()?);
        let response = request.send().await.map_err(|e| AuthError::Request {
            url: url.clone(),
            reason: crate::sink::http::describe_error(&e),
        })?;
        let status = response.status();
        let body = read_bounded(response, MAX_TOKEN_RESPONSE_BYTES)
            .await
            .map_err(|e| AuthError::Request {
                url: url.clone(),
                reason: format!("reading the answer: {e}"),
            })?;
        if !status.is_success() {
            let (Ok(body) | Err(body)) = body;
            return Err(AuthError::Status {
                url: url.clone(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body)
                    .chars()
                    .take(ERROR_EXCERPT_CHARS)
                    .collect(),
            });
        }
        let invalid = |source: TokenResponseError| AuthError::Response {
            url: url.clone(),
            source,
        };
        let body = body.map_err(|_| {
            invalid(TokenResponseError::TooLarge {
                limit: MAX_TOKEN_RESPONSE_BYTES,
            })
        })?;
        let token = parse_token_response(&body, started, self.config.default_token_lifetime)
            .map_err(invalid)?;
        let bearer = Bearer::new(&token.access_token).map_err(invalid)?;
        log_lifetime(&token);
        Ok(CachedToken {
            bearer,
            refresh_at: token.refresh_at,
            expires_at: token.expires_at,
        })
    }

    /// The client-credentials grant request, authenticated as `client_auth_method` says
    /// (RFC 6749 §2.3.1: HTTP Basic with form-encoded credentials, or in the body).
    fn token_request(&self, secret: &str) -> reqwest::RequestBuilder {
        let client_id = self.config.client_id.as_str();
        let scope = self.config.scope.as_str();
        let request = self.http.post(&self.config.token_url);
        let grant = [("grant_type", "client_credentials"), ("scope", scope)];
        match self.config.client_auth_method {
            ClientAuthMethod::ClientSecretBasicRaw => {
                request.basic_auth(client_id, Some(secret)).form(&grant)
            }
            ClientAuthMethod::ClientSecretBasic => request
                .basic_auth(
                    form_encode_credential(client_id),
                    Some(form_encode_credential(secret)),
                )
                .form(&grant),
            ClientAuthMethod::ClientSecretPost => request.form(&[
                ("grant_type", "client_credentials"),
                ("scope", scope),
                ("client_id", client_id),
                ("client_secret", secret),
            ]),
        }
    }
}

/// Logs a fetched token's lifetime and where it came from (`expires_in`, assumed, capped).
fn log_lifetime(token: &ParsedToken) {
    match token.lifetime_source {
        LifetimeSource::ExpiresIn => tracing::info!(
            expires_in_seconds = token.lifetime.as_secs_f64(),
            "fetched an access token"
        ),
        LifetimeSource::Assumed => tracing::info!(
            assumed_lifetime_seconds = token.lifetime.as_secs_f64(),
            "fetched an access token without a usable expires_in; assuming \
             exporter.oidc.default_token_lifetime (a 401 from the sink still refreshes it)"
        ),
        LifetimeSource::Capped => tracing::warn!(
            lifetime_seconds = token.lifetime.as_secs_f64(),
            "fetched an access token whose expires_in exceeds 24h; it will be refreshed \
             after 24h"
        ),
    }
}

#[cfg(test)]
mod tests;
