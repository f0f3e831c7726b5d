//! A real OAuth2 client-credentials token endpoint (RFC 6749 §4.4) on 127.0.0.1: the reference
//! sink's token endpoint (`tools/src/sink/tokens.rs`, one implementation) served alone, with
//! its knobs for expiry, revocation, secret rotation, outages and TLS.

use std::sync::Arc;
use std::time::Duration;

use event_exporter_dev::sink::{token_router, Client, TokenEndpoint};
use serde_json::Value;

use super::tls::{serve, ServerHandle, TestPki};

/// Tokens issued by a [`TokenServer`]; a [`super::sink::SinkServer`] given the
/// same registry accepts exactly the tokens that are issued and unexpired. The reference
/// sink's token store (one implementation, in `tools/`: the sink checks Bearer tokens against
/// its own endpoint's store, or this one through `RunningSink::set_token_registry`):
/// `issue_for(ttl)`, `is_valid`, `revoke_all`.
pub type TokenRegistry = event_exporter_dev::sink::TokenIssuer;

/// One request as the token endpoint saw it, with the status it got.
pub use event_exporter_dev::sink::TokenRequest;

/// What the token endpoint accepts and how long its tokens live.
#[derive(Clone, Debug)]
pub struct TokenConfig {
    pub client_id: String,
    pub client_secret: String,
    /// The `scope` form value must be this set of space-separated scopes (an empty string
    /// means `scope=` or no scope parameter).
    pub scope: String,
    /// `expires_in` of issued tokens, in seconds.
    pub expires_in: u64,
    /// Added before every answer (a slow or far identity provider).
    pub latency: Option<Duration>,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            client_id: "event-exporter".into(),
            client_secret: "s3cret-test-value".into(),
            scope: "events.write".into(),
            expires_in: 3600,
            latency: None,
        }
    }
}

/// The running token endpoint. Dropping it shuts the server down.
pub struct TokenServer {
    endpoint: Arc<TokenEndpoint>,
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
        let lifetime = Duration::from_secs(config.expires_in);
        let endpoint = Arc::new(TokenEndpoint::new(
            Client::new(&config.client_id, &config.client_secret, &config.scope),
            Arc::new(TokenRegistry::new(lifetime)),
            lifetime,
        ));
        let mut router = token_router(endpoint.clone());
        if let Some(latency) = config.latency {
            router = router.layer(axum::middleware::from_fn(
                move |request: axum::extract::Request, next: axum::middleware::Next| async move {
                    tokio::time::sleep(latency).await;
                    next.run(request).await
                },
            ));
        }
        let server = serve(router, pki.map(|p| Arc::new(p.server_config()))).await;
        TokenServer {
            endpoint,
            server,
            scheme: if pki.is_some() { "https" } else { "http" },
        }
    }

    /// Full token URL, e.g. `http://127.0.0.1:PORT/oauth2/token`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}{}",
            self.scheme,
            self.server.addr,
            event_exporter_dev::sink::TOKEN_PATH
        )
    }

    pub fn client_id(&self) -> &str {
        self.endpoint.client().id()
    }

    /// The secret currently accepted.
    pub fn secret(&self) -> String {
        self.endpoint.client().secret()
    }

    pub fn scope(&self) -> &str {
        self.endpoint.client().scope()
    }

    /// Shared registry of issued tokens (attach it to a sink).
    pub fn registry(&self) -> Arc<TokenRegistry> {
        self.endpoint.issuer().clone()
    }

    /// Number of requests that reached `/oauth2/token` (any outcome).
    pub fn requests(&self) -> usize {
        self.endpoint.requests().len()
    }

    /// Every request seen so far with the status it got.
    pub fn request_log(&self) -> Vec<TokenRequest> {
        self.endpoint.requests()
    }

    /// `expires_in` for tokens issued from now on.
    pub fn set_expires_in(&self, seconds: u64) {
        self.endpoint.set_lifetime(Duration::from_secs(seconds));
    }

    /// What answers say in `expires_in` from now on: `Some(Some(v))` sends `v` as is (a string,
    /// a huge or negative number…), `Some(None)` leaves the member out, `None` goes back to
    /// the numeric [`TokenServer::set_expires_in`] value. The registry lifetime is unchanged.
    pub fn set_expires_in_json(&self, value: Option<Option<Value>>) {
        self.endpoint.set_expires_in_json(value);
    }

    /// Pads every answer with `bytes` of filler (0 = none).
    pub fn set_padding(&self, bytes: usize) {
        self.endpoint.set_padding(bytes);
    }

    /// Rotates the client secret: the old one gets 401 from now on.
    pub fn set_secret(&self, secret: &str) {
        self.endpoint.client().set_secret(secret);
    }

    /// Invalidates every token issued so far.
    pub fn revoke_all(&self) {
        self.endpoint.issuer().revoke_all();
    }

    /// The next `n` requests answer `status` (e.g. 503) without issuing a token.
    pub fn fail_next(&self, n: usize, status: u16) {
        self.endpoint.fail_next(n, status);
    }
}

/// The reference sink's decoders (one implementation, in `tools/`): form bodies (`+` is a
/// space) and standard base64 with or without padding (`None` on invalid input). Not every test
/// binary uses them.
#[allow(unused_imports)]
pub use event_exporter_dev::sink::{base64_decode, parse_form};
