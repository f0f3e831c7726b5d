//! A `json`/`jsonb` column read as its JSON text, unparsed: the exporter decodes the document
//! once, in one pass, where it turns it into a CloudEvent (`model::decode`), instead of the
//! driver building a `serde_json::Value` tree first. jsonb's binary form is a version byte
//! (1) followed by the text, so reading it costs one copy.

use std::error::Error;

use tokio_postgres::types::{FromSql, Type};

use crate::model::Document;

/// The text of a `json` or `jsonb` value.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonText(pub String);

impl JsonText {
    /// The column as a stored document; SQL NULL (`None`) is the JSON `null`.
    pub fn document(column: Option<JsonText>) -> Document {
        match column {
            Some(JsonText(text)) => Document::Text(text),
            None => Document::Tree(serde_json::Value::Null),
        }
    }
}

impl<'a> FromSql<'a> for JsonText {
    /// Errors: a jsonb version other than 1, text that is not UTF-8.
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<JsonText, Box<dyn Error + Sync + Send>> {
        let text = if *ty == Type::JSONB {
            match raw.split_first() {
                Some((1, text)) => text,
                _ => return Err("unsupported JSONB encoding version".into()),
            }
        } else {
            raw
        };
        Ok(JsonText(std::str::from_utf8(text)?.to_owned()))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON || *ty == Type::JSONB
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_jsonb_and_json_text() {
        let jsonb = JsonText::from_sql(&Type::JSONB, b"\x01{\"a\": 1}").unwrap();
        assert_eq!(jsonb, JsonText("{\"a\": 1}".into()));
        let json = JsonText::from_sql(&Type::JSON, b"[1, 2]").unwrap();
        assert_eq!(json, JsonText("[1, 2]".into()));
        assert!(JsonText::from_sql(&Type::JSONB, b"\x02{}").is_err());
        assert!(JsonText::from_sql(&Type::JSONB, b"").is_err());
        assert!(JsonText::from_sql(&Type::JSON, b"\"\xff\"").is_err());
        assert!(JsonText::accepts(&Type::JSONB) && !JsonText::accepts(&Type::TEXT));
    }
}
