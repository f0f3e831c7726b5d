//! NVSentinel's health event, decoded tolerantly from a stored document.
//!
//! Documents come in two spellings: camelCase keys with `omitempty` (the PostgreSQL path, Go's
//! JSON) and lowercase keys (MongoDB's BSON). Enums may be numbers or names, timestamps
//! `{seconds, nanos}` or strings. Unknown keys (`RawEvent`, status fields) are ignored.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Default)]
pub struct HealthEvent {
    pub version: u64,
    pub agent: String,
    pub component_class: String,
    pub check_name: String,
    pub is_fatal: bool,
    pub is_healthy: bool,
    pub message: String,
    /// Enum name, e.g. `RESTART_VM` (an unknown number is kept as its decimal text).
    pub recommended_action: String,
    pub error_code: Vec<String>,
    pub entities_impacted: Vec<Entity>,
    pub metadata: BTreeMap<String, String>,
    pub generated_timestamp: Option<DateTime<Utc>>,
    pub node_name: String,
    pub quarantine_overrides: Option<Overrides>,
    pub drain_overrides: Option<Overrides>,
    /// Enum name, e.g. `EXECUTE_REMEDIATION`.
    pub processing_strategy: String,
    pub custom_recommended_action: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub entity_type: String,
    pub entity_value: String,
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

/// Decodes the `healthevent` of a stored document. `Ok(None)` when the document has no health
/// event (the Go exporter skips those silently too).
pub fn decode_document(document: &Value) -> Result<Option<HealthEvent>, DecodeError> {
    let Value::Object(top) = document else {
        return Err(error(
            "document",
            format!("expected an object, got {}", json_kind(document)),
        ));
    };
    let event = match field(top, "healthevent", "healthEvent") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(event)) => event,
        Some(other) => {
            return Err(error(
                "healthevent",
                format!("expected an object, got {}", json_kind(other)),
            ))
        }
    };
    // Both spellings are literals: no lower-casing (an allocation) per field and event.
    let get = |(camel, lower): (&str, &str)| field(event, camel, lower);
    Ok(Some(HealthEvent {
        version: match get(("version", "version")) {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().ok_or_else(|| {
                error("healthevent.version", format!("expected a number, got {v}"))
            })?,
        },
        agent: string(get(("agent", "agent")), "healthevent.agent")?,
        component_class: string(
            get(("componentClass", "componentclass")),
            "healthevent.componentClass",
        )?,
        check_name: string(get(("checkName", "checkname")), "healthevent.checkName")?,
        is_fatal: boolean(get(("isFatal", "isfatal")), "healthevent.isFatal")?,
        is_healthy: boolean(get(("isHealthy", "ishealthy")), "healthevent.isHealthy")?,
        message: string(get(("message", "message")), "healthevent.message")?,
        recommended_action: enum_name(
            get(("recommendedAction", "recommendedaction")),
            RECOMMENDED_ACTIONS,
            "healthevent.recommendedAction",
        )?,
        error_code: string_list(get(("errorCode", "errorcode")), "healthevent.errorCode")?,
        entities_impacted: entities(get(("entitiesImpacted", "entitiesimpacted")))?,
        metadata: string_map(get(("metadata", "metadata")), "healthevent.metadata")?,
        generated_timestamp: timestamp(
            get(("generatedTimestamp", "generatedtimestamp")),
            "healthevent.generatedTimestamp",
        )?,
        node_name: string(get(("nodeName", "nodename")), "healthevent.nodeName")?,
        quarantine_overrides: overrides(
            get(("quarantineOverrides", "quarantineoverrides")),
            "healthevent.quarantineOverrides",
        )?,
        drain_overrides: overrides(
            get(("drainOverrides", "drainoverrides")),
            "healthevent.drainOverrides",
        )?,
        processing_strategy: enum_name(
            get(("processingStrategy", "processingstrategy")),
            PROCESSING_STRATEGIES,
            "healthevent.processingStrategy",
        )?,
        custom_recommended_action: string(
            get(("customRecommendedAction", "customrecommendedaction")),
            "healthevent.customRecommendedAction",
        )?,
    }))
}

/// The W3C `traceparent` for delivering `event`, when a platform connector put a trace id in
/// its metadata: the parent span is the one recorded in `healtheventstatus.spanids` (the
/// platform connector's, when several), else a new span id for this delivery.
pub fn traceparent(document: &Value, event: &HealthEvent) -> Option<String> {
    let is_hex = |text: &str, len: usize| {
        text.len() == len
            && text.bytes().all(|b| b.is_ascii_hexdigit())
            && text.bytes().any(|b| b != b'0')
    };
    let trace_id = event.metadata.get("trace_id")?.to_ascii_lowercase();
    if !is_hex(&trace_id, 32) {
        return None;
    }
    let span_ids = document
        .get("healtheventstatus")
        .and_then(|status| status.get("spanids").or_else(|| status.get("spanIds")))
        .and_then(Value::as_object);
    let recorded = span_ids.and_then(|ids| {
        let valid = |(_, v): &(&String, &Value)| v.as_str().is_some_and(|s| is_hex(s, 16));
        ids.iter()
            .filter(valid)
            .find(|(key, _)| key.contains("platform-connector"))
            .or_else(|| ids.iter().find(valid))
            .and_then(|(_, v)| v.as_str().map(str::to_ascii_lowercase))
    });
    let span_id = recorded.unwrap_or_else(|| format!("{:016x}", fastrand::u64(1..)));
    Some(format!("00-{trace_id}-{span_id}-01"))
}

fn field<'a>(object: &'a Map<String, Value>, camel: &str, lower: &str) -> Option<&'a Value> {
    object.get(camel).or_else(|| object.get(lower))
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

fn string(value: Option<&Value>, name: &str) -> Result<String, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(other) => Err(error(
            name,
            format!("expected a string, got {}", json_kind(other)),
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

fn enum_name(
    value: Option<&Value>,
    names: &[(i64, &str)],
    name: &str,
) -> Result<String, DecodeError> {
    let by_number = |n: i64| {
        names
            .iter()
            .find(|(number, _)| *number == n)
            .map(|(_, text)| text.to_string())
            // Go's protobuf String() prints an unknown value as its number.
            .unwrap_or_else(|| n.to_string())
    };
    match value {
        None | Some(Value::Null) => Ok(by_number(0)),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(by_number)
            .ok_or_else(|| error(name, format!("expected an enum number, got {n}"))),
        Some(Value::String(text)) => Ok(match text.parse::<i64>() {
            Ok(n) => by_number(n),
            Err(_) => text.clone(),
        }),
        Some(other) => Err(error(
            name,
            format!("expected an enum, got {}", json_kind(other)),
        )),
    }
}

fn string_list(value: Option<&Value>, name: &str) -> Result<Vec<String>, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(text) => Ok(text.clone()),
                other => Err(error(
                    &format!("{name}[{i}]"),
                    format!("expected a string, got {}", json_kind(other)),
                )),
            })
            .collect(),
        Some(other) => Err(error(
            name,
            format!("expected an array, got {}", json_kind(other)),
        )),
    }
}

fn entities(value: Option<&Value>) -> Result<Vec<Entity>, DecodeError> {
    let name = "healthevent.entitiesImpacted";
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                // Field names are formatted only for an error, not for every entity.
                let at = || format!("{name}[{i}]");
                let Value::Object(entity) = item else {
                    return Err(error(
                        &at(),
                        format!("expected an object, got {}", json_kind(item)),
                    ));
                };
                let text = |camel: &str, lower: &str| {
                    string(field(entity, camel, lower), "").map_err(|e| DecodeError {
                        field: format!("{}.{camel}", at()),
                        ..e
                    })
                };
                Ok(Entity {
                    entity_type: text("entityType", "entitytype")?,
                    entity_value: text("entityValue", "entityvalue")?,
                })
            })
            .collect(),
        Some(other) => Err(error(
            name,
            format!("expected an array, got {}", json_kind(other)),
        )),
    }
}

fn string_map(value: Option<&Value>, name: &str) -> Result<BTreeMap<String, String>, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(entries)) => entries
            .iter()
            .map(|(key, value)| match value {
                Value::String(text) => Ok((key.clone(), text.clone())),
                // Scalars are kept as text rather than losing the whole event.
                Value::Number(n) => Ok((key.clone(), n.to_string())),
                Value::Bool(b) => Ok((key.clone(), b.to_string())),
                other => Err(error(
                    &format!("{name}.{key}"),
                    format!("expected a string, got {}", json_kind(other)),
                )),
            })
            .collect(),
        Some(other) => Err(error(
            name,
            format!("expected an object, got {}", json_kind(other)),
        )),
    }
}

/// Whether `time` can be written as an RFC 3339 timestamp (4-digit year, 0001 to 9999, in UTC).
/// CloudEvents `time` is RFC 3339; chrono would write year 10000 as `+10000`.
pub fn in_rfc3339_range(time: &DateTime<Utc>) -> bool {
    use chrono::Datelike;
    (1..=9999).contains(&time.year())
}

fn timestamp(value: Option<&Value>, name: &str) -> Result<Option<DateTime<Utc>>, DecodeError> {
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

fn timestamp_any(value: Option<&Value>, name: &str) -> Result<Option<DateTime<Utc>>, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => DateTime::parse_from_rfc3339(text)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| error(name, format!("{text:?} is not an RFC 3339 timestamp: {e}"))),
        Some(Value::Object(parts)) => {
            let number = |key: &str| -> Result<i64, DecodeError> {
                match parts.get(key) {
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
            let seconds = number("seconds")?;
            let nanos = number("nanos")?;
            let nanos = u32::try_from(nanos)
                .ok()
                .filter(|n| *n < 1_000_000_000)
                .ok_or_else(|| error(name, format!("nanos {nanos} is out of range")))?;
            match Utc.timestamp_opt(seconds, nanos) {
                chrono::LocalResult::Single(t) => Ok(Some(t)),
                _ => Err(error(name, format!("seconds {seconds} is out of range"))),
            }
        }
        Some(other) => Err(error(
            name,
            format!(
                "expected {{seconds, nanos}} or a timestamp string, got {}",
                json_kind(other)
            ),
        )),
    }
}

fn overrides(value: Option<&Value>, name: &str) -> Result<Option<Overrides>, DecodeError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(parts)) => {
            let flag = |key: &str| {
                boolean(parts.get(key), "").map_err(|e| DecodeError {
                    field: format!("{name}.{key}"),
                    ..e
                })
            };
            Ok(Some(Overrides {
                force: flag("force")?,
                skip: flag("skip")?,
            }))
        }
        Some(other) => Err(error(
            name,
            format!("expected an object, got {}", json_kind(other)),
        )),
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
        let event = decode_document(&json!({"healthevent": {"nodeName": "n"}}))
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
        let event = decode_document(&json!({"healthevent": {"recommendedAction": 77}}))
            .expect("valid")
            .expect("has event");
        assert_eq!(event.recommended_action, "77");
        // Numbers older protos named but the current one does not: digits, not names.
        for (number, digits) in [(39, "39"), (28, "28"), (1, "1"), (-3, "-3")] {
            let event = decode_document(&json!({"healthevent": {
                "recommendedAction": number, "processingStrategy": number + 100
            }}))
            .expect("valid")
            .expect("has event");
            assert_eq!(event.recommended_action, digits);
            assert_eq!(event.processing_strategy, (number + 100).to_string());
        }
        // Every current name, by number and as a digit string.
        for (number, name) in RECOMMENDED_ACTIONS.iter().chain(PROCESSING_STRATEGIES) {
            assert_eq!(
                enum_name(Some(&json!(number)), &[(*number, name)], "f"),
                Ok(name.to_string())
            );
            assert_eq!(
                enum_name(Some(&json!(number.to_string())), &[(*number, name)], "f"),
                Ok(name.to_string())
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
}
