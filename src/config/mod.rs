//! The exporter's TOML configuration: upstream's layout (`[exporter.*]`, snake_case keys, Go
//! durations) and upstream's defaults, validated once at start so that a bad value is reported
//! with the key that holds it instead of failing on the first event.

mod duration;

pub use duration::{format_go_duration, parse_go_duration};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

/// The resume-token client name the Go exporter hard-codes; using it lets this exporter take
/// over a running Go exporter's position.
pub const DEFAULT_CLIENT_NAME: &str = "event-exporter";

/// A configuration problem, always naming the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Copied whole into every CloudEvent's `data.metadata`; always holds a non-empty `cluster`.
    pub metadata: BTreeMap<String, String>,
    /// Row name in `resume_tokens` (`exporter.client_name`, default `event-exporter`).
    pub client_name: String,
    /// `exporter.workers`; the `--workers` flag wins over it.
    pub workers: Option<usize>,
    pub sink: SinkConfig,
    /// `None` when `exporter.oidc.enabled = false`: no secret is read, no Authorization header.
    pub oidc: Option<OidcConfig>,
    pub backfill: BackfillConfig,
    pub failure_handling: RetryPolicy,
    /// What to do with an event the sink permanently rejects (`on_rejected`, the status
    /// lists and the dead letter under `[exporter.failure_handling]`).
    pub rejections: RejectionPolicy,
    /// `exporter.resume_token.save_interval` (default 100ms): the least time between two
    /// resume-token writes; the token is written as soon as it advances and this much time
    /// has passed since the last write.
    #[serde(serialize_with = "serialize_duration")]
    pub resume_token_save_interval: Duration,
    /// Blank means "export everything".
    pub filter_expression: Option<String>,
    /// `[exporter.resume_token]` is accepted for compatibility; the token lives in the datastore.
    pub resume_token: BTreeMap<String, String>,
    /// `exporter.liveness_timeout`: `/healthz` fails once events are pending and nothing
    /// progressed for this long (see `crate::watchdog`). Default: the larger of 5 minutes and
    /// `2 × (sink.timeout + failure_handling.max_backoff)`.
    #[serde(serialize_with = "serialize_duration")]
    pub liveness_timeout: Duration,
    /// Keys present in the file that this version does not know (logged as warnings;
    /// `check-config` fails on them).
    #[serde(skip)]
    pub unknown_keys: Vec<String>,
    /// For unknown keys that look like a misspelling: the known key meant (full paths).
    #[serde(skip)]
    pub did_you_mean: BTreeMap<String, String>,
    /// Accepted values worth a warning (e.g. `max_events = 1e+06`, a float where an integer
    /// belongs, as charts before upstream PR #1010 render it), each naming its key.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SinkConfig {
    pub endpoint: String,
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    pub insecure_skip_verify: bool,
    /// Extra PEM CA bundle trusted for the sink (private PKI), besides the system roots.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OidcConfig {
    pub token_url: String,
    pub client_id: String,
    pub scope: String,
    pub insecure_skip_verify: bool,
    /// Extra PEM CA bundle trusted for the token endpoint.
    pub ca_file: Option<PathBuf>,
    /// `exporter.oidc.client_auth_method`: how the client id and secret reach the token
    /// endpoint (default [`ClientAuthMethod::ClientSecretBasicRaw`], the Go exporter's way).
    pub client_auth_method: ClientAuthMethod,
    /// `exporter.oidc.default_token_lifetime` (default 5m): the lifetime assumed for a token
    /// whose response has no usable `expires_in` (RFC 6749 §5.1 makes it optional).
    #[serde(serialize_with = "serialize_duration")]
    pub default_token_lifetime: Duration,
}

/// OAuth2 client authentication at the token endpoint (`exporter.oidc.client_auth_method`).
/// The names follow RFC 7591's `token_endpoint_auth_method` values where one exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    /// HTTP Basic with the raw `client_id:secret` (no form-encoding), as the Go exporter sends
    /// it. Not an RFC 7591 name: it equals `client_secret_basic` on the wire only while the id
    /// and secret hold nothing but unreserved characters (`A–Z a–z 0–9 - . _ ~`).
    ClientSecretBasicRaw,
    /// RFC 6749 §2.3.1 / RFC 7591 `client_secret_basic`: id and secret are each
    /// `application/x-www-form-urlencoded` before `id:secret` is base64-encoded.
    ClientSecretBasic,
    /// RFC 6749 §2.3.1 / RFC 7591 `client_secret_post`: `client_id` and `client_secret` go in
    /// the form body; no `Authorization` header.
    ClientSecretPost,
}

impl ClientAuthMethod {
    /// Every accepted config value.
    pub const NAMES: [&'static str; 3] = [
        "client_secret_basic_raw",
        "client_secret_basic",
        "client_secret_post",
    ];

    fn from_name(name: &str) -> Option<ClientAuthMethod> {
        match name {
            "client_secret_basic_raw" => Some(ClientAuthMethod::ClientSecretBasicRaw),
            "client_secret_basic" => Some(ClientAuthMethod::ClientSecretBasic),
            "client_secret_post" => Some(ClientAuthMethod::ClientSecretPost),
            _ => None,
        }
    }
}

/// Default of `exporter.oidc.default_token_lifetime`.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// Longest token lifetime the exporter believes (and the largest
/// `default_token_lifetime`): a token is fetched again at least this often.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Serialize)]
pub struct BackfillConfig {
    pub enabled: bool,
    #[serde(serialize_with = "serialize_duration")]
    pub max_age: Duration,
    pub max_events: u64,
    pub batch_size: u64,
    /// Events per second; 0 means unlimited.
    pub rate_limit: u64,
}

/// Upstream's retry schedule: `max_retries + 1` attempts, sleeping
/// `initial_backoff × backoff_multiplier^k` (capped at `max_backoff`) plus 0–10 % jitter.
#[derive(Debug, Clone, Serialize)]
pub struct RetryPolicy {
    pub max_retries: u32,
    #[serde(serialize_with = "serialize_duration")]
    pub initial_backoff: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub max_backoff: Duration,
    pub backoff_multiplier: f64,
}

/// `exporter.failure_handling.on_rejected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRejected {
    /// Stop without moving the resume token (upstream's behaviour; the default).
    Stop,
    /// Write the event to the dead letter, then go on.
    DeadLetter,
}

/// The default `exporter.failure_handling.rejected_statuses`: answers that say the request
/// itself is wrong and will never be taken (RFC 9110: Bad Request, Content Too Large,
/// Unsupported Media Type, Unprocessable Content).
pub const DEFAULT_REJECTED_STATUSES: [u16; 4] = [400, 413, 415, 422];

/// Statuses that can never be listed as permanent or "already delivered": they describe the
/// sink's state or the credentials, not the event.
pub const TRANSIENT_STATUSES: [u16; 4] = [401, 407, 408, 429];

/// Permanent rejections: after the retries, an event whose last answer is in
/// `rejected_statuses` is handled by `on_rejected`; an answer in `already_delivered_statuses`
/// counts as delivered at once.
#[derive(Debug, Clone, Serialize)]
pub struct RejectionPolicy {
    pub on_rejected: OnRejected,
    /// 4xx statuses (not 401, 407, 408, 429); default `[400, 413, 415, 422]`.
    pub rejected_statuses: Vec<u16>,
    /// 4xx statuses (not 401, 407, 408, 429) meaning "already have it"; default empty.
    pub already_delivered_statuses: Vec<u16>,
    /// `[exporter.failure_handling.dead_letter]`; required when `on_rejected = "dead_letter"`.
    pub dead_letter: Option<DeadLetterConfig>,
}

/// `[exporter.failure_handling.dead_letter]`: at least one of `file` and `endpoint`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterConfig {
    /// NDJSON file appended to (fsync'd per record), e.g. on a persistent volume.
    pub file: Option<PathBuf>,
    /// http(s) URL POSTed one JSON record per event, with the sink's TLS options.
    pub endpoint: Option<String>,
}

fn serialize_duration<S: serde::Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_go_duration(*value))
}

impl Config {
    /// Reads and validates the TOML file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|error| match error {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Validates TOML text (the path in a syntax error is left empty).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: PathBuf::new(),
                message: e.to_string().trim().to_string(),
            })?;
        misspelled_section(&root)?;
        let mut unknown = Vec::new();
        for key in root.keys().filter(|k| *k != "exporter") {
            unknown.push(key.clone());
        }
        let empty = toml::Table::new();
        let exporter = match root.get("exporter") {
            None => Section::new("exporter", &empty),
            Some(toml::Value::Table(table)) => Section::new("exporter", table),
            Some(other) => return Err(invalid("exporter", wrong_type("a table", other))),
        };
        let mut config = Config::from_section(&exporter)?;
        exporter.collect_unknown(&mut unknown, &mut config.did_you_mean);
        exporter.collect_warnings(&mut config.warnings);
        config.warnings.sort();
        unknown.append(&mut config.unknown_keys);
        unknown.sort();
        config.unknown_keys = unknown;
        Ok(config)
    }

    /// One line per unknown key, with the key it most likely misspells.
    pub fn unknown_key_messages(&self) -> Vec<String> {
        self.unknown_keys
            .iter()
            .map(|key| match self.did_you_mean.get(key) {
                Some(known) => format!("{key}: unknown key (did you mean {known}?)"),
                None => format!("{key}: unknown key"),
            })
            .collect()
    }

    fn from_section(exporter: &Section) -> Result<Config, ConfigError> {
        let metadata_section = exporter.section("metadata")?;
        let mut metadata = BTreeMap::new();
        if let Some(section) = &metadata_section {
            for (key, value) in section.table {
                section.mark_used(key);
                match value {
                    toml::Value::String(text) => {
                        metadata.insert(key.clone(), text.clone());
                    }
                    other => return Err(invalid(&section.key(key), wrong_type("a string", other))),
                }
            }
        }
        match metadata.get("cluster") {
            Some(cluster) if !cluster.trim().is_empty() => check_cluster(cluster)?,
            _ => {
                return Err(invalid(
                    "exporter.metadata.cluster",
                    "is required: it names the cluster in every CloudEvent's source \
                     (nvsentinel://<cluster>/healthevents)",
                ))
            }
        }

        let client_name = exporter
            .string("client_name")?
            .unwrap_or_else(|| DEFAULT_CLIENT_NAME.to_string());
        if client_name.trim().is_empty() {
            return Err(invalid("exporter.client_name", "must not be empty"));
        }
        let workers = match exporter.integer("workers")? {
            None => None,
            Some(n) => Some(in_range("exporter.workers", n, 1, MAX_WORKERS)? as usize),
        };

        let sink_section = exporter.section("sink")?;
        let sink = {
            let s = sink_section.as_ref();
            let endpoint = opt(s, |s| s.string("endpoint"))?.unwrap_or_default();
            if endpoint.trim().is_empty() {
                return Err(invalid("exporter.sink.endpoint", "is required"));
            }
            check_http_url("exporter.sink.endpoint", &endpoint)?;
            SinkConfig {
                endpoint,
                timeout: opt(s, |s| s.duration("timeout"))?.unwrap_or(Duration::from_secs(30)),
                insecure_skip_verify: opt(s, |s| s.boolean("insecure_skip_verify"))?
                    .unwrap_or(false),
                ca_file: opt(s, |s| s.string("ca_file"))?.map(PathBuf::from),
            }
        };
        if sink.timeout.is_zero() {
            return Err(invalid("exporter.sink.timeout", "must be greater than 0"));
        }
        duration_at_most("exporter.sink.timeout", sink.timeout, MAX_WAIT)?;

        let oidc_section = exporter.section("oidc")?;
        let oidc = {
            let s = oidc_section.as_ref();
            let enabled = opt(s, |s| s.boolean("enabled"))?.unwrap_or(true);
            let token_url = opt(s, |s| s.string("token_url"))?.unwrap_or_default();
            let client_id = opt(s, |s| s.string("client_id"))?.unwrap_or_default();
            let scope = opt(s, |s| s.string("scope"))?.unwrap_or_default();
            let insecure_skip_verify =
                opt(s, |s| s.boolean("insecure_skip_verify"))?.unwrap_or(false);
            let ca_file = opt(s, |s| s.string("ca_file"))?.map(PathBuf::from);
            let client_auth_method = match opt(s, |s| s.string("client_auth_method"))? {
                None => ClientAuthMethod::ClientSecretBasicRaw,
                Some(name) => ClientAuthMethod::from_name(name.trim()).ok_or_else(|| {
                    invalid(
                        "exporter.oidc.client_auth_method",
                        format!(
                            "unknown method {name:?}; expected one of {}",
                            ClientAuthMethod::NAMES.join(", ")
                        ),
                    )
                })?,
            };
            let default_token_lifetime =
                opt(s, |s| s.duration("default_token_lifetime"))?.unwrap_or(DEFAULT_TOKEN_LIFETIME);
            if default_token_lifetime.is_zero() || default_token_lifetime > MAX_TOKEN_LIFETIME {
                return Err(invalid(
                    "exporter.oidc.default_token_lifetime",
                    format!(
                        "must be greater than 0 and at most {}, got {}",
                        format_go_duration(MAX_TOKEN_LIFETIME),
                        format_go_duration(default_token_lifetime)
                    ),
                ));
            }
            if enabled {
                for (key, value) in [
                    ("token_url", &token_url),
                    ("client_id", &client_id),
                    ("scope", &scope),
                ] {
                    if value.trim().is_empty() {
                        return Err(invalid(
                            &format!("exporter.oidc.{key}"),
                            "is required while exporter.oidc.enabled is true \
                             (set enabled = false for a sink without authentication)",
                        ));
                    }
                }
                check_http_url("exporter.oidc.token_url", &token_url)?;
                Some(OidcConfig {
                    token_url,
                    client_id,
                    scope,
                    insecure_skip_verify,
                    ca_file,
                    client_auth_method,
                    default_token_lifetime,
                })
            } else {
                None
            }
        };

        let backfill_section = exporter.section("backfill")?;
        let backfill = {
            let s = backfill_section.as_ref();
            let enabled = opt(s, |s| s.boolean("enabled"))?.unwrap_or(false);
            let max_age =
                opt(s, |s| s.duration("max_age"))?.unwrap_or(Duration::from_secs(720 * 3600));
            let max_events = non_negative(s, "exporter.backfill.max_events", "max_events")?;
            let batch_size = non_negative(s, "exporter.backfill.batch_size", "batch_size")?;
            let rate_limit = non_negative(s, "exporter.backfill.rate_limit", "rate_limit")?;
            let max_events = max_events.unwrap_or(0);
            if enabled && max_events == 0 {
                return Err(invalid(
                    "exporter.backfill.max_events",
                    "must be greater than 0 while exporter.backfill.enabled is true",
                ));
            }
            at_most(
                "exporter.backfill.max_events",
                max_events,
                MAX_BACKFILL_EVENTS,
            )?;
            duration_at_most("exporter.backfill.max_age", max_age, MAX_BACKFILL_AGE)?;
            if let Some(n) = batch_size {
                in_range(
                    "exporter.backfill.batch_size",
                    n as i64,
                    1,
                    MAX_BATCH_SIZE as i64,
                )?;
            }
            let rate_limit = rate_limit.unwrap_or(0);
            at_most("exporter.backfill.rate_limit", rate_limit, MAX_RATE_LIMIT)?;
            BackfillConfig {
                enabled,
                max_age,
                max_events,
                batch_size: batch_size.unwrap_or(500),
                rate_limit,
            }
        };

        let retry_section = exporter.section("failure_handling")?;
        let failure_handling = {
            let s = retry_section.as_ref();
            let max_retries =
                non_negative(s, "exporter.failure_handling.max_retries", "max_retries")?
                    .unwrap_or(0);
            at_most(
                "exporter.failure_handling.max_retries",
                max_retries,
                u64::from(MAX_RETRIES),
            )?;
            let max_retries = u32::try_from(max_retries).map_err(|_| {
                invalid(
                    "exporter.failure_handling.max_retries",
                    format!("{max_retries} is too large"),
                )
            })?;
            let multiplier = opt(s, |s| s.float("backoff_multiplier"))?.unwrap_or(0.0);
            if !(multiplier.is_finite() && (0.0..=MAX_BACKOFF_MULTIPLIER).contains(&multiplier)) {
                return Err(invalid(
                    "exporter.failure_handling.backoff_multiplier",
                    format!(
                        "must be a number from 0 to {MAX_BACKOFF_MULTIPLIER} \
                         (0 keeps the interval constant), got {multiplier}"
                    ),
                ));
            }
            let initial_backoff =
                opt(s, |s| s.duration("initial_backoff"))?.unwrap_or(Duration::from_secs(1));
            let max_backoff =
                opt(s, |s| s.duration("max_backoff"))?.unwrap_or(Duration::from_secs(60));
            duration_at_most(
                "exporter.failure_handling.initial_backoff",
                initial_backoff,
                MAX_WAIT,
            )?;
            duration_at_most(
                "exporter.failure_handling.max_backoff",
                max_backoff,
                MAX_WAIT,
            )?;
            RetryPolicy {
                max_retries,
                initial_backoff,
                max_backoff,
                backoff_multiplier: multiplier,
            }
        };

        let (rejections, dead_letter_section) = match retry_section.as_ref() {
            Some(s) => rejection_policy(s)?,
            None => (
                RejectionPolicy {
                    on_rejected: OnRejected::Stop,
                    rejected_statuses: DEFAULT_REJECTED_STATUSES.to_vec(),
                    already_delivered_statuses: Vec::new(),
                    dead_letter: None,
                },
                None,
            ),
        };

        let filter_section = exporter.section("filter")?;
        let filter_expression = opt(filter_section.as_ref(), |s| s.string("expression"))?
            .filter(|e| !e.trim().is_empty());

        let token_section = exporter.section("resume_token")?;
        let mut resume_token = BTreeMap::new();
        if let Some(section) = &token_section {
            for key in ["database", "collection"] {
                if let Some(value) = section.string(key)? {
                    resume_token.insert(key.to_string(), value);
                }
            }
        }
        let resume_token_save_interval =
            opt(token_section.as_ref(), |s| s.duration("save_interval"))?
                .unwrap_or(Duration::from_millis(100));

        let liveness_timeout = match exporter.duration("liveness_timeout")? {
            None => crate::watchdog::default_liveness_timeout(
                sink.timeout,
                failure_handling.max_backoff,
            ),
            Some(timeout) if timeout < Duration::from_secs(1) => {
                return Err(invalid(
                    "exporter.liveness_timeout",
                    format!("must be at least 1s, got {}", format_go_duration(timeout)),
                ))
            }
            Some(timeout) => timeout,
        };

        // Nested sections record which of their keys were read; gather their leftovers.
        let mut unknown = Vec::new();
        let mut did_you_mean = BTreeMap::new();
        for section in [
            &sink_section,
            &oidc_section,
            &backfill_section,
            &retry_section,
            &filter_section,
            &token_section,
            &dead_letter_section,
        ]
        .into_iter()
        .flatten()
        {
            section.collect_unknown(&mut unknown, &mut did_you_mean);
        }
        let mut warnings = Vec::new();
        for section in [
            &metadata_section,
            &sink_section,
            &oidc_section,
            &backfill_section,
            &retry_section,
            &filter_section,
            &token_section,
        ]
        .into_iter()
        .flatten()
        {
            section.collect_warnings(&mut warnings);
        }

        Ok(Config {
            metadata,
            client_name,
            workers,
            sink,
            oidc,
            backfill,
            failure_handling,
            rejections,
            resume_token_save_interval,
            filter_expression,
            resume_token,
            liveness_timeout,
            unknown_keys: unknown,
            did_you_mean,
            warnings,
        })
    }

    /// The value of `metadata.cluster` (validated non-empty).
    pub fn cluster(&self) -> &str {
        self.metadata
            .get("cluster")
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// Reads `on_rejected`, the status lists and `[dead_letter]` from
/// `[exporter.failure_handling]`; returns the dead-letter section so its unknown keys are
/// reported.
fn rejection_policy<'a>(
    s: &Section<'a>,
) -> Result<(RejectionPolicy, Option<Section<'a>>), ConfigError> {
    let on_rejected = match s.string("on_rejected")?.as_deref() {
        None | Some("stop") => OnRejected::Stop,
        Some("dead_letter") => OnRejected::DeadLetter,
        Some(other) => {
            return Err(invalid(
                &s.key("on_rejected"),
                format!("must be \"stop\" or \"dead_letter\", got {other:?}"),
            ))
        }
    };
    let rejected_statuses = s
        .statuses("rejected_statuses")?
        .unwrap_or_else(|| DEFAULT_REJECTED_STATUSES.to_vec());
    let already_delivered_statuses = s
        .statuses("already_delivered_statuses")?
        .unwrap_or_default();
    if let Some(both) = already_delivered_statuses
        .iter()
        .find(|status| rejected_statuses.contains(status))
    {
        return Err(invalid(
            &s.key("already_delivered_statuses"),
            format!("{both} is also in rejected_statuses; a status can mean only one of the two"),
        ));
    }
    let section = s.section("dead_letter")?;
    let dead_letter = match &section {
        None => None,
        Some(d) => {
            let file = d.string("file")?;
            if file.as_ref().is_some_and(|f| f.trim().is_empty()) {
                return Err(invalid(&d.key("file"), "must not be empty"));
            }
            let endpoint = d.string("endpoint")?;
            if let Some(endpoint) = &endpoint {
                check_http_url(&d.key("endpoint"), endpoint)?;
            }
            if file.is_none() && endpoint.is_none() {
                return Err(invalid(
                    &d.path,
                    "needs file, endpoint or both (where dead-lettered events are written)",
                ));
            }
            Some(DeadLetterConfig {
                file: file.map(PathBuf::from),
                endpoint,
            })
        }
    };
    match (on_rejected, &dead_letter) {
        (OnRejected::DeadLetter, None) => {
            return Err(invalid(
                &s.key("on_rejected"),
                format!(
                    "\"dead_letter\" needs a [{}] table with file and/or endpoint",
                    s.key("dead_letter")
                ),
            ))
        }
        (OnRejected::Stop, Some(_)) => {
            return Err(invalid(
                &s.key("dead_letter"),
                "is only used with on_rejected = \"dead_letter\" (the default \"stop\" never \
                 writes it)",
            ))
        }
        _ => {}
    }
    Ok((
        RejectionPolicy {
            on_rejected,
            rejected_statuses,
            already_delivered_statuses,
            dead_letter,
        },
        section,
    ))
}

fn opt<T>(
    section: Option<&Section>,
    read: impl FnOnce(&Section) -> Result<Option<T>, ConfigError>,
) -> Result<Option<T>, ConfigError> {
    match section {
        Some(section) => read(section),
        None => Ok(None),
    }
}

fn non_negative(
    section: Option<&Section>,
    full_key: &str,
    key: &str,
) -> Result<Option<u64>, ConfigError> {
    match opt(section, |s| s.integer(key))? {
        None => Ok(None),
        Some(n) if n >= 0 => Ok(Some(n as u64)),
        Some(n) => Err(invalid(full_key, format!("must not be negative, got {n}"))),
    }
}

/// Upper bounds of the numeric keys, checked at start (`Config::parse`, so `check-config` and
/// the exporter agree). They keep every later computation in range: `Instant`/`DateTime`
/// arithmetic, `Duration::mul_f64` in the retry schedule, PostgreSQL `bigint` parameters.
pub const MAX_WORKERS: i64 = 1024;
/// `exporter.backfill.batch_size`: rows per keyset page.
pub const MAX_BATCH_SIZE: u64 = 100_000;
/// `exporter.backfill.max_events`.
pub const MAX_BACKFILL_EVENTS: u64 = 1_000_000_000;
/// `exporter.backfill.rate_limit`, events per second.
pub const MAX_RATE_LIMIT: u64 = 1_000_000;
/// `exporter.backfill.max_age`: ten years.
pub const MAX_BACKFILL_AGE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Timeouts and backoffs: one day.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
/// `exporter.failure_handling.max_retries`.
pub const MAX_RETRIES: u32 = 100_000;
/// `exporter.failure_handling.backoff_multiplier`.
pub const MAX_BACKOFF_MULTIPLIER: f64 = 100.0;

fn in_range(key: &str, value: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            key,
            format!("must be from {min} to {max}, got {value}"),
        ))
    }
}

fn at_most(key: &str, value: u64, max: u64) -> Result<u64, ConfigError> {
    if value <= max {
        Ok(value)
    } else {
        Err(invalid(key, format!("must be at most {max}, got {value}")))
    }
}

fn duration_at_most(key: &str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    if value <= max {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!(
                "must be at most {}, got {}",
                format_go_duration(max),
                format_go_duration(value)
            ),
        ))
    }
}

/// `exporter.metadata.cluster` goes into the CloudEvent `source`
/// (`nvsentinel://<cluster>/healthevents`) as the URI's authority, so it must be an RFC 3986
/// `reg-name` made of unreserved characters: ASCII letters, digits, `-`, `.`, `_`, `~` (every
/// Kubernetes cluster name qualifies). Anything else would make `source` an invalid URI.
pub fn check_cluster(cluster: &str) -> Result<(), ConfigError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~');
    match cluster.chars().find(|c| !allowed(*c)) {
        None => Ok(()),
        Some(bad) => Err(invalid(
            "exporter.metadata.cluster",
            format!(
                "{cluster:?} contains {bad:?}: the cluster name becomes the host of the \
                 CloudEvent source nvsentinel://<cluster>/healthevents, so only ASCII letters, \
                 digits, '-', '.', '_' and '~' are allowed (RFC 3986 unreserved characters)"
            ),
        )),
    }
}

fn check_http_url(key: &str, text: &str) -> Result<(), ConfigError> {
    if !text.contains("://") {
        return Err(invalid(
            key,
            format!("{text:?} has no scheme: it must start with http:// or https://"),
        ));
    }
    match reqwest::Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(()),
        Ok(url) => Err(invalid(
            key,
            format!(
                "{text:?} is not an http:// or https:// URL (scheme {:?}): it must start with \
                 http:// or https://",
                url.scheme()
            ),
        )),
        Err(e) => Err(invalid(
            key,
            format!("{text:?} is not a valid http:// or https:// URL: {e}"),
        )),
    }
}

/// The tables of `[exporter]` this version reads. A table whose name is a likely misspelling of
/// one of these is an error, not a warning: `[exporter.odic]` would otherwise leave OIDC on with
/// no settings, and `[exporter.backfil]` would silently turn the backfill off.
const SECTIONS: [&str; 7] = [
    "metadata",
    "sink",
    "oidc",
    "backfill",
    "failure_handling",
    "filter",
    "resume_token",
];

/// The known name `name` most likely misspells: the closest by Damerau-Levenshtein distance,
/// within one edit per three characters (at least one); `None` when nothing is that close.
fn closest<'k>(name: &str, known: impl Iterator<Item = &'k str>) -> Option<&'k str> {
    let limit = (name.chars().count() / 3).max(1);
    known
        .filter(|candidate| *candidate != name)
        .map(|candidate| (strsim::damerau_levenshtein(name, candidate), candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min()
        .map(|(_, candidate)| candidate)
}

/// Fails on a table that misspells `[exporter]` or one of its known tables (see `SECTIONS`).
fn misspelled_section(root: &toml::Table) -> Result<(), ConfigError> {
    for (key, value) in root {
        if key != "exporter" && value.is_table() && closest(key, ["exporter"].into_iter()).is_some()
        {
            return Err(invalid(
                key,
                format!("unknown table [{key}]: did you mean [exporter]?"),
            ));
        }
    }
    let Some(toml::Value::Table(exporter)) = root.get("exporter") else {
        return Ok(());
    };
    for (key, value) in exporter {
        if !value.is_table() || SECTIONS.contains(&key.as_str()) {
            continue;
        }
        if let Some(known) = closest(key, SECTIONS.into_iter()) {
            return Err(invalid(
                &format!("exporter.{key}"),
                format!(
                    "unknown table [exporter.{key}]: did you mean [exporter.{known}]? \
                     (its settings would be ignored)"
                ),
            ));
        }
    }
    Ok(())
}

/// The integer a float stands for, when it has an integral value within `i64`.
fn integral(value: f64) -> Option<i64> {
    // 2^63 is exactly representable; every float below it in magnitude converts exactly.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    (value.is_finite() && value.fract() == 0.0 && (-LIMIT..LIMIT).contains(&value))
        .then_some(value as i64)
}

fn wrong_type(expected: &str, found: &toml::Value) -> String {
    format!("expected {expected}, got {} {found}", found.type_str())
}

/// One TOML table being read, remembering which keys were consumed so the rest can be
/// reported as unknown.
struct Section<'a> {
    path: String,
    table: &'a toml::Table,
    used: std::cell::RefCell<BTreeSet<String>>,
    warnings: std::cell::RefCell<Vec<String>>,
}

impl<'a> Section<'a> {
    fn new(path: &str, table: &'a toml::Table) -> Self {
        Section {
            path: path.to_string(),
            table,
            used: Default::default(),
            warnings: Default::default(),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    fn mark_used(&self, key: &str) {
        self.used.borrow_mut().insert(key.to_string());
    }

    fn get(&self, key: &str) -> Option<&'a toml::Value> {
        self.mark_used(key);
        self.table.get(key)
    }

    fn section(&self, key: &str) -> Result<Option<Section<'a>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Table(table)) => Ok(Some(Section::new(&self.key(key), table))),
            Some(other) => Err(invalid(&self.key(key), wrong_type("a table", other))),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::String(text)) => Ok(Some(text.clone())),
            Some(other) => Err(invalid(&self.key(key), wrong_type("a string", other))),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Boolean(value)) => Ok(Some(*value)),
            Some(other) => Err(invalid(&self.key(key), wrong_type("true or false", other))),
        }
    }

    fn integer(&self, key: &str) -> Result<Option<i64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(value)) => Ok(Some(*value)),
            // Charts before upstream PR #1010 render large integers as floats (`1e+06`).
            Some(toml::Value::Float(value)) => match integral(*value) {
                Some(n) => {
                    self.warnings.borrow_mut().push(format!(
                        "{}: {value} is a float; read as the integer {n} (write {n})",
                        self.key(key)
                    ));
                    Ok(Some(n))
                }
                None => Err(invalid(
                    &self.key(key),
                    format!("expected an integer, got float {value}"),
                )),
            },
            Some(other) => Err(invalid(&self.key(key), wrong_type("an integer", other))),
        }
    }

    /// A list of HTTP statuses, each a 4xx other than 401, 407, 408 and 429.
    fn statuses(&self, key: &str) -> Result<Option<Vec<u16>>, ConfigError> {
        let items = match self.get(key) {
            None => return Ok(None),
            Some(toml::Value::Array(items)) => items,
            Some(other) => {
                return Err(invalid(
                    &self.key(key),
                    wrong_type("a list of HTTP statuses", other),
                ))
            }
        };
        let mut statuses = Vec::new();
        for item in items {
            let status = match item {
                toml::Value::Integer(n) => {
                    u16::try_from(*n).ok().filter(|n| (400..500).contains(n))
                }
                _ => None,
            };
            match status {
                Some(status) if !TRANSIENT_STATUSES.contains(&status) => statuses.push(status),
                _ => {
                    return Err(invalid(
                        &self.key(key),
                        format!(
                            "{item} is not allowed: each entry must be a 4xx status other than \
                             401, 407, 408 and 429 (those and 5xx are always retried)"
                        ),
                    ))
                }
            }
        }
        Ok(Some(statuses))
    }

    fn float(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(toml::Value::Float(value)) => Ok(Some(*value)),
            Some(toml::Value::Integer(value)) => Ok(Some(*value as f64)),
            Some(other) => Err(invalid(&self.key(key), wrong_type("a number", other))),
        }
    }

    fn duration(&self, key: &str) -> Result<Option<Duration>, ConfigError> {
        match self.string(key)? {
            None => Ok(None),
            Some(text) => parse_go_duration(&text).map(Some).map_err(|reason| {
                invalid(
                    &self.key(key),
                    format!("invalid duration {text:?}: {reason} (examples: \"30s\", \"1h30m\")"),
                )
            }),
        }
    }

    /// Warnings about this table's values (not of child sections').
    fn collect_warnings(&self, into: &mut Vec<String>) {
        into.extend(self.warnings.borrow().iter().cloned());
    }

    /// Keys of this table (not of child sections, which report their own) never read, each
    /// with the read key it most likely misspells.
    fn collect_unknown(&self, into: &mut Vec<String>, did_you_mean: &mut BTreeMap<String, String>) {
        let used = self.used.borrow();
        for key in self.table.keys() {
            if !used.contains(key) {
                into.push(self.key(key));
                if let Some(known) = closest(key, used.iter().map(String::as_str)) {
                    did_you_mean.insert(self.key(key), self.key(known));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
