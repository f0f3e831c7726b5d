//! The dead letter: where an event the sink permanently rejected goes (opt-in,
//! `exporter.failure_handling.on_rejected = "dead_letter"`), so the events behind it are not
//! held up forever.
//!
//! Invariant: an event counts as dead-lettered only once every configured destination has it
//! durably — the NDJSON line is written, flushed and `fsync`ed, and/or the dead-letter endpoint
//! answered 2xx. Only then may the resume token move past it. If any write fails the event is
//! undelivered and the exporter stops without moving the token, exactly as without a dead
//! letter; a restart writes the record again (at least once, like delivery).

use std::io::Write;
use std::path::{Path, PathBuf};

use reqwest::header::{HeaderValue, CONTENT_TYPE};
use serde_json::{json, Value};

use super::http::{describe_error, excerpt, read_bounded, BODY_LIMIT};

/// A dead-letter write that failed; the event stays undelivered.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("cannot write the dead-letter file {path} (exporter.failure_handling.dead_letter.file): {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the dead-letter file writer stopped: {0}")]
    Writer(String),
    #[error("cannot POST to the dead-letter endpoint {url} (exporter.failure_handling.dead_letter.endpoint): {message}")]
    Endpoint { url: String, message: String },
    #[error("the dead-letter endpoint {url} answered HTTP {status}: {excerpt}")]
    EndpointStatus {
        url: String,
        status: u16,
        excerpt: String,
    },
}

/// One dead-lettered event, as written (one JSON object per line in the file, the request
/// body for the endpoint).
#[derive(Debug)]
pub struct Record<'a> {
    /// The CloudEvent `id` (the health event's record id).
    pub event_id: &'a str,
    /// The changelog id of the change that carried the event.
    pub changelog_id: u64,
    /// The sink's last HTTP status.
    pub status: u16,
    /// Publish attempts made.
    pub attempts: u32,
    /// The start of the sink's last response body.
    pub body_excerpt: &'a str,
    /// The CloudEvent JSON exactly as POSTed.
    pub event: &'a [u8],
}

impl Record<'_> {
    /// The record as one JSON line (no trailing newline): `time` (RFC 3339, UTC, when it was
    /// dead-lettered), `event_id`, `changelog_id`, `status`, `attempts`, `body_excerpt`, and
    /// `event` (the CloudEvent object; a string if it were not JSON).
    pub fn to_json(&self) -> String {
        let event = serde_json::from_slice::<Value>(self.event)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(self.event).into_owned()));
        json!({
            "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "event_id": self.event_id,
            "changelog_id": self.changelog_id,
            "status": self.status,
            "attempts": self.attempts,
            "body_excerpt": self.body_excerpt,
            "event": event,
        })
        .to_string()
    }
}

/// The configured dead-letter destinations.
pub struct DeadLetter {
    file: Option<PathBuf>,
    endpoint: Option<(reqwest::Client, reqwest::Url)>,
    /// Serializes file appends so lines from concurrent workers never interleave.
    lock: tokio::sync::Mutex<()>,
}

impl DeadLetter {
    /// `file`: NDJSON file appended to (created if missing); `endpoint`: POSTed one record as
    /// `application/json`, with `http` (the sink's TLS options, no `Authorization`).
    pub fn new(file: Option<PathBuf>, endpoint: Option<(reqwest::Client, reqwest::Url)>) -> Self {
        DeadLetter {
            file,
            endpoint,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Writes `record` to every destination (file first); `Ok` only when all have it durably.
    pub async fn write(&self, record: &Record<'_>) -> Result<(), DeadLetterError> {
        let line = record.to_json();
        if let Some(path) = &self.file {
            let _guard = self.lock.lock().await;
            let path = path.clone();
            let text = format!("{line}\n");
            tokio::task::spawn_blocking(move || append_synced(&path, text.as_bytes()))
                .await
                .map_err(|e| DeadLetterError::Writer(e.to_string()))??;
        }
        if let Some((http, url)) = &self.endpoint {
            let response = http
                .post(url.clone())
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(line)
                .send()
                .await
                .map_err(|e| DeadLetterError::Endpoint {
                    url: url.to_string(),
                    message: describe_error(&e),
                })?;
            let status = response.status();
            let (body, _) = read_bounded(response, BODY_LIMIT).await;
            if !status.is_success() {
                return Err(DeadLetterError::EndpointStatus {
                    url: url.to_string(),
                    status: status.as_u16(),
                    excerpt: excerpt(&body, 200),
                });
            }
        }
        Ok(())
    }
}

/// Appends `bytes` to `path` in one write, then flushes and `fsync`s the file.
fn append_synced(path: &Path, bytes: &[u8]) -> Result<(), DeadLetterError> {
    let fail = |source| DeadLetterError::File {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(fail)?;
    file.write_all(bytes).map_err(fail)?;
    file.flush().map_err(fail)?;
    file.sync_all().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_json_line_with_the_event_inside() {
        let record = Record {
            event_id: "abc",
            changelog_id: 42,
            status: 422,
            attempts: 3,
            body_excerpt: "bad\nfield",
            event: br#"{"specversion":"1.0","id":"abc"}"#,
        };
        let line = record.to_json();
        assert!(!line.contains('\n'), "{line}");
        let value: Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(value["event"]["id"], "abc");
        assert_eq!(value["changelog_id"], 42);
        assert_eq!(value["status"], 422);
        assert_eq!(value["attempts"], 3);
        assert_eq!(value["body_excerpt"], "bad\nfield");
        assert!(value["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    }

    #[tokio::test]
    async fn appends_lines_and_reports_a_failed_write_with_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("dead.ndjson");
        let letter = DeadLetter::new(Some(path.clone()), None);
        for id in ["a", "b"] {
            let record = Record {
                event_id: id,
                changelog_id: 1,
                status: 400,
                attempts: 1,
                body_excerpt: "",
                event: b"{}",
            };
            letter.write(&record).await.expect("written");
        }
        let text = std::fs::read_to_string(&path).expect("read back");
        assert_eq!(text.lines().count(), 2, "{text}");

        let full = DeadLetter::new(Some(PathBuf::from("/dev/full")), None);
        let record = Record {
            event_id: "c",
            changelog_id: 2,
            status: 400,
            attempts: 1,
            body_excerpt: "",
            event: b"{}",
        };
        let error = full.write(&record).await.expect_err("ENOSPC");
        assert!(error.to_string().contains("/dev/full"), "{error}");
    }
}
