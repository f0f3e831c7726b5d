//! Delivery to the sink: an HTTP client that POSTs each CloudEvent (`http`), an OAuth2
//! client-credentials token cache (`auth`), upstream's retry schedule (`retry`), and how many
//! requests may be in flight (`concurrency`). The sink's own client (`client`) is hyper-util's
//! over hyper-rustls; the token endpoint, the dead-letter endpoint and `check-config` use the
//! reqwest client of [`http_client`], with the same TLS settings and redirect rule.

pub(crate) mod auth;
pub(crate) mod client;
pub mod concurrency;
pub(crate) mod dead_letter;
pub(crate) mod http;
pub mod retry;

pub(crate) use auth::TokenProvider;
pub(crate) use client::SinkClient;
pub(crate) use http::{PublishError, Publisher};

use std::path::Path;
use std::time::Duration;

use crate::tls::{self, Verification};

/// Why an HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot build the HTTP client for the {what}: {source}")]
    Build {
        what: String,
        #[source]
        source: reqwest::Error,
    },
}

/// A reqwest client with this process's TLS settings.
pub fn http_client(
    timeout: Duration,
    insecure_skip_verify: bool,
    ca_file: Option<&Path>,
    max_idle_per_host: usize,
    what: &str,
) -> Result<reqwest::Client, HttpClientError> {
    let config = tls_config(insecure_skip_verify, ca_file, what)?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_max_idle_per_host(max_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("event-exporter/", env!("CARGO_PKG_VERSION")))
        .redirect(redirect_policy())
        .build()
        .map_err(|source| HttpClientError::Build {
            what: what.to_string(),
            source,
        })
}

/// This process's TLS client settings for the `what` endpoint: system roots plus `ca_file`,
/// or no verification at all (logged as a warning) with `insecure_skip_verify`; ALPN `h2`
/// then `http/1.1`.
pub fn tls_config(
    insecure_skip_verify: bool,
    ca_file: Option<&Path>,
    what: &str,
) -> Result<rustls::ClientConfig, tls::TlsError> {
    let verification = if insecure_skip_verify {
        tracing::warn!(
            target = what,
            "TLS certificate verification is DISABLED (insecure_skip_verify = true): anyone on \
             the network path can impersonate the {what}; use this only for testing"
        );
        Verification::None
    } else {
        Verification::Full(tls::system_roots_plus(ca_file)?)
    };
    let mut config = tls::client_config(verification, None)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The HTTP proxy the clients built by [`http_client`] and [`SinkClient::new`] use for `url`, read from
/// `HTTPS_PROXY`/`https_proxy` (https URLs), `HTTP_PROXY`/`http_proxy` (http URLs),
/// `ALL_PROXY`/`all_proxy` and `NO_PROXY`/`no_proxy` with the very matcher reqwest applies
/// (`hyper_util`'s, curl's rules). `None`: direct. The proxy URL is returned without its
/// credentials, followed by ` (credentials redacted)` when it had any.
///
/// Both clients read these variables when they are built, so a running exporter keeps the
/// proxy it started with. Only `http://` and `https://` proxies work (SOCKS is not built in).
pub fn proxy_in_effect(url: &str) -> Option<String> {
    let uri: axum::http::Uri = url.parse().ok()?;
    let intercept = hyper_util::client::proxy::matcher::Matcher::from_env().intercept(&uri)?;
    let mut shown = intercept.uri().to_string();
    if intercept.basic_auth().is_some() || intercept.raw_auth().is_some() {
        shown.push_str(" (credentials redacted)");
    }
    Some(shown)
}

/// `url` for logs: a password in its userinfo replaced by `***` (the user name kept); text
/// that is not a URL is returned as it is.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// Logs at start whether the `what` endpoint at `url` is reached through a proxy (see
/// [`proxy_in_effect`]), so an operator sees the egress path without running `check-config`.
pub fn log_proxy(what: &str, url: &str) {
    match proxy_in_effect(url) {
        Some(proxy) => tracing::info!(endpoint = what, %proxy, "reached through proxy"),
        None => tracing::debug!(endpoint = what, "reached directly (no proxy applies)"),
    }
}

/// The redirect rule: only a 2xx answer to the POST itself counts as delivery, so
/// 301/302/303 (which turn a POST into a body-less GET) are never followed, and 307/308 are
/// followed (re-sending the same body and headers) only to the same origin (scheme, host and
/// port), at most 5 hops, so `Authorization` never reaches another origin. A redirect not
/// followed comes back as the 3xx response itself, which the caller treats as a failed attempt.
pub fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        // `previous` holds the original URL and each one already redirected to.
        let followed = attempt.previous().len().saturating_sub(1);
        let allowed = attempt.previous().last().is_some_and(|from| {
            redirect_allowed(attempt.status().as_u16(), from, attempt.url(), followed)
        });
        if allowed {
            attempt.follow()
        } else {
            attempt.stop()
        }
    })
}

/// The redirect rule of [`redirect_policy`] as a pure function: a `status` answer to `from`
/// redirecting to `to`, after `followed` redirects of the same request, is followed only for
/// 307/308 to the same origin while fewer than [`client::MAX_REDIRECTS`] were followed.
pub fn redirect_allowed(status: u16, from: &url::Url, to: &url::Url, followed: usize) -> bool {
    matches!(status, 307 | 308) && from.origin() == to.origin() && followed < client::MAX_REDIRECTS
}
