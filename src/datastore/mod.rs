//! Where health events come from. A datastore hands the pipeline a dense sequence of
//! positions: every position is reported exactly once, either carrying an event to export or
//! saying it needs nothing (another table, an update, a rolled-back id). Because the sequence
//! is dense, the pipeline can advance the resume token over the contiguous prefix of finished
//! positions and never past one it has not seen.

pub mod mongo;
pub mod postgres;
pub mod start;

use chrono::{DateTime, Utc};

/// One resolved position of the change feed.
#[derive(Debug, Clone)]
pub struct Change {
    /// Dense, increasing position (the PostgreSQL changelog id).
    pub position: u64,
    /// The last position this change covers: equal to `position`, except for a span of ids
    /// that were never committed (a sequence jump can leave millions).
    pub through: u64,
    /// When the change was written (changelog `changed_at`), when known; goes into the token.
    pub changed_at: Option<DateTime<Utc>>,
    /// Where a restart resumes once this position and every one before it are finished, when
    /// the position itself is not enough (a MongoDB change stream's resume token: the event's
    /// own `_id`). The sequence tracker carries it into the checkpoint, so no side map
    /// translates positions into tokens.
    pub resume: Option<ResumePoint>,
    pub kind: ChangeKind,
}

/// A backend's own resume point, carried through the pipeline with the position.
#[derive(Debug, Clone, PartialEq)]
pub enum ResumePoint {
    /// A MongoDB change-stream resume token (`{_data: "<hex>"}`), the event's own `_id`.
    ChangeStream(mongodb::bson::Document),
    /// A backfill row's `(created_at, id)` keyset position.
    Keyset(crate::backfill::Cursor),
}

impl Change {
    pub fn new(position: u64, changed_at: Option<DateTime<Utc>>, kind: ChangeKind) -> Change {
        Change {
            position,
            through: position,
            changed_at,
            resume: None,
            kind,
        }
    }

    /// The change with the resume point a restart continues from once it is finished.
    pub fn resuming_at(mut self, resume: ResumePoint) -> Change {
        self.resume = Some(resume);
        self
    }

    /// The event this change carries for delivery; `None` for a skip.
    pub fn event(&self) -> Option<&RawEvent> {
        match &self.kind {
            ChangeKind::Event(event) => Some(event),
            ChangeKind::Skip(_) => None,
        }
    }

    /// Positions `first..=last`, none of which needs anything.
    pub fn skip_span(first: u64, last: u64, reason: SkipReason) -> Change {
        Change {
            position: first,
            through: last,
            changed_at: None,
            resume: None,
            kind: ChangeKind::Skip(reason),
        }
    }
}

#[derive(Debug, Clone)]
pub enum ChangeKind {
    /// A new health event to export.
    Event(RawEvent),
    /// Nothing to export at this position; it only has to be passed over.
    Skip(SkipReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// A change to another table, or an UPDATE/DELETE.
    NotAHealthEventInsert,
    /// The id was never committed (rolled back, or a sequence value that was never used).
    NeverCommitted,
    /// Committed before this exporter's starting point (a backfill's domain, if enabled).
    BeforeStart,
    /// Ids of a changelog whose ids were reset (see `postgres::reset`): never to be read.
    ChangelogReset,
    /// A health-event row the driver cannot decode (logged with its changelog id and counted
    /// as `skipped{reason="undecodable"}` where it was found).
    Undecodable,
    /// A document a MongoDB recovery backfill already delivered, seen again on the new change
    /// stream (counted as `skipped{reason="already_exported"}`).
    AlreadyExported,
}

/// A health event as stored, not yet decoded.
#[derive(Debug, Clone)]
pub struct RawEvent {
    /// The `health_events.id` UUID: the CloudEvent id, stable across redeliveries.
    pub record_id: String,
    /// The stored document (`createdAt`, `healthevent`, `healtheventstatus`), decoded by the
    /// worker that delivers it (`model::decode`).
    pub document: crate::model::Document,
    /// The row's `created_at`, used for `time` when the event has no `generatedTimestamp`.
    pub created_at: Option<DateTime<Utc>>,
}

/// How far the exporter has got: every position up to and including `position` is finished.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub position: u64,
    pub changed_at: Option<DateTime<Utc>>,
    /// The resume point of the newest finished position that had one (see `Change::resume`).
    pub resume: Option<ResumePoint>,
}

#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("datastore settings: {0}")]
    PgSettings(#[from] postgres::PgSettingsError),
    #[error("datastore settings: DATASTORE_PROVIDER is set but is not valid UTF-8")]
    ProviderNotUtf8,
    #[error(
        "datastore settings: DATASTORE_PROVIDER={value:?} is not supported (use mongodb or \
         postgresql)"
    )]
    ProviderUnsupported { value: String },
    #[error("{0}")]
    Schema(String),
    #[error("resume token for client {client:?} is unusable: {reason}")]
    Token { client: String, reason: String },
    #[error("PostgreSQL: {}", describe_postgres_error(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("PostgreSQL TLS setup: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("changelog row {id}: {reason}")]
    Row { id: i64, reason: String },
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("MongoDB settings: {0}")]
    MongoSettings(#[from] mongo::MongoSettingsError),
    /// An operation that did not answer in time (transient).
    #[error("{0}")]
    Timeout(String),
}

/// Whether retrying can help with a [`DatastoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Later, the same request can succeed (a lost connection, a primary stepping down).
    Transient,
    /// The deployment is wrong (settings, credentials, a missing table or collection):
    /// an operator must change something.
    Configuration,
    /// Neither: the data or the server refuses it for good (an unreadable token).
    Permanent,
}

impl std::fmt::Display for Retry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Retry::Transient => "transient",
            Retry::Configuration => "configuration",
            Retry::Permanent => "permanent",
        })
    }
}

/// PostgreSQL SQLSTATEs an operator fixes: bad password or role, no such database, no
/// privilege, no such table.
const PG_CONFIGURATION_STATES: &[&str] = &["28000", "28P01", "3D000", "42501", "42P01"];

/// MongoDB codes an operator fixes: authentication failed, unauthorized, no such namespace.
const MONGO_CONFIGURATION_CODES: &[i32] = &[18, 13, 26, 11];

impl DatastoreError {
    /// Whether retrying can help, and if not, whether the deployment must change.
    pub fn retry(&self) -> Retry {
        if self.is_transient() {
            return Retry::Transient;
        }
        match self {
            DatastoreError::PgSettings(_)
            | DatastoreError::ProviderNotUtf8
            | DatastoreError::ProviderUnsupported { .. }
            | DatastoreError::MongoSettings(_)
            | DatastoreError::Tls(_)
            | DatastoreError::Schema(_) => Retry::Configuration,
            DatastoreError::Postgres(error)
                if error
                    .code()
                    .is_some_and(|c| PG_CONFIGURATION_STATES.contains(&c.code())) =>
            {
                Retry::Configuration
            }
            DatastoreError::Mongo(error) => match error.kind.as_ref() {
                mongodb::error::ErrorKind::Authentication { .. } => Retry::Configuration,
                mongodb::error::ErrorKind::Command(c)
                    if MONGO_CONFIGURATION_CODES.contains(&c.code) =>
                {
                    Retry::Configuration
                }
                _ => Retry::Permanent,
            },
            _ => Retry::Permanent,
        }
    }

    /// Whether retrying later can help (a lost connection, a server starting or shutting down,
    /// too many connections), as opposed to a mistake that retrying cannot fix (a missing table,
    /// a wrong password, no such database).
    pub fn is_transient(&self) -> bool {
        if let DatastoreError::Mongo(error) = self {
            return mongo::is_transient(error);
        }
        if let DatastoreError::Timeout(_) = self {
            return true;
        }
        let DatastoreError::Postgres(error) = self else {
            return false;
        };
        match error.code() {
            // No SQLSTATE: I/O, a closed connection, TLS, a timeout.
            None => true,
            Some(state) => {
                let code = state.code();
                code.starts_with("08") // connection exception
                    || code.starts_with("53") // insufficient resources
                    || code.starts_with("57P") // admin/crash shutdown, cannot connect now
                    || code == "40001" // serialization failure
                    || code == "40P01" // deadlock detected
            }
        }
    }
}

/// tokio-postgres prints only the kind of an error ("db error"); the reason is in the server's
/// message or the error's sources.
pub fn describe_postgres_error(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" ({detail})"));
        }
        return text;
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A feed of changes with dense positions (see the module docs).
pub trait ChangeSource: Send + 'static {
    /// Every position at or below this one was finished before the source started.
    fn start_position(&self) -> u64;
    /// The next decided changes; waits while there are none. `None` means the source is
    /// finished (a backfill); a stream never finishes. Connection failures are retried inside;
    /// an error means retrying cannot help.
    fn next_batch(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Option<Vec<Change>>, DatastoreError>> + Send;
}

/// Where the checkpoint (resume token) is kept.
pub trait CheckpointStore: Send + Sync + 'static {
    fn save(
        &self,
        checkpoint: &Checkpoint,
    ) -> impl std::future::Future<Output = Result<(), DatastoreError>> + Send;
}

/// Which datastore the exporter reads, from `DATASTORE_PROVIDER` as upstream: `mongodb` or
/// unset → MongoDB (the chart's default), `postgresql` → PostgreSQL.
#[derive(Debug, Clone)]
pub enum DatastoreSettings {
    Postgres(postgres::PgSettings),
    Mongo(mongo::MongoSettings),
}

impl DatastoreSettings {
    /// Reads the process environment; a variable set but not UTF-8 is an error naming it.
    pub fn from_process_env() -> Result<DatastoreSettings, DatastoreError> {
        match std::env::var("DATASTORE_PROVIDER") {
            Err(std::env::VarError::NotUnicode(_)) => Err(DatastoreError::ProviderNotUtf8),
            Ok(value) if is_postgres(&value) => Ok(DatastoreSettings::Postgres(
                postgres::PgSettings::from_process_env()?,
            )),
            _ => DatastoreSettings::from_env(|name| std::env::var(name).ok()),
        }
    }

    /// Reads the variables through `get`.
    pub fn from_env(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<DatastoreSettings, DatastoreError> {
        let provider = get("DATASTORE_PROVIDER").unwrap_or_default();
        match provider.trim() {
            "" | "mongodb" | "mongo" => Ok(DatastoreSettings::Mongo(
                mongo::MongoSettings::from_env(get)?,
            )),
            value if is_postgres(value) => Ok(DatastoreSettings::Postgres(
                postgres::PgSettings::from_env(get)?,
            )),
            other => Err(DatastoreError::ProviderUnsupported {
                value: other.to_string(),
            }),
        }
    }

    /// Where the exporter reads from, without credentials (for logs).
    pub fn describe(&self) -> String {
        match self {
            DatastoreSettings::Postgres(settings) => settings.describe(),
            DatastoreSettings::Mongo(settings) => settings.describe(),
        }
    }
}

fn is_postgres(provider: &str) -> bool {
    matches!(provider.trim(), "postgresql" | "postgres")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_whether_retrying_can_help() {
        let io = mongodb::error::Error::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert_eq!(DatastoreError::Mongo(io).retry(), Retry::Transient);
        assert_eq!(
            DatastoreError::from(postgres::PgSettingsError::Missing {
                name: "DATASTORE_USERNAME"
            })
            .retry(),
            Retry::Configuration
        );
        assert_eq!(
            DatastoreError::Schema("no collection".into()).retry(),
            Retry::Configuration
        );
        let token = DatastoreError::Token {
            client: "event-exporter".into(),
            reason: "garbage".into(),
        };
        assert_eq!(token.retry(), Retry::Permanent);
        assert_eq!(Retry::Configuration.to_string(), "configuration");
    }
}
