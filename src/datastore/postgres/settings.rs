//! How to reach PostgreSQL: NVSentinel's `DATASTORE_*` environment (the chart's datastore
//! ConfigMap and client-certificate mount), with libpq's TLS modes.

use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio_postgres::config::SslMode as WireSslMode;

use crate::datastore::DatastoreError;
use crate::tls::{self, Verification};

/// Where NVSentinel's chart mounts the PostgreSQL client certificate.
pub const DEFAULT_CERT_MOUNT_PATH: &str = "/etc/ssl/client-certs";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PgSettings {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    #[serde(serialize_with = "redact")]
    pub password: Option<String>,
    pub sslmode: SslMode,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub sslrootcert: Option<PathBuf>,
}

fn redact<S: serde::Serializer>(value: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

fn settings_error(message: impl Into<String>) -> DatastoreError {
    DatastoreError::Settings(message.into())
}

impl PgSettings {
    /// Reads NVSentinel's datastore variables from the process environment. A variable that is
    /// set but not UTF-8 is an error naming it (`std::env::var(..).ok()` would read it as unset:
    /// a password silently dropped, a host silently defaulted).
    pub fn from_process_env() -> Result<PgSettings, DatastoreError> {
        let not_utf8 = std::cell::RefCell::new(None::<String>);
        let settings = PgSettings::from_env(|name| match std::env::var(name) {
            Ok(value) => Some(value),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(_)) => {
                not_utf8
                    .borrow_mut()
                    .get_or_insert_with(|| name.to_string());
                None
            }
        });
        match not_utf8.into_inner() {
            Some(name) => Err(settings_error(format!(
                "{name} is set but is not valid UTF-8"
            ))),
            None => settings,
        }
    }

    /// Reads NVSentinel's datastore variables through `get` (normally `std::env::var`).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<PgSettings, DatastoreError> {
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        match var("DATASTORE_PROVIDER").as_deref() {
            Some("postgresql") | Some("postgres") => {}
            Some("mongodb") => {
                return Err(settings_error(
                    "DATASTORE_PROVIDER=mongodb names MongoDB, but PostgreSQL settings were \
                     asked for here (this command reads PostgreSQL only); set \
                     DATASTORE_PROVIDER=postgresql",
                ))
            }
            Some(other) => {
                return Err(settings_error(format!(
                    "DATASTORE_PROVIDER={other:?} is not supported (use postgresql)"
                )))
            }
            None => {
                return Err(settings_error(
                    "DATASTORE_PROVIDER is not set; set it to postgresql and give \
                     DATASTORE_HOST, DATASTORE_DATABASE and DATASTORE_USERNAME",
                ))
            }
        }
        let port = match var("DATASTORE_PORT") {
            None => 5432,
            Some(text) => text.trim().parse().map_err(|_| {
                settings_error(format!("DATASTORE_PORT={text:?} is not a port number"))
            })?,
        };
        let user = var("DATASTORE_USERNAME")
            .ok_or_else(|| settings_error("DATASTORE_USERNAME is required"))?;
        let sslmode = match var("DATASTORE_SSLMODE") {
            // lib/pq's default, which the Go exporter inherits.
            None => SslMode::Require,
            Some(text) => SslMode::parse(text.trim()).ok_or_else(|| {
                settings_error(format!(
                    "DATASTORE_SSLMODE={text:?} is not one of disable, prefer, require, \
                     verify-ca, verify-full"
                ))
            })?,
        };
        let mount = PathBuf::from(
            var("POSTGRESQL_CLIENT_CERT_MOUNT_PATH").unwrap_or(DEFAULT_CERT_MOUNT_PATH.into()),
        );
        // An explicit path must exist; a default under the mount is used only when present.
        let file = |name: &str, default: &str| -> Result<Option<PathBuf>, DatastoreError> {
            match var(name) {
                Some(path) => {
                    let path = PathBuf::from(path);
                    if sslmode != SslMode::Disable && !path.is_file() {
                        return Err(settings_error(format!(
                            "{name}={}: file not found",
                            path.display()
                        )));
                    }
                    Ok(Some(path))
                }
                None => Ok(Some(mount.join(default)).filter(|p| p.is_file())),
            }
        };
        let settings = PgSettings {
            host: var("DATASTORE_HOST").unwrap_or_else(|| "localhost".into()),
            port,
            database: var("DATASTORE_DATABASE").unwrap_or_else(|| "nvsentinel".into()),
            user,
            password: get("DATASTORE_PASSWORD").filter(|p| !p.is_empty()),
            sslmode,
            sslcert: file("DATASTORE_SSLCERT", "tls.crt")?,
            sslkey: file("DATASTORE_SSLKEY", "tls.key")?,
            sslrootcert: file("DATASTORE_SSLROOTCERT", "ca.crt")?,
        };
        if settings.sslcert.is_some() != settings.sslkey.is_some() {
            return Err(settings_error(
                "DATASTORE_SSLCERT and DATASTORE_SSLKEY must be given together",
            ));
        }
        if matches!(settings.sslmode, SslMode::VerifyCa | SslMode::VerifyFull)
            && settings.sslrootcert.is_none()
        {
            return Err(settings_error(format!(
                "DATASTORE_SSLMODE={} needs a CA certificate: set DATASTORE_SSLROOTCERT or mount \
                 ca.crt under {}",
                match settings.sslmode {
                    SslMode::VerifyCa => "verify-ca",
                    _ => "verify-full",
                },
                mount.display()
            )));
        }
        Ok(settings)
    }

    /// The driver configuration (without TLS, which `tls_connector` supplies).
    pub fn driver_config(&self) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .dbname(&self.database)
            .user(&self.user)
            .application_name("event-exporter")
            .connect_timeout(std::time::Duration::from_secs(10))
            .keepalives_idle(std::time::Duration::from_secs(30))
            .ssl_mode(match self.sslmode {
                SslMode::Disable => WireSslMode::Disable,
                SslMode::Prefer => WireSslMode::Prefer,
                _ => WireSslMode::Require,
            });
        if let Some(password) = &self.password {
            config.password(password);
        }
        config
    }

    /// The TLS connector for `sslmode`, presenting the client certificate when one is set.
    pub fn tls_connector(
        &self,
    ) -> Result<tokio_postgres_rustls::MakeRustlsConnect, DatastoreError> {
        let roots = |path: &Path| tls::roots_from_file(path).map_err(DatastoreError::Tls);
        let verification = match (self.sslmode, &self.sslrootcert) {
            (SslMode::VerifyFull, Some(ca)) => Verification::Full(roots(ca)?),
            (SslMode::VerifyCa, Some(ca)) => Verification::ChainOnly(roots(ca)?),
            // libpq: `require` with a root certificate file behaves like `verify-ca`.
            (SslMode::Require, Some(ca)) => Verification::ChainOnly(roots(ca)?),
            _ => Verification::None,
        };
        let identity = match (&self.sslcert, &self.sslkey) {
            (Some(cert), Some(key)) => Some(tls::load_identity(cert, key)?),
            _ => None,
        };
        let config = tls::client_config(verification, identity)?;
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }

    /// `host:port/database` for messages.
    pub fn describe(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.database)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<PgSettings, DatastoreError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([(
                "POSTGRESQL_CLIENT_CERT_MOUNT_PATH".to_string(),
                "/nonexistent-cert-dir".to_string(),
            )])
            .collect();
        PgSettings::from_env(|name| map.get(name).cloned())
    }

    #[test]
    fn reads_nvsentinel_variables_with_defaults() {
        let settings = from(&[
            ("DATASTORE_PROVIDER", "postgresql"),
            ("DATASTORE_HOST", "db.nvsentinel"),
            ("DATASTORE_USERNAME", "nvsentinel"),
        ])
        .expect("valid");
        assert_eq!(settings.port, 5432);
        assert_eq!(settings.database, "nvsentinel");
        assert_eq!(settings.sslmode, SslMode::Require);
        assert!(settings.sslcert.is_none() && settings.sslrootcert.is_none());
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "DATASTORE_PROVIDER"),
            (&[("DATASTORE_PROVIDER", "mongodb")], "DATASTORE_PROVIDER"),
            (
                &[("DATASTORE_PROVIDER", "postgresql")],
                "DATASTORE_USERNAME",
            ),
            (
                &[
                    ("DATASTORE_PROVIDER", "postgresql"),
                    ("DATASTORE_USERNAME", "u"),
                    ("DATASTORE_PORT", "x"),
                ],
                "DATASTORE_PORT",
            ),
            (
                &[
                    ("DATASTORE_PROVIDER", "postgresql"),
                    ("DATASTORE_USERNAME", "u"),
                    ("DATASTORE_SSLMODE", "maybe"),
                ],
                "DATASTORE_SSLMODE",
            ),
            (
                &[
                    ("DATASTORE_PROVIDER", "postgresql"),
                    ("DATASTORE_USERNAME", "u"),
                    ("DATASTORE_SSLMODE", "verify-full"),
                ],
                "DATASTORE_SSLROOTCERT",
            ),
            (
                &[
                    ("DATASTORE_PROVIDER", "postgresql"),
                    ("DATASTORE_USERNAME", "u"),
                    ("DATASTORE_SSLCERT", "/nope.crt"),
                ],
                "DATASTORE_SSLCERT",
            ),
        ];
        for (vars, name) in cases {
            let message = from(vars).expect_err("should fail").to_string();
            assert!(message.contains(name), "{message:?} should name {name}");
        }
    }
}
