//! Property tests (proptest) for everything that reads input from outside: the health-event
//! document decoder and the CloudEvent transform, the resume-token parser, and the
//! configuration loader. Each property is "any input gives `Ok` or `Err`, never a panic", plus
//! what an `Ok` promises. Seeded with the cases of issues 13 and 14.
//!
//! A short run (256 cases per property) is part of `cargo test`. A long run:
//! `PROPTEST_CASES=100000 cargo test --test properties` (proptest reads `PROPTEST_CASES`);
//! a failing case is written to `tests/properties.proptest-regressions` and replayed first.

use std::collections::BTreeMap;

use event_exporter::cloudevent::Transformer;
use event_exporter::config::{Config, MAX_BACKOFF_MULTIPLIER, MAX_WORKERS};
use event_exporter::datastore::postgres::StartPoint;
use event_exporter::model::{decode_document, traceparent};
use proptest::prelude::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Document decoder + CloudEvent transform
// ---------------------------------------------------------------------------------------------

fn transformer() -> Transformer {
    Transformer::new(BTreeMap::from([(
        "cluster".to_string(),
        "prod-1".to_string(),
    )]))
}

/// Decodes and transforms `document`; panics (failing the property) only if an `Ok` breaks
/// its promise: a decoded event always makes a valid CloudEvent.
fn check_document(document: &Value) {
    let Ok(Some(event)) = decode_document(document) else {
        return;
    };
    let _ = traceparent(document, &event);
    let body = transformer()
        .try_encode("7f0c1a2e-0000-4000-8000-000000000001", &event, None)
        .unwrap_or_else(|e| panic!("decoded event made an invalid CloudEvent: {e}; {document}"));
    let value: Value = serde_json::from_slice(&body).expect("body is JSON");
    let time = value["time"].as_str().expect("time is a string");
    assert!(
        time.as_bytes()
            .get(..4)
            .is_some_and(|y| y.iter().all(u8::is_ascii_digit))
            && chrono::DateTime::parse_from_rfc3339(time).is_ok(),
        "time {time:?} is not RFC 3339"
    );
    let source = value["source"].as_str().expect("source is a string");
    assert!(
        reqwest_free_uri_check(source),
        "source {source:?} is not a URI"
    );
    assert_eq!(value["data"]["healthEvent"]["generatedTimestamp"], time);
}

/// `scheme://host/path` with RFC 3986 unreserved host characters (what we promise).
fn reqwest_free_uri_check(source: &str) -> bool {
    let Some(rest) = source.strip_prefix("nvsentinel://") else {
        return false;
    };
    let Some((host, path)) = rest.split_once('/') else {
        return false;
    };
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~'))
        && path == "healthevents"
}

fn nested_arrays(depth: usize) -> Value {
    let mut value = json!([]);
    for _ in 1..depth {
        value = Value::Array(vec![value]);
    }
    value
}

fn seed_documents() -> Vec<Value> {
    let base = json!({"healthevent": {"nodeName": "n", "recommendedAction": 15}});
    let with = |key: &str, value: Value| {
        let mut doc = base.clone();
        doc["healthevent"][key] = value;
        doc
    };
    let mut seeds = vec![
        base.clone(),
        json!(null),
        json!([1, 2]),
        json!("text"),
        json!({"healthevent": "x"}),
        json!({"healthevent": null}),
        json!({"healthevent": {}, "RawEvent": nested_arrays(127)}),
        json!({"healthevent": {"metadata": {"deep": nested_arrays(200)}}}),
        with("recommendedAction", json!(39)),
        with("recommendedAction", json!(-1)),
        with("recommendedAction", json!(u64::MAX)),
        with("recommendedAction", json!(1e300)),
        with("processingStrategy", json!("99")),
        with("version", json!(-1)),
        with("version", json!(1.5)),
        with(
            "metadata",
            json!({"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}),
        ),
        with("entitiesImpacted", json!([{"entityType": 1}])),
        with("errorCode", json!([null])),
    ];
    for generated in [
        json!({"seconds": 253402300800i64}),
        json!({"seconds": 253402300799i64, "nanos": 999_999_999}),
        json!({"seconds": -62135596801i64}),
        json!({"seconds": -62135596800i64}),
        json!({"seconds": i64::MAX, "nanos": i64::MAX}),
        json!({"seconds": i64::MIN, "nanos": i64::MIN}),
        json!({"seconds": "253402300800"}),
        json!({"seconds": "-9223372036854775808"}),
        json!({"seconds": 1e300}),
        json!({"seconds": 0, "nanos": -1}),
        json!({"seconds": 0, "nanos": 1_000_000_000}),
        json!({"seconds": u64::MAX}),
        json!("0000-01-01T00:00:00Z"),
        json!("9999-12-31T23:59:59-23:59"),
        json!("0001-01-01T00:00:00+23:59"),
        json!("+10000-01-01T00:00:00Z"),
        json!([]),
    ] {
        seeds.push(with("generatedTimestamp", generated));
    }
    seeds
}

#[test]
fn seeded_documents_never_panic_and_decoded_ones_make_valid_cloudevents() {
    for seed in seed_documents() {
        check_document(&seed);
    }
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        "[0-9-]{1,22}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `generatedTimestamp` values: any `{seconds, nanos}`, valid ones, the ends of RFC 3339's
/// years, and timestamp strings.
fn any_timestamp() -> impl Strategy<Value = Value> {
    prop_oneof![
        (any::<i64>(), any::<i64>()).prop_map(|(s, n)| json!({"seconds": s, "nanos": n})),
        (-62135596800i64..=253402300799i64, 0i64..1_000_000_000)
            .prop_map(|(s, n)| json!({"seconds": s, "nanos": n})),
        any::<i64>().prop_map(|s| json!({"seconds": s.to_string()})),
        // Around the ends of RFC 3339's years (0001-01-01 and 10000-01-01 in UTC).
        (
            prop_oneof![
                -62135600000i64..-62135500000i64,
                253402200000i64..253402400000i64
            ],
            0i64..1_000_000_000
        )
            .prop_map(|(s, n)| json!({"seconds": s, "nanos": n})),
        "(0000|0001|9999)-(01|12)-(01|31)T(00|23):(00|59):(00|59)(Z|[+-](00|23):(00|59))"
            .prop_map(Value::String),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})"
            .prop_map(Value::String),
    ]
}

/// A health-event-shaped document: the decoder's keys (both spellings) with any values, and
/// timestamps with any seconds and nanos.
fn health_document() -> impl Strategy<Value = Value> {
    let keys = prop::sample::select(vec![
        "version",
        "agent",
        "componentClass",
        "checkName",
        "isFatal",
        "isHealthy",
        "message",
        "recommendedAction",
        "recommendedaction",
        "errorCode",
        "entitiesImpacted",
        "metadata",
        "generatedTimestamp",
        "generatedtimestamp",
        "nodeName",
        "quarantineOverrides",
        "drainOverrides",
        "processingStrategy",
        "customRecommendedAction",
    ]);
    let timestamp = any_timestamp();
    let value =
        prop_oneof![3 => any_json(), 1 => timestamp, 1 => any::<i64>().prop_map(|n| json!(n))];
    (
        prop::collection::btree_map(keys, value, 0..10),
        prop::option::of(any_json()),
        any::<bool>(),
    )
        .prop_map(|(fields, status, lower)| {
            let event: serde_json::Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            let mut doc = serde_json::Map::new();
            doc.insert(
                if lower { "healthevent" } else { "healthEvent" }.into(),
                Value::Object(event),
            );
            if let Some(status) = status {
                doc.insert("healtheventstatus".into(), status);
            }
            Value::Object(doc)
        })
}

proptest! {
    #[test]
    fn any_json_document_decodes_or_errs(document in any_json()) {
        check_document(&document);
    }

    #[test]
    fn any_health_event_shaped_document_decodes_or_errs(document in health_document()) {
        check_document(&document);
    }

    #[test]
    fn any_generated_timestamp_gives_a_valid_time_or_an_error(
        generated in any_timestamp(),
        lower in any::<bool>(),
    ) {
        let key = if lower { "generatedtimestamp" } else { "generatedTimestamp" };
        let document = json!({"healthevent": {"nodeName": "n", key: generated}});
        check_document(&document);
    }

    #[test]
    fn any_document_text_parses_or_errs(text in ".{0,64}") {
        if let Ok(document) = serde_json::from_str::<Value>(&text) {
            check_document(&document);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resume-token parser
// ---------------------------------------------------------------------------------------------

fn check_token(token: &Value) {
    match StartPoint::from_token("event-exporter", token) {
        Ok(
            StartPoint::Contiguous(id) | StartPoint::EventId(id) | StartPoint::Keyset { id, .. },
        ) => {
            assert!(
                id <= i64::MAX as u64,
                "{id} does not fit a changelog id: {token}"
            );
        }
        Ok(StartPoint::End) => panic!("a stored token never means 'start at the end': {token}"),
        Err(error) => {
            assert!(error.to_string().contains("\"event-exporter\""), "{error}");
        }
    }
}

#[test]
fn seeded_tokens() {
    for token in [
        json!({"eventID": 1000000, "contiguous": true}),
        json!({"eventID": u64::MAX, "contiguous": true}),
        json!({"eventID": "18446744073709551616"}),
        json!({"eventID": -1}),
        json!({"eventID": 1.5}),
        json!({"eventID": " 7 "}),
        json!({"eventID": 1, "timestamp": "+10000-01-01T00:00:00Z"}),
        json!({"eventID": 1, "timestamp": 5}),
        json!({"lastChangelogID": u64::MAX}),
        json!({"eventID": nested_arrays(150)}),
        json!(null),
        json!([]),
    ] {
        check_token(&token);
    }
    assert_eq!(
        StartPoint::from_token("c", &json!({"eventID": u64::MAX, "contiguous": true})).ok(),
        Some(StartPoint::Contiguous(i64::MAX as u64))
    );
}

fn token_shaped() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n.to_string())),
        any_json(),
    ];
    let timestamp = prop_oneof![
        Just(Value::Null),
        ".{0,30}".prop_map(Value::String),
        "[0-9]{4,6}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?Z"
            .prop_map(Value::String),
        any_json(),
    ];
    (
        prop::sample::select(vec!["eventID", "lastChangelogID", "other"]),
        id,
        timestamp,
        prop::option::of(any_json()),
    )
        .prop_map(|(key, id, timestamp, contiguous)| {
            let mut token = serde_json::Map::new();
            token.insert(key.into(), id);
            token.insert("timestamp".into(), timestamp);
            if let Some(contiguous) = contiguous {
                token.insert("contiguous".into(), contiguous);
            }
            Value::Object(token)
        })
}

proptest! {
    #[test]
    fn any_token_value_parses_or_errs(token in prop_oneof![any_json(), token_shaped()]) {
        check_token(&token);
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration loader
// ---------------------------------------------------------------------------------------------

const BASE_CONFIG: &str = r#"
[exporter]
workers = 4

[exporter.metadata]
cluster = "prod-1"

[exporter.sink]
endpoint = "https://events.example.com/api/v1/events"
timeout = "10s"

[exporter.oidc]
enabled = false

[exporter.backfill]
enabled = true
max_age = "168h"
max_events = 10000
batch_size = 100
rate_limit = 100

[exporter.failure_handling]
max_retries = 17
initial_backoff = "1s"
max_backoff = "5m"
backoff_multiplier = 2.0
"#;

/// Parses `text`; an accepted configuration must be usable without a panic: its retry
/// schedule computes, its CloudEvent source is a URI, its numbers are in range.
fn check_config(text: &str) {
    let Ok(config) = Config::parse(text) else {
        return;
    };
    let policy = &config.failure_handling;
    assert!(policy.backoff_multiplier.is_finite());
    assert!((0.0..=MAX_BACKOFF_MULTIPLIER).contains(&policy.backoff_multiplier));
    let _ = event_exporter::sink::retry::total_base_delay(policy);
    let mut backoff = event_exporter::sink::retry::Backoff::new(policy);
    for _ in 0..64 {
        if backoff.next_delay().is_none() {
            break;
        }
    }
    assert!(config
        .workers
        .is_none_or(|w| (1..=MAX_WORKERS as usize).contains(&w)));
    assert!(config.backfill.batch_size >= 1);
    let _ = std::time::Instant::now()
        .checked_add(config.sink.timeout)
        .expect("timeout fits");
    let _ = chrono::Duration::from_std(config.backfill.max_age)
        .ok()
        .and_then(|age| chrono::Utc::now().checked_sub_signed(age))
        .expect("max_age fits");
    let source = Transformer::new(config.metadata.clone())
        .source()
        .to_string();
    assert!(reqwest_free_uri_check(&source), "{source}");
}

#[test]
fn seeded_configs() {
    assert!(Config::parse(BASE_CONFIG).is_ok());
    for (from, to) in [
        ("backoff_multiplier = 2.0", "backoff_multiplier = 1e300"),
        ("backoff_multiplier = 2.0", "backoff_multiplier = nan"),
        ("max_events = 10000", "max_events = 1e+06"),
        ("max_events = 10000", "max_events = 1.5"),
        ("cluster = \"prod-1\"", "cluster = \"my cluster\""),
        ("max_backoff = \"5m\"", "max_backoff = \"2562047h47m16s\""),
        ("max_age = \"168h\"", "max_age = \"2562047h\""),
        ("workers = 4", "workers = 9223372036854775807"),
        ("batch_size = 100", "batch_size = 0"),
        ("rate_limit = 100", "rate_limit = 9223372036854775807"),
    ] {
        check_config(&BASE_CONFIG.replace(from, to));
    }
}

/// A value TOML can hold, rendered as TOML text.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| match f {
            f if f.is_nan() => "nan".to_string(),
            f if f.is_infinite() => if f > 0.0 { "inf" } else { "-inf" }.to_string(),
            f => format!("{f:e}"),
        }),
        "[0-9]{1,3}(h|m|s|ms|us|ns)".prop_map(|d| format!("{d:?}")),
        "-?[0-9]{1,25}(h|m|s|ms)".prop_map(|d| format!("{d:?}")),
        ".{0,16}".prop_map(|s| format!("{s:?}")),
        Just("true".to_string()),
        Just("[]".to_string()),
    ]
}

proptest! {
    #[test]
    fn any_value_for_any_key_is_accepted_or_rejected(
        key in prop::sample::select(vec![
            "workers", "cluster", "endpoint", "timeout", "max_age", "max_events", "batch_size",
            "rate_limit", "max_retries", "initial_backoff", "max_backoff", "backoff_multiplier",
        ]),
        value in toml_value(),
    ) {
        let text: String = BASE_CONFIG
            .lines()
            .map(|line| match line.split_once(" = ") {
                Some((k, _)) if k == key => format!("{k} = {value}"),
                _ => line.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        check_config(&text);
    }

    #[test]
    fn any_text_is_accepted_or_rejected(text in ".{0,200}") {
        check_config(&text);
        check_config(&format!("{BASE_CONFIG}\n{text}"));
    }
}
