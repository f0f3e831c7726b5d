//! The leadership lock session (issue 16): one dedicated PostgreSQL connection per replica that
//! tries, holds and checks the session-level advisory lock `crate::leadership::lock_key`.
//!
//! Invariant: the lock lives exactly as long as this session. PostgreSQL releases a
//! session-level advisory lock when the session ends — the process killed (`kill -9` closes the
//! socket), the connection cut (the short TCP keepalives and `tcp_user_timeout` set here make a
//! dead peer visible within seconds), or the process paused (the session's
//! `idle_session_timeout` ends it when the paused holder stops checking). A standby polling
//! `pg_try_advisory_lock` then gets it.
//!
//! Fencing: the resume token is written **on the lock session itself**, in a statement that
//! also requires the lock to be held by that session ([`LockSession::write_token`]). A write
//! either commits while the session (and so the lock) is alive — before any standby can take
//! the lock and read the token — or is aborted with the session. So a replica that lost the
//! lock can never move the token, backwards or past an event; the token row format is
//! unchanged.

use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Client;

use super::Connector;
use crate::datastore::DatastoreError;

/// TCP keepalive idle time, interval and probe count of the lock session: a silent peer is
/// noticed after about 1 + 3 × 1 s.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
pub const KEEPALIVE_RETRIES: u32 = 3;
/// Unacknowledged data on the lock session fails the connection after this long.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(4);
/// PostgreSQL ends a lock session idle for longer (a paused holder), releasing the lock.
/// Holders and standbys query it every second, so a live replica never reaches it.
pub const IDLE_SESSION_TIMEOUT: &str = "4s";

/// "Does this session hold the lock now?": the advisory lock row of `pg_locks` for this
/// database, key halves `$1` (classid) and `$2` (objid), granted to this backend.
const HOLDS_LOCK: &str = "EXISTS (SELECT 1 FROM pg_locks \
     WHERE locktype = 'advisory' \
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
       AND classid::text::bigint = $1 AND objid::text::bigint = $2 AND objsubid = 1 \
       AND pid = pg_backend_pid() AND granted)";

/// The fenced resume-token upsert: same row format as `TokenStore::save_value`, written only
/// while the writing session holds the lock (`$3`, `$4`: the key's `pg_locks` halves).
pub const FENCED_TOKEN_WRITE: &str =
    "INSERT INTO resume_tokens (client_name, resume_token, last_updated) \
     SELECT $1::text, $2::jsonb, NOW() WHERE EXISTS (SELECT 1 FROM pg_locks \
     WHERE locktype = 'advisory' \
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
       AND classid::text::bigint = $3 AND objid::text::bigint = $4 AND objsubid = 1 \
       AND pid = pg_backend_pid() AND granted) \
     ON CONFLICT (client_name) DO UPDATE \
     SET resume_token = EXCLUDED.resume_token, last_updated = NOW()";

/// The lock session's `application_name` is this prefix plus the replica's `host/pid`, so
/// standbys (and operators, in `pg_stat_activity`) can see who leads.
pub const APPLICATION_NAME_PREFIX: &str = "event-exporter-leader ";

/// One replica's lock connection.
pub struct LockSession {
    client: Client,
    key: i64,
    classid: i64,
    objid: i64,
    pid: i32,
}

impl LockSession {
    /// Opens the dedicated connection (short keepalives, `tcp_user_timeout`, and
    /// `idle_session_timeout` where the server has it: PostgreSQL 14+; older servers only log a
    /// warning, and a paused holder then keeps the lock until it resumes and steps down).
    /// Errors: connection errors (transient, see `DatastoreError::is_transient`).
    pub async fn open(
        connector: &Connector,
        key: i64,
        replica: &str,
    ) -> Result<LockSession, DatastoreError> {
        let application_name = format!("{APPLICATION_NAME_PREFIX}{replica}");
        let client = connector
            .connect_tuned(|config| {
                config
                    .application_name(&application_name)
                    .keepalives(true)
                    .keepalives_idle(KEEPALIVE)
                    .keepalives_interval(KEEPALIVE)
                    .keepalives_retries(KEEPALIVE_RETRIES)
                    .tcp_user_timeout(TCP_USER_TIMEOUT);
            })
            .await?;
        if let Err(error) = client
            .batch_execute(&format!(
                "SET idle_session_timeout = '{IDLE_SESSION_TIMEOUT}'"
            ))
            .await
        {
            tracing::warn!(
                error = %crate::datastore::describe_postgres_error(&error),
                "the server has no idle_session_timeout (PostgreSQL < 14): a paused leader keeps \
                 the lock until it resumes"
            );
        }
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        let (classid, objid) = crate::leadership::pg_locks_ids(key);
        Ok(LockSession {
            client,
            key,
            classid: i64::from(classid),
            objid: i64::from(objid),
            pid,
        })
    }

    /// The session's client (for read-only catalog queries such as "who holds the lock").
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The session's backend pid (`pg_locks.pid` of the held lock).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the connection is closed (the lock is then released or about to be).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// `pg_try_advisory_lock(key)`: true when this session holds the lock now (also when it
    /// already held it: session locks stack, and [`LockSession::release`] drops them all).
    pub async fn try_acquire(&self) -> Result<bool, DatastoreError> {
        let row = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&self.key])
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Whether this session holds the lock (one cheap catalog query; an error means the
    /// session is lost).
    pub async fn holds(&self) -> Result<bool, DatastoreError> {
        let row = self
            .client
            .query_one(
                &format!("SELECT {HOLDS_LOCK}"),
                &[&self.classid, &self.objid],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// The backend pid of the session holding the lock now, if any.
    pub async fn holder_pid(&self) -> Result<Option<i32>, DatastoreError> {
        let row = self
            .client
            .query_opt(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND classid::text::bigint = $1 AND objid::text::bigint = $2 AND objsubid = 1 \
                 LIMIT 1",
                &[&self.classid, &self.objid],
            )
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Releases every hold of the lock by this session (graceful hand-over on SIGTERM).
    pub async fn release(&self) -> Result<(), DatastoreError> {
        self.client
            .execute("SELECT pg_advisory_unlock_all()", &[])
            .await?;
        Ok(())
    }

    /// Reads `client_name`'s resume-token row on the lock session (`None`: no row).
    pub async fn read_token(&self, client_name: &str) -> Result<Option<Value>, DatastoreError> {
        let row = self
            .client
            .query_opt(
                "SELECT resume_token FROM resume_tokens WHERE client_name = $1",
                &[&client_name],
            )
            .await?;
        match row {
            None => Ok(None),
            Some(row) => Ok(row.try_get(0)?),
        }
    }

    /// Writes `value` as `client_name`'s resume-token row, only while this session holds the
    /// lock. Returns false (nothing written) when it does not: the caller is no longer leader.
    pub async fn write_token(
        &self,
        client_name: &str,
        value: &Value,
    ) -> Result<bool, DatastoreError> {
        let written = self
            .client
            .execute(
                FENCED_TOKEN_WRITE,
                &[&client_name, value, &self.classid, &self.objid],
            )
            .await?;
        Ok(written > 0)
    }
}
