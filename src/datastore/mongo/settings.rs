//! How to reach MongoDB: NVSentinel's `MONGODB_*` environment (the chart's datastore ConfigMap,
//! `MONGODB_URI` possibly from a Secret) and the client-certificate mount.
//!
//! Source: `store-client/pkg/config/env_loader.go` and `pkg/datastore/config.go` upstream
//! (`../shared/reference/nvsentinel-datastore.md` §4.1, §4.3, §6).

use std::time::Duration;

use mongodb::options::ClientOptions;

/// Defaults of NVSentinel's chart and store-client.
pub const DEFAULT_URI: &str = "mongodb://localhost:27017";
pub const DEFAULT_DATABASE: &str = "nvsentinel";
pub const DEFAULT_COLLECTION: &str = "HealthEvents";
pub const DEFAULT_TOKEN_COLLECTION: &str = "ResumeTokens";

/// Why the MongoDB environment cannot be used; every variant names the variable or file.
#[derive(Debug, thiserror::Error)]
pub enum MongoSettingsError {
    #[error("{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("MONGODB_URI: {0}")]
    Uri(#[source] mongodb::error::Error),
}

/// Everything the exporter needs to open its MongoDB client.
#[derive(Debug, Clone)]
pub struct MongoSettings {
    /// `MONGODB_URI` (may carry credentials: never logged as is, see [`MongoSettings::describe`]).
    pub uri: String,
    /// `MONGODB_DATABASE_NAME`: holds the health events and the resume tokens.
    pub database: String,
    /// `MONGODB_COLLECTION_NAME` (`HealthEvents`).
    pub collection: String,
    /// `MONGODB_TOKEN_COLLECTION_NAME` (`ResumeTokens`).
    pub token_collection: String,
    /// `APP_NAME`: the driver's app name (shown in the server's logs and `currentOp`).
    pub app_name: Option<String>,
    /// Server selection and connect timeout (`MONGODB_PING_TIMEOUT_TOTAL_SECONDS`, 30 s).
    pub ping_timeout: Duration,
}

impl MongoSettings {
    /// Reads the variables through `get` (normally `std::env::var`); blank counts as unset.
    pub fn from_env(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<MongoSettings, MongoSettingsError> {
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let seconds = |name: &'static str, default: u64| -> Result<Duration, MongoSettingsError> {
            match var(name) {
                None => Ok(Duration::from_secs(default)),
                Some(text) => match text.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
                    _ => Err(MongoSettingsError::Invalid {
                        name,
                        reason: format!("{text:?} is not a positive number of seconds"),
                    }),
                },
            }
        };
        Ok(MongoSettings {
            uri: var("MONGODB_URI").unwrap_or_else(|| DEFAULT_URI.into()),
            database: var("MONGODB_DATABASE_NAME")
                .or_else(|| var("DATASTORE_DATABASE"))
                .unwrap_or_else(|| DEFAULT_DATABASE.into()),
            collection: var("MONGODB_COLLECTION_NAME").unwrap_or_else(|| DEFAULT_COLLECTION.into()),
            token_collection: var("MONGODB_TOKEN_COLLECTION_NAME")
                .unwrap_or_else(|| DEFAULT_TOKEN_COLLECTION.into()),
            app_name: var("APP_NAME"),
            ping_timeout: seconds("MONGODB_PING_TIMEOUT_TOTAL_SECONDS", 30)?,
        })
    }

    /// `host/database.collection` without credentials, for logs.
    pub fn describe(&self) -> String {
        let hosts = self
            .uri
            .split_once("://")
            .map(|(_, rest)| rest)
            .unwrap_or(&self.uri);
        let hosts = hosts.rsplit_once('@').map(|(_, h)| h).unwrap_or(hosts);
        let hosts = hosts.split(['/', '?']).next().unwrap_or_default();
        format!("mongodb {hosts}/{}.{}", self.database, self.collection)
    }

    /// The driver's options: the URI (with `mongodb+srv://` resolved), the app name and the
    /// timeouts.
    pub async fn client_options(&self) -> Result<ClientOptions, MongoSettingsError> {
        let mut options = ClientOptions::parse(&self.uri)
            .await
            .map_err(MongoSettingsError::Uri)?;
        if let Some(app_name) = &self.app_name {
            options.app_name = Some(app_name.clone());
        }
        options.server_selection_timeout = Some(self.ping_timeout);
        options.connect_timeout = Some(self.ping_timeout.min(Duration::from_secs(10)));
        Ok(options)
    }
}
