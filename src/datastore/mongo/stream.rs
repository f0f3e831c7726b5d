//! The live feed from MongoDB: a change stream on inserts into the health-events collection
//! (`fullDocument: updateLookup`), opened with `resumeAfter` = the stored token.
//!
//! Positions are dense and local to this process (1, 2, 3, … in the order events arrive); each
//! event's change carries its own `_id` as the resume point, so the checkpoint written is
//! always the token of the newest event of the contiguous finished prefix — never the cursor's
//! position, which can be ahead of unfinished events (upstream bug #1549).
//!
//! Failures are never silent (unlike the Go watcher, which stops and stays "healthy", upstream
//! #960): a stream error or a dropped connection reopens the stream with backoff from the
//! newest event received, and readiness is false meanwhile. When the history behind the token
//! is gone (codes 286 ChangeStreamHistoryLost, 260 InvalidResumeToken, 280, 9), the loss is
//! logged and counted, a fresh stream is opened **first**, and then every stored document from
//! the last exported `createdAt` (bounded by `max_age`) is read in keyset pages before the new
//! stream's events — so each event still in the collection is delivered. Documents the
//! recovery reads that this process already received, and documents the new stream delivers
//! again after the recovery read them, are recognised by `_id` and passed over (counted as
//! `skipped{reason="already_exported"}`). After a restart the recovery starts 2 s (writers'
//! clock margin) before the last exported `createdAt`, so events that close to it are sent
//! again: at least once, bounded.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Bson, Document};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::options::FullDocumentType;
use mongodb::Collection;

use super::decode;
use super::keyset::KeysetReader;
use crate::datastore::{Change, ChangeKind, ChangeSource, DatastoreError, ResumePoint, SkipReason};
use crate::metrics;
use crate::reconnect::Backoff;

/// Server codes meaning the token's history cannot be resumed from.
pub const HISTORY_LOST_CODES: &[i32] = &[286, 260, 280, 9];

/// How long an idle `getMore` waits before returning an empty batch (the lag metric and
/// shutdown both rely on the stream coming back regularly).
const MAX_AWAIT: Duration = Duration::from_secs(1);

/// Writers stamp `createdAt` with their own clocks: a recovery reads this far before the last
/// event received, so a document stamped slightly earlier but inserted later is not missed.
const CLOCK_MARGIN: Duration = Duration::from_secs(2);

/// Whether `error` says the resume token's history is gone.
pub fn history_lost(error: &mongodb::error::Error) -> bool {
    matches!(error.kind.as_ref(), mongodb::error::ErrorKind::Command(c) if HISTORY_LOST_CODES.contains(&c.code))
}

/// Settings of the live feed.
pub struct StreamOptions {
    pub client_name: String,
    /// `exporter.backfill.max_age`: how far back a recovery reads at most.
    pub max_age: Duration,
    /// `exporter.backfill.batch_size`: the recovery's page size.
    pub batch_size: u64,
}

/// A recovery in progress: stored documents read before the new stream's events.
struct Recovery {
    reader: KeysetReader,
}

/// The change stream as a [`ChangeSource`].
pub struct ChangeStreamSource {
    collection: Collection<Document>,
    options: StreamOptions,
    stream: Option<ChangeStream<Document>>,
    /// Where a reopened stream continues: the newest event received (the stored token at start).
    resume_from: Option<Document>,
    /// `createdAt` of the newest event received (the stored `lastExportedAt` at start): where a
    /// recovery starts reading.
    received_until: Option<DateTime<Utc>>,
    next_position: u64,
    /// A recovery is due once the fresh stream is open (its lower bound).
    recovery_due: Option<DateTime<Utc>>,
    recovery: Option<Recovery>,
    /// `_id`s a recovery delivered that the new stream may deliver again, and from when.
    recovered: HashSet<String>,
    recovered_since: Option<DateTime<Utc>>,
    /// `_id`s this process received with `createdAt` within [`CLOCK_MARGIN`] of
    /// `received_until`: a recovery re-reading that margin passes over them.
    recent: std::collections::HashMap<String, DateTime<Utc>>,
    /// Whether any stream was opened yet (the recovery metric's `phase`).
    opened_once: bool,
    up: Arc<AtomicBool>,
    backoff: Backoff,
}

impl ChangeStreamSource {
    /// A source resuming after `resume_token` (none: from now), whose recovery would start at
    /// `last_exported_at`.
    pub fn new(
        collection: Collection<Document>,
        options: StreamOptions,
        resume_token: Option<Document>,
        last_exported_at: Option<DateTime<Utc>>,
    ) -> ChangeStreamSource {
        ChangeStreamSource {
            collection,
            options,
            stream: None,
            resume_from: resume_token,
            received_until: last_exported_at,
            next_position: 0,
            recovery_due: None,
            recovery: None,
            recovered: HashSet::new(),
            recovered_since: None,
            recent: std::collections::HashMap::new(),
            opened_once: false,
            up: Arc::new(AtomicBool::new(false)),
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
        }
    }

    /// Reports the connection state into `up` (readiness) from now on.
    pub fn report_connection(&mut self, up: Arc<AtomicBool>) {
        up.store(self.up.load(Ordering::Relaxed), Ordering::Relaxed);
        self.up = up;
    }

    /// The open stream's own resume token (its start point before any event arrived), as
    /// BSON; `None` before `open` or when the server sent none.
    pub fn start_token(&self) -> Option<Document> {
        let token = self.stream.as_ref()?.resume_token()?;
        match mongodb::bson::to_bson(&token) {
            Ok(Bson::Document(document)) => Some(document),
            _ => None,
        }
    }

    /// Opens the stream now (start-up: so that a backfill starting after this misses nothing).
    /// Errors: only those retrying cannot fix.
    pub async fn open(&mut self) -> Result<(), DatastoreError> {
        while self.stream.is_none() {
            self.try_open().await?;
        }
        Ok(())
    }

    async fn try_open(&mut self) -> Result<(), DatastoreError> {
        let mut watch = self
            .collection
            .watch()
            .pipeline([doc! {"$match": {"operationType": {"$in": ["insert"]}}}])
            .full_document(FullDocumentType::UpdateLookup)
            .max_await_time(MAX_AWAIT);
        if let Some(token) = &self.resume_from {
            match mongodb::bson::from_bson::<ResumeToken>(Bson::Document(token.clone())) {
                Ok(token) => watch = watch.resume_after(token),
                Err(error) => {
                    tracing::error!(%error, "the stored resume token is not a change-stream token");
                    self.history_lost("the stored resume token cannot be read");
                    return Ok(());
                }
            }
        }
        match watch.await {
            Ok(stream) => {
                self.stream = Some(stream.with_type::<Document>());
                self.opened_once = true;
                self.up.store(true, Ordering::Relaxed);
                self.backoff.connected(tokio::time::Instant::now());
                if let Some(from) = self.recovery_due.take() {
                    self.start_recovery(from);
                }
                Ok(())
            }
            Err(error) => self.failed(error).await,
        }
    }

    /// Handles a failed open, `getMore` or recovery read: history lost → recovery; transient
    /// → wait and reopen; anything else is returned.
    async fn failed(&mut self, error: mongodb::error::Error) -> Result<(), DatastoreError> {
        self.stream = None;
        if history_lost(&error) {
            tracing::error!(
                %error,
                client = %self.options.client_name,
                "the change stream's history behind the resume token is lost; recovering with a \
                 backfill from the last exported createdAt"
            );
            self.history_lost("history lost");
            return Ok(());
        }
        if !super::is_transient(&error) {
            return Err(error.into());
        }
        self.up.store(false, Ordering::Relaxed);
        metrics::get().datastore_reconnects.inc();
        let wait = self.backoff.failed(tokio::time::Instant::now());
        tracing::warn!(%error, retry_in = ?wait, "MongoDB change stream failed; reopening it");
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// Drops the token; the next open starts from now and then recovers from the last
    /// exported `createdAt` (bounded by `max_age`).
    fn history_lost(&mut self, why: &str) {
        let phase = if self.opened_once {
            "runtime"
        } else {
            "initialization"
        };
        metrics::get()
            .resume_token_recoveries
            .get_or_create(&vec![
                ("client".into(), self.options.client_name.clone()),
                ("phase".into(), phase.into()),
            ])
            .inc();
        let oldest = chrono::Duration::from_std(self.options.max_age)
            .ok()
            .and_then(|age| Utc::now().checked_sub_signed(age))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let margin = chrono::Duration::from_std(CLOCK_MARGIN).unwrap_or_default();
        let from = self
            .received_until
            .and_then(|t| t.checked_sub_signed(margin))
            .map_or(oldest, |t| t.max(oldest));
        tracing::warn!(reason = why, %from, "recovery: reading stored health events from here");
        self.resume_from = None;
        self.recovery = None;
        self.recovery_due = Some(from);
    }

    fn start_recovery(&mut self, from: DateTime<Utc>) {
        let margin = chrono::Duration::from_std(CLOCK_MARGIN).unwrap_or_default();
        self.recovered.clear();
        self.recovered_since = Utc::now().checked_sub_signed(margin);
        self.recovery = Some(Recovery {
            reader: KeysetReader::new(from, None, self.options.batch_size),
        });
    }

    /// The next page of a recovery in progress, as changes (`None` when none is running).
    async fn recovery_page(&mut self) -> Result<Option<Vec<Change>>, DatastoreError> {
        let Some(recovery) = self.recovery.as_mut() else {
            return Ok(None);
        };
        let page = match recovery.reader.next_page(&self.collection).await {
            Ok(page) => page,
            Err(DatastoreError::Mongo(error)) if super::is_transient(&error) => {
                let wait = self.backoff.failed(tokio::time::Instant::now());
                tracing::warn!(%error, retry_in = ?wait, "recovery read failed; retrying");
                tokio::time::sleep(wait).await;
                return Ok(Some(Vec::new()));
            }
            Err(error) => return Err(error),
        };
        if recovery.reader.is_exhausted() {
            self.recovery = None;
            tracing::info!("recovery: every stored event since the last exported one was read");
        }
        let mut changes = Vec::with_capacity(page.len());
        for document in page {
            let created_at = decode::created_at(&document);
            let position = self.advance();
            let change = match decode::raw_event(&document) {
                Ok(event) if self.recent.contains_key(&event.record_id) => {
                    metrics::get().skipped("already_exported");
                    Change::new(
                        position,
                        created_at,
                        ChangeKind::Skip(SkipReason::AlreadyExported),
                    )
                }
                Ok(event) => {
                    self.remember(&event.record_id, created_at);
                    if self
                        .recovered_since
                        .is_some_and(|since| created_at.is_some_and(|t| t >= since))
                    {
                        self.recovered.insert(event.record_id.clone());
                    }
                    Change::new(position, created_at, ChangeKind::Event(event))
                }
                Err(error) => undecodable(position, &error),
            };
            if let Some(t) = created_at {
                self.received_until = Some(self.received_until.map_or(t, |r| r.max(t)));
            }
            changes.push(change);
        }
        Ok(Some(changes))
    }

    /// Remembers an event received, forgetting those older than the margin.
    fn remember(&mut self, id: &str, created_at: Option<DateTime<Utc>>) {
        let Some(created_at) = created_at else {
            return;
        };
        let newest = self
            .received_until
            .map_or(created_at, |r| r.max(created_at));
        let margin = chrono::Duration::from_std(CLOCK_MARGIN).unwrap_or_default();
        let Some(oldest) = newest.checked_sub_signed(margin) else {
            return;
        };
        if created_at >= oldest {
            self.recent.insert(id.to_string(), created_at);
        }
        if self.recent.len() > 1024 {
            self.recent.retain(|_, t| *t >= oldest);
        }
    }

    fn advance(&mut self) -> u64 {
        self.next_position = self.next_position.saturating_add(1);
        self.next_position
    }

    /// One change event as a change carrying its token.
    fn change_of(&mut self, event: Document) -> Change {
        let position = self.advance();
        let token = event.get_document("_id").ok().cloned();
        let full = event.get_document("fullDocument").ok();
        let created_at = full.and_then(decode::created_at);
        let kind = match full.map(decode::raw_event) {
            Some(Ok(raw)) if self.recovered.remove(&raw.record_id) => {
                metrics::get().skipped("already_exported");
                ChangeKind::Skip(SkipReason::AlreadyExported)
            }
            Some(Ok(raw)) => {
                self.remember(&raw.record_id, created_at);
                ChangeKind::Event(raw)
            }
            Some(Err(error)) => undecodable(position, &error).kind,
            None => undecodable(position, &decode::DocumentError::NoFullDocument).kind,
        };
        if let Some(t) = created_at {
            self.received_until = Some(self.received_until.map_or(t, |r| r.max(t)));
        }
        let mut change = Change::new(position, created_at, kind);
        if let Some(token) = token {
            self.resume_from = Some(token.clone());
            change = change.resuming_at(ResumePoint::ChangeStream(token));
        }
        change
    }
}

fn undecodable(position: u64, error: &decode::DocumentError) -> Change {
    tracing::warn!(position, %error, "MongoDB health event cannot be decoded; skipping it");
    metrics::get().skipped("undecodable");
    Change::new(position, None, ChangeKind::Skip(SkipReason::Undecodable))
}

impl ChangeSource for ChangeStreamSource {
    fn start_position(&self) -> u64 {
        0
    }

    async fn next_batch(&mut self) -> Result<Option<Vec<Change>>, DatastoreError> {
        loop {
            if self.stream.is_none() {
                self.try_open().await?;
                continue;
            }
            if let Some(changes) = self.recovery_page().await? {
                if changes.is_empty() {
                    continue;
                }
                return Ok(Some(changes));
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            match stream.next_if_any().await {
                Ok(Some(event)) => {
                    self.backoff.reset();
                    if let Ok(time) = event.get_timestamp("clusterTime") {
                        if let Some(at) = DateTime::from_timestamp(i64::from(time.time), 0) {
                            crate::lag::global().event(at);
                        }
                    }
                    return Ok(Some(vec![self.change_of(event)]));
                }
                Ok(None) => {
                    self.backoff.reset();
                    crate::lag::global().caught_up();
                }
                Err(error) => self.failed(error).await?,
            }
        }
    }
}
