//! NVSentinel's health event, decoded tolerantly from a stored document.
//!
//! Documents come in two spellings: camelCase keys with `omitempty` (the PostgreSQL path, Go's
//! JSON) and lowercase keys (MongoDB's BSON). Enums may be numbers or names, timestamps
//! `{seconds, nanos}` or strings. Unknown keys (`RawEvent`, status fields) are ignored, but
//! checked as a JSON parse would check them.
//!
//! A document is read in one pass (`visit`): JSON text (PostgreSQL) and a JSON tree (MongoDB's
//! BSON mapped to JSON, and callers holding a `serde_json::Value`) go through the same visitors
//! into per-field slots, then the field functions below turn the chosen slots into a
//! [`HealthEvent`] or a [`DecodeError`] naming the first wrong field, in declaration order.
//!
//! The event borrows from the document it was decoded from (`HealthEvent<'a>`, `Decoded<'a>`):
//! its text fields are `Cow<'a, str>`, slices of the JSON text or of the tree's strings, copied
//! only when a string had an escape that had to be undone; enum names are the static names of
//! the tables below. Every event is decoded, filtered and encoded while its `Document` is held
//! (one worker's `handle`), so copying each string into an owned `String` only to drop it
//! after encoding was most of the allocations per event. The invariant is the borrow itself:
//! an event cannot outlive its document, and nothing returned from the pipeline's `prepare`
//! borrows from it.

mod visit;

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use serde::Deserialize;
use serde_json::Value;

use visit::{
    EntityFields, EventFields, Flags, Metadata, NonScalar, Scalar, Shape, Status, Time, Top,
};

pub use visit::MetadataMap;

/// A health event, borrowing its text from the document it was decoded from (see the module
/// docs); `'static` when built from literals or owned strings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HealthEvent<'a> {
    pub version: u64,
    pub agent: Cow<'a, str>,
    pub component_class: Cow<'a, str>,
    pub check_name: Cow<'a, str>,
    pub is_fatal: bool,
    pub is_healthy: bool,
    pub message: Cow<'a, str>,
    /// Enum name, e.g. `RESTART_VM` (an unknown number is kept as its decimal text).
    pub recommended_action: Cow<'a, str>,
    pub error_code: Vec<Cow<'a, str>>,
    pub entities_impacted: Vec<Entity<'a>>,
    pub metadata: MetadataMap<'a>,
    pub generated_timestamp: Option<DateTime<Utc>>,
    pub node_name: Cow<'a, str>,
    pub quarantine_overrides: Option<Overrides>,
    pub drain_overrides: Option<Overrides>,
    /// Enum name, e.g. `EXECUTE_REMEDIATION`.
    pub processing_strategy: Cow<'a, str>,
    pub custom_recommended_action: Cow<'a, str>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entity<'a> {
    pub entity_type: Cow<'a, str>,
    pub entity_value: Cow<'a, str>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overrides {
    pub force: bool,
    pub skip: bool,
}

/// What is wrong with a document, naming the field.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field}: {reason}")]
pub struct DecodeError {
    pub field: String,
    pub reason: String,
}

fn error(field: &str, reason: impl Into<String>) -> DecodeError {
    DecodeError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// `RecommendedAction` names of the current proto (upstream-changes-2026.md §2); any other
/// number is rendered as its digits (`"39"`), as Go's protobuf `String()` does.
const RECOMMENDED_ACTIONS: &[(i64, &str)] = &[
    (0, "NONE"),
    (2, "COMPONENT_RESET"),
    (5, "CONTACT_SUPPORT"),
    (6, "RUN_FIELDDIAG"),
    (15, "RESTART_VM"),
    (24, "RESTART_BM"),
    (25, "REPLACE_VM"),
    (26, "RUN_DCGMEUD"),
    (27, "CUSTOM"),
    (99, "UNKNOWN"),
];

/// `ProcessingStrategy` names of the current proto; other numbers become digit strings.
const PROCESSING_STRATEGIES: &[(i64, &str)] = &[
    (0, "UNSPECIFIED"),
    (1, "EXECUTE_REMEDIATION"),
    (2, "STORE_ONLY"),
    (3, "STORE_AND_ANALYSE"),
];

/// A stored health-event document, as its datastore hands it over (not yet decoded).
#[derive(Debug, Clone)]
pub enum Document {
    /// JSON text (PostgreSQL's jsonb as the server sends it): read in one pass, no tree built.
    Text(String),
    /// A JSON tree (a MongoDB document mapped to JSON by `datastore::mongo::decode`).
    Tree(Value),
}

/// A decoded document: the health event, and the span its trace continues from; both borrow
/// from the `Document`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded<'a> {
    pub event: HealthEvent<'a>,
    /// The span id recorded in `healtheventstatus.spanids` (the platform connector's when
    /// several; 16 lowercase hex digits), if any.
    pub recorded_span: Option<Cow<'a, str>>,
}

impl Decoded<'_> {
    /// The W3C `traceparent` for delivering the event (see [`traceparent_from`]).
    pub fn traceparent(&self) -> Option<String> {
        traceparent_from(&self.event, self.recorded_span.as_deref())
    }
}

/// Why a document cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// The text is not JSON a parse accepts: a syntax error, nesting deeper than 128 levels
    /// (in any key, kept or ignored), a number beyond `f64` such as `1e400`, a bad escape.
    #[error("document: {0}")]
    Unreadable(#[from] serde_json::Error),
    /// JSON, but a field the exporter reads has the wrong type or an impossible value.
    #[error(transparent)]
    Invalid(#[from] DecodeError),
}

/// Decodes a stored document. `Ok(None)` when it has no health event (the Go exporter skips
/// those silently too).
pub fn decode(document: &Document) -> Result<Option<Decoded<'_>>, DocumentError> {
    let top = match document {
        Document::Text(text) => {
            let mut reader = serde_json::Deserializer::from_str(text);
            let top = Shape::<Top>::deserialize(&mut reader)?;
            reader.end()?;
            top
        }
        Document::Tree(tree) => Shape::<Top>::deserialize(tree)?,
    };
    Ok(decode_top(top)?)
}

/// Decodes the `healthevent` of a document held as a tree; `Ok(None)` when it has none.
pub fn decode_document(document: &Value) -> Result<Option<HealthEvent<'_>>, DecodeError> {
    // Every tree deserializes (the visitors accept any value); only field errors remain.
    let top = Shape::<Top>::deserialize(document).map_err(|e| error("document", e.to_string()))?;
    Ok(decode_top(top)?.map(|decoded| decoded.event))
}

fn decode_top(top: Shape<Top<'_>>) -> Result<Option<Decoded<'_>>, DecodeError> {
    let top = match top {
        Shape::Found(top) => top,
        other => return Err(wrong_kind("document", "an object", &other)),
    };
    let fields = match top.event.chosen() {
        None | Some(Shape::Null) => return Ok(None),
        Some(Shape::Found(fields)) => fields,
        Some(other) => return Err(wrong_kind("healthevent", "an object", &other)),
    };
    Ok(Some(Decoded {
        event: decode_fields(fields)?,
        recorded_span: top.status.and_then(recorded_span),
    }))
}

/// "expected {what}, got {kind}" for `name`, where `shape` is not what was expected.
fn wrong_kind<T>(name: &str, what: &str, shape: &Shape<T>) -> DecodeError {
    let kind = match shape {
        Shape::Null => "null",
        Shape::Other(kind) => kind,
        Shape::Found(_) => "an unexpected value",
    };
    error(name, format!("expected {what}, got {kind}"))
}

/// The health event from its fields; the first wrong one, in declaration order, is the error.
fn decode_fields(f: Box<EventFields<'_>>) -> Result<HealthEvent<'_>, DecodeError> {
    Ok(HealthEvent {
        version: match f.version {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().ok_or_else(|| {
                error("healthevent.version", format!("expected a number, got {v}"))
            })?,
        },
        agent: string(f.agent, "healthevent.agent")?,
        component_class: string(f.component_class.chosen(), "healthevent.componentClass")?,
        check_name: string(f.check_name.chosen(), "healthevent.checkName")?,
        is_fatal: boolean(f.is_fatal.chosen().as_ref(), "healthevent.isFatal")?,
        is_healthy: boolean(f.is_healthy.chosen().as_ref(), "healthevent.isHealthy")?,
        message: string(f.message, "healthevent.message")?,
        recommended_action: enum_name(
            f.recommended_action.chosen(),
            RECOMMENDED_ACTIONS,
            "healthevent.recommendedAction",
        )?,
        error_code: string_list(f.error_code.chosen(), "healthevent.errorCode")?,
        entities_impacted: entities(f.entities_impacted.chosen())?,
        metadata: metadata(f.metadata, "healthevent.metadata")?,
        generated_timestamp: timestamp(
            f.generated_timestamp.chosen(),
            "healthevent.generatedTimestamp",
        )?,
        node_name: string(f.node_name.chosen(), "healthevent.nodeName")?,
        quarantine_overrides: overrides(
            f.quarantine_overrides.chosen(),
            "healthevent.quarantineOverrides",
        )?,
        drain_overrides: overrides(f.drain_overrides.chosen(), "healthevent.drainOverrides")?,
        processing_strategy: enum_name(
            f.processing_strategy.chosen(),
            PROCESSING_STRATEGIES,
            "healthevent.processingStrategy",
        )?,
        custom_recommended_action: string(
            f.custom_recommended_action.chosen(),
            "healthevent.customRecommendedAction",
        )?,
    })
}

/// The W3C `traceparent` for delivering `event` held as a tree `document` (see
/// [`traceparent_from`]; the recorded span is read as [`decode`] reads it).
pub fn traceparent(document: &Value, event: &HealthEvent<'_>) -> Option<String> {
    let recorded = document
        .get("healtheventstatus")
        .and_then(|status| Shape::<Status>::deserialize(status).ok())
        .and_then(recorded_span);
    traceparent_from(event, recorded.as_deref())
}

/// The W3C `traceparent` for delivering `event`, when a platform connector put a trace id in
/// its metadata: the parent span is `recorded_span` (from `healtheventstatus.spanids`), else a
/// new span id for this delivery. The header is written in one buffer, the trace id lowercased.
pub fn traceparent_from(event: &HealthEvent<'_>, recorded_span: Option<&str>) -> Option<String> {
    use std::fmt::Write;
    let trace_id = event.metadata.get("trace_id")?;
    if !is_trace_hex(trace_id, 32) {
        return None;
    }
    let mut header = String::with_capacity(55);
    header.push_str("00-");
    header.extend(trace_id.chars().map(|c| c.to_ascii_lowercase()));
    header.push('-');
    match recorded_span {
        Some(span) => header.push_str(span),
        // Writing to a String cannot fail.
        None => {
            let _ = write!(header, "{:016x}", fastrand::u64(1..));
        }
    }
    header.push_str("-01");
    Some(header)
}

/// The recorded parent span: among the valid span ids of `spanids` (else `spanIds`), the first
/// whose component names a platform connector, else the first; lowercase (borrowed when it
/// already is).
fn recorded_span(status: Shape<Status<'_>>) -> Option<Cow<'_, str>> {
    let Shape::Found(status) = status else {
        return None;
    };
    let Some(Shape::Found(ids)) = status.span_ids.chosen() else {
        return None;
    };
    let span = ids.platform_connector.or(ids.first)?;
    Some(if span.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(span.to_ascii_lowercase())
    } else {
        span
    })
}

/// Whether `text` is a W3C trace or span id: `len` hex digits, not all zero.
fn is_trace_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text.bytes().all(|b| b.is_ascii_hexdigit())
        && text.bytes().any(|b| b != b'0')
}

/// "a string", "an object", … for messages about a JSON value of the wrong kind.
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string<'a>(value: Option<Scalar<'a>>, name: &str) -> Result<Cow<'a, str>, DecodeError> {
    match value {
        None | Some(Scalar::Null) => Ok(Cow::Borrowed("")),
        Some(Scalar::String(text)) => Ok(text),
        Some(other) => Err(error(
            name,
            format!("expected a string, got {}", other.kind()),
        )),
    }
}

fn boolean(value: Option<&Value>, name: &str) -> Result<bool, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(error(
            name,
            format!("expected a boolean, got {}", json_kind(other)),
        )),
    }
}

/// An enum's name: from `names` (static, no copy) by number or digit string, a name as the
/// document has it, or an unknown number's digits.
fn enum_name<'a>(
    value: Option<Scalar<'a>>,
    names: &[(i64, &'static str)],
    name: &str,
) -> Result<Cow<'a, str>, DecodeError> {
    let by_number = |n: i64| {
        names
            .iter()
            .find(|(number, _)| *number == n)
            .map(|(_, text)| Cow::Borrowed(*text))
            // Go's protobuf String() prints an unknown value as its number.
            .unwrap_or_else(|| Cow::Owned(n.to_string()))
    };
    match value {
        None | Some(Scalar::Null) => Ok(by_number(0)),
        Some(Scalar::Number(n)) => n
            .as_i64()
            .map(by_number)
            .ok_or_else(|| error(name, format!("expected an enum number, got {n}"))),
        Some(Scalar::String(text)) => Ok(match text.parse::<i64>() {
            Ok(n) => by_number(n),
            Err(_) => text,
        }),
        Some(other) => Err(error(
            name,
            format!("expected an enum, got {}", other.kind()),
        )),
    }
}

fn string_list<'a>(
    value: Option<Shape<Vec<Scalar<'a>>>>,
    name: &str,
) -> Result<Vec<Cow<'a, str>>, DecodeError> {
    match value {
        None | Some(Shape::Null) => Ok(Vec::new()),
        Some(Shape::Found(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                string(Some(item), "").map_err(|e| DecodeError {
                    field: format!("{name}[{i}]"),
                    ..e
                })
            })
            .collect(),
        Some(other) => Err(wrong_kind(name, "an array", &other)),
    }
}

fn entities<'a>(
    value: Option<Shape<Vec<Shape<EntityFields<'a>>>>>,
) -> Result<Vec<Entity<'a>>, DecodeError> {
    let name = "healthevent.entitiesImpacted";
    match value {
        None | Some(Shape::Null) => Ok(Vec::new()),
        Some(Shape::Found(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                // Field names are formatted only for an error, not for every entity.
                let at = || format!("{name}[{i}]");
                let entity = match item {
                    Shape::Found(entity) => entity,
                    other => return Err(wrong_kind(&at(), "an object", &other)),
                };
                let text = |value: Option<Scalar<'a>>, camel: &str| {
                    string(value, "").map_err(|e| DecodeError {
                        field: format!("{}.{camel}", at()),
                        ..e
                    })
                };
                Ok(Entity {
                    entity_type: text(entity.entity_type.chosen(), "entityType")?,
                    entity_value: text(entity.entity_value.chosen(), "entityValue")?,
                })
            })
            .collect(),
        Some(other) => Err(wrong_kind(name, "an array", &other)),
    }
}

fn metadata<'a>(
    value: Option<Shape<Metadata<'a>>>,
    name: &str,
) -> Result<MetadataMap<'a>, DecodeError> {
    match value {
        None | Some(Shape::Null) => Ok(BTreeMap::new()),
        Some(Shape::Found(Metadata(Ok(entries)))) => Ok(entries),
        Some(Shape::Found(Metadata(Err(NonScalar { key, kind })))) => Err(error(
            &format!("{name}.{key}"),
            format!("expected a string, got {kind}"),
        )),
        Some(other) => Err(wrong_kind(name, "an object", &other)),
    }
}

/// Whether `time` can be written as an RFC 3339 timestamp (4-digit year, 0001 to 9999, in UTC).
/// CloudEvents `time` is RFC 3339; chrono would write year 10000 as `+10000`.
pub fn in_rfc3339_range(time: &DateTime<Utc>) -> bool {
    use chrono::Datelike;
    (1..=9999).contains(&time.year())
}

fn timestamp(value: Option<Time<'_>>, name: &str) -> Result<Option<DateTime<Utc>>, DecodeError> {
    let parsed = timestamp_any(value, name)?;
    match parsed {
        Some(time) if !in_rfc3339_range(&time) => Err(error(
            name,
            format!(
                "{} is outside RFC 3339's years 0001-9999 (in UTC)",
                time.to_rfc3339()
            ),
        )),
        other => Ok(other),
    }
}

fn timestamp_any(
    value: Option<Time<'_>>,
    name: &str,
) -> Result<Option<DateTime<Utc>>, DecodeError> {
    match value {
        None | Some(Time::Null) => Ok(None),
        Some(Time::Text(text)) => DateTime::parse_from_rfc3339(&text)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| error(name, format!("{text:?} is not an RFC 3339 timestamp: {e}"))),
        Some(Time::Parts(parts)) => {
            let number = |key: &str, value: Option<Value>| -> Result<i64, DecodeError> {
                match value {
                    None | Some(Value::Null) => Ok(0),
                    // protojson writes int64 seconds as a string.
                    Some(Value::String(text)) => text
                        .parse()
                        .map_err(|_| error(name, format!("{key} {text:?} is not a number"))),
                    Some(v) => v
                        .as_i64()
                        .ok_or_else(|| error(name, format!("{key} {v} is not a whole number"))),
                }
            };
            let seconds = number("seconds", parts.seconds)?;
            let nanos = number("nanos", parts.nanos)?;
            let nanos = u32::try_from(nanos)
                .ok()
                .filter(|n| *n < 1_000_000_000)
                .ok_or_else(|| error(name, format!("nanos {nanos} is out of range")))?;
            match Utc.timestamp_opt(seconds, nanos) {
                chrono::LocalResult::Single(t) => Ok(Some(t)),
                _ => Err(error(name, format!("seconds {seconds} is out of range"))),
            }
        }
        Some(Time::Other(kind)) => Err(error(
            name,
            format!("expected {{seconds, nanos}} or a timestamp string, got {kind}"),
        )),
    }
}

fn overrides(value: Option<Shape<Flags>>, name: &str) -> Result<Option<Overrides>, DecodeError> {
    match value {
        None | Some(Shape::Null) => Ok(None),
        Some(Shape::Found(flags)) => {
            let flag = |key: &str, value: Option<Value>| {
                boolean(value.as_ref(), "").map_err(|e| DecodeError {
                    field: format!("{name}.{key}"),
                    ..e
                })
            };
            Ok(Some(Overrides {
                force: flag("force", flags.force)?,
                skip: flag("skip", flags.skip)?,
            }))
        }
        Some(other) => Err(wrong_kind(name, "an object", &other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_the_postgresql_spelling() {
        let document = json!({
            "createdAt": "2026-11-25T08:00:00.5Z",
            "healthevent": {
                "version": 1, "agent": "gpu-health-monitor", "componentClass": "GPU",
                "checkName": "GpuXidError", "isFatal": true, "message": "XID 79",
                "recommendedAction": 15, "errorCode": ["79"],
                "entitiesImpacted": [{"entityType": "GPU", "entityValue": "3"}],
                "metadata": {"trace_id": "abc"},
                "generatedTimestamp": {"seconds": 1764057600, "nanos": 500},
                "nodeName": "node-1", "processingStrategy": 2,
                "quarantineOverrides": {"force": true}
            },
            "healtheventstatus": {"nodequarantined": null},
            "RawEvent": null
        });
        let event = decode_document(&document)
            .expect("valid")
            .expect("has event");
        assert_eq!(event.recommended_action, "RESTART_VM");
        assert_eq!(event.processing_strategy, "STORE_ONLY");
        assert!(event.is_fatal && !event.is_healthy);
        assert_eq!(event.entities_impacted[0].entity_value, "3");
        assert_eq!(
            event
                .generated_timestamp
                .expect("set")
                .timestamp_subsec_nanos(),
            500
        );
        assert_eq!(
            event.quarantine_overrides,
            Some(Overrides {
                force: true,
                skip: false
            })
        );
        assert_eq!(event.drain_overrides, None);
        assert_eq!(event.metadata["trace_id"], "abc");
    }

    #[test]
    fn decodes_the_mongodb_spelling_and_names() {
        let document = json!({
            "healthevent": {
                "agent": "a", "componentclass": "NVLink", "checkname": "c",
                "ishealthy": true, "recommendedaction": "CUSTOM",
                "customrecommendedaction": "REPLACE_DISK", "errorcode": null,
                "entitiesimpacted": [{"entitytype": "PCI", "entityvalue": "0000:01"}],
                "generatedtimestamp": "2026-01-15T10:30:00Z", "nodename": "n",
                "processingstrategy": 0
            }
        });
        let event = decode_document(&document)
            .expect("valid")
            .expect("has event");
        assert_eq!(event.component_class, "NVLink");
        assert_eq!(event.recommended_action, "CUSTOM");
        assert_eq!(event.custom_recommended_action, "REPLACE_DISK");
        assert_eq!(event.processing_strategy, "UNSPECIFIED");
        assert!(event.error_code.is_empty());
        assert_eq!(event.entities_impacted[0].entity_type, "PCI");
    }

    #[test]
    fn omitted_zero_values_decode_as_zero() {
        let document = json!({"healthevent": {"nodeName": "n"}});
        let event = decode_document(&document)
            .expect("valid")
            .expect("has event");
        assert_eq!(event.recommended_action, "NONE");
        assert_eq!(event.processing_strategy, "UNSPECIFIED");
        assert_eq!(event.version, 0);
        assert!(!event.is_fatal);
        assert!(event.generated_timestamp.is_none());
    }

    #[test]
    fn unknown_enum_numbers_are_kept_as_numbers() {
        let document = json!({"healthevent": {"recommendedAction": 77}});
        let event = decode_document(&document)
            .expect("valid")
            .expect("has event");
        assert_eq!(event.recommended_action, "77");
        // Numbers older protos named but the current one does not: digits, not names.
        for (number, digits) in [(39, "39"), (28, "28"), (1, "1"), (-3, "-3")] {
            let document = json!({"healthevent": {
                "recommendedAction": number, "processingStrategy": number + 100
            }});
            let event = decode_document(&document)
                .expect("valid")
                .expect("has event");
            assert_eq!(event.recommended_action, digits);
            assert_eq!(event.processing_strategy, (number + 100).to_string());
        }
        // Every current name, by number and as a digit string.
        fn scalar(value: &Value) -> Scalar<'_> {
            Scalar::deserialize(value).expect("any value")
        }
        for (number, name) in RECOMMENDED_ACTIONS.iter().chain(PROCESSING_STRATEGIES) {
            assert_eq!(
                enum_name(Some(scalar(&json!(number))), &[(*number, name)], "f"),
                Ok(Cow::Borrowed(*name))
            );
            assert_eq!(
                enum_name(
                    Some(scalar(&json!(number.to_string()))),
                    &[(*number, name)],
                    "f"
                ),
                Ok(Cow::Borrowed(*name))
            );
        }
        let names: Vec<&str> = RECOMMENDED_ACTIONS.iter().map(|(_, n)| *n).collect();
        assert_eq!(
            names,
            [
                "NONE",
                "COMPONENT_RESET",
                "CONTACT_SUPPORT",
                "RUN_FIELDDIAG",
                "RESTART_VM",
                "RESTART_BM",
                "REPLACE_VM",
                "RUN_DCGMEUD",
                "CUSTOM",
                "UNKNOWN"
            ]
        );
    }

    #[test]
    fn traceparent_joins_the_platform_connectors_trace() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let document = json!({
            "healthevent": {"metadata": {"trace_id": trace}},
            "healtheventstatus": {"spanids": {
                "fault-quarantine": "1111111111111111",
                "platform-connectors": "00f067aa0ba902b7"
            }}
        });
        let event = decode_document(&document)
            .expect("valid")
            .expect("has event");
        assert_eq!(
            traceparent(&document, &event).as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        // No recorded span: a new span id of our own.
        let bare = json!({"healthevent": {"metadata": {"trace_id": trace}}});
        let event = decode_document(&bare).expect("valid").expect("has event");
        let header = traceparent(&bare, &event).expect("header");
        assert!(
            header.starts_with(&format!("00-{trace}-")) && header.ends_with("-01"),
            "{header}"
        );
        assert_eq!(header.len(), 55);
        // Not a W3C trace id: no header.
        for bad in [
            "abc",
            "00000000000000000000000000000000",
            "zz92f3577b34da6a3ce929d0e0e4736z",
        ] {
            let doc = json!({"healthevent": {"metadata": {"trace_id": bad}}});
            let event = decode_document(&doc).expect("valid").expect("has event");
            assert_eq!(traceparent(&doc, &event), None, "{bad}");
        }
    }

    #[test]
    fn times_outside_rfc3339_years_are_named_errors() {
        for bad in [
            json!({"seconds": 253402300800i64}), // 10000-01-01
            json!({"seconds": "253402300800"}),
            json!({"seconds": -62135596801i64}), // 0000-12-31T23:59:59
            json!({"seconds": i64::MAX}),
            json!({"seconds": i64::MIN}),
            json!({"seconds": 0, "nanos": 1_000_000_000}),
            json!({"seconds": 0, "nanos": -1}),
            json!({"seconds": 1.5}),
            json!({"seconds": 1e300}),
            json!("0000-01-01T00:00:00Z"),
            json!("9999-12-31T23:59:59-01:00"),
            json!("+10000-01-01T00:00:00Z"),
        ] {
            let document = json!({"healthevent": {"generatedTimestamp": bad}});
            let error = decode_document(&document).expect_err("out of range");
            assert_eq!(error.field, "healthevent.generatedTimestamp", "{bad}");
        }
        for good in [
            json!({"seconds": 253402300799i64}), // 9999-12-31T23:59:59
            json!({"seconds": -62135596800i64}), // 0001-01-01
            json!({"seconds": -1, "nanos": 5}),  // 1969, fine
            json!("0001-01-01T00:00:00Z"),
        ] {
            let document = json!({"healthevent": {"generatedTimestamp": good}});
            let event = decode_document(&document)
                .expect("in range")
                .expect("has event");
            assert!(event.generated_timestamp.is_some(), "{good}");
        }
    }

    #[test]
    fn missing_health_event_is_not_an_error() {
        assert_eq!(decode_document(&json!({"createdAt": "x"})), Ok(None));
        assert_eq!(decode_document(&json!({"healthevent": null})), Ok(None));
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (json!("text"), "document"),
            (json!({"healthevent": 3}), "healthevent"),
            (
                json!({"healthevent": {"isFatal": "yes"}}),
                "healthevent.isFatal",
            ),
            (
                json!({"healthevent": {"errorCode": [1]}}),
                "healthevent.errorCode[0]",
            ),
            (
                json!({"healthevent": {"generatedTimestamp": {"seconds": "x"}}}),
                "healthevent.generatedTimestamp",
            ),
            (
                json!({"healthevent": {"recommendedAction": [1]}}),
                "healthevent.recommendedAction",
            ),
            (
                json!({"healthevent": {"metadata": {"k": {"x": 1}}}}),
                "healthevent.metadata.k",
            ),
        ];
        for (document, field) in cases {
            let error = decode_document(&document).expect_err("should fail");
            assert_eq!(error.field, field, "{document}");
        }
    }

    /// What `decode` makes of `text`: the event and span, or the error's field ("document"
    /// for text a `Value` parse refuses too).
    fn outcome(document: &Document) -> Result<Option<Decoded<'_>>, String> {
        decode(document).map_err(|error| match error {
            DocumentError::Unreadable(_) => "unreadable".to_string(),
            DocumentError::Invalid(error) => error.field,
        })
    }

    #[test]
    fn text_and_tree_decode_alike() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let documents = [
            json!({"createdAt": "2026-11-25T08:00:00.5Z", "healthevent": {
                "version": 1, "agent": "a", "componentClass": "GPU", "checkName": "c",
                "isFatal": true, "message": "XID 79", "recommendedAction": 15,
                "errorCode": ["79"], "nodeName": "node-1", "processingStrategy": 2,
                "entitiesImpacted": [{"entityType": "GPU", "entityValue": "3", "x": [1]}],
                "metadata": {"trace_id": trace, "n": 1.5, "b": true},
                "generatedTimestamp": {"seconds": "1764057600", "nanos": 500},
                "quarantineOverrides": {"force": true}, "drainOverrides": null,
                "unknown": {"deep": [[[]]]}
            }, "healtheventstatus": {"spanids": {
                "fault-quarantine": "1111111111111111",
                "platform-connectors": "00F067AA0BA902B7"
            }}, "RawEvent": null}),
            json!({"healthEvent": {"nodename": "n", "customrecommendedaction": "X"},
                   "healtheventstatus": {"spanIds": {"a": "0000000000000000", "b": "2222222222222222"}}}),
            json!({"healthevent": null, "healthEvent": {"nodeName": "ignored"}}),
            json!({"healthevent": {"version": -1}}),
            json!({"healthevent": {"version": 1.0}}),
            json!({"healthevent": {"entitiesImpacted": [3]}}),
            json!({"healthevent": {"entitiesImpacted": [{"entitytype": 3}]}}),
            json!({"healthevent": {"entitiesImpacted": {"a": 1}}}),
            json!({"healthevent": {"metadata": {"a": "x", "k": null}}}),
            json!({"healthevent": {"metadata": [1]}}),
            json!({"healthevent": {"errorCode": "79"}}),
            json!({"healthevent": {"drainOverrides": {"skip": 1}}}),
            json!({"healthevent": {"processingStrategy": "STORE_ONLY", "recommendedAction": "7"}}),
            json!({"healthevent": [1]}),
            json!([{"healthevent": {}}]),
            json!(null),
            json!(12),
        ];
        for document in documents {
            let (text, tree) = (
                Document::Text(document.to_string()),
                Document::Tree(document.clone()),
            );
            let (text, tree) = (outcome(&text), outcome(&tree));
            assert_eq!(text, tree, "{document}");
            // The tree decoder other crates call gives the same event or error field.
            let event = decode_document(&document).map_err(|e| e.field);
            assert_eq!(event, tree.map(|d| d.map(|d| d.event)), "{document}");
        }
    }

    #[test]
    fn text_a_value_parse_refuses_is_unreadable_even_in_ignored_keys() {
        let nested = |depth: usize| "[".repeat(depth) + &"]".repeat(depth);
        let mut texts = vec![
            r#"{"healthevent": {"nodeName": "n"}, "RawEvent": 1e400}"#.to_string(),
            r#"{"healthevent": {"nodeName": "n", "x": -1e309}}"#.to_string(),
            r#"{"healthevent": {"nodeName": "n\ud800"}}"#.to_string(),
            r#"{"healthevent": {"nodeName": "n"}} trailing"#.to_string(),
            r#"{"healthevent": {"nodeName": "n",}}"#.to_string(),
            r#"{"healthevent": {"nodeName": "n"}, "RawEvent": 1e300}"#.to_string(),
            String::new(),
        ];
        for depth in [1, 125, 126, 127, 128, 1000] {
            texts.push(format!(
                r#"{{"healthevent": {{}}, "RawEvent": {}}}"#,
                nested(depth)
            ));
            texts.push(format!(
                r#"{{"healthevent": {{"metadata": {{"k": {}}}}}}}"#,
                nested(depth)
            ));
        }
        for text in texts {
            let refused = serde_json::from_str::<Value>(&text).is_err();
            let document = Document::Text(text.clone());
            let decoded = outcome(&document);
            assert_eq!(
                decoded.as_ref().err().map(String::as_str) == Some("unreadable"),
                refused,
                "{text:.80}: {decoded:?}"
            );
        }
    }

    #[test]
    fn text_is_borrowed_from_the_document_unless_an_escape_was_undone() {
        let text = r#"{"healthevent": {"agent": "a", "nodeName": "n\u0031", "errorCode": ["79"],
                       "entitiesImpacted": [{"entityType": "GPU", "entityValue": "0"}],
                       "metadata": {"k": "v", "n": 1.5, "b": true},
                       "recommendedAction": 15, "processingStrategy": "STORE_ONLY",
                       "customRecommendedAction": "X"},
                       "healtheventstatus": {"spanids": {"a": "00f067aa0ba902b7"}}}"#;
        let tree = Document::Tree(serde_json::from_str(text).expect("JSON"));
        let text = Document::Text(text.into());
        let borrowed = |c: &Cow<'_, str>| matches!(c, Cow::Borrowed(_));
        for document in [&text, &tree] {
            let decoded = decode(document).expect("valid").expect("has event");
            let event = &decoded.event;
            assert!(borrowed(&event.agent) && borrowed(&event.custom_recommended_action));
            assert!(event.error_code.iter().all(borrowed));
            assert!(event
                .entities_impacted
                .iter()
                .all(|e| borrowed(&e.entity_type) && borrowed(&e.entity_value)));
            assert!(event.metadata.keys().all(borrowed));
            assert!(borrowed(&event.metadata["k"]) && borrowed(&event.metadata["b"]));
            // A number's text is made for the event.
            assert_eq!(event.metadata["n"], "1.5");
            // Enum names come from the static tables or the document, never a copy.
            assert!(borrowed(&event.recommended_action) && borrowed(&event.processing_strategy));
            assert!(decoded.recorded_span.as_ref().is_some_and(borrowed));
            assert_eq!(event.node_name, "n1");
        }
        // An escape in JSON text is undone into an owned string; a tree holds it undone.
        let node_name = |document| decode(document).ok().flatten().map(|d| d.event.node_name);
        assert!(matches!(node_name(&text), Some(Cow::Owned(_))));
        assert!(matches!(node_name(&tree), Some(Cow::Borrowed(_))));
    }

    #[test]
    fn the_camel_case_spelling_wins_even_when_null() {
        let text = r#"{"healthevent": {"nodeName": null, "nodename": "x",
                       "isFatal": true, "isfatal": "not a boolean",
                       "node\u004eame2": 1, "check\u004eame": "escaped"}}"#;
        let document = Document::Text(text.into());
        let event = decode(&document).expect("valid").expect("has event").event;
        assert_eq!(event.node_name, "");
        assert!(event.is_fatal);
        assert_eq!(event.check_name, "escaped");
    }

    #[test]
    fn the_recorded_span_is_the_platform_connectors() {
        let text = r#"{"healthevent": {"metadata": {"trace_id": "4BF92F3577B34DA6A3CE929D0E0E4736"}},
                       "healtheventstatus": {"spanids": {"a": "zz", "b": "1111111111111111",
                                             "platform-connectors": "00F067AA0BA902B7"}}}"#;
        let document = Document::Text(text.into());
        let decoded = decode(&document).expect("valid").expect("has event");
        assert_eq!(decoded.recorded_span.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(
            decoded.traceparent().as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        // No platform connector: the first valid one; `spanids` present but not an object
        // hides `spanIds`, as before.
        for (status, span) in [
            (
                json!({"spanids": {"x": "1", "y": "2222222222222222"}}),
                Some("2222222222222222"),
            ),
            (
                json!({"spanids": "no", "spanIds": {"y": "2222222222222222"}}),
                None,
            ),
            (
                json!({"spanIds": {"y": "2222222222222222"}}),
                Some("2222222222222222"),
            ),
            (json!([1]), None),
        ] {
            let document = json!({"healthevent": {}, "healtheventstatus": status});
            let text = Document::Text(document.to_string());
            let decoded = decode(&text).expect("valid").expect("has event");
            assert_eq!(decoded.recorded_span.as_deref(), span, "{document}");
        }
    }
}
