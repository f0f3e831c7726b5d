//! OAuth2 client credentials (RFC 6749 §4.4), as upstream does it: POST the token URL with
//! HTTP Basic `client_id:secret` and `grant_type=client_credentials&scope=…`; the answer must
//! carry `access_token` and `expires_in`.
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

use crate::config::OidcConfig;

/// Refresh this long before expiry (upstream's margin), or at half-life for short tokens.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
    #[error("token endpoint {url} sent an invalid answer: {reason}")]
    Response { url: String, reason: String },
}

#[derive(Clone)]
struct CachedToken {
    value: Arc<str>,
    refresh_at: Instant,
    expires_at: Instant,
}

pub struct TokenProvider {
    http: reqwest::Client,
    config: OidcConfig,
    secret_path: PathBuf,
    cached: RwLock<Option<CachedToken>>,
    refresh: Mutex<()>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
}

impl TokenProvider {
    pub fn new(config: OidcConfig, secret_path: PathBuf) -> Result<TokenProvider, String> {
        let http = super::http_client(
            TOKEN_REQUEST_TIMEOUT,
            config.insecure_skip_verify,
            config.ca_file.as_deref(),
            1,
            "OIDC token endpoint",
        )?;
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
        let now = Instant::now();
        let current = self.cached.read().await.clone();
        if let Some(token) = &current {
            if now < token.refresh_at {
                return Ok(token.value.clone());
            }
            if now < token.expires_at {
                // Due for refresh but still valid: refresh only if nobody else is.
                return match self.refresh.try_lock() {
                    Ok(_guard) => self.refresh_locked().await.or_else(|error| {
                        tracing::warn!(%error, "token refresh failed; using the current token until it expires");
                        Ok(token.value.clone())
                    }),
                    Err(_) => Ok(token.value.clone()),
                };
            }
        }
        let _guard = self.refresh.lock().await;
        // Another worker may have refreshed while this one waited.
        if let Some(token) = self.cached.read().await.as_ref() {
            if Instant::now() < token.refresh_at {
                return Ok(token.value.clone());
            }
        }
        self.refresh_locked().await
    }

    /// Drops `rejected` (a token the sink answered 401 to) so the next call fetches a new one.
    /// A newer token fetched meanwhile by another worker is kept.
    pub async fn invalidate(&self, rejected: &str) {
        let mut cached = self.cached.write().await;
        if cached.as_ref().is_some_and(|t| &*t.value == rejected) {
            *cached = None;
        }
    }

    async fn refresh_locked(&self) -> Result<Arc<str>, AuthError> {
        match self.fetch().await {
            Ok(token) => {
                let value = token.value.clone();
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
        let secret = self.read_secret()?;
        let started = Instant::now();
        let response = self
            .http
            .post(url)
            .basic_auth(&self.config.client_id, Some(secret))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", self.config.scope.as_str()),
            ])
            .send()
            .await
            .map_err(|e| AuthError::Request {
                url: url.clone(),
                reason: crate::sink::http::describe_reqwest_error(&e),
            })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| AuthError::Request {
            url: url.clone(),
            reason: format!("reading the answer: {e}"),
        })?;
        if !status.is_success() {
            return Err(AuthError::Status {
                url: url.clone(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            });
        }
        let invalid = |reason: &str| AuthError::Response {
            url: url.clone(),
            reason: reason.to_string(),
        };
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|_| invalid("the body is not JSON"))?;
        let access_token = parsed
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid("access_token is missing"))?;
        let expires_in = parsed
            .expires_in
            .and_then(|v| {
                v.as_f64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .filter(|seconds| *seconds > 0.0)
            .ok_or_else(|| invalid("expires_in is missing or not a positive number"))?;
        let lifetime = Duration::from_secs_f64(expires_in);
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        tracing::info!(expires_in = expires_in, "fetched an access token");
        Ok(CachedToken {
            value: access_token.into(),
            refresh_at: started + lifetime - margin,
            expires_at: started + lifetime,
        })
    }
}
