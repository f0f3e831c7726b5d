//! How to reach MongoDB: NVSentinel's `MONGODB_*` environment (the chart's datastore ConfigMap,
//! `MONGODB_URI` possibly from a Secret) and the client-certificate mount.
//!
//! Source: `store-client/pkg/config/env_loader.go` and `pkg/datastore/config.go` upstream
//! (`../shared/reference/nvsentinel-datastore.md` §4.1, §4.3, §6).
//!
//! TLS, from the files the environment names (checked when [`MongoSettings::client_options`]
//! runs, not when the variables are read):
//! - `ca.crt` plus `tls.crt` and `tls.key`: TLS with that CA, the client certificate presented,
//!   and `MONGODB-X509` authentication (`authSource` `$external`) unless the URI carries its own
//!   credentials.
//! - `ca.crt` only (the managed-database case: AWS DocumentDB, Azure DocumentDB, Atlas with a
//!   private CA): TLS with that CA; credentials (SCRAM) come from the URI.
//! - Neither: TLS only as the URI says (`tls=true`, system roots).
//!
//! A CA path named explicitly (`MONGODB_CA_CERT_PATH`, or a `MONGODB_CLIENT_CERT_MOUNT_PATH`
//! that is set) is waited for until `CA_CERT_MOUNT_TIMEOUT_TOTAL_SECONDS`; the default mount
//! `/etc/ssl/mongo-client` is used only if its `ca.crt` is there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mongodb::options::{AuthMechanism, ClientOptions, Credential, Tls, TlsOptions};

/// Defaults of NVSentinel's chart and store-client.
pub const DEFAULT_URI: &str = "mongodb://localhost:27017";
pub const DEFAULT_DATABASE: &str = "nvsentinel";
pub const DEFAULT_COLLECTION: &str = "HealthEvents";
pub const DEFAULT_TOKEN_COLLECTION: &str = "ResumeTokens";
/// Where NVSentinel mounts the MongoDB client certificate (`tls.crt`, `tls.key`, `ca.crt`).
pub const DEFAULT_CLIENT_CERT_MOUNT_PATH: &str = "/etc/ssl/mongo-client";

/// Why the MongoDB environment cannot be used; every variant names the variable or file.
#[derive(Debug, thiserror::Error)]
pub enum MongoSettingsError {
    #[error("{name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    /// The URI does not parse (or a `mongodb+srv://` name does not resolve). `detail` is the
    /// driver's message with the URI's password replaced.
    #[error("MONGODB_URI ({uri}): {detail}")]
    Uri {
        uri: String,
        detail: String,
        #[source]
        source: Box<mongodb::error::Error>,
    },
    #[error(
        "{name}: CA certificate {} did not appear within {}s (CA_CERT_MOUNT_TIMEOUT_TOTAL_SECONDS)",
        path.display(), waited.as_secs()
    )]
    CaNotMounted {
        name: &'static str,
        path: PathBuf,
        waited: Duration,
    },
    #[error("{name}: cannot read {}: {source}", path.display())]
    Unreadable {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{present_name} ({}) exists but {missing_name} ({}) does not: a client certificate \
         needs both",
        present.display(), missing.display()
    )]
    HalfCertificate {
        present_name: &'static str,
        present: PathBuf,
        missing_name: &'static str,
        missing: PathBuf,
    },
    #[error("cannot write the combined client certificate and key to {}: {source}", path.display())]
    KeyCopy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A file the TLS settings name, with the variable that named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    pub path: PathBuf,
    /// The variable that set it (or, for a file in the mount directory,
    /// `MONGODB_CLIENT_CERT_MOUNT_PATH`).
    pub variable: &'static str,
}

/// The client-certificate files, as resolved from the environment.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `ca.crt`.
    pub ca: Option<NamedFile>,
    /// Whether the CA must exist (waited for): it was named explicitly. When false (the default
    /// mount), it is used only if present.
    pub ca_required: bool,
    /// `tls.crt` and `tls.key`: used when both exist.
    pub cert: Option<NamedFile>,
    pub key: Option<NamedFile>,
    /// `CA_CERT_MOUNT_TIMEOUT_TOTAL_SECONDS` (360 s).
    pub ca_mount_timeout: Duration,
    /// `CA_CERT_READ_INTERVAL_SECONDS` (5 s).
    pub ca_read_interval: Duration,
    /// `MONGODB_ENABLE_CERT_ROTATION` (upstream's; true/false as Go's `strconv.ParseBool`):
    /// watch the client certificate and key and restart in place when they change, every
    /// `MONGODB_CERT_ROTATION_CHECK_SECONDS` (this exporter's; 10 s). `None` when off.
    pub rotation_check: Option<Duration>,
}

/// Everything the exporter needs to open its MongoDB client.
#[derive(Debug, Clone)]
pub struct MongoSettings {
    /// `MONGODB_URI` (may carry credentials: never logged as is, see [`MongoSettings::describe`]
    /// and [`redact_uri`]).
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
    /// `MONGODB_PING_INTERVAL_SECONDS` (5 s, below the ping timeout): validated as upstream;
    /// start-up retries with the exporter's own backoff.
    pub ping_interval: Duration,
    /// `MONGODB_CHANGE_STREAM_RETRY_DEADLINE_SECONDS` (or the legacy
    /// `CHANGE_STREAM_RETRY_DEADLINE_SECONDS`; 60 s): validated; the exporter reconnects its
    /// change stream with its own backoff for as long as it runs.
    pub change_stream_retry_deadline: Duration,
    /// `MONGODB_CHANGE_STREAM_RETRY_INTERVAL_SECONDS` (or `CHANGE_STREAM_RETRY_INTERVAL_SECONDS`;
    /// 3 s, at most the deadline): validated, as above.
    pub change_stream_retry_interval: Duration,
    /// The client-certificate and CA files.
    pub tls: TlsFiles,
}

impl MongoSettings {
    /// Reads the variables through `get` (normally `std::env::var`); blank counts as unset,
    /// except for `MONGODB_CLIENT_CERT_MOUNT_PATH`, where blank means "no mount" (the chart's
    /// value for managed databases).
    pub fn from_env(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<MongoSettings, MongoSettingsError> {
        let env = Env { get: &get };
        let (ping_timeout, ping_interval) = env.ping()?;
        let (change_stream_retry_deadline, change_stream_retry_interval) =
            env.change_stream_retry()?;
        Ok(MongoSettings {
            uri: env.uri()?,
            database: env
                .var("MONGODB_DATABASE_NAME")
                .or_else(|| env.var("DATASTORE_DATABASE"))
                .unwrap_or_else(|| DEFAULT_DATABASE.into()),
            collection: env
                .var("MONGODB_COLLECTION_NAME")
                .unwrap_or_else(|| DEFAULT_COLLECTION.into()),
            token_collection: env
                .var("MONGODB_TOKEN_COLLECTION_NAME")
                .unwrap_or_else(|| DEFAULT_TOKEN_COLLECTION.into()),
            app_name: env.var("APP_NAME"),
            ping_timeout,
            ping_interval,
            change_stream_retry_deadline,
            change_stream_retry_interval,
            tls: env.tls_files()?,
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

    /// The effective settings as JSON for `check-config`, the URI's password redacted.
    pub fn report(&self) -> serde_json::Value {
        let file = |f: &Option<NamedFile>| match f {
            // `present`: whether the file is there now (the default mount's files are used
            // only when they exist; see `tls_mode`).
            Some(f) => serde_json::json!({
                "path": f.path.display().to_string(),
                "from": f.variable,
                "present": f.path.is_file(),
            }),
            None => serde_json::Value::Null,
        };
        serde_json::json!({
            "provider": "mongodb",
            "uri": redact_uri(&self.uri),
            "database": self.database,
            "collection": self.collection,
            "tokenCollection": self.token_collection,
            "appName": self.app_name,
            "pingTimeoutSeconds": self.ping_timeout.as_secs(),
            "pingIntervalSeconds": self.ping_interval.as_secs(),
            "changeStreamRetryDeadlineSeconds": self.change_stream_retry_deadline.as_secs(),
            "changeStreamRetryIntervalSeconds": self.change_stream_retry_interval.as_secs(),
            "tls": {
                "caFile": file(&self.tls.ca),
                "caWaitedFor": self.tls.ca_required,
                "clientCert": file(&self.tls.cert),
                "clientKey": file(&self.tls.key),
                "caMountTimeoutSeconds": self.tls.ca_mount_timeout.as_secs(),
                "caReadIntervalSeconds": self.tls.ca_read_interval.as_secs(),
                "certRotationCheckSeconds": self.tls.rotation_check.map(|d| d.as_secs()),
                "mode": self.tls_mode(),
            },
        })
    }

    /// Which TLS mode the files present now give (see the module docs).
    pub fn tls_mode(&self) -> &'static str {
        let exists = |f: &Option<NamedFile>| f.as_ref().is_some_and(|f| f.path.is_file());
        let ca = exists(&self.tls.ca);
        let client = exists(&self.tls.cert) && exists(&self.tls.key);
        match (ca || self.tls.ca_required, client) {
            (_, true) => "client certificate (MONGODB-X509 unless the URI has credentials)",
            (true, false) => "CA only (credentials from the URI)",
            (false, false) => "as the URI says",
        }
    }

    /// The driver's options: the URI (with `mongodb+srv://` resolved), the app name, the
    /// timeouts and the TLS files (waiting for a CA that is not mounted yet; see the module
    /// docs).
    pub async fn client_options(&self) -> Result<ClientOptions, MongoSettingsError> {
        let mut options =
            ClientOptions::parse(&self.uri)
                .await
                .map_err(|source| MongoSettingsError::Uri {
                    uri: redact_uri(&self.uri),
                    detail: redact_text(&source.to_string(), &self.uri),
                    source: Box::new(source),
                })?;
        if let Some(app_name) = &self.app_name {
            options.app_name = Some(app_name.clone());
        }
        options.server_selection_timeout = Some(self.ping_timeout);
        options.connect_timeout = Some(self.ping_timeout.min(Duration::from_secs(10)));

        let ca = self.ca_file().await?;
        let client_pem = self.client_certificate()?;
        if ca.is_none() && client_pem.is_none() {
            return Ok(options);
        }
        let mut tls = match options.tls.take() {
            Some(Tls::Enabled(tls)) => tls,
            _ => TlsOptions::default(),
        };
        if ca.is_some() {
            tls.ca_file_path = ca;
        }
        if let Some(pem) = client_pem {
            tls.cert_key_file_path = Some(pem);
            x509_unless_other_credentials(&mut options);
        }
        options.tls = Some(Tls::Enabled(tls));
        Ok(options)
    }

    /// The CA file to verify the server with: waited for when it is required (mounted late),
    /// else used when it is there; `None` without one.
    async fn ca_file(&self) -> Result<Option<PathBuf>, MongoSettingsError> {
        Ok(match &self.tls.ca {
            Some(ca) if self.tls.ca_required => {
                wait_for(ca, self.tls.ca_mount_timeout, self.tls.ca_read_interval).await?;
                Some(ca.path.clone())
            }
            Some(ca) if ca.path.is_file() => {
                readable(ca)?;
                Some(ca.path.clone())
            }
            _ => None,
        })
    }

    /// The client certificate and key as one PEM file (what the driver reads), when both
    /// exist; an error when only one does.
    fn client_certificate(&self) -> Result<Option<PathBuf>, MongoSettingsError> {
        let (Some(cert), Some(key)) = (&self.tls.cert, &self.tls.key) else {
            if let Some(only) = self.tls.cert.as_ref().or(self.tls.key.as_ref()) {
                if only.path.is_file() {
                    return Err(MongoSettingsError::Invalid {
                        name: only.variable,
                        reason: format!(
                            "{} is set but not its pair (MONGODB_CLIENT_CERT_PATH and \
                             MONGODB_CLIENT_KEY_PATH go together)",
                            only.path.display()
                        ),
                    });
                }
            }
            return Ok(None);
        };
        match (cert.path.is_file(), key.path.is_file()) {
            (false, false) => Ok(None),
            (true, false) | (false, true) => {
                let (present, missing) = if cert.path.is_file() {
                    (cert, key)
                } else {
                    (key, cert)
                };
                Err(MongoSettingsError::HalfCertificate {
                    present_name: present.variable,
                    present: present.path.clone(),
                    missing_name: missing.variable,
                    missing: missing.path.clone(),
                })
            }
            (true, true) => {
                if cert.path == key.path {
                    readable(cert)?;
                    return Ok(Some(cert.path.clone()));
                }
                let mut pem = readable(cert)?;
                if !pem.ends_with('\n') {
                    pem.push('\n');
                }
                pem.push_str(&readable(key)?);
                write_key_copy(&pem).map(Some)
            }
        }
    }
}

/// Waits until `file` is a readable file, checking every `interval` for up to `timeout`.
async fn wait_for(
    file: &NamedFile,
    timeout: Duration,
    interval: Duration,
) -> Result<(), MongoSettingsError> {
    let started = tokio::time::Instant::now();
    let mut logged = false;
    loop {
        if file.path.is_file() {
            readable(file)?;
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(MongoSettingsError::CaNotMounted {
                name: file.variable,
                path: file.path.clone(),
                waited: timeout,
            });
        }
        if !logged {
            tracing::warn!(
                path = %file.path.display(),
                variable = file.variable,
                timeout_seconds = timeout.as_secs(),
                "MongoDB CA certificate not mounted yet: waiting for it"
            );
            logged = true;
        }
        let left = timeout.saturating_sub(started.elapsed());
        tokio::time::sleep(interval.min(left).max(Duration::from_millis(10))).await;
    }
}

fn readable(file: &NamedFile) -> Result<String, MongoSettingsError> {
    std::fs::read_to_string(&file.path).map_err(|source| MongoSettingsError::Unreadable {
        name: file.variable,
        path: file.path.clone(),
        source,
    })
}

/// Writes the combined certificate and key to `client-<n>.pem` (mode 0600) in a directory of
/// this process's own (mode 0700) under the temporary directory (`TMPDIR`, else `/tmp`; the
/// chart mounts a memory-backed `emptyDir` there). The file stays for the life of the process:
/// the driver reads it whenever a client is built from the options. A file of the same name
/// left by this process's previous image (an in-place restart keeps the pid) is replaced.
fn write_key_copy(pem: &str) -> Result<PathBuf, MongoSettingsError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("event-exporter-mongo-{}", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MongoSettingsError::KeyCopy { path, source }
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(io(&dir)(error)),
    }
    let path = dir.join(format!(
        "client-{}.pem",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
    };
    let mut file = match create() {
        // Left by this process before it restarted in place (`crate::restart`: same pid).
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(&path).map_err(io(&path))?;
            create().map_err(io(&path))?
        }
        opened => opened.map_err(io(&path))?,
    };
    file.write_all(pem.as_bytes()).map_err(io(&path))?;
    Ok(path)
}

/// The URI with its password (if any) replaced by `***`.
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, hosts)) = authority.rsplit_once('@') else {
        return uri.to_string();
    };
    let user = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => userinfo.to_string(),
    };
    format!("{scheme}://{user}@{hosts}{tail}")
}

/// `text` with the URI's password (raw and percent-decoded) replaced by `***`.
fn redact_text(text: &str, uri: &str) -> String {
    let password = uri
        .split_once("://")
        .map(|(_, rest)| rest)
        .and_then(|rest| rest.split(['/', '?']).next())
        .and_then(|authority| authority.rsplit_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password.to_string());
    let Some(password) = password.filter(|p| !p.is_empty()) else {
        return text.to_string();
    };
    let decoded: String = form_urlencoded::parse(format!("p={password}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let mut out = text.replace(&password, "***");
    if !decoded.is_empty() {
        out = out.replace(&decoded, "***");
    }
    out
}

/// A boolean as Go's `strconv.ParseBool` reads it (`1 t T TRUE true True`, `0 f F FALSE false
/// False`); `None` otherwise.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The environment as `MongoSettings::from_env` reads it: blank values count as unset, and
/// every error names its variable.
struct Env<'a, G: Fn(&str) -> Option<String>> {
    get: &'a G,
}

impl<G: Fn(&str) -> Option<String>> Env<'_, G> {
    /// The trimmed value; `None` when unset or blank.
    fn var(&self, name: &str) -> Option<String> {
        (self.get)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn invalid(name: &'static str, reason: String) -> MongoSettingsError {
        MongoSettingsError::Invalid { name, reason }
    }

    /// The first of `names` that is set (current name first, then legacy ones), as a positive
    /// whole number of seconds, with the name it came from; `default` seconds under the first
    /// name when none is set.
    fn seconds(
        &self,
        names: &[&'static str],
        default: u64,
    ) -> Result<(Duration, &'static str), MongoSettingsError> {
        for &name in names {
            if let Some(text) = self.var(name) {
                return match text.parse::<u64>() {
                    Ok(n) if n > 0 => Ok((Duration::from_secs(n), name)),
                    _ => Err(Self::invalid(
                        name,
                        format!("{text:?} is not a positive whole number of seconds"),
                    )),
                };
            }
        }
        let first = names.first().copied().unwrap_or("");
        Ok((Duration::from_secs(default), first))
    }

    /// An absolute path, when set.
    fn absolute(&self, name: &'static str) -> Result<Option<PathBuf>, MongoSettingsError> {
        let Some(text) = self.var(name) else {
            return Ok(None);
        };
        let path = PathBuf::from(&text);
        if path.is_absolute() {
            Ok(Some(path))
        } else {
            Err(Self::invalid(
                name,
                format!("{text:?} is not an absolute path"),
            ))
        }
    }

    /// `true`/`false` (and the other spellings `parse_bool` takes); `false` when unset.
    fn flag(&self, name: &'static str) -> Result<bool, MongoSettingsError> {
        match self.var(name) {
            None => Ok(false),
            Some(text) => parse_bool(&text)
                .ok_or_else(|| Self::invalid(name, format!("{text:?} is not true or false"))),
        }
    }

    /// The ping timeout (30 s) and interval (5 s), the interval below the timeout.
    fn ping(&self) -> Result<(Duration, Duration), MongoSettingsError> {
        let (timeout, timeout_name) = self.seconds(&["MONGODB_PING_TIMEOUT_TOTAL_SECONDS"], 30)?;
        let (interval, interval_name) = self.seconds(&["MONGODB_PING_INTERVAL_SECONDS"], 5)?;
        if interval >= timeout {
            return Err(Self::invalid(
                interval_name,
                format!(
                    "{}s must be less than {timeout_name} ({}s)",
                    interval.as_secs(),
                    timeout.as_secs()
                ),
            ));
        }
        Ok((timeout, interval))
    }

    /// The change-stream retry deadline (60 s) and interval (3 s, at most the deadline), under
    /// their current or legacy names.
    fn change_stream_retry(&self) -> Result<(Duration, Duration), MongoSettingsError> {
        let (deadline, deadline_name) = self.seconds(
            &[
                "MONGODB_CHANGE_STREAM_RETRY_DEADLINE_SECONDS",
                "CHANGE_STREAM_RETRY_DEADLINE_SECONDS",
            ],
            60,
        )?;
        let (interval, interval_name) = self.seconds(
            &[
                "MONGODB_CHANGE_STREAM_RETRY_INTERVAL_SECONDS",
                "CHANGE_STREAM_RETRY_INTERVAL_SECONDS",
            ],
            3,
        )?;
        if interval > deadline {
            return Err(Self::invalid(
                interval_name,
                format!(
                    "{}s must not exceed {deadline_name} ({}s)",
                    interval.as_secs(),
                    deadline.as_secs()
                ),
            ));
        }
        Ok((deadline, interval))
    }

    /// The client-certificate and CA files: explicit paths first, else the mount directory's
    /// `ca.crt`, `tls.crt`, `tls.key`.
    fn tls_files(&self) -> Result<TlsFiles, MongoSettingsError> {
        let (mount, mount_explicit) = self.mount()?;
        let in_mount = |file: &str| {
            mount.as_ref().map(|dir| NamedFile {
                path: dir.join(file),
                variable: MOUNT,
            })
        };
        let named = |name: &'static str| -> Result<Option<NamedFile>, MongoSettingsError> {
            Ok(self.absolute(name)?.map(|path| NamedFile {
                path,
                variable: name,
            }))
        };
        let explicit_ca = named("MONGODB_CA_CERT_PATH")?;
        let ca_required = explicit_ca.is_some() || mount_explicit;
        let (rotation_check, _) = self.seconds(&["MONGODB_CERT_ROTATION_CHECK_SECONDS"], 10)?;
        Ok(TlsFiles {
            ca: explicit_ca.or_else(|| in_mount("ca.crt")),
            ca_required,
            cert: named("MONGODB_CLIENT_CERT_PATH")?.or_else(|| in_mount("tls.crt")),
            key: named("MONGODB_CLIENT_KEY_PATH")?.or_else(|| in_mount("tls.key")),
            ca_mount_timeout: self
                .seconds(&["CA_CERT_MOUNT_TIMEOUT_TOTAL_SECONDS"], 360)?
                .0,
            ca_read_interval: self.seconds(&["CA_CERT_READ_INTERVAL_SECONDS"], 5)?.0,
            rotation_check: self
                .flag("MONGODB_ENABLE_CERT_ROTATION")?
                .then_some(rotation_check),
        })
    }

    /// The mount directory and whether it was set: set → waited for; set but blank → none;
    /// unset → the default, used only if its files are there.
    fn mount(&self) -> Result<(Option<PathBuf>, bool), MongoSettingsError> {
        Ok(match (self.get)(MOUNT) {
            Some(text) if text.trim().is_empty() => (None, false),
            Some(_) => (self.absolute(MOUNT)?, true),
            None => (Some(PathBuf::from(DEFAULT_CLIENT_CERT_MOUNT_PATH)), false),
        })
    }

    /// `MONGODB_URI`, which must be a `mongodb://` or `mongodb+srv://` URI.
    fn uri(&self) -> Result<String, MongoSettingsError> {
        let uri = self
            .var("MONGODB_URI")
            .unwrap_or_else(|| DEFAULT_URI.into());
        if uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://") {
            return Ok(uri);
        }
        Err(Self::invalid(
            "MONGODB_URI",
            format!(
                "{} does not start with mongodb:// or mongodb+srv://",
                redact_uri(&uri)
            ),
        ))
    }
}

/// The client-certificate mount directory's variable.
const MOUNT: &str = "MONGODB_CLIENT_CERT_MOUNT_PATH";

/// With a client certificate, the client authenticates as X.509 (`$external`) unless the URI
/// brings credentials of its own (a user or password, or another mechanism).
fn x509_unless_other_credentials(options: &mut ClientOptions) {
    let credential = options.credential.as_ref();
    let uri_credentials = credential.is_some_and(|c| c.username.is_some() || c.password.is_some());
    let other_mechanism = credential
        .and_then(|c| c.mechanism.as_ref())
        .is_some_and(|m| *m != AuthMechanism::MongoDbX509);
    if !uri_credentials && !other_mechanism {
        let mut credential = Credential::default();
        credential.mechanism = Some(AuthMechanism::MongoDbX509);
        credential.source = Some("$external".into());
        options.credential = Some(credential);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_certificate_means_x509_unless_the_uri_brings_credentials() {
        let with = |credential: Option<Credential>| {
            let mut options = ClientOptions::default();
            options.credential = credential;
            x509_unless_other_credentials(&mut options);
            options.credential
        };
        let none = with(None).expect("x509");
        assert_eq!(none.mechanism, Some(AuthMechanism::MongoDbX509));
        assert_eq!(none.source.as_deref(), Some("$external"));
        let mut user = Credential::default();
        user.username = Some("u".into());
        assert_eq!(with(Some(user)).and_then(|c| c.mechanism), None);
        let mut scram = Credential::default();
        scram.mechanism = Some(AuthMechanism::ScramSha256);
        assert_eq!(
            with(Some(scram)).and_then(|c| c.mechanism),
            Some(AuthMechanism::ScramSha256)
        );
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_uri("mongodb+srv://app:s3cr%40t@cluster.example.net/db?tls=true"),
            "mongodb+srv://app:***@cluster.example.net/db?tls=true"
        );
        assert_eq!(
            redact_uri("mongodb://h1:27017,h2/?replicaSet=rs0"),
            "mongodb://h1:27017,h2/?replicaSet=rs0"
        );
        assert_eq!(
            redact_text("bad s3cr@t and s3cr%40t", "mongodb://u:s3cr%40t@h/"),
            "bad *** and ***"
        );
    }

    #[test]
    fn defaults_and_mount_resolution() {
        let s = MongoSettings::from_env(env(&[])).expect("defaults");
        assert_eq!(s.ping_timeout, Duration::from_secs(30));
        assert_eq!(s.ping_interval, Duration::from_secs(5));
        assert!(!s.tls.ca_required);
        assert_eq!(
            s.tls.ca.as_ref().map(|f| f.path.clone()),
            Some(PathBuf::from("/etc/ssl/mongo-client/ca.crt"))
        );
        // Blank mount path: no files at all (managed databases).
        let s = MongoSettings::from_env(env(&[("MONGODB_CLIENT_CERT_MOUNT_PATH", "")])).unwrap();
        assert!(s.tls.ca.is_none() && s.tls.cert.is_none() && s.tls.key.is_none());
        // The trio wins file by file and makes the CA required.
        let s = MongoSettings::from_env(env(&[
            ("MONGODB_CLIENT_CERT_MOUNT_PATH", "/m"),
            ("MONGODB_CA_CERT_PATH", "/ca/ca.crt"),
        ]))
        .unwrap();
        assert!(s.tls.ca_required);
        assert_eq!(s.tls.ca.unwrap().variable, "MONGODB_CA_CERT_PATH");
        assert_eq!(s.tls.cert.unwrap().path, PathBuf::from("/m/tls.crt"));
        // Legacy retry names are read.
        let s =
            MongoSettings::from_env(env(&[("CHANGE_STREAM_RETRY_DEADLINE_SECONDS", "9")])).unwrap();
        assert_eq!(s.change_stream_retry_deadline, Duration::from_secs(9));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("MONGODB_PING_TIMEOUT_TOTAL_SECONDS", "0")],
                "MONGODB_PING_TIMEOUT_TOTAL_SECONDS",
            ),
            (
                &[("MONGODB_PING_INTERVAL_SECONDS", "30")],
                "MONGODB_PING_INTERVAL_SECONDS",
            ),
            (
                &[("MONGODB_CA_CERT_PATH", "certs/ca.crt")],
                "MONGODB_CA_CERT_PATH",
            ),
            (
                &[("MONGODB_CLIENT_CERT_MOUNT_PATH", "mongo-client")],
                "MONGODB_CLIENT_CERT_MOUNT_PATH",
            ),
            (
                &[("CA_CERT_READ_INTERVAL_SECONDS", "5s")],
                "CA_CERT_READ_INTERVAL_SECONDS",
            ),
            (
                &[
                    ("MONGODB_CHANGE_STREAM_RETRY_DEADLINE_SECONDS", "3"),
                    ("MONGODB_CHANGE_STREAM_RETRY_INTERVAL_SECONDS", "4"),
                ],
                "MONGODB_CHANGE_STREAM_RETRY_INTERVAL_SECONDS",
            ),
            (&[("MONGODB_URI", "http://u:pw@h")], "MONGODB_URI"),
        ];
        for (pairs, name) in cases {
            let error = MongoSettings::from_env(env(pairs)).expect_err(name);
            let text = error.to_string();
            assert!(text.starts_with(name), "{text}");
            assert!(!text.contains(":pw@"), "{text}");
        }
    }
}
