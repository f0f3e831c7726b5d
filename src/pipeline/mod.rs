//! From changes to deliveries: a reader task pulls decided changes from the datastore, the
//! dispatcher hands each health event to one of `workers` concurrent publishes, and the
//! sequence tracker moves the checkpoint over the contiguous prefix of finished positions.
//!
//! At-least-once: a position is finished only once its event was accepted by the sink (a 2xx
//! to its POST, or an answer in `already_delivered_statuses`), was durably written to the dead
//! letter after a permanent rejection (`on_rejected = "dead_letter"`), or needed no delivery.
//! If an event cannot be delivered, intake stops, in-flight work gets the grace period, the
//! checkpoint is saved up to the failed position, and `run` returns an error.
//!
//! Checkpoint writes: as soon as the contiguous prefix advances, the resume token is written,
//! but at most one write is in flight (the write is awaited in the loop) and two writes are at
//! least `save_interval` apart. A `kill -9` therefore re-sends at most the events in flight,
//! the events finished behind an earlier one still in flight, and the events finished within
//! the last `save_interval` (plus the duration of one token write).

mod tracker;

pub use tracker::SequenceTracker;

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cloudevent::Transformer;
use crate::datastore::{
    Change, ChangeKind, ChangeSource, CheckpointStore, DatastoreError, RawEvent,
};
use crate::filter::Filter;
use crate::metrics;
use crate::model::{decode_document, traceparent};
use crate::sink::dead_letter::{self, DeadLetter};
use crate::sink::http::Delivery;
use crate::sink::{PublishError, Publisher};

/// How often the stream lag is reported, and how long a fresh start waits before writing its
/// first resume token (so the first batch is in it).
const LAG_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("event {record_id} (changelog id {position}) was not delivered: {reason}")]
    Undelivered {
        position: u64,
        record_id: String,
        reason: String,
    },
    #[error("reading the datastore: {0}")]
    Source(DatastoreError),
    #[error("saving the resume token: {0}")]
    Checkpoint(DatastoreError),
}

/// What happened to one event.
enum Outcome {
    Published,
    /// Permanently rejected by the sink and durably written to the dead letter.
    DeadLettered,
    /// Needs no delivery (undecodable, no health event); the position still finishes.
    Skipped,
    /// The filter expression evaluated false: not published; the position still finishes.
    Filtered,
    Failed(String),
    /// Stopped by shutdown before the sink accepted it; the position stays unfinished.
    Cancelled,
}

/// Turns a stored event into a delivery.
pub struct EventHandler {
    pub transformer: Transformer,
    pub publisher: Publisher,
    /// `exporter.filter.expression`; `None` exports everything.
    pub filter: Option<Filter>,
    /// Where permanently rejected events go (`on_rejected = "dead_letter"`); `None` stops.
    pub dead_letter: Option<DeadLetter>,
}

impl EventHandler {
    async fn handle(
        &self,
        feed: Feed,
        position: u64,
        event: &RawEvent,
        cancel: &CancellationToken,
    ) -> Outcome {
        let metrics = metrics::get();
        let health_event = match decode_document(&event.document) {
            Ok(Some(health_event)) => health_event,
            Ok(None) => {
                tracing::warn!(changelog_id = position, record_id = %event.record_id, "document has no health event; skipping it");
                metrics.skipped("no_health_event");
                return Outcome::Skipped;
            }
            Err(error) => {
                tracing::warn!(changelog_id = position, record_id = %event.record_id, %error, "undecodable health event document; skipping it");
                metrics.transform_errors.inc();
                // A time outside RFC 3339's years would make an invalid CloudEvent `time`.
                metrics.skipped(if error.field.ends_with("generatedTimestamp") {
                    "invalid_time"
                } else {
                    "undecodable"
                });
                return Outcome::Skipped;
            }
        };
        if let Some(filter) = &self.filter {
            match filter.matches(&health_event) {
                Ok(true) => {}
                Ok(false) => {
                    metrics.events_filtered.inc();
                    tracing::debug!(changelog_id = position, record_id = %event.record_id, "filter expression is false; not publishing the event");
                    return Outcome::Filtered;
                }
                // Fail open, as upstream: an event the filter cannot judge is exported.
                Err(error) => {
                    metrics.filter_errors.inc();
                    tracing::warn!(changelog_id = position, record_id = %event.record_id, %error, "Filter evaluation failed, exporting event");
                }
            }
        }
        let body = match self.transformer.try_encode(
            &event.record_id,
            &health_event,
            event.created_at,
        ) {
            Ok(body) => body,
            // One bad event never blocks the rest: skipped, logged, counted.
            Err(error) => {
                tracing::warn!(changelog_id = position, record_id = %event.record_id, %error, "the CloudEvent built for this event is invalid; skipping it");
                metrics.transform_errors.inc();
                metrics.skipped("invalid_cloudevent");
                return Outcome::Skipped;
            }
        };
        let started = Instant::now();
        match self
            .publisher
            .publish(
                &body,
                &event.record_id,
                traceparent(&event.document, &health_event).as_deref(),
                cancel,
            )
            .await
        {
            Ok(delivery) => {
                metrics.published(match delivery {
                    Delivery::Accepted => "success",
                    Delivery::AlreadyDelivered(_) => "already_delivered",
                });
                if let Delivery::AlreadyDelivered(status) = delivery {
                    tracing::info!(changelog_id = position, record_id = %event.record_id, status, "sink already has the event (already_delivered_statuses)");
                }
                metrics
                    .publish_duration
                    .observe(started.elapsed().as_secs_f64());
                if feed == Feed::Backfill {
                    metrics.backfill_events_processed.inc();
                }
                tracing::debug!(changelog_id = position, record_id = %event.record_id, "event published");
                Outcome::Published
            }
            Err(PublishError::Cancelled) => Outcome::Cancelled,
            Err(PublishError::Rejected {
                status,
                attempts,
                excerpt,
                last,
                ..
            }) if self.dead_letter.is_some() => {
                let record = dead_letter::Record {
                    event_id: &event.record_id,
                    changelog_id: position,
                    status,
                    attempts,
                    body_excerpt: &excerpt,
                    event: &body,
                };
                let written = match &self.dead_letter {
                    Some(letter) => letter.write(&record).await,
                    None => Ok(()),
                };
                match written {
                    Ok(()) => {
                        metrics.dead_lettered(status);
                        tracing::error!(
                            changelog_id = position,
                            record_id = %event.record_id,
                            status,
                            attempts,
                            error = %last,
                            "the sink permanently rejected the event; written to the dead letter, going on"
                        );
                        Outcome::DeadLettered
                    }
                    Err(error) => {
                        metrics.published("failure");
                        metrics.publish_error("dead_letter_failed");
                        Outcome::Failed(format!(
                            "the sink rejected it with HTTP {status} ({last}), and writing it to the dead letter failed: {error}"
                        ))
                    }
                }
            }
            Err(error) => {
                metrics.published("failure");
                metrics.publish_error("max_retries_exceeded");
                Outcome::Failed(error.to_string())
            }
        }
    }
}

/// Which feed a pipeline carries; decides the metrics it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    Stream,
    Backfill,
}

pub struct Pipeline<S, C> {
    pub feed: Feed,
    pub source: S,
    pub checkpoints: Arc<C>,
    pub handler: Arc<EventHandler>,
    /// Concurrent publishes, shared by the stream and a running backfill.
    pub permits: Arc<Semaphore>,
    /// How long in-flight publishes may finish after intake stops.
    pub grace: Duration,
    /// Whether a resume token existed at start; if not, the first checkpoint is written even
    /// when it has not moved, so a restart does not begin at a later "end".
    pub had_token: bool,
    /// The least time between two checkpoint writes (`exporter.resume_token.save_interval`).
    pub save_interval: Duration,
}

/// Counts for the final log line.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// The source ran out and every one of its events finished.
    pub finished: bool,
    pub published: u64,
    pub skipped: u64,
    /// Not published because the filter expression evaluated false.
    pub filtered: u64,
    /// Permanently rejected and written to the dead letter.
    pub dead_lettered: u64,
    pub checkpoint: u64,
}

impl<S: ChangeSource, C: CheckpointStore> Pipeline<S, C> {
    /// Runs until `shutdown` or the source is finished (returns `Ok`) or an event cannot be
    /// delivered (returns `Err`).
    pub async fn run(self, shutdown: CancellationToken) -> Result<Summary, PipelineError> {
        let Pipeline {
            feed,
            mut source,
            checkpoints,
            handler,
            permits,
            grace,
            had_token,
            save_interval,
        } = self;
        let mut tracker = SequenceTracker::new(source.start_position());
        let mut saved = had_token.then(|| tracker.checkpoint());
        let mut saver = Saver::new(save_interval, saved.is_none());
        let mut summary = Summary::default();

        // The reader runs ahead of dispatch by at most a few batches.
        let (changes_tx, mut changes_rx) =
            mpsc::channel::<Result<Option<Vec<Change>>, DatastoreError>>(2);
        let reader_stop = CancellationToken::new();
        let reader = tokio::spawn({
            let stop = reader_stop.clone();
            async move {
                loop {
                    let batch = tokio::select! {
                        _ = stop.cancelled() => return,
                        batch = source.next_batch() => batch,
                    };
                    let last = !matches!(batch, Ok(Some(_)));
                    if changes_tx.send(batch).await.is_err() || last {
                        return;
                    }
                }
            }
        });

        let (results_tx, mut results_rx) = mpsc::unbounded_channel::<(Change, Outcome)>();
        let mut in_flight = JoinSet::new();
        // Cancels retry waits once the grace period is over.
        let publish_cancel = CancellationToken::new();
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + LAG_INTERVAL, LAG_INTERVAL);
        let mut failure: Option<PipelineError> = None;
        let mut finished = false;

        // Events received and not yet handed to a worker. Waiting for a worker is one arm of
        // the loop, so results keep being recorded and the token saved meanwhile.
        let mut waiting: VecDeque<(Change, RawEvent)> = VecDeque::new();
        // When each received, unfinished event was written: the stream's lag.
        let mut unfinished: BTreeMap<u64, DateTime<Utc>> = BTreeMap::new();
        'intake: loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'intake,
                // Before results: a steady stream of results must not starve the checkpoint.
                _ = sleep_until_some(saver.due) => {
                    saver.save(&*checkpoints, &tracker, &mut saved).await;
                }
                _ = tick.tick() => {
                    if feed == Feed::Stream {
                        report_lag(&unfinished, &tracker);
                    }
                }
                Some((change, outcome)) = results_rx.recv() => {
                    // Reap finished tasks so the set holds only what is in flight.
                    while in_flight.try_join_next().is_some() {}
                    unfinished.remove(&change.position);
                    if let Some(error) = record(&mut tracker, &mut summary, change, outcome) {
                        failure = Some(error);
                        break 'intake;
                    }
                    saver.note(&tracker, &saved);
                }
                permit = permits.clone().acquire_owned(), if !waiting.is_empty() => {
                    let (Ok(permit), Some((change, event))) = (permit, waiting.pop_front()) else {
                        break 'intake;
                    };
                    let handler = handler.clone();
                    let results = results_tx.clone();
                    let cancel = publish_cancel.clone();
                    in_flight.spawn(async move {
                        let _permit = permit;
                        let gauge = &metrics::get().events_in_flight;
                        gauge.inc();
                        crate::panics::debug_panic_point("publish");
                        let outcome = handler.handle(feed, change.position, &event, &cancel).await;
                        gauge.dec();
                        crate::watchdog::global().finished();
                        let _ = results.send((change, outcome));
                    });
                }
                batch = changes_rx.recv(), if waiting.is_empty() => {
                    let changes = match batch {
                        Some(Ok(Some(changes))) => changes,
                        // The source is finished: drain in-flight work below, then return.
                        Some(Ok(None)) => { finished = true; break 'intake; }
                        Some(Err(error)) => { failure = Some(PipelineError::Source(error)); break 'intake; }
                        None => { failure = Some(PipelineError::Source(DatastoreError::Schema("the changelog reader stopped".into()))); break 'intake; }
                    };
                    for change in changes {
                        match &change.kind {
                            ChangeKind::Skip(_) => {
                                tracker.finish_span(change.position, change.through, change.changed_at);
                                saver.note(&tracker, &saved);
                            }
                            ChangeKind::Event(event) => {
                                if feed == Feed::Stream {
                                    metrics::get().events_received.inc();
                                    if let Some(changed_at) = change.changed_at {
                                        unfinished.insert(change.position, changed_at);
                                    }
                                }
                                let event = event.clone();
                                crate::watchdog::global().received();
                                waiting.push_back((change, event));
                            }
                        }
                    }
                }
            }
        }

        // Intake is closed: let in-flight publishes finish within the grace period.
        reader_stop.cancel();
        let _ = reader.await;
        drop(results_tx);
        // A finished source waits for all its events (saving progress as usual); a stop or a
        // failure gives in-flight events the grace period.
        let mut deadline =
            (!finished || failure.is_some()).then(|| tokio::time::Instant::now() + grace);
        if !in_flight.is_empty() {
            tracing::info!(in_flight = in_flight.len(), grace = ?grace, "waiting for in-flight events");
        }
        let mut abandoned = false;
        loop {
            tokio::select! {
                joined = in_flight.join_next() => if joined.is_none() { break },
                _ = shutdown.cancelled(), if deadline.is_none() => {
                    deadline = Some(tokio::time::Instant::now() + grace);
                }
                _ = sleep_until_some(saver.due), if deadline.is_none() => {
                    saver.save(&*checkpoints, &tracker, &mut saved).await;
                }
                _ = sleep_until_some(deadline) => {
                    tracing::warn!(abandoned = in_flight.len(), "grace period over; abandoning in-flight events (they will be re-sent after restart)");
                    publish_cancel.cancel();
                    in_flight.abort_all();
                    while in_flight.join_next().await.is_some() {}
                    abandoned = true;
                    break;
                }
            }
            while let Ok((change, outcome)) = results_rx.try_recv() {
                if let Some(error) = record(&mut tracker, &mut summary, change, outcome) {
                    failure.get_or_insert(error);
                    deadline.get_or_insert(tokio::time::Instant::now() + grace);
                }
                saver.note(&tracker, &saved);
            }
        }
        while let Ok((change, outcome)) = results_rx.try_recv() {
            if let Some(error) = record(&mut tracker, &mut summary, change, outcome) {
                failure.get_or_insert(error);
            }
        }

        let saved_now = save_if_advanced(&*checkpoints, &tracker, &mut saved).await;
        summary.checkpoint = tracker.checkpoint().position;
        summary.finished = finished && !abandoned && failure.is_none();
        match (failure, saved_now) {
            (Some(error), _) => Err(error),
            (None, Err(error)) => Err(PipelineError::Checkpoint(error)),
            (None, Ok(())) => Ok(summary),
        }
    }
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Applies one outcome; returns the error that must stop the pipeline, if any.
fn record(
    tracker: &mut SequenceTracker,
    summary: &mut Summary,
    change: Change,
    outcome: Outcome,
) -> Option<PipelineError> {
    match outcome {
        Outcome::Published => summary.published += 1,
        Outcome::DeadLettered => summary.dead_lettered += 1,
        Outcome::Skipped => summary.skipped += 1,
        Outcome::Filtered => summary.filtered += 1,
        Outcome::Cancelled => return None,
        Outcome::Failed(reason) => {
            let record_id = match change.kind {
                ChangeKind::Event(event) => event.record_id,
                ChangeKind::Skip(_) => String::new(),
            };
            return Some(PipelineError::Undelivered {
                position: change.position,
                record_id,
                reason,
            });
        }
    }
    tracker.finish_span(change.position, change.through, change.changed_at);
    None
}

/// Stream lag: the age of the oldest received event not yet finished, and how many changelog
/// ids the resume token is behind the head.
fn report_lag(unfinished: &BTreeMap<u64, DateTime<Utc>>, tracker: &SequenceTracker) {
    let metrics = metrics::get();
    let lag = unfinished
        .values()
        .min()
        .map(|oldest| (Utc::now() - *oldest).num_milliseconds().max(0) as f64 / 1000.0)
        .unwrap_or(0.0);
    metrics.stream_lag_seconds.set(lag);
    let head = metrics.changelog_head_id.get().max(0) as u64;
    let behind = head.saturating_sub(tracker.checkpoint().position);
    metrics.changelog_ids_behind.set(behind as i64);
}

/// When the next checkpoint write is due: as soon as the prefix advances, but at least
/// `interval` after the previous write. Writes are awaited in the pipeline loop, so at most
/// one is in flight.
struct Saver {
    interval: Duration,
    last: Option<tokio::time::Instant>,
    /// `Some` while a write is owed.
    due: Option<tokio::time::Instant>,
}

impl Saver {
    /// A fresh start (`first_write`) owes one write after [`LAG_INTERVAL`] even if nothing
    /// finished, so the first batch is in it and a restart does not begin at a later "end".
    fn new(interval: Duration, first_write: bool) -> Saver {
        Saver {
            interval,
            last: None,
            due: first_write.then(|| tokio::time::Instant::now() + LAG_INTERVAL),
        }
    }

    /// Schedules a write if the checkpoint moved past the saved one and none is owed yet.
    fn note(&mut self, tracker: &SequenceTracker, saved: &Option<crate::datastore::Checkpoint>) {
        if self.due.is_some() {
            return;
        }
        let moved = saved
            .as_ref()
            .is_none_or(|s| s.position != tracker.checkpoint().position);
        if moved {
            let now = tokio::time::Instant::now();
            let earliest = self.last.map_or(now, |last| last + self.interval);
            self.due = Some(earliest.max(now));
        }
    }

    /// Writes the checkpoint if it moved; a failed write is retried one interval later.
    async fn save<C: CheckpointStore>(
        &mut self,
        checkpoints: &C,
        tracker: &SequenceTracker,
        saved: &mut Option<crate::datastore::Checkpoint>,
    ) {
        self.due = None;
        let now = tokio::time::Instant::now();
        self.last = Some(now);
        if let Err(error) = save_if_advanced(checkpoints, tracker, saved).await {
            tracing::warn!(%error, "saving the resume token failed; will retry");
            self.due = Some(now + self.interval.max(Duration::from_millis(100)));
        }
    }
}

async fn save_if_advanced<C: CheckpointStore>(
    checkpoints: &C,
    tracker: &SequenceTracker,
    saved: &mut Option<crate::datastore::Checkpoint>,
) -> Result<(), DatastoreError> {
    let checkpoint = tracker.checkpoint();
    if saved
        .as_ref()
        .is_some_and(|s| s.position == checkpoint.position)
    {
        return Ok(());
    }
    checkpoints.save(&checkpoint).await?;
    tracing::debug!(
        position = checkpoint.position,
        pending = tracker.pending(),
        "resume token saved"
    );
    metrics::get()
        .resume_token_update_timestamp
        .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
    *saved = Some(checkpoint);
    Ok(())
}
