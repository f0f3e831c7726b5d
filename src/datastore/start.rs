//! Start-up behind the datastore seam: [`DatastoreSettings::start`] picks the backend, waits for
//! leadership, opens the change stream (and the backfill, if one runs) and hands the pipeline
//! what it needs as [`Feeds`] — a stream, a checkpoint store, a backfill — through [`Launch`].
//! The caller (`crate::exporter`) never names a backend.
//!
//! The order every backend keeps: leadership first (a standby opens nothing), then the stream,
//! then the backfill plan, so that the backfill's upper bound is the stream's start and nothing
//! falls between them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ChangeSource, CheckpointStore, DatastoreError, DatastoreSettings};
use crate::backfill::{BackfillProgress, PlanStore};
use crate::config::Config;
use crate::leader::Held;
use crate::server::Status;

/// How long start-up waits for an unreachable datastore before giving up.
pub const STARTUP_WAIT: Duration = Duration::from_secs(60);

/// What every backend's start-up reads: the configuration, SIGTERM/SIGINT, the readiness status.
pub struct Startup<'a> {
    pub config: &'a Config,
    /// Cancelled on SIGTERM/SIGINT: start-up gives up (returns `Ok(None)`) at any wait.
    pub shutdown: &'a CancellationToken,
    /// Standby while waiting for leadership; the stream reports its connection to it.
    pub status: &'a Status,
}

/// What a backend opened for the pipeline: its change stream, where its resume token goes,
/// and the backfill to run beside the stream (its source and its progress record).
pub struct Feeds<S, C, B, P: PlanStore> {
    pub stream: S,
    pub checkpoints: Arc<C>,
    /// Whether a resume token was stored (else the stream started at the head).
    pub had_token: bool,
    pub backfill: Option<(B, Arc<BackfillProgress<P>>)>,
}

/// The background tasks that must live as long as the feeds.
pub struct Background {
    /// A task that must not end while the exporter runs (PostgreSQL's LISTEN, MongoDB's
    /// client-certificate watcher), except after cancelling the shutdown token itself.
    pub listener: Option<JoinHandle<()>>,
    /// The leadership held (PostgreSQL's lock, MongoDB's lease) and the task proving it.
    pub leadership: Held,
}

/// Turns a backend's [`Feeds`] into running work; implemented by the exporter, which owns the
/// pipeline. Generic so each backend keeps its own concrete types (no boxing per event).
pub trait Launch {
    type Running;
    fn launch<S, C, B, P>(&self, feeds: Feeds<S, C, B, P>, background: Background) -> Self::Running
    where
        S: ChangeSource,
        C: CheckpointStore,
        B: ChangeSource,
        P: PlanStore;
}

/// Why start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The datastore environment cannot work as given (exit status 2).
    #[error("{0}")]
    Settings(#[source] DatastoreError),
    /// Leadership could not be awaited (a permanent error from the lease or lock store).
    #[error("cannot take the leadership lease in {datastore}: {source}")]
    Leadership {
        datastore: String,
        source: DatastoreError,
    },
    /// The datastore could not be opened within [`STARTUP_WAIT`], or refused for good.
    #[error("cannot start from datastore {datastore}: {source}")]
    Open {
        datastore: String,
        source: DatastoreError,
    },
}

impl StartError {
    /// Whether an operator must change the deployment (exit status 2 rather than 1).
    pub fn is_configuration(&self) -> bool {
        matches!(self, StartError::Settings(_))
    }
}

impl DatastoreSettings {
    /// Starts the backend these settings name and launches its feeds. `Ok(None)` when a
    /// shutdown came first (as a standby, or while the datastore was not reachable yet).
    pub async fn start<L: Launch>(
        self,
        startup: &Startup<'_>,
        launch: &L,
    ) -> Result<Option<L::Running>, StartError> {
        match self {
            DatastoreSettings::Postgres(settings) => {
                super::postgres::start(settings, startup, launch).await
            }
            DatastoreSettings::Mongo(settings) => {
                super::mongo::start(settings, startup, launch).await
            }
        }
    }
}

/// Runs `attempt` until it succeeds, fails with a non-transient error, or [`STARTUP_WAIT`]
/// passes, backing off between tries. `None` on `shutdown`.
pub(crate) async fn open_patiently<T, F, Fut>(
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Option<Result<T, DatastoreError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DatastoreError>>,
{
    let deadline = crate::clock::deadline_after(STARTUP_WAIT);
    let mut backoff =
        crate::reconnect::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return None,
            result = attempt() => result,
        };
        match result {
            Err(error) if error.is_transient() && tokio::time::Instant::now() < deadline => {
                let wait = backoff.failed(tokio::time::Instant::now());
                tracing::warn!(%error, retry_in = ?wait, "datastore not reachable yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(error) => {
                tracing::error!(retry = %error.retry(), "cannot start from the datastore");
                return Some(Err(error));
            }
            Ok(opened) => return Some(Ok(opened)),
        }
    }
}

/// What [`open_patiently`] gave, with the leadership handed over when start-up ends here:
/// `Ok(None)` on shutdown, `StartError::Open` naming `datastore` on failure.
pub(crate) async fn opened_or_give_up<T>(
    opened: Option<Result<T, DatastoreError>>,
    held: Held,
    datastore: impl FnOnce() -> String,
) -> Result<Option<(T, Held)>, StartError> {
    match opened {
        Some(Ok(opened)) => Ok(Some((opened, held))),
        None => {
            held.give_up().await;
            Ok(None)
        }
        Some(Err(source)) => {
            held.give_up().await;
            Err(StartError::Open {
                datastore: datastore(),
                source,
            })
        }
    }
}
