//! The metrics-port HTTP server: `/healthz` (liveness: the exporter's loops are running *and*
//! making progress — see `crate::watchdog` for the exact rule), `/readyz` (the datastore is
//! reachable and the stream is running) and `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

/// What the probes report, updated by the exporter's loops.
#[derive(Default)]
pub struct Status {
    /// The stream loops are running (liveness; stays true through retries and backfill).
    running: AtomicBool,
    /// The last changelog read reached the datastore.
    datastore_up: Arc<AtomicBool>,
    /// A standby waiting for the leadership lock (issue 16): alive, never ready.
    standby: AtomicBool,
}

impl Status {
    pub fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::Relaxed);
    }
    /// The flag the changelog reader keeps up to date.
    pub fn datastore_flag(&self) -> Arc<AtomicBool> {
        self.datastore_up.clone()
    }
    pub fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::Relaxed);
    }
    pub fn alive(&self) -> bool {
        self.running.load(Ordering::Relaxed) || self.standby.load(Ordering::Relaxed)
    }
    pub fn ready(&self) -> bool {
        self.running.load(Ordering::Relaxed) && self.datastore_up.load(Ordering::Relaxed)
    }
}

/// Binds the metrics port now (a bind failure is a start-up error, not ignored as upstream
/// does) and serves until `shutdown`.
pub async fn start(
    port: u16,
    status: Arc<Status>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), std::io::Error> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    let address = listener.local_addr()?;
    let health = status.clone();
    let app = Router::new()
        .route(
            "/healthz",
            get(move || async move { liveness(health.alive()) }),
        )
        .route("/readyz", get(move || async move { probe(status.ready()) }))
        .route("/metrics", get(metrics));
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "metrics server failed");
        }
    });
    Ok((address, task))
}

/// `/healthz`: 200 while the loops run and the watchdog sees progress (or nothing to do);
/// 503 with the reason otherwise.
fn liveness(running: bool) -> axum::response::Response {
    use crate::watchdog::Verdict;
    if !running {
        return probe(false).into_response();
    }
    match crate::watchdog::global().verdict() {
        Verdict::Idle | Verdict::Progressing { .. } => probe(true).into_response(),
        Verdict::Stalled { pending, since } => {
            tracing::error!(
                pending,
                no_progress_for = ?since,
                "liveness: events are pending and nothing progressed for exporter.liveness_timeout; failing /healthz"
            );
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "stalled: {pending} events pending, no progress for {}s",
                    since.as_secs()
                ),
            )
                .into_response()
        }
        Verdict::Dead(reason) => {
            tracing::error!(%reason, "liveness: a background task died; failing /healthz");
            (StatusCode::SERVICE_UNAVAILABLE, format!("dead: {reason}")).into_response()
        }
    }
}

fn probe(ok: bool) -> impl IntoResponse {
    if ok {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::get().encode(),
    )
}
