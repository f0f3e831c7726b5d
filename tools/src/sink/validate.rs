//! CloudEvents 1.0 structured-mode JSON checks: the required context attributes and the types of
//! the optional ones, so a malformed event is caught at the sink's door with a 400 naming the
//! attribute instead of being stored.

use event_exporter::model::json_kind;
use serde_json::{Map, Value};

/// A context attribute the sink checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute {
    Specversion,
    Id,
    Source,
    Type,
    Time,
    Datacontenttype,
    Subject,
}

impl Attribute {
    /// The attribute's JSON key.
    pub fn name(self) -> &'static str {
        match self {
            Attribute::Specversion => "specversion",
            Attribute::Id => "id",
            Attribute::Source => "source",
            Attribute::Type => "type",
            Attribute::Time => "time",
            Attribute::Datacontenttype => "datacontenttype",
            Attribute::Subject => "subject",
        }
    }
}

/// Why a body is not a CloudEvents 1.0 JSON event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("a CloudEvent must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    #[error("{}: {problem}", attribute.name())]
    Attribute {
        attribute: Attribute,
        problem: String,
    },
}

/// An event that passed the checks, with its deduplication key pulled out.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidEvent {
    pub source: String,
    pub id: String,
    pub event: Value,
}

/// Parses `body` and checks it is a CloudEvents 1.0 JSON event.
pub fn validate_event(body: &[u8]) -> Result<ValidEvent, Invalid> {
    let event: Value = serde_json::from_slice(body).map_err(|e| Invalid::NotJson(e.to_string()))?;
    let Value::Object(attributes) = &event else {
        return Err(Invalid::NotAnObject(json_kind(&event)));
    };
    check_specversion(attributes)?;
    let id = required_string(attributes, Attribute::Id)?.to_string();
    let source = required_string(attributes, Attribute::Source)?.to_string();
    required_string(attributes, Attribute::Type)?;
    check_time(attributes)?;
    optional_string(attributes, Attribute::Datacontenttype)?;
    optional_string(attributes, Attribute::Subject)?;
    Ok(ValidEvent { source, id, event })
}

fn problem(attribute: Attribute, problem: impl Into<String>) -> Invalid {
    Invalid::Attribute {
        attribute,
        problem: problem.into(),
    }
}

/// Only 1.0 is accepted: the exporter sends 1.0, and 0.3 has different attribute rules.
fn check_specversion(attributes: &Map<String, Value>) -> Result<(), Invalid> {
    match attributes.get("specversion") {
        None => Err(problem(Attribute::Specversion, "is required")),
        Some(Value::String(version)) if version == "1.0" => Ok(()),
        Some(Value::String(version)) => Err(problem(
            Attribute::Specversion,
            format!("must be \"1.0\", got {version:?}"),
        )),
        Some(other) => Err(problem(
            Attribute::Specversion,
            format!("must be the string \"1.0\", got {}", json_kind(other)),
        )),
    }
}

fn required_string(attributes: &Map<String, Value>, attribute: Attribute) -> Result<&str, Invalid> {
    match attributes.get(attribute.name()) {
        None => Err(problem(attribute, "is required")),
        Some(Value::String(text)) if !text.is_empty() => Ok(text),
        Some(Value::String(_)) => Err(problem(attribute, "must not be empty")),
        Some(other) => Err(problem(
            attribute,
            format!("must be a string, got {}", json_kind(other)),
        )),
    }
}

fn optional_string(attributes: &Map<String, Value>, attribute: Attribute) -> Result<(), Invalid> {
    match attributes.get(attribute.name()) {
        None | Some(Value::String(_)) => Ok(()),
        Some(other) => Err(problem(
            attribute,
            format!("must be a string, got {}", json_kind(other)),
        )),
    }
}

fn check_time(attributes: &Map<String, Value>) -> Result<(), Invalid> {
    let Some(time) = attributes.get("time") else {
        return Ok(());
    };
    let Value::String(text) = time else {
        return Err(problem(
            Attribute::Time,
            format!(
                "must be an RFC 3339 timestamp string, got {}",
                json_kind(time)
            ),
        ));
    };
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|_| ())
        .map_err(|e| {
            problem(
                Attribute::Time,
                format!("{text:?} is not an RFC 3339 timestamp ({e})"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good() -> Value {
        json!({
            "specversion": "1.0",
            "type": "com.nvidia.nvsentinel.health.v1",
            "source": "nvsentinel://c1/healthevents",
            "id": "42",
            "time": "2025-01-02T03:04:05.123456789Z",
            "datacontenttype": "application/json",
            "subject": "node-1",
            "data": {"healthEvent": {}},
        })
    }

    fn check(event: &Value) -> Result<ValidEvent, Invalid> {
        validate_event(&serde_json::to_vec(event).expect("serializable"))
    }

    fn attribute_of(event: Value) -> Attribute {
        match check(&event) {
            Err(Invalid::Attribute { attribute, .. }) => attribute,
            other => panic!("expected an attribute problem for {event}, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_complete_event_and_extracts_the_key() {
        let valid = check(&good()).expect("valid");
        assert_eq!(valid.source, "nvsentinel://c1/healthevents");
        assert_eq!(valid.id, "42");
        assert_eq!(valid.event, good());
    }

    #[test]
    fn optional_attributes_may_be_absent() {
        let mut event = good();
        for key in ["time", "datacontenttype", "subject", "data"] {
            event.as_object_mut().expect("object").remove(key);
        }
        assert!(check(&event).is_ok());
    }

    #[test]
    fn names_the_broken_attribute() {
        let with = |key: &str, value: Value| {
            let mut event = good();
            event[key] = value;
            event
        };
        let without = |key: &str| {
            let mut event = good();
            event.as_object_mut().expect("object").remove(key);
            event
        };
        let cases = [
            (without("specversion"), Attribute::Specversion),
            (with("specversion", json!("0.3")), Attribute::Specversion),
            (with("specversion", json!(1.0)), Attribute::Specversion),
            (without("id"), Attribute::Id),
            (with("id", json!("")), Attribute::Id),
            (with("id", json!(7)), Attribute::Id),
            (without("source"), Attribute::Source),
            (with("source", json!("")), Attribute::Source),
            (without("type"), Attribute::Type),
            (with("type", Value::Null), Attribute::Type),
            (with("time", json!("yesterday")), Attribute::Time),
            (with("time", json!("2025-01-02 03:04")), Attribute::Time),
            (with("time", json!(1735787045)), Attribute::Time),
            (
                with("datacontenttype", json!(1)),
                Attribute::Datacontenttype,
            ),
            (with("subject", json!(["a"])), Attribute::Subject),
        ];
        for (event, expected) in cases {
            assert_eq!(attribute_of(event.clone()), expected, "{event}");
        }
    }

    #[test]
    fn rejects_non_json_and_non_objects() {
        assert!(matches!(validate_event(b"{"), Err(Invalid::NotJson(_))));
        assert!(matches!(
            validate_event(b"[1]"),
            Err(Invalid::NotAnObject("an array"))
        ));
    }
}
