//! `event-exporter-dev sink`: a reference CloudEvents sink with an OAuth2 client-credentials token
//! endpoint, implementing every sink requirement of the spec, so operators, tests, the demo and
//! benchmarks have a real receiver to deliver to.
//!
//! An event request meets the rules in this order (the first one broken decides the answer):
//! POST at `--path` (else 405, other paths 404); a Bearer token this server issued and that has
//! not expired (401, unless `--no-auth`); `Content-Type: application/cloudevents+json` or, for
//! the batched content mode, `application/cloudevents-batch+json` (else 415); a CloudEvents 1.0
//! JSON event, or a JSON array whose every element is one (else 400 naming the problem and, in
//! a batch, the element); then the fault switches (in-process scripted answers, "fail always",
//! one `--fail-rate` roll per request; see `faults.rs`); then 202 `{"status":"accepted"}` (a
//! batch: with `accepted` and `duplicates` counts). Events are deduplicated on `source` + `id`
//! and each new one is appended as one JSON line to `--out`.
//!
//! [`start`] runs the server in-process (the `sink` command, the demo, the benchmarks and the
//! integration tests use it); [`run`] is the command: it adds the signal handling and the
//! running count on stderr. In-process users also get what no flag gives: HTTPS from a
//! `rustls::ServerConfig` ([`SinkArgs::tls`]), the request registry ([`SinkArgs::keep_requests`],
//! [`RunningSink::requests`], the waits), scripted answers and "fail always"
//! ([`RunningSink::push_responses`], [`RunningSink::fail_always`]), the latency changed at run
//! time, and Bearer tokens checked against another token endpoint's issuer
//! ([`RunningSink::set_token_registry`]).

mod faults;
mod http;
mod requests;
mod serve;
mod stats;
mod store;
mod tokens;
mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use event_exporter::exporter::ExitError;

pub use faults::Scripted;
pub use requests::{RecordedRequest, WaitTimeout};
pub use serve::{spawn_server, spawn_server_with_delay, TlsListener};
pub use stats::{Reason, SinkStats};
pub use store::ReceivedEvent;
pub use tokens::{
    base64_decode, bearer_token, parse_form, token_router, Client, GrantError, TokenEndpoint,
    TokenIssuer, TokenRequest, TOKEN_PATH,
};
pub use validate::{validate_event, Attribute, Invalid, ValidEvent};

#[derive(Clone, Args)]
pub struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Path events are POSTed to.
    #[arg(long, default_value = "/api/v1/events")]
    pub path: String,
    /// Append every accepted event as one JSON line to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Accept requests without a Bearer token (no token endpoint).
    #[arg(long)]
    pub no_auth: bool,
    /// OAuth2 client id the token endpoint accepts.
    #[arg(long, default_value = "nvsentinel-exporter")]
    pub client_id: String,
    /// OAuth2 client secret the token endpoint accepts.
    #[arg(
        long,
        env = "SINK_CLIENT_SECRET",
        default_value = "demo-secret",
        hide_env_values = true
    )]
    pub client_secret: String,
    /// Scope the token endpoint requires.
    #[arg(long, default_value = "events:write")]
    pub scope: String,
    /// Lifetime of issued tokens.
    #[arg(long, default_value = "1h", value_parser = event_exporter::cli::parse_duration)]
    pub token_lifetime: Duration,
    /// Test switch: delay every answer by this long.
    #[arg(long, default_value = "0s", value_parser = event_exporter::cli::parse_duration)]
    pub latency: Duration,
    /// Test switch: add a uniformly random extra delay of up to this long.
    #[arg(long, default_value = "0s", value_parser = event_exporter::cli::parse_duration)]
    pub latency_jitter: Duration,
    /// In-process only, with `tls`: hold every new connection this long before its TLS
    /// handshake, as a sink across a WAN whose TCP and TLS handshakes cost network round trips
    /// (at a 300 ms round trip, about 600 ms); a connection's later requests do not wait.
    #[arg(skip)]
    pub handshake_delay: Duration,
    /// Test switch: answer at most N requests at a time (each taking --latency); the others
    /// wait their turn, so latency grows with concurrency past N, like a saturated server.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub capacity: Option<u32>,
    /// Test switch: fraction (0–1) of valid requests answered with --fail-status.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Test switch: status for injected failures (e.g. 503 or 429).
    #[arg(long, default_value_t = 503)]
    pub fail_status: u16,
    /// Test switch: Retry-After seconds sent with injected failures.
    #[arg(long)]
    pub retry_after: Option<u64>,
    /// Keep the last N accepted events in memory for in-process readers (0 keeps none).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_KEEP_EVENTS)]
    pub keep_events: usize,
    /// In-process only: record the last N requests answered (0, the default, records none);
    /// see [`RunningSink::requests`].
    #[arg(skip)]
    pub keep_requests: usize,
    /// In-process only: serve HTTPS with this configuration instead of plain HTTP.
    #[arg(skip)]
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Enough for the demo and tests to look at every event, small enough for a long benchmark.
const DEFAULT_KEEP_EVENTS: usize = 10_000;

impl std::fmt::Debug for SinkArgs {
    /// Every flag but the client secret, so logging the arguments never leaks it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkArgs")
            .field("listen", &self.listen)
            .field("path", &self.path)
            .field("out", &self.out)
            .field("no_auth", &self.no_auth)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("scope", &self.scope)
            .field("token_lifetime", &self.token_lifetime)
            .field("latency", &self.latency)
            .field("latency_jitter", &self.latency_jitter)
            .field("handshake_delay", &self.handshake_delay)
            .field("capacity", &self.capacity)
            .field("fail_rate", &self.fail_rate)
            .field("fail_status", &self.fail_status)
            .field("retry_after", &self.retry_after)
            .field("keep_events", &self.keep_events)
            .field("keep_requests", &self.keep_requests)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Default for SinkArgs {
    /// The command line's defaults (without reading `SINK_CLIENT_SECRET`), for in-process use.
    fn default() -> Self {
        SinkArgs {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            path: "/api/v1/events".into(),
            out: None,
            no_auth: false,
            client_id: "nvsentinel-exporter".into(),
            client_secret: "demo-secret".into(),
            scope: "events:write".into(),
            token_lifetime: Duration::from_secs(3600),
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            handshake_delay: Duration::ZERO,
            capacity: None,
            fail_rate: 0.0,
            fail_status: 503,
            retry_after: None,
            keep_events: DEFAULT_KEEP_EVENTS,
            keep_requests: 0,
            tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A flag value the sink cannot work with (exit 2).
    #[error("{0}")]
    InvalidArgs(String),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open --out {}: {source}", path.display())]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signal(std::io::Error),
    #[error("the sink server failed: {0}")]
    Server(std::io::Error),
    /// A scripted or "fail always" status that is not an HTTP status.
    #[error("{0} is not an HTTP status")]
    ScriptedStatus(u16),
    #[error("scripted Retry-After {value:?} is not a header value: {source}")]
    ScriptedRetryAfter {
        value: String,
        source: axum::http::header::InvalidHeaderValue,
    },
}

impl From<SinkError> for ExitError {
    fn from(error: SinkError) -> Self {
        match error {
            SinkError::InvalidArgs(_) => ExitError::config(error),
            other => ExitError::failed(other),
        }
    }
}

/// How long [`RunningSink::shutdown`] lets in-flight requests finish before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A sink serving in this process. Dropping it stops the server (without waiting).
pub struct RunningSink {
    address: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
    shared: Arc<http::Shared>,
    stop: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

/// Binds `args.listen` (port 0 picks a free port) and serves until [`RunningSink::shutdown`].
pub async fn start(args: SinkArgs) -> Result<RunningSink, SinkError> {
    check_args(&args)?;
    let shared = Arc::new(http::Shared::new(&args)?);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| SinkError::Bind {
            address: args.listen,
            source,
        })?;
    let address = listener.local_addr().map_err(SinkError::Server)?;
    let stop = CancellationToken::new();
    let app = http::router(shared.clone());
    let scheme = if args.tls.is_some() { "https" } else { "http" };
    let server =
        spawn_server_with_delay(listener, app, args.tls, args.handshake_delay, stop.clone());
    Ok(RunningSink {
        address,
        scheme,
        shared,
        stop,
        server: Some(server),
    })
}

/// Rejects flag values that would make the server misbehave rather than fail loudly.
fn check_args(args: &SinkArgs) -> Result<(), SinkError> {
    let invalid = |message: String| Err(SinkError::InvalidArgs(message));
    if !args.path.starts_with('/') {
        return invalid(format!("--path: must start with '/', got {:?}", args.path));
    }
    if !args.no_auth && args.path == TOKEN_PATH {
        return invalid(format!("--path: {TOKEN_PATH} is the token endpoint"));
    }
    if !args.handshake_delay.is_zero() && args.tls.is_none() {
        return invalid("handshake_delay: only a TLS sink has a handshake to delay".into());
    }
    if !(0.0..=1.0).contains(&args.fail_rate) {
        return invalid(format!(
            "--fail-rate: must be between 0 and 1, got {}",
            args.fail_rate
        ));
    }
    if !(400..=599).contains(&args.fail_status) {
        return invalid(format!(
            "--fail-status: must be a 4xx or 5xx status, got {}",
            args.fail_status
        ));
    }
    if !args.no_auth {
        if args.token_lifetime.is_zero() {
            return invalid("--token-lifetime: must be positive".into());
        }
        if args.client_id.is_empty() || args.client_secret.is_empty() {
            return invalid("--client-id and --client-secret must not be empty".into());
        }
    }
    Ok(())
}

impl RunningSink {
    /// The bound address (the real port when `--listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT` (`https` with [`SinkArgs::tls`]), without a path.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.address)
    }

    /// Full URL events are POSTed to, e.g. `http://127.0.0.1:PORT/api/v1/events`.
    pub fn events_url(&self) -> String {
        format!("{}{}", self.base_url(), self.shared.path)
    }

    /// Full URL of the token endpoint; `None` with `--no-auth`.
    pub fn token_url(&self) -> Option<String> {
        self.shared
            .auth
            .as_ref()
            .map(|_| format!("{}{TOKEN_PATH}", self.base_url()))
    }

    /// New events accepted (duplicates and injected failures not included).
    pub fn accepted(&self) -> u64 {
        self.shared.counters.accepted()
    }

    /// Requests for an event already accepted (answered 202, not stored again).
    pub fn duplicates(&self) -> u64 {
        self.shared.counters.duplicates()
    }

    /// Event requests turned away, all reasons together.
    pub fn rejected(&self) -> u64 {
        self.stats().rejected_total()
    }

    /// Every counter at once.
    pub fn stats(&self) -> SinkStats {
        self.shared.counters.snapshot()
    }

    /// The last `--keep-events` accepted events, oldest first.
    pub fn events(&self) -> Vec<ReceivedEvent> {
        self.shared.store.events()
    }

    /// Accepts the Bearer tokens of `registry` from now on, e.g. another token endpoint's
    /// ([`TokenEndpoint::issuer`]); `None` accepts requests without a token. The sink's own
    /// token endpoint, if any, keeps issuing tokens of its own.
    pub fn set_token_registry(&self, registry: Option<Arc<TokenIssuer>>) {
        self.shared.set_accepted_tokens(registry);
    }

    /// The fixed delay before every answer from now on (`--latency`; the jitter stays).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults.set_latency(latency);
    }

    /// At most `capacity` requests in their latency at once from now on (`--capacity`;
    /// `None`: no limit).
    pub fn set_capacity(&self, capacity: Option<usize>) {
        self.shared.faults.set_capacity(capacity);
    }

    /// Queues answers for the next valid event requests, used once each, before "fail
    /// always" and `--fail-rate`; a 2xx still stores the events. Errors (and queues nothing)
    /// when a status is not an HTTP status or a `Retry-After` is not a header value.
    pub fn push_responses(&self, responses: Vec<Scripted>) -> Result<(), SinkError> {
        self.shared.faults.push_scripted(responses)
    }

    /// Valid event requests answer `status` (no `Retry-After`) until
    /// [`RunningSink::clear_failures`]; scripted answers are used first.
    pub fn fail_always(&self, status: u16) -> Result<(), SinkError> {
        self.shared.faults.fail_always(status)
    }

    /// Drops "fail always" and the queued scripted answers (`--fail-rate` stays).
    pub fn clear_failures(&self) {
        self.shared.faults.clear();
    }

    /// The recorded requests (the last [`SinkArgs::keep_requests`], token requests left
    /// out), in the order answered, rejected ones included.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.snapshot()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.requests.clear();
    }

    /// Requests being answered now (token requests included).
    pub fn in_flight(&self) -> usize {
        self.shared.requests.in_flight()
    }

    /// The most requests answered at once so far.
    pub fn max_in_flight(&self) -> usize {
        self.shared.requests.max_in_flight()
    }

    /// The events of the recorded requests answered 2xx, in the order answered (a batch's one
    /// by one; duplicates and scripted 2xx included, unlike [`RunningSink::events`]).
    pub fn accepted_events(&self) -> Vec<Value> {
        requests::accepted_events(&self.requests())
    }

    /// The CloudEvent `id`s of [`RunningSink::accepted_events`], in order.
    pub fn accepted_ids(&self) -> Vec<String> {
        self.accepted_events()
            .iter()
            .filter_map(|event| event.get("id").and_then(Value::as_str).map(str::to_string))
            .collect()
    }

    /// Waits until [`RunningSink::accepted_events`] holds at least `n` events and returns
    /// them; [`WaitTimeout`] after `timeout`, saying how many arrived.
    pub async fn wait_for_accepted(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Value>, WaitTimeout> {
        self.shared.requests.wait_for_accepted(n, timeout).await
    }

    /// Waits until at least `n` requests (any status) were recorded and returns them all.
    pub async fn wait_for_requests(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedRequest>, WaitTimeout> {
        self.shared.requests.wait_for_requests(n, timeout).await
    }

    /// Stops accepting connections, lets in-flight requests finish (for a few seconds at most)
    /// and returns the final counts.
    pub async fn shutdown(mut self) -> Result<SinkStats, SinkError> {
        self.stop.cancel();
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(Ok(served)) => served.map_err(SinkError::Server)?,
                Ok(Err(join_error)) => {
                    return Err(SinkError::Server(std::io::Error::other(join_error)))
                }
                Err(_) => {
                    tracing::warn!("sink: in-flight requests did not finish in time; dropped");
                    server.abort();
                }
            }
        }
        Ok(self.stats())
    }
}

impl Drop for RunningSink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The `sink` command: serves until SIGTERM/SIGINT, printing a running count to stderr.
pub async fn run(args: SinkArgs) -> Result<(), ExitError> {
    let signals = Signals::install().map_err(SinkError::Signal)?;
    let sink = start(args).await?;
    announce(&sink);
    let signal = report_until(&sink, signals.wait()).await;
    tracing::info!(signal, "sink: stopping");
    let stats = sink.shutdown().await?;
    eprintln!("sink: stopped ({signal}): {stats}");
    Ok(())
}

/// One line saying where to send events and tokens (scripts using port 0 parse it).
fn announce(sink: &RunningSink) {
    match sink.token_url() {
        Some(token_url) => eprintln!(
            "sink: listening on {} (token endpoint {token_url}, client id {:?}, scope {:?})",
            sink.events_url(),
            sink.shared
                .auth
                .as_ref()
                .map_or("", |a| a.endpoint.client().id()),
            sink.shared
                .auth
                .as_ref()
                .map_or("", |a| a.endpoint.client().scope()),
        ),
        None => eprintln!(
            "sink: listening on {} (no authentication)",
            sink.events_url()
        ),
    }
}

/// Prints the counts about once a second when they changed, until `done` completes.
async fn report_until<F: std::future::Future>(sink: &RunningSink, done: F) -> F::Output {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last = sink.stats();
    tokio::pin!(done);
    loop {
        tokio::select! {
            output = &mut done => return output,
            _ = ticker.tick() => {
                let now = sink.stats();
                if now != last {
                    eprintln!("sink: {now}");
                    last = now;
                }
            }
        }
    }
}

/// SIGTERM and SIGINT, installed before the server starts so an early signal is not lost.
pub(crate) struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// The name of the first signal received.
    pub(crate) async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

/// p50 and p99 of write-to-sink latency (arrival − the event's `time`, the moment it was
/// written) over the events written at or after `since`; zero when there are none.
pub fn latency_percentiles(
    events: &[ReceivedEvent],
    since: chrono::DateTime<chrono::Utc>,
) -> (Duration, Duration) {
    latency_percentiles_from(events, |written| (written >= since).then_some(written))
}

/// p50 and p99 of arrival − `start(the event's time)` over the events `start` gives a time
/// for (e.g. the commit of the transaction that wrote the event); zero when there are none.
pub fn latency_percentiles_from(
    events: &[ReceivedEvent],
    start: impl Fn(chrono::DateTime<chrono::Utc>) -> Option<chrono::DateTime<chrono::Utc>>,
) -> (Duration, Duration) {
    let mut latencies: Vec<Duration> = events
        .iter()
        .filter_map(|received| {
            let time = received.event["time"].as_str()?;
            let written = chrono::DateTime::parse_from_rfc3339(time)
                .ok()?
                .with_timezone(&chrono::Utc);
            let start = start(written)?;
            Some((received.received_at - start).to_std().unwrap_or_default())
        })
        .collect();
    latencies.sort_unstable();
    let at = |p: f64| nearest_rank(&latencies, p).unwrap_or_default();
    (at(0.50), at(0.99))
}

/// The nearest-rank percentile `p` (0–1) of `sorted` (ascending); `None` when it is empty.
pub fn nearest_rank(sorted: &[Duration], p: f64) -> Option<Duration> {
    let rank = (sorted.len() as f64 * p).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: SinkArgs,
    }

    #[test]
    fn default_matches_the_command_line_defaults() {
        let parsed = Command::try_parse_from(["sink"])
            .expect("defaults parse")
            .args;
        // Debug leaves the secret out (the environment may set SINK_CLIENT_SECRET anyway).
        assert_eq!(format!("{parsed:?}"), format!("{:?}", SinkArgs::default()));
        assert!(!format!("{:?}", SinkArgs::default()).contains("demo-secret"));
    }

    #[test]
    fn rejects_unusable_flag_values() {
        let bad = [
            SinkArgs {
                path: "api".into(),
                ..SinkArgs::default()
            },
            SinkArgs {
                path: TOKEN_PATH.into(),
                ..SinkArgs::default()
            },
            SinkArgs {
                fail_rate: 1.5,
                ..SinkArgs::default()
            },
            SinkArgs {
                fail_rate: f64::NAN,
                ..SinkArgs::default()
            },
            SinkArgs {
                fail_status: 200,
                ..SinkArgs::default()
            },
            SinkArgs {
                token_lifetime: Duration::ZERO,
                ..SinkArgs::default()
            },
        ];
        for args in bad {
            assert!(
                matches!(check_args(&args), Err(SinkError::InvalidArgs(_))),
                "{args:?}"
            );
        }
        assert!(check_args(&SinkArgs::default()).is_ok());
    }
}
