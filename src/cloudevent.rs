//! The CloudEvent upstream sends (structured mode, CloudEvents 1.0 JSON), byte-for-byte in
//! key order: `specversion`, `type`, `source`, `id`, `time`, `data`, with `data`'s keys sorted as
//! Go's `encoding/json` sorts a map. One improvement: `id` is the health event's row id, so a
//! redelivered event carries the same id and a sink can deduplicate on `source` + `id`.
//!
//! Every body is checked before it is sent (`Transformer::try_encode`): `id` non-empty,
//! `source` a URI with a host, `time` RFC 3339 with a 4-digit year. The decoder already rejects
//! a `generatedTimestamp` outside years 0001-9999 and the configuration rejects a `cluster`
//! that is not a URI host, so a failed check means a bug; the pipeline then skips the event
//! (logged with its changelog id, counted as `skipped{reason="invalid_cloudevent"}`) instead of
//! sending something every sink would reject forever.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};

use crate::model::{in_rfc3339_range, Entity, HealthEvent, MetadataMap};

pub const SPEC_VERSION: &str = "1.0";
pub const EVENT_TYPE: &str = "com.nvidia.nvsentinel.health.v1";
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

#[derive(Debug, Serialize)]
pub struct CloudEvent<'a> {
    pub specversion: &'static str,
    #[serde(rename = "type")]
    pub event_type: &'static str,
    pub source: &'a str,
    pub id: &'a str,
    pub time: &'a str,
    /// Absent unless `exporter.cloudevent.subject` asks for it (upstream never sends one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<&'a str>,
    pub data: Data<'a>,
}

/// What the optional CloudEvents `subject` attribute carries: the part of the source a receiver
/// filters on first (CloudEvents 1.0 §3.1.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    /// No `subject` (upstream's exact shape; the default).
    #[default]
    None,
    /// The health event's node name (`healthEvent.nodeName`); omitted when it is empty.
    NodeName,
}

#[derive(Debug, Serialize)]
pub struct Data<'a> {
    #[serde(rename = "healthEvent")]
    pub health_event: HealthEventData<'a>,
    pub metadata: &'a BTreeMap<String, String>,
}

/// `data.healthEvent`, serialized straight from the decoded event (no intermediate JSON
/// tree). The fields are declared in the order Go's `encoding/json` writes a map's keys
/// (sorted), which is upstream's order; empty optional keys are left out as upstream does.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthEventData<'a> {
    pub agent: &'a str,
    pub check_name: &'a str,
    pub component_class: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub custom_recommended_action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_overrides: Option<OverridesData>,
    pub entities_impacted: Entities<'a>,
    pub error_code: &'a [Cow<'a, str>],
    /// The CloudEvent's `time` (RFC 3339, Go's nanosecond form).
    pub generated_timestamp: &'a str,
    pub is_fatal: bool,
    pub is_healthy: bool,
    pub message: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: &'a MetadataMap<'a>,
    pub node_name: &'a str,
    pub processing_strategy: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine_overrides: Option<OverridesData>,
    pub recommended_action: &'a str,
    pub version: u64,
}

/// `{"force": …, "skip": …}`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OverridesData {
    pub force: bool,
    pub skip: bool,
}

/// `{"entityType": …, "entityValue": …}`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntityData<'a> {
    pub entity_type: &'a str,
    pub entity_value: &'a str,
}

/// `entitiesImpacted`: the event's entities serialized straight from its slice, each as
/// [`EntityData`] (no list is collected per event).
#[derive(Debug, Clone, Copy)]
pub struct Entities<'a>(pub &'a [Entity<'a>]);

impl Serialize for Entities<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|e| EntityData {
            entity_type: &e.entity_type,
            entity_value: &e.entity_value,
        }))
    }
}

/// Builds CloudEvents for one cluster.
pub struct Transformer {
    source: String,
    /// `validate`'s verdict on `source`, taken once (the source is the same for every event).
    source_error: Option<InvalidCloudEvent>,
    metadata: BTreeMap<String, String>,
    subject: Subject,
}

impl Transformer {
    /// `metadata` must hold `cluster` (config validation guarantees it).
    pub fn new(metadata: BTreeMap<String, String>) -> Transformer {
        let cluster = metadata.get("cluster").cloned().unwrap_or_default();
        let source = format!("nvsentinel://{cluster}/healthevents");
        Transformer {
            source_error: check_source(&source).err(),
            source,
            metadata,
            subject: Subject::None,
        }
    }

    /// Sets what the `subject` attribute carries (none by default).
    pub fn with_subject(mut self, subject: Subject) -> Transformer {
        self.subject = subject;
        self
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The CloudEvent `time` of `event` (Go's RFC 3339 with nanoseconds): its
    /// `generatedTimestamp`, else `fallback_time` (the row's `created_at`, so a redelivery is
    /// identical), else now as upstream does.
    pub fn time(&self, event: &HealthEvent<'_>, fallback_time: Option<DateTime<Utc>>) -> String {
        go_rfc3339_nano(
            event
                .generated_timestamp
                .or(fallback_time.filter(in_rfc3339_range))
                .unwrap_or_else(Utc::now),
        )
    }

    /// The event for `record_id` at `time` (from [`Transformer::time`]; `time` and
    /// `data.healthEvent.generatedTimestamp` are the same text, written once).
    pub fn event<'a>(
        &'a self,
        record_id: &'a str,
        event: &'a HealthEvent<'a>,
        time: &'a str,
    ) -> CloudEvent<'a> {
        CloudEvent {
            specversion: SPEC_VERSION,
            event_type: EVENT_TYPE,
            source: &self.source,
            id: record_id,
            time,
            subject: match self.subject {
                Subject::None => None,
                Subject::NodeName => Some(&*event.node_name).filter(|n| !n.is_empty()),
            },
            data: Data {
                health_event: HealthEventData::of(event, time),
                metadata: &self.metadata,
            },
        }
    }

    /// The JSON body to POST.
    pub fn encode(
        &self,
        record_id: &str,
        event: &HealthEvent<'_>,
        fallback_time: Option<DateTime<Utc>>,
    ) -> Vec<u8> {
        let time = self.time(event, fallback_time);
        // Serializing plain strings, maps and numbers cannot fail.
        to_body(&self.event(record_id, event, &time)).unwrap_or_default()
    }

    /// Like `encode`, but checks the event first (see the module docs); the error names the
    /// attribute at fault.
    pub fn try_encode(
        &self,
        record_id: &str,
        event: &HealthEvent<'_>,
        fallback_time: Option<DateTime<Utc>>,
    ) -> Result<Vec<u8>, InvalidCloudEvent> {
        let time = self.time(event, fallback_time);
        let cloud_event = self.event(record_id, event, &time);
        check_id(cloud_event.id)?;
        if let Some(error) = &self.source_error {
            return Err(error.clone());
        }
        check_time(cloud_event.time)?;
        to_body(&cloud_event).map_err(|e| InvalidCloudEvent {
            attribute: "data",
            reason: e.to_string(),
        })
    }
}

/// Bodies are a little under 1 KiB: one allocation is usually enough.
///
/// Written by sonic-rs: the same compact JSON as serde_json (its serializer is serde_json's,
/// with the string escaping done 16 bytes at a time), which was a sixth of the exporter's
/// instructions per event. `tests::sonic_and_serde_json_write_the_same_bytes` holds the two to
/// the same output.
fn to_body(event: &CloudEvent<'_>) -> Result<Vec<u8>, sonic_rs::Error> {
    let mut body = Vec::with_capacity(1024);
    sonic_rs::to_writer(&mut body, event)?;
    Ok(body)
}

impl<'a> HealthEventData<'a> {
    /// Borrows `event`'s fields; `generatedTimestamp` is `time` (what the CloudEvent says).
    fn of(event: &'a HealthEvent<'a>, time: &'a str) -> HealthEventData<'a> {
        let overrides = |o: &Option<crate::model::Overrides>| {
            o.map(|o| OverridesData {
                force: o.force,
                skip: o.skip,
            })
        };
        HealthEventData {
            agent: &event.agent,
            check_name: &event.check_name,
            component_class: &event.component_class,
            custom_recommended_action: &event.custom_recommended_action,
            drain_overrides: overrides(&event.drain_overrides),
            entities_impacted: Entities(&event.entities_impacted),
            error_code: &event.error_code,
            generated_timestamp: time,
            is_fatal: event.is_fatal,
            is_healthy: event.is_healthy,
            message: &event.message,
            metadata: &event.metadata,
            node_name: &event.node_name,
            processing_strategy: &event.processing_strategy,
            quarantine_overrides: overrides(&event.quarantine_overrides),
            recommended_action: &event.recommended_action,
            version: event.version,
        }
    }
}

/// A CloudEvent this exporter built that a conforming sink would reject.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("invalid CloudEvent attribute {attribute}: {reason}")]
pub struct InvalidCloudEvent {
    /// `id`, `source` or `time`.
    pub attribute: &'static str,
    pub reason: String,
}

/// Checks the required context attributes of CloudEvents 1.0: `id` non-empty, `source` a
/// URI-reference (ours is always absolute, `nvsentinel://<cluster>/healthevents`), and `time`
/// an RFC 3339 timestamp (4-digit year).
pub fn validate(event: &CloudEvent<'_>) -> Result<(), InvalidCloudEvent> {
    check_id(event.id)?;
    check_source(event.source)?;
    check_time(event.time)
}

fn bad(attribute: &'static str, reason: String) -> Result<(), InvalidCloudEvent> {
    Err(InvalidCloudEvent { attribute, reason })
}

fn check_id(id: &str) -> Result<(), InvalidCloudEvent> {
    if id.is_empty() {
        return bad("id", "is empty".into());
    }
    Ok(())
}

fn check_source(source: &str) -> Result<(), InvalidCloudEvent> {
    match reqwest::Url::parse(source) {
        Ok(url) if url.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        Ok(_) => bad("source", format!("{source:?} has no host")),
        Err(e) => bad("source", format!("{source:?} is not a URI: {e}")),
    }
}

fn check_time(time: &str) -> Result<(), InvalidCloudEvent> {
    if !is_rfc3339(time) {
        return bad("time", format!("{time:?} is not an RFC 3339 timestamp"));
    }
    Ok(())
}

/// RFC 3339 `date-time`: exactly `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` with a real date.
fn is_rfc3339(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|part| part.iter().all(u8::is_ascii_digit))
    };
    digits(0..4) && bytes.get(4) == Some(&b'-') && DateTime::parse_from_rfc3339(text).is_ok()
}

/// Go's `time.RFC3339Nano` in UTC: the fraction keeps only significant digits, and a whole
/// second has none (`2025-01-15T10:30:00Z`, `…:00.5Z`).
pub fn go_rfc3339_nano(time: DateTime<Utc>) -> String {
    use chrono::{Datelike, SecondsFormat, Timelike};
    let nanos = time.nanosecond();
    // `…:SS` and, when `nanos` is not 0, a fraction of 3, 6 or 9 digits (or all nine).
    let mut text = if (0..=9999).contains(&time.year()) && nanos < 1_000_000_000 {
        // Digits written directly (no `fmt`); the `Z` comes back below.
        let mut text = time.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        text.pop();
        text
    } else {
        // chrono writes a year past 9999 with a sign and a leap second as `:60`: its own format.
        use std::fmt::Write;
        let mut text = time.format("%Y-%m-%dT%H:%M:%S").to_string();
        if nanos != 0 {
            let _ = write!(text, ".{nanos:09}");
        }
        text
    };
    // Go keeps only the significant digits of the fraction (one at least is not zero).
    if nanos != 0 {
        text.truncate(text.trim_end_matches('0').len());
    }
    text.push('Z');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Entity, Overrides};
    use chrono::TimeZone;
    use serde_json::{json, Value};

    fn sample() -> HealthEvent<'static> {
        HealthEvent {
            version: 1,
            agent: "gpu-health-monitor".into(),
            component_class: "GPU".into(),
            check_name: "GpuXidError".into(),
            is_fatal: true,
            message: "XID 79".into(),
            recommended_action: "RESTART_VM".into(),
            error_code: vec!["79".into()],
            entities_impacted: vec![
                Entity {
                    entity_type: "GPU".into(),
                    entity_value: "0".into(),
                },
                Entity {
                    entity_type: "PCI".into(),
                    entity_value: "0000:3b:00".into(),
                },
            ],
            generated_timestamp: Some(Utc.with_ymd_and_hms(2025, 1, 15, 10, 30, 0).unwrap()),
            node_name: "node-1".into(),
            quarantine_overrides: Some(Overrides {
                force: true,
                skip: false,
            }),
            drain_overrides: Some(Overrides {
                force: false,
                skip: true,
            }),
            processing_strategy: "STORE_ONLY".into(),
            ..HealthEvent::default()
        }
    }

    fn transformer() -> Transformer {
        Transformer::new(BTreeMap::from([
            ("cluster".to_string(), "prod-1".to_string()),
            ("environment".to_string(), "production".to_string()),
        ]))
    }

    #[test]
    fn matches_upstream_shape_and_key_order() {
        let body = transformer().encode("7f0c1a2e-0000-4000-8000-000000000001", &sample(), None);
        let text = String::from_utf8(body).expect("utf-8");
        let expected = concat!(
            r#"{"specversion":"1.0","type":"com.nvidia.nvsentinel.health.v1","#,
            r#""source":"nvsentinel://prod-1/healthevents","id":"7f0c1a2e-0000-4000-8000-000000000001","#,
            r#""time":"2025-01-15T10:30:00Z","data":{"healthEvent":{"agent":"gpu-health-monitor","#,
            r#""checkName":"GpuXidError","componentClass":"GPU","drainOverrides":{"force":false,"skip":true},"#,
            r#""entitiesImpacted":[{"entityType":"GPU","entityValue":"0"},{"entityType":"PCI","entityValue":"0000:3b:00"}],"#,
            r#""errorCode":["79"],"generatedTimestamp":"2025-01-15T10:30:00Z","isFatal":true,"isHealthy":false,"#,
            r#""message":"XID 79","nodeName":"node-1","processingStrategy":"STORE_ONLY","#,
            r#""quarantineOverrides":{"force":true,"skip":false},"recommendedAction":"RESTART_VM","version":1},"#,
            r#""metadata":{"cluster":"prod-1","environment":"production"}}}"#
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn subject_is_the_node_name_only_when_asked_for() {
        let value: Value =
            serde_json::from_slice(&transformer().encode("id-1", &sample(), None)).expect("json");
        assert!(
            value.get("subject").is_none(),
            "upstream's shape has no subject"
        );
        let with_node = transformer().with_subject(Subject::NodeName);
        let text = String::from_utf8(with_node.encode("id-1", &sample(), None)).expect("utf-8");
        assert!(
            text.contains(r#""time":"2025-01-15T10:30:00Z","subject":"node-1","data":"#),
            "{text}"
        );
        // An event without a node name gets no (empty, invalid) subject.
        let nameless = HealthEvent::default();
        let value: Value =
            serde_json::from_slice(&with_node.encode("id-2", &nameless, None)).expect("json");
        assert!(value.get("subject").is_none(), "{value}");
    }

    #[test]
    fn empty_lists_are_arrays_and_optional_keys_absent() {
        let event = HealthEvent {
            recommended_action: "NONE".into(),
            processing_strategy: "EXECUTE_REMEDIATION".into(),
            ..HealthEvent::default()
        };
        let value: Value =
            serde_json::from_slice(&transformer().encode("id-1", &event, None)).expect("json");
        let health = &value["data"]["healthEvent"];
        assert_eq!(health["errorCode"], json!([]));
        assert_eq!(health["entitiesImpacted"], json!([]));
        for absent in [
            "metadata",
            "customRecommendedAction",
            "quarantineOverrides",
            "drainOverrides",
        ] {
            assert!(health.get(absent).is_none(), "{absent} should be absent");
        }
        assert!(value.get("gpuUUID").is_none() && value["data"].get("csp").is_none());
    }

    #[test]
    fn custom_action_is_exported_when_set() {
        let event = HealthEvent {
            recommended_action: "CUSTOM".into(),
            custom_recommended_action: "REPLACE_DISK".into(),
            ..sample()
        };
        let value: Value =
            serde_json::from_slice(&transformer().encode("id", &event, None)).expect("json");
        assert_eq!(
            value["data"]["healthEvent"]["customRecommendedAction"],
            "REPLACE_DISK"
        );
        assert_eq!(value["data"]["healthEvent"]["recommendedAction"], "CUSTOM");
    }

    #[test]
    fn time_falls_back_to_the_row_creation_time() {
        let event = HealthEvent {
            generated_timestamp: None,
            ..sample()
        };
        let created = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()
            + chrono::Duration::microseconds(1500);
        let value: Value =
            serde_json::from_slice(&transformer().encode("id", &event, Some(created)))
                .expect("json");
        assert_eq!(value["time"], "2026-03-01T00:00:00.0015Z");
        assert_eq!(
            value["data"]["healthEvent"]["generatedTimestamp"],
            value["time"]
        );
    }

    #[test]
    fn try_encode_rejects_what_a_sink_would_reject() {
        let far = HealthEvent {
            generated_timestamp: Some(Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap()),
            ..sample()
        };
        let error = transformer()
            .try_encode("id", &far, None)
            .expect_err("year 10000");
        assert_eq!(error.attribute, "time");
        let error = transformer()
            .try_encode("", &sample(), None)
            .expect_err("empty id");
        assert_eq!(error.attribute, "id");
        let spaced = Transformer::new(BTreeMap::from([(
            "cluster".to_string(),
            "my cluster".to_string(),
        )]));
        let error = spaced
            .try_encode("id", &sample(), None)
            .expect_err("space in host");
        assert_eq!(error.attribute, "source");
        let body = transformer()
            .try_encode("id", &sample(), None)
            .expect("valid");
        assert_eq!(body, transformer().encode("id", &sample(), None));
    }

    #[test]
    fn out_of_range_row_time_falls_back_to_now() {
        let event = HealthEvent {
            generated_timestamp: None,
            ..sample()
        };
        let far = Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap();
        let body = transformer()
            .try_encode("id", &event, Some(far))
            .expect("now is used instead");
        let value: Value = serde_json::from_slice(&body).expect("json");
        assert!(value["time"].as_str().is_some_and(|t| t.starts_with("20")));
    }

    #[test]
    fn rfc3339_check() {
        for good in [
            "2026-01-01T00:00:00Z",
            "0001-01-01T00:00:00.5Z",
            "2026-01-01T00:00:00+01:00",
        ] {
            assert!(is_rfc3339(good), "{good}");
        }
        for bad in [
            "+10000-01-01T00:00:00Z",
            "10000-01-01T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "",
            "-001-01-01T00:00:00Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }

    proptest::proptest! {
        /// The fixed-width fast path writes what chrono's format string writes, for every
        /// time in years 0001-9999.
        #[test]
        fn fast_formatting_matches_chrono(
            seconds in -62_135_596_800i64..=253_402_300_799,
            nanos in 0u32..1_000_000_000,
        ) {
            let time = Utc.timestamp_opt(seconds, nanos).unwrap();
            let base = time.format("%Y-%m-%dT%H:%M:%S").to_string();
            let fraction = format!("{nanos:09}");
            let expected = match fraction.trim_end_matches('0') {
                "" => format!("{base}Z"),
                digits => format!("{base}.{digits}Z"),
            };
            proptest::prop_assert_eq!(go_rfc3339_nano(time), expected);
        }

        /// The body sonic-rs writes is byte for byte what serde_json writes for the same event,
        /// for any text: quotes, backslashes, control characters, U+2028, non-BMP characters.
        #[test]
        fn sonic_and_serde_json_write_the_same_bytes(
            message in "\\PC*|[\"\\\\\u{0}-\u{1f}\u{7f}\u{2028}\u{2029}<>&a-z\u{1F600}]{0,40}",
            node in "[\\x00-\\x7f]{0,20}",
            key in "\\PC{0,12}",
            value in "[\"\\\\\u{0}-\u{1f}a-z\u{e9}]{0,20}",
            code in "\\PC{0,8}",
        ) {
            let event = HealthEvent {
                message: message.clone().into(),
                node_name: node.clone().into(),
                error_code: vec![code.clone().into()],
                metadata: [(key.clone().into(), value.clone().into())].into_iter().collect(),
                entities_impacted: vec![Entity {
                    entity_type: key.into(),
                    entity_value: value.into(),
                }],
                ..sample()
            };
            let transformer = transformer().with_subject(Subject::NodeName);
            let sonic = transformer.encode("row-1", &event, None);
            let time = transformer.time(&event, None);
            let serde = serde_json::to_vec(&transformer.event("row-1", &event, &time)).unwrap();
            proptest::prop_assert_eq!(String::from_utf8_lossy(&sonic), String::from_utf8_lossy(&serde));
        }
    }

    #[test]
    fn a_leap_second_keeps_chronos_digits() {
        for text in ["2016-12-31T23:59:60Z", "2016-12-31T23:59:60.5Z"] {
            let time = DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&Utc);
            let nanos = time.timestamp_subsec_nanos();
            let base = time.format("%Y-%m-%dT%H:%M:%S").to_string();
            let fraction = format!("{nanos:09}");
            let expected = match fraction.trim_end_matches('0') {
                "" => format!("{base}Z"),
                digits => format!("{base}.{digits}Z"),
            };
            assert_eq!(go_rfc3339_nano(time), expected, "{text}");
        }
    }

    #[test]
    fn formats_like_go_rfc3339_nano() {
        let t = Utc.with_ymd_and_hms(2026, 11, 25, 8, 1, 2).unwrap();
        assert_eq!(go_rfc3339_nano(t), "2026-11-25T08:01:02Z");
        assert_eq!(
            go_rfc3339_nano(t + chrono::Duration::nanoseconds(120_000_000)),
            "2026-11-25T08:01:02.12Z"
        );
        assert_eq!(
            go_rfc3339_nano(t + chrono::Duration::nanoseconds(1)),
            "2026-11-25T08:01:02.000000001Z"
        );
    }
}
