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

/// What is wrong with the PostgreSQL settings, naming the variable (exit 2: the deployment must
/// change).
#[derive(Debug, thiserror::Error)]
pub enum PgSettingsError {
    #[error("{name} is set but is not valid UTF-8")]
    NotUtf8 { name: String },
    #[error(
        "DATASTORE_PROVIDER is not set; set it to postgresql and give DATASTORE_HOST, \
         DATASTORE_DATABASE and DATASTORE_USERNAME"
    )]
    ProviderUnset,
    #[error(
        "DATASTORE_PROVIDER=mongodb names MongoDB, but PostgreSQL settings were asked for here \
         (this command reads PostgreSQL only); set DATASTORE_PROVIDER=postgresql"
    )]
    ProviderIsMongo,
    #[error("DATASTORE_PROVIDER={value:?} is not supported (use postgresql)")]
    ProviderUnsupported { value: String },
    #[error("{name} is required")]
    Missing { name: &'static str },
    /// A value that does not parse; `expected` says what would.
    #[error("{name}={value:?} is not {expected}")]
    Invalid {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{name}={}: file not found", path.display())]
    FileNotFound { name: &'static str, path: PathBuf },
    #[error("DATASTORE_SSLCERT and DATASTORE_SSLKEY must be given together")]
    HalfCertificate,
    #[error(
        "DATASTORE_SSLMODE={mode} needs a CA certificate: set DATASTORE_SSLROOTCERT or mount \
         ca.crt under {}",
        mount.display()
    )]
    NoCa { mode: &'static str, mount: PathBuf },
}

impl PgSettings {
    /// Reads NVSentinel's datastore variables from the process environment. A variable that is
    /// set but not UTF-8 is an error naming it (`std::env::var(..).ok()` would read it as unset:
    /// a password silently dropped, a host silently defaulted).
    pub fn from_process_env() -> Result<PgSettings, PgSettingsError> {
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
            Some(name) => Err(PgSettingsError::NotUtf8 { name }),
            None => settings,
        }
    }

    /// Reads NVSentinel's datastore variables through `get` (normally `std::env::var`). Blank
    /// values count as unset, except `DATASTORE_PASSWORD`, where only the empty string does.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<PgSettings, PgSettingsError> {
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        require_postgres(var("DATASTORE_PROVIDER"))?;
        let sslmode = sslmode(var("DATASTORE_SSLMODE"))?;
        let mount = PathBuf::from(
            var("POSTGRESQL_CLIENT_CERT_MOUNT_PATH").unwrap_or(DEFAULT_CERT_MOUNT_PATH.into()),
        );
        let files = CertFiles {
            mount: &mount,
            check_exists: sslmode != SslMode::Disable,
        };
        let settings = PgSettings {
            host: var("DATASTORE_HOST").unwrap_or_else(|| "localhost".into()),
            port: port(var("DATASTORE_PORT"))?,
            database: var("DATASTORE_DATABASE").unwrap_or_else(|| "nvsentinel".into()),
            user: var("DATASTORE_USERNAME").ok_or(PgSettingsError::Missing {
                name: "DATASTORE_USERNAME",
            })?,
            password: get("DATASTORE_PASSWORD").filter(|p| !p.is_empty()),
            sslmode,
            sslcert: files.resolve("DATASTORE_SSLCERT", var("DATASTORE_SSLCERT"), "tls.crt")?,
            sslkey: files.resolve("DATASTORE_SSLKEY", var("DATASTORE_SSLKEY"), "tls.key")?,
            sslrootcert: files.resolve(
                "DATASTORE_SSLROOTCERT",
                var("DATASTORE_SSLROOTCERT"),
                "ca.crt",
            )?,
        };
        settings.check_tls(&mount)?;
        Ok(settings)
    }

    /// A client certificate needs its key; `verify-ca`/`verify-full` need a CA.
    fn check_tls(&self, mount: &Path) -> Result<(), PgSettingsError> {
        if self.sslcert.is_some() != self.sslkey.is_some() {
            return Err(PgSettingsError::HalfCertificate);
        }
        let mode = match self.sslmode {
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
            _ => return Ok(()),
        };
        match self.sslrootcert {
            Some(_) => Ok(()),
            None => Err(PgSettingsError::NoCa {
                mode,
                mount: mount.to_path_buf(),
            }),
        }
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

/// `DATASTORE_PROVIDER` must name PostgreSQL here.
fn require_postgres(provider: Option<String>) -> Result<(), PgSettingsError> {
    match provider.as_deref() {
        Some("postgresql") | Some("postgres") => Ok(()),
        Some("mongodb") => Err(PgSettingsError::ProviderIsMongo),
        Some(other) => Err(PgSettingsError::ProviderUnsupported {
            value: other.to_string(),
        }),
        None => Err(PgSettingsError::ProviderUnset),
    }
}

/// `DATASTORE_PORT`, 5432 when unset.
fn port(text: Option<String>) -> Result<u16, PgSettingsError> {
    let Some(text) = text else { return Ok(5432) };
    text.trim().parse().map_err(|_| PgSettingsError::Invalid {
        name: "DATASTORE_PORT",
        value: text,
        expected: "a port number",
    })
}

/// `DATASTORE_SSLMODE`, `require` when unset (lib/pq's default, which the Go exporter inherits).
fn sslmode(text: Option<String>) -> Result<SslMode, PgSettingsError> {
    let Some(text) = text else {
        return Ok(SslMode::Require);
    };
    SslMode::parse(text.trim()).ok_or(PgSettingsError::Invalid {
        name: "DATASTORE_SSLMODE",
        value: text,
        expected: "one of disable, prefer, require, verify-ca, verify-full",
    })
}

/// Where the client-certificate files come from: an explicit path must exist (unless TLS is
/// off); without one, the file under the mount directory is used only when present.
struct CertFiles<'a> {
    mount: &'a Path,
    check_exists: bool,
}

impl CertFiles<'_> {
    fn resolve(
        &self,
        name: &'static str,
        explicit: Option<String>,
        default: &str,
    ) -> Result<Option<PathBuf>, PgSettingsError> {
        let Some(path) = explicit.map(PathBuf::from) else {
            return Ok(Some(self.mount.join(default)).filter(|p| p.is_file()));
        };
        if self.check_exists && !path.is_file() {
            return Err(PgSettingsError::FileNotFound { name, path });
        }
        Ok(Some(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<PgSettings, PgSettingsError> {
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
