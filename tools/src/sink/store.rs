//! Where accepted events go: the `source` + `id` deduplication set, the `--out` file (opened
//! once, one write per event so a reader tailing it sees each event as soon as it is answered)
//! and the last few events kept in memory for in-process readers.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::validate::ValidEvent;

/// An accepted event and when it arrived (for delivery-latency measurements).
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedEvent {
    pub received_at: DateTime<Utc>,
    pub event: Value,
}

/// Whether an accepted event was new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
    New,
    Duplicate,
}

pub(super) struct EventStore {
    /// One lock for the set, the file and the memory, so the file holds each key exactly once
    /// and in the order the events were accepted.
    inner: Mutex<Inner>,
    keep: usize,
}

struct Inner {
    seen: HashSet<(String, String)>,
    out: Option<File>,
    kept: VecDeque<ReceivedEvent>,
}

impl EventStore {
    /// Opens `out` for appending (created if missing); keeps the last `keep` events in memory.
    pub fn open(out: Option<&Path>, keep: usize) -> std::io::Result<EventStore> {
        let out = match out {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
            None => None,
        };
        Ok(EventStore {
            // Sized for `keep` up front: growing a table of tens of thousands of keys (or
            // events) under the lock holds every answer up for as long as the copy takes.
            inner: Mutex::new(Inner {
                seen: HashSet::with_capacity(keep),
                out,
                kept: VecDeque::with_capacity(keep),
            }),
            keep,
        })
    }

    /// Stores `event` unless its key was seen. `body` is the request body, written as is when
    /// it is already one line. A write error leaves the key unseen, so a retry can succeed.
    pub fn accept(&self, event: ValidEvent, body: &[u8]) -> std::io::Result<Stored> {
        let key = (event.source, event.id);
        let mut inner = self.lock();
        if inner.seen.contains(&key) {
            return Ok(Stored::Duplicate);
        }
        if let Some(out) = inner.out.as_mut() {
            out.write_all(&json_line(body, &event.event))?;
        }
        inner.seen.insert(key);
        self.remember(&mut inner, event.event);
        Ok(Stored::New)
    }

    /// The kept events, oldest first.
    pub fn events(&self) -> Vec<ReceivedEvent> {
        self.lock().kept.iter().cloned().collect()
    }

    fn remember(&self, inner: &mut Inner, event: Value) {
        if self.keep == 0 {
            return;
        }
        if inner.kept.len() == self.keep {
            inner.kept.pop_front();
        }
        inner.kept.push_back(ReceivedEvent {
            received_at: Utc::now(),
            event,
        });
    }

    /// A panic elsewhere while holding the lock leaves the data consistent enough to go on.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The event as one JSON line: the sender's bytes (its key order) when they hold no line
/// break, else re-serialized compactly.
fn json_line(body: &[u8], event: &Value) -> Vec<u8> {
    let trimmed = body.trim_ascii();
    let mut line = if trimmed.iter().any(|&b| b == b'\n' || b == b'\r') {
        // Serializing a parsed JSON value cannot fail.
        serde_json::to_vec(event).unwrap_or_default()
    } else {
        trimmed.to_vec()
    };
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid(id: &str, event: Value) -> ValidEvent {
        ValidEvent {
            source: "s".into(),
            id: id.into(),
            event,
        }
    }

    #[test]
    fn deduplicates_and_appends_one_line_per_new_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.ndjson");
        let store = EventStore::open(Some(&path), 1).expect("open");
        let pretty = b"{\n  \"id\": \"1\"\n}\n";
        assert_eq!(
            store
                .accept(valid("1", json!({"id": "1"})), pretty)
                .expect("write"),
            Stored::New
        );
        assert_eq!(
            store
                .accept(valid("1", json!({"id": "1"})), pretty)
                .expect("write"),
            Stored::Duplicate
        );
        let raw = br#" {"id":"2","b":1,"a":2} "#;
        assert_eq!(
            store.accept(valid("2", json!({})), raw).expect("write"),
            Stored::New
        );
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "{\"id\":\"1\"}\n{\"id\":\"2\",\"b\":1,\"a\":2}\n");
        // keep = 1: only the newest stays in memory.
        assert_eq!(store.events().len(), 1);
    }
}
