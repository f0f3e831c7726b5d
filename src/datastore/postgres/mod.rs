//! NVSentinel's PostgreSQL datastore: the `datastore_changelog` feed (read gaplessly, see
//! `changelog`), LISTEN/NOTIFY wake-ups, and the `resume_tokens` row.

mod backfill;
mod changelog;
mod holes;
mod json_text;
mod listener;
pub(crate) mod lock;
pub(crate) mod reset;
pub(crate) mod settings;
mod start;
mod token;

pub(crate) use changelog::{describe_conversion, ChangelogReader, FreshStart};
pub use changelog::{read_new_sql, reread_holes_sql};
pub(crate) use listener::spawn_listener;
pub use settings::{PgSettings, PgSettingsError, SslMode};
pub(crate) use start::start;
pub use token::{StartPoint, TokenStore};

use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::DatastoreError;

/// NOTIFY channel NVSentinel's changelog trigger signals on every change.
pub const NOTIFY_CHANNEL: &str = "nvsentinel_changes";

/// Opens connections with the configured settings and TLS. Clones share one
/// `reset::PositionMap`, so the changelog reader and the `TokenStore` opened from the same
/// connector agree on what a checkpoint position means after a changelog reset.
#[derive(Clone)]
pub struct Connector {
    settings: PgSettings,
    tls: MakeRustlsConnect,
    positions: std::sync::Arc<reset::PositionMap>,
}

pub type PgConnection = Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

impl Connector {
    pub fn new(settings: PgSettings) -> Result<Connector, DatastoreError> {
        let tls = settings.tls_connector()?;
        Ok(Connector {
            settings,
            tls,
            positions: Default::default(),
        })
    }

    /// Positions versus changelog ids across resets (shared by clones).
    pub fn positions(&self) -> &reset::PositionMap {
        &self.positions
    }

    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    /// A connection whose driver the caller runs (needed to receive notifications).
    pub async fn connect_raw(&self) -> Result<(Client, PgConnection), DatastoreError> {
        Ok(self
            .settings
            .driver_config()
            .connect(self.tls.clone())
            .await?)
    }

    /// A client whose connection is driven by a background task.
    pub async fn connect(&self) -> Result<Client, DatastoreError> {
        let (client, connection) = self.connect_raw().await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "PostgreSQL connection closed");
            }
        });
        Ok(client)
    }

    /// A client (driven by a background task) whose driver configuration `tune` adjusts first
    /// (the leadership lock session sets short TCP keepalives this way).
    pub async fn connect_tuned(
        &self,
        tune: impl FnOnce(&mut tokio_postgres::Config),
    ) -> Result<Client, DatastoreError> {
        let mut config = self.settings.driver_config();
        tune(&mut config);
        let (client, connection) = config.connect(self.tls.clone()).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "PostgreSQL lock connection closed");
            }
        });
        Ok(client)
    }

    /// Fails with a message pointing at NVSentinel's migrations when the schema is missing.
    /// The exporter never runs DDL itself.
    pub async fn check_schema(&self, client: &Client) -> Result<(), DatastoreError> {
        let row = client
            .query_one(
                "SELECT to_regclass('datastore_changelog') IS NOT NULL, \
                        to_regclass('health_events') IS NOT NULL, \
                        to_regclass('resume_tokens') IS NOT NULL",
                &[],
            )
            .await?;
        let missing: Vec<&str> = ["datastore_changelog", "health_events", "resume_tokens"]
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !row.get::<_, bool>(*i))
            .map(|(_, name)| name)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(DatastoreError::Schema(format!(
            "database {} has no NVSentinel schema (missing table{} {}). Apply NVSentinel's \
             PostgreSQL migrations first (distros/kubernetes/nvsentinel/files/postgresql-migrations, \
             run by the chart's postgresql-migrations Job); the exporter never creates tables",
            self.settings.describe(),
            if missing.len() > 1 { "s" } else { "" },
            missing.join(", ")
        )))
    }
}
