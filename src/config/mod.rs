//! The exporter's TOML configuration: upstream's layout (`[exporter.*]`, snake_case keys, Go
//! durations) and upstream's defaults, validated once at start so that a bad value is reported
//! with the key that holds it instead of failing on the first event.
//!
//! Reading goes in three steps, each naming the key at fault:
//! 1. `keys::check_table_names`: a table whose name misspells a known one is an error;
//! 2. `keys::read`: serde deserializes the tree into the structs of `raw` (the one list of
//!    known keys); a value of the wrong type fails naming its key (`serde_path_to_error`),
//!    keys no struct reads are collected as unknown (`serde_ignored`);
//! 3. `Config::from_raw`: upstream's defaults, ranges and the rules between keys.

mod duration;
mod keys;
mod raw;

pub use duration::{format_go_duration, parse_go_duration, DurationError};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use raw::RawExporter;

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
    /// `exporter.cloudevent.subject`: `none` (default, upstream's exact shape) or `node_name`
    /// (the CloudEvents `subject` attribute carries the event's node name, so a receiver can
    /// route or filter on it without parsing `data`).
    pub subject: crate::cloudevent::Subject,
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
    /// Shown (check-config's effective settings) with a password in it masked.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub endpoint: String,
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    pub insecure_skip_verify: bool,
    /// Extra PEM CA bundle trusted for the sink (private PKI), besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// `exporter.sink.concurrency` (default [`ConcurrencyMode::Fixed`]): how many requests
    /// may be in flight.
    pub concurrency: ConcurrencyMode,
    /// `exporter.sink.mode`: one event per request (`structured`, default) or JSON arrays.
    pub mode: SinkMode,
    /// `batch_max_events`, `batch_max_bytes`, `batch_linger` (used in batch mode).
    pub batch: BatchLimits,
}

/// The CloudEvents HTTP content mode (`exporter.sink.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkMode {
    /// One event per request, `application/cloudevents+json` (upstream's behaviour).
    Structured,
    /// A JSON array of events per request, `application/cloudevents-batch+json`.
    Batch,
}

/// How big a batch may grow and how long a worker waits to fill it (batch mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchLimits {
    /// At most this many events per request (1–10,000, default 100).
    pub max_events: usize,
    /// At most this many body bytes per request (default 1 MiB, at least 1 KiB); one event
    /// larger than this goes alone.
    pub max_bytes: usize,
    /// How long fewer than `max_events` waiting events wait for more (default 10ms, at most 1s).
    #[serde(serialize_with = "serialize_duration")]
    pub linger: Duration,
}

/// Defaults of `batch_max_events`, `batch_max_bytes`, `batch_linger`.
pub const DEFAULT_BATCH: BatchLimits = BatchLimits {
    max_events: 100,
    max_bytes: 1024 * 1024,
    linger: Duration::from_millis(10),
};

/// How many requests to the sink may be in flight (`exporter.sink.concurrency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConcurrencyMode {
    /// Always `workers` (upstream's behaviour).
    Fixed,
    /// `workers` is the ceiling; the limit follows the sink's latency and back-pressure
    /// answers (AIMD, see `crate::sink::concurrency`).
    Adaptive,
}

impl ConcurrencyMode {
    /// Every accepted config value.
    pub const NAMES: [&'static str; 2] = ["fixed", "adaptive"];

    fn from_name(name: &str) -> Option<ConcurrencyMode> {
        match name {
            "fixed" => Some(ConcurrencyMode::Fixed),
            "adaptive" => Some(ConcurrencyMode::Adaptive),
            _ => None,
        }
    }
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
    /// http(s) URL POSTed one JSON record per event, with the sink's TLS options (shown with a
    /// password in it masked).
    #[serde(serialize_with = "serialize_redacted_url_opt")]
    pub endpoint: Option<String>,
}

fn serialize_redacted_url<S: serde::Serializer>(value: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::sink::redact_url(value))
}

fn serialize_redacted_url_opt<S: serde::Serializer>(
    value: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(url) => serialize_redacted_url(url, s),
        None => s.serialize_none(),
    }
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

    /// Validates TOML text (the path in a syntax error is left empty): the text is parsed,
    /// table names are checked for misspellings, the tree is deserialized into the structs of
    /// `raw` (type errors name their key), then ranges and rules between keys are checked.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: PathBuf::new(),
                message: e.to_string().trim().to_string(),
            })?;
        keys::check_table_names(&root)?;
        let read = keys::read(root)?;
        let mut config = Config::from_raw(read.exporter)?;
        config.unknown_keys = read.unknown_keys;
        config.did_you_mean = read.did_you_mean;
        config.warnings.sort();
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

    /// Applies upstream's defaults and checks every range and rule between keys.
    fn from_raw(raw: RawExporter) -> Result<Config, ConfigError> {
        let mut warnings = Vec::new();
        let metadata = metadata(raw.metadata)?;
        let client_name = client_name(raw.client_name)?;
        let workers = workers(raw.workers, &mut warnings)?;
        let sink = sink(raw.sink, &mut warnings)?;
        let oidc = oidc(raw.oidc)?;
        let backfill = backfill(raw.backfill, &mut warnings)?;
        let failure_handling = retry_policy(&raw.failure_handling, &mut warnings)?;
        let rejections = rejection_policy(raw.failure_handling)?;
        let filter_expression = raw
            .filter
            .expression
            .map(|text| text.0)
            .filter(|e| !e.trim().is_empty());
        let resume_token_save_interval = raw
            .resume_token
            .save_interval
            .map_or(Duration::from_millis(100), |d| d.0);
        let liveness_timeout = liveness_timeout(raw.liveness_timeout, &sink, &failure_handling)?;
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
            resume_token: resume_token_location(raw.resume_token),
            liveness_timeout,
            subject: subject(raw.cloudevent)?,
            unknown_keys: Vec::new(),
            did_you_mean: BTreeMap::new(),
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

/// `exporter.client_name`: upstream's default when absent, never blank.
fn client_name(raw: Option<raw::Text>) -> Result<String, ConfigError> {
    let client_name = raw.map_or_else(|| DEFAULT_CLIENT_NAME.to_string(), |name| name.0);
    if client_name.trim().is_empty() {
        return Err(invalid("exporter.client_name", "must not be empty"));
    }
    Ok(client_name)
}

/// `exporter.workers`: from 1 to [`MAX_WORKERS`] when set.
fn workers(
    raw: Option<raw::Int>,
    warnings: &mut Vec<String>,
) -> Result<Option<usize>, ConfigError> {
    match int("exporter.workers", raw, warnings) {
        None => Ok(None),
        Some(n) => Ok(Some(
            in_range("exporter.workers", n, 1, MAX_WORKERS)? as usize
        )),
    }
}

/// `[exporter.resume_token]`'s `database` and `collection` (upstream's MongoDB location),
/// kept for the report.
fn resume_token_location(raw: raw::RawResumeToken) -> BTreeMap<String, String> {
    [("database", raw.database), ("collection", raw.collection)]
        .into_iter()
        .filter_map(|(key, value)| value.map(|value| (key.to_string(), value.0)))
        .collect()
}

/// `exporter.liveness_timeout`: at least 1s; by default derived from the sink timeout and the
/// retry cap (`crate::watchdog::default_liveness_timeout`).
fn liveness_timeout(
    raw: Option<raw::GoDuration>,
    sink: &SinkConfig,
    retry: &RetryPolicy,
) -> Result<Duration, ConfigError> {
    match raw.map(|d| d.0) {
        None => Ok(crate::watchdog::default_liveness_timeout(
            sink.timeout,
            retry.max_backoff,
        )),
        Some(timeout) if timeout < Duration::from_secs(1) => Err(invalid(
            "exporter.liveness_timeout",
            format!("must be at least 1s, got {}", format_go_duration(timeout)),
        )),
        Some(timeout) => Ok(timeout),
    }
}

/// `exporter.cloudevent.subject`: `none` (default) or `node_name`.
fn subject(raw: raw::RawCloudEvent) -> Result<crate::cloudevent::Subject, ConfigError> {
    match raw.subject.as_ref().map(|t| t.0.as_str()) {
        None | Some("none") => Ok(crate::cloudevent::Subject::None),
        Some("node_name") => Ok(crate::cloudevent::Subject::NodeName),
        Some(other) => Err(invalid(
            "exporter.cloudevent.subject",
            format!("must be \"none\" or \"node_name\", got {other:?}"),
        )),
    }
}

/// `[exporter.metadata]`: any string keys; `cluster` is required and must be a URI host.
fn metadata(raw: raw::Metadata) -> Result<BTreeMap<String, String>, ConfigError> {
    let metadata: BTreeMap<String, String> = raw.0.into_iter().map(|(k, v)| (k, v.0)).collect();
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
    Ok(metadata)
}

/// `exporter.sink.mode` and the batch limits.
fn sink_mode(
    raw: &raw::RawSink,
    warnings: &mut Vec<String>,
) -> Result<(SinkMode, BatchLimits), ConfigError> {
    let mode = match raw.mode.as_ref().map(|t| t.0.trim()) {
        None | Some("structured") => SinkMode::Structured,
        Some("batch") => SinkMode::Batch,
        Some(other) => {
            return Err(invalid(
                "exporter.sink.mode",
                format!("unknown mode {other:?}; expected one of structured, batch"),
            ))
        }
    };
    let mut batch = DEFAULT_BATCH;
    if let Some(n) = int(
        "exporter.sink.batch_max_events",
        raw.batch_max_events,
        warnings,
    ) {
        batch.max_events = in_range("exporter.sink.batch_max_events", n, 1, 10_000)? as usize;
    }
    if let Some(n) = int(
        "exporter.sink.batch_max_bytes",
        raw.batch_max_bytes,
        warnings,
    ) {
        let max = 64 * 1024 * 1024;
        batch.max_bytes = in_range("exporter.sink.batch_max_bytes", n, 1024, max)? as usize;
    }
    if let Some(linger) = &raw.batch_linger {
        duration_at_most(
            "exporter.sink.batch_linger",
            linger.0,
            Duration::from_secs(1),
        )?;
        batch.linger = linger.0;
    }
    Ok((mode, batch))
}

fn sink(raw: raw::RawSink, warnings: &mut Vec<String>) -> Result<SinkConfig, ConfigError> {
    let (mode, batch) = sink_mode(&raw, warnings)?;
    let endpoint = raw.endpoint.map(|t| t.0).unwrap_or_default();
    if endpoint.trim().is_empty() {
        return Err(invalid("exporter.sink.endpoint", "is required"));
    }
    check_http_url("exporter.sink.endpoint", &endpoint)?;
    let timeout = raw.timeout.map_or(Duration::from_secs(30), |d| d.0);
    if timeout.is_zero() {
        return Err(invalid("exporter.sink.timeout", "must be greater than 0"));
    }
    duration_at_most("exporter.sink.timeout", timeout, MAX_WAIT)?;
    let concurrency = match raw.concurrency {
        None => ConcurrencyMode::Fixed,
        Some(raw::Text(name)) => ConcurrencyMode::from_name(name.trim()).ok_or_else(|| {
            invalid(
                "exporter.sink.concurrency",
                format!(
                    "unknown mode {name:?}; expected one of {}",
                    ConcurrencyMode::NAMES.join(", ")
                ),
            )
        })?,
    };
    Ok(SinkConfig {
        endpoint,
        timeout,
        insecure_skip_verify: raw.insecure_skip_verify.is_some_and(|f| f.0),
        ca_file: raw.ca_file.map(|t| PathBuf::from(t.0)),
        concurrency,
        mode,
        batch,
    })
}

/// `[exporter.oidc]`: every key is type-checked; the endpoint keys are required only while
/// `enabled` (default true).
fn oidc(raw: raw::RawOidc) -> Result<Option<OidcConfig>, ConfigError> {
    let client_auth_method = client_auth_method(raw.client_auth_method)?;
    let default_token_lifetime = default_token_lifetime(raw.default_token_lifetime)?;
    if !raw.enabled.is_none_or(|f| f.0) {
        return Ok(None);
    }
    let token_url = required_oidc_key("token_url", raw.token_url)?;
    let client_id = required_oidc_key("client_id", raw.client_id)?;
    let scope = required_oidc_key("scope", raw.scope)?;
    check_http_url("exporter.oidc.token_url", &token_url)?;
    Ok(Some(OidcConfig {
        token_url,
        client_id,
        scope,
        insecure_skip_verify: raw.insecure_skip_verify.is_some_and(|f| f.0),
        ca_file: raw.ca_file.map(|t| PathBuf::from(t.0)),
        client_auth_method,
        default_token_lifetime,
    }))
}

/// `exporter.oidc.client_auth_method`: one of [`ClientAuthMethod::NAMES`].
fn client_auth_method(raw: Option<raw::Text>) -> Result<ClientAuthMethod, ConfigError> {
    let Some(raw::Text(name)) = raw else {
        return Ok(ClientAuthMethod::ClientSecretBasicRaw);
    };
    ClientAuthMethod::from_name(name.trim()).ok_or_else(|| {
        invalid(
            "exporter.oidc.client_auth_method",
            format!(
                "unknown method {name:?}; expected one of {}",
                ClientAuthMethod::NAMES.join(", ")
            ),
        )
    })
}

/// `exporter.oidc.default_token_lifetime`: above 0, at most [`MAX_TOKEN_LIFETIME`].
fn default_token_lifetime(raw: Option<raw::GoDuration>) -> Result<Duration, ConfigError> {
    let lifetime = raw.map_or(DEFAULT_TOKEN_LIFETIME, |d| d.0);
    if lifetime.is_zero() || lifetime > MAX_TOKEN_LIFETIME {
        return Err(invalid(
            "exporter.oidc.default_token_lifetime",
            format!(
                "must be greater than 0 and at most {}, got {}",
                format_go_duration(MAX_TOKEN_LIFETIME),
                format_go_duration(lifetime)
            ),
        ));
    }
    Ok(lifetime)
}

/// `exporter.oidc.<key>`, required (not blank) while OIDC is enabled.
fn required_oidc_key(key: &str, raw: Option<raw::Text>) -> Result<String, ConfigError> {
    let value = raw.map(|t| t.0).unwrap_or_default();
    if value.trim().is_empty() {
        return Err(invalid(
            &format!("exporter.oidc.{key}"),
            "is required while exporter.oidc.enabled is true \
             (set enabled = false for a sink without authentication)",
        ));
    }
    Ok(value)
}

fn backfill(
    raw: raw::RawBackfill,
    warnings: &mut Vec<String>,
) -> Result<BackfillConfig, ConfigError> {
    let enabled = raw.enabled.is_some_and(|f| f.0);
    let max_age = raw.max_age.map_or(Duration::from_secs(720 * 3600), |d| d.0);
    let max_events = non_negative("exporter.backfill.max_events", raw.max_events, warnings)?;
    let batch_size = non_negative("exporter.backfill.batch_size", raw.batch_size, warnings)?;
    let rate_limit = non_negative("exporter.backfill.rate_limit", raw.rate_limit, warnings)?;
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
    let batch_size = batch_size.unwrap_or(500);
    if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
        return Err(invalid(
            "exporter.backfill.batch_size",
            format!("must be from 1 to {MAX_BATCH_SIZE}, got {batch_size}"),
        ));
    }
    let rate_limit = rate_limit.unwrap_or(0);
    at_most("exporter.backfill.rate_limit", rate_limit, MAX_RATE_LIMIT)?;
    Ok(BackfillConfig {
        enabled,
        max_age,
        max_events,
        batch_size,
        rate_limit,
    })
}

/// The retry keys of `[exporter.failure_handling]`.
fn retry_policy(
    raw: &raw::RawFailureHandling,
    warnings: &mut Vec<String>,
) -> Result<RetryPolicy, ConfigError> {
    const KEY: &str = "exporter.failure_handling.max_retries";
    let max_retries = non_negative(KEY, raw.max_retries, warnings)?.unwrap_or(0);
    at_most(KEY, max_retries, u64::from(MAX_RETRIES))?;
    let max_retries = u32::try_from(max_retries)
        .map_err(|_| invalid(KEY, format!("{max_retries} is too large")))?;
    let multiplier = raw.backoff_multiplier.map_or(0.0, |n| n.0);
    if !(multiplier.is_finite() && (0.0..=MAX_BACKOFF_MULTIPLIER).contains(&multiplier)) {
        return Err(invalid(
            "exporter.failure_handling.backoff_multiplier",
            format!(
                "must be a number from 0 to {MAX_BACKOFF_MULTIPLIER} \
                 (0 keeps the interval constant), got {multiplier}"
            ),
        ));
    }
    let initial_backoff = raw.initial_backoff.map_or(Duration::from_secs(1), |d| d.0);
    let max_backoff = raw.max_backoff.map_or(Duration::from_secs(60), |d| d.0);
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
    Ok(RetryPolicy {
        max_retries,
        initial_backoff,
        max_backoff,
        backoff_multiplier: multiplier,
    })
}

const ON_REJECTED: &str = "exporter.failure_handling.on_rejected";
const DEAD_LETTER: &str = "exporter.failure_handling.dead_letter";

/// `on_rejected`, the status lists and `[dead_letter]` of `[exporter.failure_handling]`.
fn rejection_policy(raw: raw::RawFailureHandling) -> Result<RejectionPolicy, ConfigError> {
    let on_rejected = on_rejected(raw.on_rejected)?;
    let rejected_statuses = raw
        .rejected_statuses
        .map_or_else(|| DEFAULT_REJECTED_STATUSES.to_vec(), |s| s.0);
    let already_delivered_statuses = raw
        .already_delivered_statuses
        .map(|s| s.0)
        .unwrap_or_default();
    if let Some(both) = already_delivered_statuses
        .iter()
        .find(|status| rejected_statuses.contains(status))
    {
        return Err(invalid(
            "exporter.failure_handling.already_delivered_statuses",
            format!("{both} is also in rejected_statuses; a status can mean only one of the two"),
        ));
    }
    let dead_letter = raw.dead_letter.map(dead_letter).transpose()?;
    check_dead_letter_use(on_rejected, dead_letter.as_ref())?;
    Ok(RejectionPolicy {
        on_rejected,
        rejected_statuses,
        already_delivered_statuses,
        dead_letter,
    })
}

/// `exporter.failure_handling.on_rejected`: `stop` (default) or `dead_letter`.
fn on_rejected(raw: Option<raw::Text>) -> Result<OnRejected, ConfigError> {
    match raw.as_ref().map(|t| t.0.as_str()) {
        None | Some("stop") => Ok(OnRejected::Stop),
        Some("dead_letter") => Ok(OnRejected::DeadLetter),
        Some(other) => Err(invalid(
            ON_REJECTED,
            format!("must be \"stop\" or \"dead_letter\", got {other:?}"),
        )),
    }
}

/// A `[dead_letter]` table exactly when `on_rejected = "dead_letter"`.
fn check_dead_letter_use(
    on_rejected: OnRejected,
    dead_letter: Option<&DeadLetterConfig>,
) -> Result<(), ConfigError> {
    match (on_rejected, dead_letter) {
        (OnRejected::DeadLetter, None) => Err(invalid(
            ON_REJECTED,
            format!("\"dead_letter\" needs a [{DEAD_LETTER}] table with file and/or endpoint"),
        )),
        (OnRejected::Stop, Some(_)) => Err(invalid(
            DEAD_LETTER,
            "is only used with on_rejected = \"dead_letter\" (the default \"stop\" never \
             writes it)",
        )),
        _ => Ok(()),
    }
}

/// `[exporter.failure_handling.dead_letter]`: at least one of `file` and `endpoint`.
fn dead_letter(raw: raw::RawDeadLetter) -> Result<DeadLetterConfig, ConfigError> {
    let file = raw.file.map(|t| t.0);
    if file.as_ref().is_some_and(|f| f.trim().is_empty()) {
        return Err(invalid(
            "exporter.failure_handling.dead_letter.file",
            "must not be empty",
        ));
    }
    let endpoint = raw.endpoint.map(|t| t.0);
    if let Some(endpoint) = &endpoint {
        check_http_url("exporter.failure_handling.dead_letter.endpoint", endpoint)?;
    }
    if file.is_none() && endpoint.is_none() {
        return Err(invalid(
            "exporter.failure_handling.dead_letter",
            "needs file, endpoint or both (where dead-lettered events are written)",
        ));
    }
    Ok(DeadLetterConfig {
        file: file.map(PathBuf::from),
        endpoint,
    })
}

/// An integer key's value; a float with an integral value adds a warning naming `key`.
fn int(key: &str, raw: Option<raw::Int>, warnings: &mut Vec<String>) -> Option<i64> {
    let raw = raw?;
    if let Some(float) = raw.written_as_float {
        let n = raw.value;
        warnings.push(format!(
            "{key}: {float} is a float; read as the integer {n} (write {n})"
        ));
    }
    Some(raw.value)
}

fn non_negative(
    key: &str,
    raw: Option<raw::Int>,
    warnings: &mut Vec<String>,
) -> Result<Option<u64>, ConfigError> {
    match int(key, raw, warnings) {
        None => Ok(None),
        Some(n) => u64::try_from(n)
            .map(Some)
            .map_err(|_| invalid(key, format!("must not be negative, got {n}"))),
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

#[cfg(test)]
mod tests;
