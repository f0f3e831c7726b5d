//! Leadership at run time (issue 16): wait as a standby until this replica holds the advisory
//! lock, then keep proving it every second; the rules are `crate::leadership`, the lock session
//! `crate::datastore::postgres::lock`.
//!
//! Invariant: **nothing is published and no resume token is written unless the process-wide
//! [`Gate`] says this replica leads now** (a proof younger than [`LEASE`]). Publishes wait on
//! the gate before every attempt; token writes go through the [`Fence`], on the lock session,
//! guarded in SQL by the lock itself.
//!
//! Losing the lock session while leading (a dropped connection, a PostgreSQL restart) closes the
//! gate at once and re-opens a session. If this replica gets the lock back and every token row
//! it wrote is still as it left it, no other replica has moved anything meanwhile, and it
//! carries on (a single replica rides out datastore outages as before). Otherwise another
//! replica leads or led: this one exits with status 1 so that Kubernetes restarts it — it then
//! comes back as a standby and, when it leads again, starts from the stored resume token.
//!
//! MongoDB (`crate::datastore::mongo::lease`) feeds the same [`Gate`] from a lease document
//! renewed every [`CHECK_INTERVAL`], shares the standby loop ([`wait_as_standby`]) and is handed
//! over through [`Release`].
//!
//! Without `run` (the unit tests, the dev tools) the gate is open: leadership only applies to
//! the exporter's main job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::datastore::postgres::lock::LockSession;
use crate::datastore::postgres::Connector;
use crate::datastore::DatastoreError;
use crate::leadership::{Identity, Lease, Observation, Transition};

/// How often standbys try the lock and the leader proves it holds it.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long one proof lets the leader publish (three checks).
pub const LEASE: Duration = Duration::from_secs(3);
/// A check that takes longer counts as a lost session.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The process-wide answer to "may this replica publish now?".
pub struct Gate {
    enforced: std::sync::atomic::AtomicBool,
    lease: Mutex<Lease>,
    leading: watch::Sender<bool>,
}

/// The process's gate.
pub fn gate() -> &'static Gate {
    static GATE: OnceLock<Gate> = OnceLock::new();
    GATE.get_or_init(|| Gate {
        enforced: Default::default(),
        lease: Mutex::new(Lease::new(LEASE)),
        leading: watch::Sender::new(false),
    })
}

impl Gate {
    /// Whether publishing is allowed now: always when leadership is not enforced, otherwise
    /// only with a fresh proof.
    pub fn may_act(&self) -> bool {
        if !self.enforced.load(std::sync::atomic::Ordering::Acquire) {
            return true;
        }
        match self.lease.lock() {
            Ok(lease) => lease.may_act(Instant::now()),
            Err(_) => false,
        }
    }

    /// Waits until `may_act`; re-checks at least every check interval (a lease expires without
    /// any event).
    pub async fn leading(&self) {
        let mut changes = self.leading.subscribe();
        while !self.may_act() {
            let _ = tokio::time::timeout(CHECK_INTERVAL, changes.changed()).await;
        }
    }

    /// Applies one observation of this replica's lock or lease (the only way leadership
    /// changes): sets `health_events_exporter_leader` and counts the change.
    pub(crate) fn observe(&self, observation: Observation) -> Transition {
        self.enforced
            .store(true, std::sync::atomic::Ordering::Release);
        let transition = match self.lease.lock() {
            Ok(mut lease) => lease.observe(observation, Instant::now()),
            Err(_) => Transition::Demoted,
        };
        let metrics = crate::metrics::get();
        match transition {
            Transition::Promoted => {
                metrics.leader.set(1);
                metrics.leadership_changes.inc();
                self.leading.send_replace(true);
            }
            Transition::Demoted => {
                metrics.leader.set(0);
                metrics.leadership_changes.inc();
                self.leading.send_replace(false);
            }
            Transition::Stay => {}
        }
        transition
    }
}

/// Resume-token writes of the leader: on the current lock session, only while it holds the
/// lock. Remembers the last value written per row, to tell after a lost session whether
/// another replica wrote meanwhile.
pub struct Fence {
    session: Mutex<Arc<LockSession>>,
    written: Mutex<HashMap<String, Value>>,
}

impl Fence {
    fn current(&self) -> Option<Arc<LockSession>> {
        self.session.lock().ok().map(|s| s.clone())
    }

    /// Writes `client_name`'s row. Errors: `DatastoreError::Token` naming the client when this
    /// replica does not lead now (nothing written), PostgreSQL errors from the lock session.
    pub async fn write(&self, client_name: &str, value: &Value) -> Result<(), DatastoreError> {
        let not_leader = |why: &str| DatastoreError::Token {
            client: client_name.to_string(),
            reason: format!("not written: this replica {why}"),
        };
        if !gate().may_act() {
            return Err(not_leader("cannot prove it leads now"));
        }
        let session = self
            .current()
            .ok_or_else(|| not_leader("has no lock session"))?;
        if !session.write_token(client_name, value).await? {
            return Err(not_leader("does not hold the leadership lock"));
        }
        if let Ok(mut written) = self.written.lock() {
            written.insert(client_name.to_string(), value.clone());
        }
        Ok(())
    }

    fn written(&self) -> Vec<(String, Value)> {
        self.written
            .lock()
            .map(|w| w.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}

/// This replica's leadership: the fence for token writes and the task that keeps proving it.
pub struct Leadership {
    pub fence: Arc<Fence>,
    key: i64,
    identity: Identity,
    connector: Connector,
}

/// Why leadership ended the exporter.
#[derive(Debug, thiserror::Error)]
pub enum LeadershipError {
    /// Another replica took the lock or wrote the token while this one could not prove it led.
    #[error("leadership lost to another replica ({0}); exiting so that this replica restarts as a standby from the stored resume token")]
    Lost(String),
}

/// Waits as a standby until this replica holds the lock (or `shutdown`: `None`). Logs who leads
/// while waiting, sets `health_events_exporter_leader`.
pub async fn acquire(
    connector: &Connector,
    key: i64,
    shutdown: &CancellationToken,
) -> Option<Leadership> {
    let identity = Identity::from_process();
    let waited = wait_as_standby(&identity, key, false, shutdown, || {
        open_and_try(connector, key, &identity)
    })
    .await;
    let session = match waited {
        Ok(Some(session)) => session,
        Ok(None) | Err(_) => return None,
    };
    tracing::info!(
        leader = %identity,
        leadership_key = key,
        lock_session_pid = session.pid(),
        "this replica leads: exporting"
    );
    Some(Leadership {
        fence: Arc::new(Fence {
            session: Mutex::new(Arc::new(session)),
            written: Mutex::new(HashMap::new()),
        }),
        key,
        identity,
        connector: connector.clone(),
    })
}

/// One try at the leadership lock or lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder<T> {
    /// This replica got it: the lock session, or `()` for MongoDB's lease.
    Held(T),
    /// Another replica holds it: who, for the log (`host/pid …`).
    Other(String),
}

/// The standby loop every backend shares: calls `try_once` every [`CHECK_INTERVAL`] until it
/// returns what this replica holds (`Ok(Holder::Held(held))`: the gate is then promoted) or
/// `shutdown` (`Ok(None)`). `Ok(Holder::Other(holder))` means another replica leads: logged
/// once per holder.
/// Datastore errors are logged and retried; with `stop_on_permanent`, an error that retrying
/// cannot cure (`DatastoreError::is_transient` false: a missing collection, bad credentials)
/// is returned instead.
pub(crate) async fn wait_as_standby<T, F, Fut>(
    identity: &Identity,
    key: impl tracing::Value + Copy,
    stop_on_permanent: bool,
    shutdown: &CancellationToken,
    mut try_once: F,
) -> Result<Option<T>, DatastoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Holder<T>, DatastoreError>>,
{
    let metrics = crate::metrics::get();
    metrics.leader.set(0);
    let mut announced: Option<String> = None;
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            attempt = try_once() => attempt,
        };
        match attempt {
            Ok(Holder::Held(held)) => {
                gate().observe(Observation::Holds);
                return Ok(Some(held));
            }
            Ok(Holder::Other(holder)) => {
                if announced.as_ref() != Some(&holder) {
                    tracing::info!(
                        replica = %identity,
                        leader = %holder,
                        leadership_key = key,
                        "standby: another replica leads; waiting for the leadership lock"
                    );
                    announced = Some(holder);
                }
            }
            Err(error) if stop_on_permanent && !error.is_transient() => return Err(error),
            Err(error) => {
                tracing::warn!(%error, "standby: cannot reach the datastore to try the leadership lock");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
    }
}

/// Opens a lock session and tries the lock: the session when this replica got it, otherwise
/// who holds it (`host/pid`). A fresh session per try (standbys try once a second) recovers
/// from a dropped connection without extra state; one kept open would save the connects.
async fn open_and_try(
    connector: &Connector,
    key: i64,
    identity: &Identity,
) -> Result<Holder<LockSession>, DatastoreError> {
    let session = LockSession::open(connector, key, &identity.to_string()).await?;
    if session.try_acquire().await? {
        return Ok(Holder::Held(session));
    }
    Ok(Holder::Other(holder(session.client(), key).await))
}

/// `host/pid` of the replica holding the lock, from its lock session's `application_name`.
async fn holder(client: &tokio_postgres::Client, key: i64) -> String {
    let (classid, objid) = crate::leadership::pg_locks_ids(key);
    let query = async {
        let row = client
            .query_opt(
                "SELECT a.application_name, l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND l.classid::text::bigint = $1 AND l.objid::text::bigint = $2 LIMIT 1",
                &[&i64::from(classid), &i64::from(objid)],
            )
            .await?;
        Ok::<_, DatastoreError>(row.map(|r| {
            let name: Option<String> = r.try_get(0).ok().flatten();
            let pid: i32 = r.try_get(1).unwrap_or_default();
            format!(
                "{} (lock session pid {pid})",
                name.unwrap_or_default()
                    .trim_start_matches(crate::datastore::postgres::lock::APPLICATION_NAME_PREFIX)
            )
        }))
    };
    match query.await {
        Ok(Some(holder)) => holder,
        Ok(None) => "nobody (the lock was just released)".to_string(),
        Err(error) => format!("unknown ({error})"),
    }
}

impl Leadership {
    /// Proves the lock every second until `shutdown` (Ok) or until another replica leads or led
    /// (`LeadershipError::Lost`). A lost session closes the gate at once and is re-opened.
    pub async fn keep(&self, shutdown: CancellationToken) -> Result<(), LeadershipError> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            }
            let Some(session) = self.fence.current() else {
                return Err(LeadershipError::Lost("no lock session".into()));
            };
            let observation = match tokio::time::timeout(CHECK_TIMEOUT, session.holds()).await {
                Ok(Ok(true)) => Observation::Holds,
                Ok(Ok(false)) => Observation::HeldElsewhere,
                Ok(Err(_)) | Err(_) => Observation::SessionLost,
            };
            if gate().observe(observation) != Transition::Demoted {
                continue;
            }
            tracing::error!(
                replica = %self.identity,
                ?observation,
                "cannot prove this replica still leads: publishing and token writes stopped"
            );
            self.regain(&shutdown).await?;
        }
    }

    /// After a demotion: gets the lock back on a new session, and keeps leading only if every
    /// token row this replica wrote is unchanged (nobody else wrote meanwhile).
    async fn regain(&self, shutdown: &CancellationToken) -> Result<(), LeadershipError> {
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                result = self.try_regain() => result,
            };
            match result {
                Ok(Regain::Held(session)) => {
                    if let Ok(mut current) = self.fence.session.lock() {
                        *current = session;
                    }
                    gate().observe(Observation::Holds);
                    tracing::info!(replica = %self.identity, "leadership regained: exporting again");
                    return Ok(());
                }
                Ok(Regain::Lost(lost)) => return Err(lost),
                Ok(Regain::OldSessionHolds) => {
                    tracing::warn!(
                        "the previous lock session still holds the lock; waiting for it"
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot reach the datastore to regain the leadership lock");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            }
        }
    }

    /// One try of [`Leadership::regain`]: a session holding the lock, then the written rows
    /// compared.
    async fn try_regain(&self) -> Result<Regain, DatastoreError> {
        let session = match self.session_holding_lock().await? {
            Regain::Held(session) => session,
            other => return Ok(other),
        };
        for (client, value) in self.fence.written() {
            let stored = session.read_token(&client).await?;
            if stored.as_ref() != Some(&value) {
                return Ok(Regain::Lost(LeadershipError::Lost(format!(
                    "row {client:?} of resume_tokens changed while this replica did not lead"
                ))));
            }
        }
        Ok(Regain::Held(session))
    }

    /// The old session when it still holds the lock (a check that only timed out on a loaded
    /// machine: nobody else can have led), else a new one that took it.
    async fn session_holding_lock(&self) -> Result<Regain, DatastoreError> {
        let old = self.fence.current().filter(|old| !old.is_closed());
        if let Some(old) = &old {
            if let Ok(Ok(true)) = tokio::time::timeout(CHECK_TIMEOUT, old.holds()).await {
                return Ok(Regain::Held(old.clone()));
            }
        }
        let session =
            LockSession::open(&self.connector, self.key, &self.identity.to_string()).await?;
        if session.try_acquire().await? {
            return Ok(Regain::Held(Arc::new(session)));
        }
        let own = old.map(|o| o.pid());
        if own.is_some() && session.holder_pid().await? == own {
            // Our previous session still holds it; it will answer or end.
            return Ok(Regain::OldSessionHolds);
        }
        Ok(Regain::Lost(LeadershipError::Lost(format!(
            "the lock is held by {}",
            holder(session.client(), self.key).await
        ))))
    }

    /// Releases the lock (graceful hand-over on SIGTERM: a standby takes over at its next
    /// try, within `CHECK_INTERVAL`).
    pub async fn release(&self) {
        gate().observe(Observation::SessionLost);
        if let Some(session) = self.fence.current() {
            match session.release().await {
                Ok(()) => tracing::info!(replica = %self.identity, "leadership released"),
                Err(error) => {
                    tracing::warn!(%error, "releasing the leadership lock failed; it ends with the session")
                }
            }
        }
    }
}

/// The outcome of one try to get the lock back after a demotion.
enum Regain {
    /// A session holding the lock, every written row unchanged.
    Held(Arc<LockSession>),
    /// Another replica leads or led.
    Lost(LeadershipError),
    /// This replica's previous session still holds the lock: wait for it to answer or end.
    OldSessionHolds,
}

/// A held leadership that a graceful stop hands over (the exporter's supervisor calls it after
/// the final token write): PostgreSQL's advisory lock, MongoDB's lease document.
pub trait Release: Send + Sync {
    /// Closes the gate, then gives the lock or lease up so that a standby leads at its next try.
    fn release(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}

impl Release for Leadership {
    fn release(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(Leadership::release(self))
    }
}

/// Leadership held by this replica and the task that keeps proving it.
pub struct Held {
    leadership: Arc<dyn Release>,
    keeper: tokio::task::JoinHandle<Result<(), LeadershipError>>,
    keeper_stop: CancellationToken,
}

impl Held {
    /// Starts the task that keeps proving `leadership` until the work is over — through the
    /// shutdown grace period too, so the final token write is still allowed.
    pub fn start<L, F>(
        leadership: Arc<L>,
        keep: impl FnOnce(Arc<L>, CancellationToken) -> F,
    ) -> Held
    where
        L: Release + 'static,
        F: std::future::Future<Output = Result<(), LeadershipError>> + Send + 'static,
    {
        let keeper_stop = CancellationToken::new();
        let keeper = tokio::spawn(keep(leadership.clone(), keeper_stop.clone()));
        Held {
            leadership,
            keeper,
            keeper_stop,
        }
    }

    /// The keeper task, its stop switch and the leadership to release after the work (the
    /// exporter's supervision watches the keeper: a lost leadership ends the process).
    #[allow(clippy::type_complexity)]
    pub(crate) fn into_parts(
        self,
    ) -> (
        tokio::task::JoinHandle<Result<(), LeadershipError>>,
        CancellationToken,
        Arc<dyn Release>,
    ) {
        (self.keeper, self.keeper_stop, self.leadership)
    }

    /// Start-up stopped before any work: stop proving and hand the leadership over.
    pub async fn give_up(self) {
        self.keeper_stop.cancel();
        let _ = self.keeper.await;
        self.leadership.release().await;
    }
}
