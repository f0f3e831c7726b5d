//! A stored MongoDB health-event document as the pipeline's [`RawEvent`].
//!
//! The document goes through the same tolerant decoder as PostgreSQL's JSON documents
//! (`crate::model`), so one event makes one CloudEvent whichever datastore held it. BSON types
//! JSON lacks are mapped to what that decoder reads: a date becomes an RFC 3339 string (so
//! `generatedtimestamp` may be `{seconds, nanos}` or a BSON date), an ObjectId its hex text,
//! 64-bit integers numbers.

use chrono::{DateTime, Utc};
use mongodb::bson::{Bson, Document};
use serde_json::{Map, Value};

use crate::datastore::RawEvent;

/// What makes a change-stream event or a stored document unusable, naming the field.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DocumentError {
    #[error("the document has no _id")]
    NoId,
    #[error("the document has no createdAt date")]
    NoCreatedAt,
    #[error("the change event has no fullDocument (was the document deleted before it was read?)")]
    NoFullDocument,
}

/// The CloudEvent id of a stored document: an ObjectId's hex text, a string as it is, anything
/// else its relaxed extended-JSON text (stable across retries, restarts and backfill).
pub fn record_id(id: &Bson) -> String {
    match id {
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::String(text) => text.clone(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

/// A stored health-event document as the pipeline's raw event: `id` from `_id`, the row's
/// creation time from `createdAt` (a BSON date), the rest converted to JSON.
pub fn raw_event(document: &Document) -> Result<RawEvent, DocumentError> {
    let id = document.get("_id").ok_or(DocumentError::NoId)?;
    Ok(RawEvent {
        record_id: record_id(id),
        document: crate::model::Document::Tree(Value::Object(to_json_object(document))),
        created_at: created_at(document),
    })
}

/// An integer field as the driver (int64) or another writer (int32) stored it.
pub fn integer(document: &Document, field: &str) -> Option<i64> {
    match document.get(field) {
        Some(Bson::Int64(n)) => Some(*n),
        Some(Bson::Int32(n)) => Some(i64::from(*n)),
        _ => None,
    }
}

/// `createdAt` when it is a BSON date.
pub fn created_at(document: &Document) -> Option<DateTime<Utc>> {
    match document.get("createdAt") {
        Some(Bson::DateTime(date)) => Some(date.to_chrono()),
        _ => None,
    }
}

fn to_json_object(document: &Document) -> Map<String, Value> {
    document
        .iter()
        .map(|(key, value)| (key.clone(), to_json(value)))
        .collect()
}

/// One BSON value as the JSON the model decoder reads.
pub fn to_json(value: &Bson) -> Value {
    match value {
        Bson::Double(number) => serde_json::Number::from_f64(*number)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Bson::String(text) => Value::String(text.clone()),
        Bson::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Bson::Document(document) => Value::Object(to_json_object(document)),
        Bson::Boolean(flag) => Value::Bool(*flag),
        Bson::Null | Bson::Undefined => Value::Null,
        Bson::Int32(number) => Value::from(*number),
        Bson::Int64(number) => Value::from(*number),
        Bson::DateTime(date) => Value::String(crate::cloudevent::go_rfc3339_nano(date.to_chrono())),
        Bson::ObjectId(oid) => Value::String(oid.to_hex()),
        Bson::Timestamp(ts) => serde_json::json!({"seconds": ts.time, "nanos": 0}),
        Bson::Decimal128(number) => Value::String(number.to_string()),
        other => other.clone().into_relaxed_extjson(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decode;
    use mongodb::bson::{doc, oid::ObjectId, DateTime as BsonDate};

    /// As platform-connectors insert it (Go driver, lowercased untagged fields, int32 enums,
    /// zero values stored).
    fn stored(generated: Bson) -> Document {
        doc! {
            "_id": ObjectId::parse_str("65f0a1b2c3d4e5f601234567").unwrap(),
            "createdAt": BsonDate::from_millis(1_700_000_000_123),
            "healthevent": {
                "version": 1_i32, "agent": "gpu-health-monitor", "componentclass": "GPU",
                "checkname": "GpuXidError", "isfatal": true, "ishealthy": false,
                "message": "XID 79", "recommendedaction": 24_i32,
                "errorcode": ["79"],
                "entitiesimpacted": [{"entitytype": "GPU", "entityvalue": "0"}],
                "metadata": {"trace_id": "0af7651916cd43dd8448eb211c80319c"},
                "generatedtimestamp": generated,
                "nodename": "node-1", "quarantineoverrides": Bson::Null,
                "drainoverrides": {"force": false, "skip": true},
                "processingstrategy": 1_i32, "id": "", "customrecommendedaction": "",
            },
            "healtheventstatus": Bson::Null,
        }
    }

    #[test]
    fn a_platform_connector_document_decodes_like_the_postgresql_one() {
        let seconds = doc! {"seconds": 1_700_000_000_i64, "nanos": 5_i32};
        let raw = raw_event(&stored(Bson::Document(seconds))).unwrap();
        assert_eq!(raw.record_id, "65f0a1b2c3d4e5f601234567");
        assert_eq!(
            raw.created_at.unwrap().timestamp_millis(),
            1_700_000_000_123
        );
        let event = decode(&raw.document).unwrap().unwrap().event;
        assert_eq!(event.recommended_action, "RESTART_BM");
        assert_eq!(event.processing_strategy, "EXECUTE_REMEDIATION");
        assert_eq!(event.check_name, "GpuXidError");
        assert!(event.is_fatal && !event.is_healthy);
        assert_eq!(event.entities_impacted.len(), 1);
        assert_eq!(event.drain_overrides.map(|o| o.skip), Some(true));
        assert_eq!(event.quarantine_overrides, None);
        let generated = event.generated_timestamp.unwrap();
        assert_eq!(
            (generated.timestamp(), generated.timestamp_subsec_nanos()),
            (1_700_000_000, 5)
        );
    }

    #[test]
    fn generated_timestamp_may_be_a_bson_date_and_enums_names() {
        let mut document = stored(Bson::DateTime(BsonDate::from_millis(1_700_000_000_250)));
        let event = document.get_document_mut("healthevent").unwrap();
        event.insert("recommendedaction", "CONTACT_SUPPORT");
        event.insert("processingstrategy", 2_i64);
        let raw = raw_event(&document).unwrap();
        let event = decode(&raw.document).unwrap().unwrap().event;
        assert_eq!(
            event.generated_timestamp.unwrap().timestamp_millis(),
            1_700_000_000_250
        );
        assert_eq!(event.recommended_action, "CONTACT_SUPPORT");
        assert_eq!(event.processing_strategy, "STORE_ONLY");
    }

    #[test]
    fn the_historical_camel_case_spelling_decodes_too() {
        let document = doc! {
            "_id": "plain-string-id",
            "createdAt": BsonDate::from_millis(0),
            "healthEvent": {"checkName": "NicDown", "isHealthy": true, "recommendedAction": "NONE",
                            "generatedTimestamp": BsonDate::from_millis(1000), "nodeName": "n2"},
        };
        let raw = raw_event(&document).unwrap();
        assert_eq!(raw.record_id, "plain-string-id");
        let event = decode(&raw.document).unwrap().unwrap().event;
        assert_eq!((&*event.check_name, &*event.node_name), ("NicDown", "n2"));
    }

    #[test]
    fn bson_types_json_lacks_are_mapped() {
        assert_eq!(to_json(&Bson::Int64(1 << 40)), Value::from(1_i64 << 40));
        assert_eq!(to_json(&Bson::Double(f64::NAN)), Value::Null);
        assert_eq!(
            to_json(&Bson::DateTime(BsonDate::from_millis(1_500))),
            Value::String("1970-01-01T00:00:01.5Z".into())
        );
        assert_eq!(raw_event(&doc! {"x": 1}).unwrap_err(), DocumentError::NoId);
    }
}
