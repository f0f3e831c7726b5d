//! The sink's HTTP client: hyper-util's pooled client over hyper-rustls, with nothing between
//! [`Publisher`](super::Publisher) and the connection but the rules below.
//!
//! It is built once for the sink endpoint and POSTs to it. Every request of an attempt shares
//! one body ([`Bytes`], cloned by reference count) and the caller's headers; the client adds
//! `User-Agent: event-exporter/<version>`, `Accept: */*` and, for an `http://` sink forwarded
//! to a proxy with credentials, `Proxy-Authorization`.
//!
//! The invariants it keeps, each the same as the reqwest client it replaced:
//! - **TLS**: the `rustls::ClientConfig` of [`super::http_client`] (system roots plus
//!   `ca_file`, or no verification with `insecure_skip_verify`), ALPN `h2` then `http/1.1`;
//!   HTTP/2 is used when the sink negotiates it.
//! - **Time**: an attempt ([`SinkClient::post`]: the request, the redirects it follows, and the
//!   bounded read of the answer) ends within the sink `timeout`; connecting (TCP, proxy tunnel
//!   and TLS handshake) within `min(timeout, 10 s)`. Both count as timeouts
//!   ([`SendError::is_timeout`]).
//! - **Redirects** ([`follow_redirect`]): only 307/308 to the same origin (scheme, host,
//!   port) are followed, re-sending the same body and headers, at most [`MAX_REDIRECTS`]
//!   hops; any other 3xx is the answer, which the caller treats as a failed attempt. So a POST
//!   never becomes a GET and `Authorization` never reaches another origin.
//! - **Proxies**: `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`/`NO_PROXY` (and lowercase) are read
//!   once, when the client is built, with hyper-util's matcher (the one reqwest uses and
//!   [`super::proxy_in_effect`] reports). An `https://` sink is reached through a `CONNECT`
//!   tunnel carrying the proxy URL's credentials; an `http://` sink's requests are forwarded
//!   to the proxy in absolute form with `Proxy-Authorization`; `NO_PROXY` hosts are direct.
//! - **Pool**: at most `max_idle_per_host` idle connections, each closed after 90 s idle.
//! - At most `limit` bytes of an answer's body are read; a longer body is dropped with its
//!   connection instead of being buffered.
//! - **Round trips are the sink's** ([`Answer::round_trip`], when built to measure them, as
//!   adaptive concurrency needs): a request's round trip starts when a connection takes it
//!   (hyper reads its body), so the time spent waiting for a pooled connection to come free
//!   or for a new one to be made (TCP, proxy tunnel, TLS: one to three network round trips)
//!   is not in it. Over HTTP/2 a wait for a stream the server's `MAX_CONCURRENT_STREAMS`
//!   allows comes before the body is read too: that queue is the client's own, and the
//!   attempt's timeout, counted from the call, still bounds it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, LOCATION, PROXY_AUTHORIZATION,
    USER_AGENT,
};
use hyper::http::uri::Scheme;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most same-origin 307/308 redirects followed for one request.
pub const MAX_REDIRECTS: usize = 5;

/// How long connecting may take at most, whatever the sink `timeout`.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalive idle time and probe interval (reqwest's defaults).
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);

/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

const USER_AGENT_VALUE: &str = concat!("event-exporter/", env!("CARGO_PKG_VERSION"));

/// Why the sink's client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SinkClientError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("the sink endpoint {endpoint} is not a usable URL")]
    Endpoint {
        endpoint: String,
        #[source]
        source: EndpointError,
    },
}

/// What is wrong with the sink endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Url(#[from] url::ParseError),
    #[error(transparent)]
    Uri(#[from] hyper::http::uri::InvalidUri),
}

/// A request that got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The attempt (request, redirects, reading the answer) outlasted the sink `timeout`.
    /// `url` is the request's (the endpoint, or a redirect's target; never with credentials).
    #[error("error sending request for url ({url}): the sink did not answer within {after:?}")]
    Timeout { url: Uri, after: Duration },
    #[error("error sending request for url ({url})")]
    Request {
        url: Uri,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
}

impl SendError {
    /// The attempt or its connecting ran out of time.
    pub fn is_timeout(&self) -> bool {
        match self {
            SendError::Timeout { .. } => true,
            SendError::Request { source, .. } => {
                let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
                while let Some(error) = cause {
                    if error.is::<ConnectTimeout>()
                        || error
                            .downcast_ref::<std::io::Error>()
                            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
                    {
                        return true;
                    }
                    cause = error.source();
                }
                false
            }
        }
    }

    /// No connection to the sink (or its proxy) could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Request { source, .. } if source.is_connect())
    }
}

/// Connecting took longer than `min(timeout, 10 s)`.
#[derive(Debug, thiserror::Error)]
#[error("connecting took longer than {0:?}")]
pub struct ConnectTimeout(Duration);

/// The sink's answer to one attempt: the last response (after the redirects followed) with at
/// most `limit` bytes of its body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// At most `limit` bytes of the body: all of it, or its start when it was longer, failed
    /// or stalled.
    pub body: Vec<u8>,
    /// From the moment a connection took the request (hyper first read its body: after any
    /// wait for a connection and any handshake) to the end of the answer read; with redirects,
    /// from the first request's. `None` when the client does not measure round trips or the
    /// body was never read (an empty body).
    pub round_trip: Option<Duration>,
}

/// The sink's HTTP client; see the module documentation.
pub struct SinkClient {
    http: Client<Timed<HttpsConnector<Route>>, SentBody>,
    endpoint: Uri,
    timeout: Duration,
    /// `Authorization: Basic` from the endpoint's `user:password@`, sent unless the caller's
    /// headers carry an `Authorization` (the OIDC bearer token).
    basic_authorization: Option<HeaderValue>,
    /// `Proxy-Authorization` for an `http://` endpoint forwarded to a proxy with credentials
    /// (a redirect followed stays on the same origin, so the same proxy applies).
    proxy_authorization: Option<HeaderValue>,
    /// Time each request from when a connection takes it ([`Answer::round_trip`]: adaptive
    /// concurrency); otherwise nothing is timed (no cost per request).
    measure_round_trips: bool,
}

impl SinkClient {
    /// A client for `endpoint` with the sink's TLS settings, `timeout` per attempt and at most
    /// `max_idle_per_host` idle connections; `measure_round_trips`: see
    /// [`Answer::round_trip`].
    pub fn new(
        endpoint: &str,
        timeout: Duration,
        insecure_skip_verify: bool,
        ca_file: Option<&std::path::Path>,
        max_idle_per_host: usize,
        measure_round_trips: bool,
    ) -> Result<SinkClient, SinkClientError> {
        let (endpoint, basic_authorization) =
            parse_endpoint(endpoint).map_err(|source| SinkClientError::Endpoint {
                endpoint: endpoint.to_string(),
                source,
            })?;
        let config = super::tls_config(insecure_skip_verify, ca_file, "sink")?;
        let mut to_proxy_tls = config.clone();
        to_proxy_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut to_sink_tls = config;
        to_sink_tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        // As reqwest did: the connect time is shared among the addresses a name resolves to
        // (a dark first address leaves time for the next), and TCP keepalive finds a pooled
        // connection whose peer vanished while it was idle.
        tcp.set_connect_timeout(Some(timeout.min(MAX_CONNECT_TIMEOUT)));
        tcp.set_keepalive(Some(TCP_KEEPALIVE));
        tcp.set_keepalive_interval(Some(TCP_KEEPALIVE));
        tcp.set_keepalive_retries(Some(3));
        let proxies = Arc::new(Matcher::from_env());
        let proxy_authorization = (endpoint.scheme() == Some(&Scheme::HTTP))
            .then(|| proxies.intercept(&endpoint))
            .flatten()
            .and_then(|proxy| proxy.basic_auth().cloned());
        let route = Route {
            to_proxy: HttpsConnector::from((tcp.clone(), to_proxy_tls)),
            direct: tcp,
            proxies,
        };
        let connector = Timed {
            inner: HttpsConnector::from((route, to_sink_tls)),
            limit: timeout.min(MAX_CONNECT_TIMEOUT),
        };
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(max_idle_per_host)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(SinkClient {
            http,
            endpoint,
            timeout,
            basic_authorization,
            proxy_authorization,
            measure_round_trips,
        })
    }

    /// POSTs `body` with `headers` (each set, replacing one the client would add) to the
    /// endpoint, following the redirects [`follow_redirect`] allows, and reads at most `limit`
    /// bytes of the answer, all within the sink `timeout`.
    pub async fn post(
        &self,
        headers: &[(HeaderName, HeaderValue)],
        body: &Bytes,
        limit: usize,
    ) -> Result<Answer, SendError> {
        let deadline = crate::clock::deadline_after(self.timeout);
        let sent = self.measure_round_trips.then(SentAt::default);
        let mut uri = self.endpoint.clone();
        let mut followed = 0usize;
        let response = loop {
            let request = self.request(&uri, headers, body, sent.as_ref());
            let response = match tokio::time::timeout_at(deadline, self.http.request(request)).await
            {
                Ok(Ok(response)) => response,
                Ok(Err(source)) => return Err(SendError::Request { url: uri, source }),
                Err(_) => {
                    return Err(SendError::Timeout {
                        url: uri,
                        after: self.timeout,
                    })
                }
            };
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|value| value.to_str().ok());
            match follow_redirect(response.status().as_u16(), &uri, location, followed) {
                Some(next) => {
                    uri = next;
                    followed = followed.saturating_add(1);
                }
                None => break response,
            }
        };
        let (parts, mut incoming) = response.into_parts();
        // A short body read to its end lets the connection go back to the pool; a longer one
        // is cut and its connection dropped with `incoming`.
        let body = read_bounded(&mut incoming, limit, deadline).await;
        let round_trip = sent
            .as_ref()
            .and_then(|sent| sent.0.get())
            .map(std::time::Instant::elapsed);
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
            round_trip,
        })
    }

    fn request(
        &self,
        uri: &Uri,
        headers: &[(HeaderName, HeaderValue)],
        body: &Bytes,
        sent: Option<&SentAt>,
    ) -> Request<SentBody> {
        let mut request = Request::new(SentBody::new(body.clone(), sent.cloned()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri.clone();
        let sent = request.headers_mut();
        sent.reserve(headers.len().saturating_add(3));
        sent.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        sent.insert(ACCEPT, HeaderValue::from_static("*/*"));
        if let Some(auth) = &self.proxy_authorization {
            sent.insert(PROXY_AUTHORIZATION, auth.clone());
        }
        if let Some(basic) = &self.basic_authorization {
            sent.insert(AUTHORIZATION, basic.clone());
        }
        for (name, value) in headers {
            sent.insert(name.clone(), value.clone());
        }
        request
    }
}

/// When a connection first read one of a `post`'s request bodies (shared by its redirects).
#[derive(Clone, Default)]
struct SentAt(Arc<std::sync::OnceLock<std::time::Instant>>);

/// A request body (one `Bytes` frame, as `Full`) that notes in its [`SentAt`] when it is first
/// read: hyper reads it on the connection the request was given, after any wait for that
/// connection and its handshakes, as it writes the request out.
struct SentBody {
    bytes: Option<Bytes>,
    /// `None`: not timed.
    sent: Option<SentAt>,
}

impl SentBody {
    fn new(bytes: Bytes, sent: Option<SentAt>) -> SentBody {
        SentBody {
            bytes: (!bytes.is_empty()).then_some(bytes),
            sent,
        }
    }
}

impl hyper::body::Body for SentBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(sent) = &this.sent {
            sent.0.get_or_init(std::time::Instant::now);
        }
        Poll::Ready(
            this.bytes
                .take()
                .map(|bytes| Ok(hyper::body::Frame::data(bytes))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let length = self.bytes.as_ref().map_or(0, Bytes::len);
        hyper::body::SizeHint::with_exact(u64::try_from(length).unwrap_or(u64::MAX))
    }
}

/// The endpoint as reqwest sent it (parsed and normalized as a URL), as a request URI without
/// its `user:password@` (which would otherwise reach the wire in HTTP/2's `:authority` or a
/// forward proxy's request line, and the logs in error messages), and the
/// `Authorization: Basic` value that userinfo stands for, as reqwest and Go's net/http send
/// it (the percent-decoded `user:password`; a bearer token, when OIDC is on, replaces it).
fn parse_endpoint(endpoint: &str) -> Result<(Uri, Option<HeaderValue>), EndpointError> {
    let mut url = url::Url::parse(endpoint)?;
    let basic = userinfo_basic(&url);
    strip_userinfo(&mut url);
    Ok((url.as_str().parse::<Uri>()?, basic))
}

/// `Basic base64(user:password)` for a URL with userinfo (marked sensitive); `None` without.
fn userinfo_basic(url: &url::Url) -> Option<HeaderValue> {
    use base64::Engine;
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let credentials = format!(
        "{}:{}",
        decode(url.username()),
        url.password().map(decode).unwrap_or_default()
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
    let mut value = HeaderValue::try_from(format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// Drops `user:password@` from `url` (a URL that cannot have one is left as it is).
fn strip_userinfo(url: &mut url::Url) {
    let _ = url.set_username("");
    let _ = url.set_password(None);
}

/// Where a `status` answer to a request for `from` is followed, given its `Location` and the
/// redirects already `followed` for this request: `Some` only for 307/308 whose `Location`
/// (absolute or relative to `from`) has the same origin (scheme, host, port) as `from`, while
/// fewer than [`MAX_REDIRECTS`] were followed. `None`: the answer is the 3xx itself.
pub fn follow_redirect(
    status: u16,
    from: &Uri,
    location: Option<&str>,
    followed: usize,
) -> Option<Uri> {
    // Every answer comes through here: only a redirect status is worth parsing URLs for.
    // The rule itself (status, origin, hop count) is `redirect_allowed`'s.
    if !matches!(status, 307 | 308) {
        return None;
    }
    let from = url::Url::parse(&from.to_string()).ok()?;
    let mut to = from.join(location?).ok()?;
    // Credentials in a Location are not followed onto the wire (the same origin keeps the
    // endpoint's own, sent as a header).
    strip_userinfo(&mut to);
    if !super::redirect_allowed(status, &from, &to, followed) {
        return None;
    }
    to.as_str().parse().ok()
}

/// Reads at most `limit` bytes of `body` until `deadline`. A longer body (or one that fails or
/// stalls midway) is cut: its start is returned and the rest never read.
async fn read_bounded(
    body: &mut Incoming,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Vec<u8> {
    let mut read = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) | Ok(Some(Err(_))) | Err(_) => return read,
        };
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        let room = limit.saturating_sub(read.len());
        if chunk.len() > room {
            read.extend_from_slice(chunk.get(..room).unwrap_or_default());
            return read;
        }
        read.extend_from_slice(&chunk);
    }
}

/// A plain connection to the sink or its proxy (TLS when the proxy is `https://`).
type Plain = MaybeHttpsStream<TokioIo<TcpStream>>;

/// The first hop of a connection: direct to the sink, a tunnel through a proxy, or a
/// connection to a proxy that forwards requests (`proxied`: sent in absolute form).
pub struct Hop {
    io: Plain,
    proxied: bool,
}

impl Connection for Hop {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for Hop {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Hop {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

/// Connects to a destination directly or through the proxy the environment names for it.
#[derive(Clone)]
pub struct Route {
    direct: HttpConnector,
    /// Reaches a proxy: TCP, or TLS (ALPN `http/1.1`) for an `https://` proxy.
    to_proxy: HttpsConnector<HttpConnector>,
    proxies: Arc<Matcher>,
}

impl Route {
    async fn connect(mut self, dst: Uri) -> Result<Hop, BoxError> {
        let Some(proxy) = self.proxies.intercept(&dst) else {
            let tcp = self.direct.call(dst).await?;
            return Ok(Hop {
                io: MaybeHttpsStream::Http(tcp),
                proxied: false,
            });
        };
        if dst.scheme() == Some(&Scheme::HTTPS) {
            let mut tunnel = Tunnel::new(proxy.uri().clone(), self.to_proxy.clone());
            if let Some(auth) = proxy.basic_auth() {
                tunnel = tunnel.with_auth(auth.clone());
            }
            let mut headers = HeaderMap::new();
            headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
            let io = tunnel.with_headers(headers).call(dst).await?;
            return Ok(Hop { io, proxied: false });
        }
        let io = self.to_proxy.call(proxy.uri().clone()).await?;
        Ok(Hop { io, proxied: true })
    }
}

impl Service<Uri> for Route {
    type Response = Hop;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Hop, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        Box::pin(self.clone().connect(dst))
    }
}

/// A connector whose whole connect (TCP, tunnel, TLS) ends within `limit`.
#[derive(Clone)]
pub struct Timed<S> {
    inner: S,
    limit: Duration,
}

impl<S> Service<Uri> for Timed<S>
where
    S: Service<Uri, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.inner.call(dst);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(connected) => connected,
                Err(_) => Err(Box::new(ConnectTimeout(limit)) as BoxError),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn uri(text: &str) -> Uri {
        text.parse().expect("valid URI")
    }

    const FROM: &str = "https://sink.example:8443/v1/events";

    #[test]
    fn same_origin_307_and_308_are_followed_absolute_or_relative() {
        for status in [307, 308] {
            assert_eq!(
                follow_redirect(status, &uri(FROM), Some("/v2/events"), 0),
                Some(uri("https://sink.example:8443/v2/events"))
            );
            assert_eq!(
                follow_redirect(
                    status,
                    &uri(FROM),
                    Some("https://SINK.example:8443/v3?x=1"),
                    0
                ),
                Some(uri("https://sink.example:8443/v3?x=1"))
            );
        }
        assert_eq!(
            follow_redirect(307, &uri(FROM), Some("next"), 0),
            Some(uri("https://sink.example:8443/v1/next"))
        );
        // The default port is the same port.
        assert_eq!(
            follow_redirect(307, &uri("http://h/a"), Some("http://h:80/b"), 0),
            Some(uri("http://h/b"))
        );
    }

    #[test]
    fn other_statuses_are_never_followed() {
        for status in [300, 301, 302, 303, 304, 305, 306, 200, 404] {
            assert_eq!(
                follow_redirect(status, &uri(FROM), Some("/v2/events"), 0),
                None,
                "{status}"
            );
        }
    }

    #[test]
    fn another_origin_is_not_followed() {
        for location in [
            "http://sink.example:8443/v2",
            "https://other.example:8443/v2",
            "https://sink.example/v2",
            "https://sink.example:9443/v2",
            "//other.example/v2",
        ] {
            assert_eq!(
                follow_redirect(307, &uri(FROM), Some(location), 0),
                None,
                "{location}"
            );
        }
    }

    #[test]
    fn at_most_five_hops_and_a_location_is_needed() {
        assert!(follow_redirect(308, &uri(FROM), Some("/x"), MAX_REDIRECTS - 1).is_some());
        assert_eq!(
            follow_redirect(308, &uri(FROM), Some("/x"), MAX_REDIRECTS),
            None
        );
        assert_eq!(follow_redirect(307, &uri(FROM), None, 0), None);
        assert_eq!(
            follow_redirect(307, &uri(FROM), Some("http://[::1"), 0),
            None
        );
    }

    #[tokio::test]
    async fn a_sink_that_never_answers_the_tls_handshake_is_a_timeout_within_the_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        // Accepts and holds connections, saying nothing.
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let timeout = Duration::from_millis(300);
        let client = SinkClient::new(
            &format!("https://{addr}/events"),
            timeout,
            true,
            None,
            1,
            false,
        )
        .expect("client");
        let started = std::time::Instant::now();
        let error = client
            .post(&[], &Bytes::from_static(b"{}"), 16)
            .await
            .err()
            .expect("no answer");
        assert!(error.is_timeout(), "{error:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        held.abort();
    }

    #[tokio::test]
    async fn a_sink_that_reads_the_request_but_never_answers_times_out_naming_the_url() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        // Reads whatever comes and never writes.
        let silent = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while matches!(socket.read(&mut buffer).await, Ok(n) if n > 0) {}
                });
            }
        });
        let timeout = Duration::from_millis(200);
        let url = format!("http://{addr}/events");
        let client = SinkClient::new(&url, timeout, false, None, 1, false).expect("client");
        let error = client
            .post(&[], &Bytes::from_static(b"{}"), 16)
            .await
            .err()
            .expect("no answer");
        assert!(
            matches!(error, SendError::Timeout { .. }) && error.is_timeout(),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains(&url), "{message}");
        assert!(message.contains("200ms"), "{message}");
        silent.abort();
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure_with_its_cause() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        drop(listener);
        let client = SinkClient::new(
            &format!("http://{addr}/events"),
            Duration::from_secs(5),
            false,
            None,
            1,
            false,
        )
        .expect("client");
        let error = client
            .post(&[], &Bytes::from_static(b"{}"), 16)
            .await
            .err()
            .expect("no answer");
        assert!(error.is_connect() && !error.is_timeout(), "{error:?}");
        let message = crate::sink::http::describe_error(&error);
        assert!(message.contains(&addr.to_string()), "{message}");
        assert!(message.to_lowercase().contains("refused"), "{message}");
    }

    /// A TLS acceptor for 127.0.0.1 with a self-signed certificate, offering `alpn`.
    fn self_signed_acceptor(alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        let certified =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("server config");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// A sink across a WAN: its TLS handshake takes a second (the server waits before
    /// answering the ClientHello), its answers none. A request's round trip is the sink's
    /// time, not the handshake's, over HTTP/1.1 and HTTP/2 (hyper reads the body in different
    /// places for each).
    #[tokio::test]
    async fn the_round_trip_leaves_out_the_wait_for_a_connection_and_its_handshake() {
        round_trip_leaves_out_a_slow_handshake(false).await;
    }

    #[tokio::test]
    async fn over_http2_the_round_trip_leaves_out_the_handshake_too() {
        round_trip_leaves_out_a_slow_handshake(true).await;
    }

    async fn round_trip_leaves_out_a_slow_handshake(h2: bool) {
        const HANDSHAKE: Duration = Duration::from_secs(1);
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        let acceptor = self_signed_acceptor(&[alpn]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(HANDSHAKE).await;
                    let Ok(tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let accept =
                        hyper::service::service_fn(|request: Request<Incoming>| async move {
                            let version = format!("{:?}", request.version());
                            let mut response =
                                hyper::Response::new(Full::new(Bytes::from(version)));
                            *response.status_mut() = StatusCode::ACCEPTED;
                            Ok::<_, hyper::Error>(response)
                        });
                    let io = TokioIo::new(tls);
                    let _ = if h2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, accept)
                            .await
                    } else {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, accept)
                            .await
                    };
                });
            }
        });
        let endpoint = format!("https://127.0.0.1:{}/events", addr.port());
        let client = SinkClient::new(&endpoint, Duration::from_secs(5), true, None, 1, true)
            .expect("client");
        let body = Bytes::from_static(b"{}");
        let called = std::time::Instant::now();
        let first = client.post(&[], &body, 64).await.expect("answer");
        assert!(
            called.elapsed() >= HANDSHAKE,
            "the handshake was waited for"
        );
        assert_eq!(first.status, StatusCode::ACCEPTED);
        let version: &[u8] = if h2 { b"HTTP/2.0" } else { b"HTTP/1.1" };
        assert_eq!(first.body, version, "spoken over the protocol negotiated");
        let taken = first.round_trip.expect("timed");
        assert!(
            taken < HANDSHAKE,
            "the round trip {taken:?} holds the handshake"
        );
        let second = client.post(&[], &body, 64).await.expect("answer");
        assert!(second.round_trip.is_some_and(|taken| taken < HANDSHAKE));
        server.abort();
    }

    #[tokio::test]
    async fn a_sink_that_negotiates_h2_is_spoken_to_in_http2() {
        // This peer speaks HTTP/2 only: an HTTP/1.1 request would fail.
        let acceptor = self_signed_acceptor(&[b"h2"]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = connections.clone();
        let server = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let echo =
                        hyper::service::service_fn(|request: Request<Incoming>| async move {
                            let version = format!("{:?}", request.version());
                            let agent = request.headers().get(USER_AGENT).cloned();
                            let body = request.into_body().collect().await?.to_bytes();
                            let mut response = hyper::Response::new(Full::new(body));
                            *response.status_mut() = StatusCode::ACCEPTED;
                            let headers = response.headers_mut();
                            headers
                                .insert("x-version", HeaderValue::from_str(&version).expect("ok"));
                            if let Some(agent) = agent {
                                headers.insert("x-user-agent", agent);
                            }
                            Ok::<_, hyper::Error>(response)
                        });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), echo)
                        .await;
                });
            }
        });
        let endpoint = format!("https://127.0.0.1:{}/events", addr.port());
        let client = SinkClient::new(&endpoint, Duration::from_secs(5), true, None, 1, false)
            .expect("client");
        for _ in 0..2 {
            let answer = client
                .post(&[], &Bytes::from_static(b"{\"a\":1}"), 64)
                .await
                .expect("answer");
            assert_eq!(answer.status, StatusCode::ACCEPTED);
            assert_eq!(
                answer.headers.get("x-version").map(|v| v.as_bytes()),
                Some(&b"HTTP/2.0"[..])
            );
            assert_eq!(
                answer.headers.get("x-user-agent").map(|v| v.as_bytes()),
                Some(USER_AGENT_VALUE.as_bytes())
            );
            assert_eq!(answer.body, b"{\"a\":1}");
        }
        assert_eq!(
            connections.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the second POST reused the pooled HTTP/2 connection"
        );
        server.abort();
    }

    #[test]
    fn the_endpoint_is_normalized_as_reqwest_sent_it() {
        let (endpoint, basic) = parse_endpoint("HTTP://Sink.Example:80/a b").expect("valid");
        assert_eq!(endpoint, uri("http://sink.example/a%20b"));
        assert_eq!(basic, None);
        assert!(parse_endpoint("not a url").is_err());
    }

    #[test]
    fn logged_endpoints_hide_the_password() {
        assert_eq!(
            super::super::redact_url("https://ingest:s3cret@sink.example/v1"),
            "https://ingest:***@sink.example/v1"
        );
        assert_eq!(
            super::super::redact_url("https://sink.example/v1"),
            "https://sink.example/v1"
        );
        assert_eq!(super::super::redact_url("not a url"), "not a url");
    }

    #[test]
    fn endpoint_credentials_become_basic_auth_and_leave_the_uri() {
        let (endpoint, basic) =
            parse_endpoint("https://ingest:p%40ss%3Aw0rd@sink.example:8443/v1").expect("valid");
        assert_eq!(endpoint, uri("https://sink.example:8443/v1"));
        // base64("ingest:p@ss:w0rd"), percent-decoded first, as reqwest and Go send it.
        let basic = basic.expect("a Basic value");
        assert_eq!(basic.to_str().ok(), Some("Basic aW5nZXN0OnBAc3M6dzByZA=="));
        assert!(basic.is_sensitive());
        let (_, user_only) = parse_endpoint("http://ingest@h/").expect("valid");
        assert_eq!(
            user_only.and_then(|v| v.to_str().ok().map(str::to_string)),
            Some("Basic aW5nZXN0Og==".to_string())
        );
        // A same-origin Location with credentials is followed without them.
        assert_eq!(
            follow_redirect(307, &uri(FROM), Some("https://u:p@sink.example:8443/v2"), 0),
            Some(uri("https://sink.example:8443/v2"))
        );
    }
}
