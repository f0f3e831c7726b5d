//! The configuration file as written: serde-derived structs that mirror upstream's TOML layout
//! key for key, and the leaf types that read one TOML value each.
//!
//! Invariant: these structs are the ONE list of keys the exporter knows. Unknown keys, the
//! "did you mean" corrections and the misspelled-table check (`super::keys`) all read the key
//! names from here, so a key added to a struct is known everywhere at once. Every field is
//! optional (absent = upstream's default, applied in `super::Config::from_raw`), and a leaf only
//! checks the TOML type; ranges and rules between keys are checked in `from_raw`.
//!
//! A leaf's error message is the text after `key: ` in [`super::ConfigError::Invalid`]; the key
//! comes from `serde_path_to_error`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, Visitor};

use super::{parse_go_duration, DurationError, TRANSIENT_STATUSES};

/// The whole file: only `[exporter]` is read.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, expecting = "a table")]
pub(super) struct RawRoot {
    pub exporter: RawExporter,
}

/// `[exporter]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, expecting = "a table")]
pub(super) struct RawExporter {
    /// Free-form: every key is copied into `data.metadata`.
    pub metadata: Metadata,
    pub client_name: Option<Text>,
    pub workers: Option<Int>,
    pub sink: RawSink,
    pub oidc: RawOidc,
    pub backfill: RawBackfill,
    pub failure_handling: RawFailureHandling,
    pub filter: RawFilter,
    pub resume_token: RawResumeToken,
    pub liveness_timeout: Option<GoDuration>,
    pub cloudevent: RawCloudEvent,
}

/// `[exporter.sink]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, expecting = "a table")]
pub(super) struct RawSink {
    pub endpoint: Option<Text>,
    pub timeout: Option<GoDuration>,
    pub insecure_skip_verify: Option<Flag>,
    pub ca_file: Option<Text>,
    pub concurrency: Option<Text>,
    pub mode: Option<Text>,
    pub batch_max_events: Option<Int>,
    pub batch_max_bytes: Option<Int>,
    pub batch_linger: Option<GoDuration>,
}

/// `[exporter.oidc]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, expecting = "a table")]
pub(super) struct RawOidc {
    pub enabled: Option<Flag>,
    pub token_url: Option<Text>,
    pub client_id: Option<Text>,
    pub scope: Option<Text>,
    pub insecure_skip_verify: Option<Flag>,
    pub ca_file: Option<Text>,
    pub client_auth_method: Option<Text>,
    pub default_token_lifetime: Option<GoDuration>,
}

/// `[exporter.backfill]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, expecting = "a table")]
pub(super) struct RawBackfill {
    pub enabled: Option<Flag>,
    pub max_age: Option<GoDuration>,
    pub max_events: Option<Int>,
    pub batch_size: Option<Int>,
    pub rate_limit: Option<Int>,
}

/// `[exporter.failure_handling]`: upstream's retry keys plus the rejection policy.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, expecting = "a table")]
pub(super) struct RawFailureHandling {
    pub max_retries: Option<Int>,
    pub initial_backoff: Option<GoDuration>,
    pub max_backoff: Option<GoDuration>,
    pub backoff_multiplier: Option<Number>,
    pub on_rejected: Option<Text>,
    pub rejected_statuses: Option<Statuses>,
    pub already_delivered_statuses: Option<Statuses>,
    /// Present or not matters: the table is only allowed with `on_rejected = "dead_letter"`.
    pub dead_letter: Option<RawDeadLetter>,
}

/// `[exporter.failure_handling.dead_letter]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, expecting = "a table")]
pub(super) struct RawDeadLetter {
    pub file: Option<Text>,
    pub endpoint: Option<Text>,
}

/// `[exporter.cloudevent]`: optional CloudEvent attributes (this exporter's; upstream has none).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, expecting = "a table")]
pub(super) struct RawCloudEvent {
    pub subject: Option<Text>,
}

/// `[exporter.filter]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, expecting = "a table")]
pub(super) struct RawFilter {
    pub expression: Option<Text>,
}

/// `[exporter.resume_token]`: `database` and `collection` are upstream's (kept for
/// compatibility; the token lives in the datastore), `save_interval` is this exporter's.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default, expecting = "a table")]
pub(super) struct RawResumeToken {
    pub database: Option<Text>,
    pub collection: Option<Text>,
    pub save_interval: Option<GoDuration>,
}

/// `[exporter.metadata]`: a table of free keys, each a string.
#[derive(Debug, Default)]
pub(super) struct Metadata(pub BTreeMap<String, Text>);

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Metadata;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Metadata, A::Error> {
                let mut entries = BTreeMap::new();
                while let Some((key, value)) = map.next_entry::<String, Text>()? {
                    entries.insert(key, value);
                }
                Ok(Metadata(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// What is wrong with one TOML value; its text is the key's message.
#[derive(Debug, thiserror::Error)]
pub(super) enum ValueError {
    /// `expected a string, got integer 3`.
    #[error("expected {expected}, got {} {found}", .found.type_str())]
    WrongType {
        expected: &'static str,
        found: toml::Value,
    },
    /// A float where an integer goes, whose value is not integral (`1.5`).
    #[error("expected an integer, got float {0}")]
    NotIntegral(f64),
    #[error("invalid duration {text:?}: {source} (examples: \"30s\", \"1h30m\")")]
    Duration {
        text: String,
        #[source]
        source: DurationError,
    },
    /// An entry of a list of statuses that a rejection policy cannot name.
    #[error(
        "{0} is not allowed: each entry must be a 4xx status other than 401, 407, 408 and 429 \
         (those and 5xx are always retried)"
    )]
    Status(toml::Value),
}

fn wrong_type(expected: &'static str, found: toml::Value) -> ValueError {
    ValueError::WrongType { expected, found }
}

/// Reads one TOML value and converts it, the error text becoming the key's message.
fn leaf<'de, D: Deserializer<'de>, T>(
    deserializer: D,
    convert: impl FnOnce(toml::Value) -> Result<T, ValueError>,
) -> Result<T, D::Error> {
    convert(toml::Value::deserialize(deserializer)?).map_err(D::Error::custom)
}

/// A TOML string.
#[derive(Debug, Clone, Default)]
pub(super) struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        leaf(deserializer, |value| match value {
            toml::Value::String(text) => Ok(Text(text)),
            other => Err(wrong_type("a string", other)),
        })
    }
}

/// A TOML boolean.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        leaf(deserializer, |value| match value {
            toml::Value::Boolean(flag) => Ok(Flag(flag)),
            other => Err(wrong_type("true or false", other)),
        })
    }
}

/// A TOML integer, or a float with an integral value: charts before upstream PR #1010 render
/// large integers as floats (`1e+06`). Such a float is accepted and remembered, so that
/// `from_raw` warns about it naming the key; `1.5` is rejected.
#[derive(Debug, Clone, Copy)]
pub(super) struct Int {
    pub value: i64,
    /// The float as written, when the value was one.
    pub written_as_float: Option<f64>,
}

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        leaf(deserializer, |value| match value {
            toml::Value::Integer(value) => Ok(Int {
                value,
                written_as_float: None,
            }),
            toml::Value::Float(float) => match integral(float) {
                Some(value) => Ok(Int {
                    value,
                    written_as_float: Some(float),
                }),
                None => Err(ValueError::NotIntegral(float)),
            },
            other => Err(wrong_type("an integer", other)),
        })
    }
}

/// The integer a float stands for, when it has an integral value within `i64`.
fn integral(value: f64) -> Option<i64> {
    // 2^63 is exactly representable; every float below it in magnitude converts exactly.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    (value.is_finite() && value.fract() == 0.0 && (-LIMIT..LIMIT).contains(&value))
        .then_some(value as i64)
}

/// A TOML float or integer (read as a float).
#[derive(Debug, Clone, Copy)]
pub(super) struct Number(pub f64);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        leaf(deserializer, |value| match value {
            toml::Value::Float(value) => Ok(Number(value)),
            toml::Value::Integer(value) => Ok(Number(value as f64)),
            other => Err(wrong_type("a number", other)),
        })
    }
}

/// A Go duration string (`"30s"`, `"1h30m"`; see `super::parse_go_duration`).
#[derive(Debug, Clone, Copy)]
pub(super) struct GoDuration(pub Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        leaf(deserializer, |value| match value {
            toml::Value::String(text) => match parse_go_duration(&text) {
                Ok(duration) => Ok(GoDuration(duration)),
                Err(source) => Err(ValueError::Duration { text, source }),
            },
            other => Err(wrong_type("a string", other)),
        })
    }
}

/// A list of HTTP statuses, each a 4xx other than 401, 407, 408 and 429 (those, and 5xx, are
/// always retried: they describe the sink or the credentials, not the event).
#[derive(Debug, Clone, Default)]
pub(super) struct Statuses(pub Vec<u16>);

impl<'de> Deserialize<'de> for Statuses {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        leaf(deserializer, |value| {
            let toml::Value::Array(items) = value else {
                return Err(wrong_type("a list of HTTP statuses", value));
            };
            items
                .iter()
                .map(|item| {
                    item.as_integer()
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|n| (400..500).contains(n) && !TRANSIENT_STATUSES.contains(n))
                        .ok_or_else(|| ValueError::Status(item.clone()))
                })
                .collect::<Result<Vec<u16>, ValueError>>()
                .map(Statuses)
        })
    }
}
