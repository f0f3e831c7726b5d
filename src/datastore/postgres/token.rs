//! The resume token: one row of `resume_tokens` per client name, holding NVSentinel's JSON
//! `{"timestamp": "<RFC3339Nano changed_at>", "eventID": <changelog id>}`.
//!
//! The Go exporter's token is a keyset bookmark over `(changed_at, id)`; ours also says
//! `"contiguous": true`, meaning every changelog id up to `eventID` is finished. Go ignores
//! the extra key, and we read both kinds, so a running Go exporter can be replaced in place.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::Connector;
use crate::datastore::{Checkpoint, CheckpointStore, DatastoreError};

/// The largest changelog id PostgreSQL can hold (`bigint`).
pub const MAX_CHANGELOG_ID: u64 = i64::MAX as u64;

/// Where reading starts, as decided by the stored token.
#[derive(Debug, Clone, PartialEq)]
pub enum StartPoint {
    /// No token: start at the changelog's current end.
    End,
    /// Every id up to and including this one is finished (our tokens, legacy id-only tokens).
    Contiguous(u64),
    /// The Go exporter's bookmark: rows after `(changed_at, id)` in that order are unfinished.
    Keyset { changed_at: DateTime<Utc>, id: u64 },
    /// Upstream's older `{"eventID": N}` form: resolved against the changelog at start.
    EventId(u64),
}

impl StartPoint {
    /// Interprets a stored token value; an unreadable one is an error, never "start at the end"
    /// (which would silently skip everything since).
    pub fn from_token(client: &str, token: &Value) -> Result<StartPoint, DatastoreError> {
        let bad = |reason: String| DatastoreError::Token {
            client: client.to_string(),
            reason,
        };
        let id_of = |key: &str| -> Result<Option<u64>, DatastoreError> {
            match token.get(key) {
                None | Some(Value::Null) => Ok(None),
                // An id beyond PostgreSQL's bigint cannot exist: it is read as the largest
                // one, so it is detected as ahead of the changelog's head (see `reset`).
                Some(value) => value
                    .as_u64()
                    .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
                    .map(|id: u64| Some(id.min(MAX_CHANGELOG_ID)))
                    .ok_or_else(|| bad(format!("{key} is not a changelog id: {value}"))),
            }
        };
        if let Some(id) = id_of("lastChangelogID")? {
            return Ok(StartPoint::Contiguous(id));
        }
        let Some(id) = id_of("eventID")? else {
            return Err(bad(format!(
                "expected {{\"timestamp\", \"eventID\"}}, found {token}"
            )));
        };
        if token.get("contiguous").and_then(Value::as_bool) == Some(true) {
            return Ok(StartPoint::Contiguous(id));
        }
        match token.get("timestamp").and_then(Value::as_str) {
            None => Ok(StartPoint::EventId(id)),
            Some(text) => {
                let changed_at = DateTime::parse_from_rfc3339(text)
                    .map_err(|e| bad(format!("timestamp {text:?} is not RFC 3339: {e}")))?
                    .with_timezone(&Utc);
                Ok(StartPoint::Keyset { changed_at, id })
            }
        }
    }
}

/// The token value written for a checkpoint.
pub fn token_value(checkpoint: &Checkpoint) -> Value {
    let timestamp = checkpoint
        .changed_at
        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| "0001-01-01T00:00:00Z".to_string());
    json!({
        "timestamp": timestamp,
        "eventID": checkpoint.position,
        "contiguous": true,
    })
}

/// Reads and writes this exporter's row of `resume_tokens` over its own connection.
pub struct TokenStore {
    connector: Connector,
    client_name: String,
    client: Mutex<Option<Client>>,
    /// When set, writes go through the leadership fence (issue 16) instead.
    fence: Option<std::sync::Arc<crate::leader::Fence>>,
}

impl TokenStore {
    pub fn new(connector: Connector, client_name: String) -> TokenStore {
        TokenStore {
            connector,
            client_name,
            client: Mutex::new(None),
            fence: None,
        }
    }

    /// Writes only as the current leader, on the lock session (`crate::leader::Fence`).
    pub fn fenced(mut self, fence: std::sync::Arc<crate::leader::Fence>) -> TokenStore {
        self.fence = Some(fence);
        self
    }

    pub fn client_name(&self) -> &str {
        &self.client_name
    }

    pub async fn load(&self) -> Result<Option<Value>, DatastoreError> {
        self.with_client(async |client, name| {
            let row = client
                .query_opt(
                    "SELECT resume_token FROM resume_tokens WHERE client_name = $1",
                    &[&name],
                )
                .await?;
            match row {
                None => Ok(None),
                Some(row) => row
                    .try_get::<_, Option<Value>>(0)
                    .map(|value| value.or(Some(Value::Null)))
                    .map_err(|e| DatastoreError::Token {
                        client: name.to_string(),
                        reason: format!(
                            "the stored value cannot be read: {}",
                            super::describe_conversion(&e)
                        ),
                    }),
            }
        })
        .await
    }

    /// Writes any JSON value as this client's row (the backfill keeps its plan this way).
    pub async fn save_value(&self, value: &Value) -> Result<(), DatastoreError> {
        if let Some(fence) = &self.fence {
            return fence.write(&self.client_name, value).await;
        }
        self.with_client(async |client, name| {
            client
                .execute(
                    "INSERT INTO resume_tokens (client_name, resume_token, last_updated) \
                     VALUES ($1, $2, NOW()) ON CONFLICT (client_name) DO UPDATE \
                     SET resume_token = EXCLUDED.resume_token, last_updated = NOW()",
                    &[&name, value],
                )
                .await?;
            Ok(())
        })
        .await
    }

    /// Opens a connection of the store's kind (for one-off queries such as planning).
    pub async fn connect(&self) -> Result<Client, DatastoreError> {
        self.connector.connect().await
    }

    /// Runs `op` on the store's connection, opening it when needed and dropping it after a
    /// failure so that the next call reconnects.
    async fn with_client<T>(
        &self,
        op: impl AsyncFnOnce(&Client, &str) -> Result<T, DatastoreError>,
    ) -> Result<T, DatastoreError> {
        let mut guard = self.client.lock().await;
        let client = match guard.take() {
            Some(client) if !client.is_closed() => client,
            _ => self.connector.connect().await?,
        };
        let result = op(&client, &self.client_name).await;
        if result.is_ok() {
            *guard = Some(client);
        }
        result
    }
}

impl CheckpointStore for TokenStore {
    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), DatastoreError> {
        // After a changelog reset positions are no longer ids (see `reset`).
        let checkpoint = Checkpoint {
            position: self.connector.positions().id_of(checkpoint.position),
            changed_at: checkpoint.changed_at,
            resume: None,
        };
        self.save_value(&token_value(&checkpoint)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_token_form() {
        let go = json!({"timestamp": "2026-11-25T08:00:00.123456Z", "eventID": 42});
        assert_eq!(
            StartPoint::from_token("event-exporter", &go).expect("valid"),
            StartPoint::Keyset {
                changed_at: DateTime::parse_from_rfc3339("2026-11-25T08:00:00.123456Z")
                    .expect("valid")
                    .with_timezone(&Utc),
                id: 42
            }
        );
        let ours = json!({"timestamp": "2026-11-25T08:00:00Z", "eventID": 7, "contiguous": true});
        assert_eq!(
            StartPoint::from_token("c", &ours).expect("valid"),
            StartPoint::Contiguous(7)
        );
        assert_eq!(
            StartPoint::from_token("c", &json!({"eventID": 9})).expect("valid"),
            StartPoint::EventId(9)
        );
        assert_eq!(
            StartPoint::from_token("c", &json!({"lastChangelogID": 3})).expect("valid"),
            StartPoint::Contiguous(3)
        );
    }

    #[test]
    fn unreadable_tokens_are_errors_that_name_the_client() {
        for token in [
            json!({}),
            json!({"eventID": "x"}),
            json!({"eventID": 1, "timestamp": "yesterday"}),
            json!("12345"),
        ] {
            let message = StartPoint::from_token("event-exporter", &token)
                .expect_err("should fail")
                .to_string();
            assert!(message.contains("\"event-exporter\""), "{message}");
        }
    }

    #[test]
    fn ids_beyond_bigint_are_read_as_the_largest_id() {
        for token in [
            json!({"eventID": u64::MAX, "contiguous": true}),
            json!({"eventID": "18446744073709551615", "contiguous": true}),
            json!({"lastChangelogID": 9223372036854775808u64}),
        ] {
            assert_eq!(
                StartPoint::from_token("c", &token).expect("valid"),
                StartPoint::Contiguous(MAX_CHANGELOG_ID),
                "{token}"
            );
        }
    }

    #[test]
    fn written_token_round_trips() {
        let checkpoint = Checkpoint {
            position: 12,
            changed_at: Some(Utc::now()),
            resume: None,
        };
        let value = token_value(&checkpoint);
        assert_eq!(value["eventID"], 12);
        assert_eq!(
            StartPoint::from_token("c", &value).expect("valid"),
            StartPoint::Contiguous(12)
        );
    }
}
