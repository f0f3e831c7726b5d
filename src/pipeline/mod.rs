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
//! but at most one write is in flight and two writes are at least `save_interval` apart. The
//! write is polled in the loop's `select!` beside intake and results (see [`Saving`]), so a
//! datastore round trip never holds up dispatch; the final write waits for the one in flight. A `kill -9` therefore re-sends at most the events in flight,
//! the events finished behind an earlier one still in flight, and the events finished within
//! the last `save_interval` (plus the duration of one token write).

mod batch;
mod dispatcher;
mod tracker;
mod workers;

use dispatcher::{Dispatcher, Flow};
use workers::Workers;

pub use tracker::SequenceTracker;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::clock::{saturating_add as after, Alarm};
use crate::cloudevent::Transformer;
use crate::datastore::{
    Change, ChangeSource, Checkpoint, CheckpointStore, DatastoreError, RawEvent,
};
use crate::filter::Filter;
use crate::metrics;
use crate::model::{decode, Decoded, DocumentError, HealthEvent};
use crate::sink::concurrency::Concurrency;
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
#[derive(Debug, Clone)]
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
    /// `Some` in batch mode (`exporter.sink.mode = "batch"`): events go as JSON arrays.
    pub batch: Option<crate::config::BatchLimits>,
}

impl EventHandler {
    /// Decodes, filters, encodes and publishes one event.
    async fn handle(
        &self,
        feed: Feed,
        position: u64,
        event: &RawEvent,
        cancel: &CancellationToken,
    ) -> Outcome {
        let (traceparent, body) = match self.prepare(position, event, |d| d.traceparent()) {
            Ok(prepared) => prepared,
            Err(outcome) => return outcome,
        };
        // One buffer for every attempt of this event (no copy per attempt or redirect).
        let body = bytes::Bytes::from(body);
        let started = Instant::now();
        let published = self
            .publisher
            .publish(&body, &event.record_id, traceparent.as_deref(), cancel)
            .await;
        self.outcome(feed, position, event, &body, &published, started)
            .await
    }

    /// One event's outcome once its request (alone, or its batch's) ended with `published`:
    /// accepted; cancelled; written to the dead letter when the sink rejected it for good and
    /// one is configured; else undelivered.
    async fn outcome(
        &self,
        feed: Feed,
        position: u64,
        event: &RawEvent,
        body: &[u8],
        published: &Result<Delivery, PublishError>,
        started: Instant,
    ) -> Outcome {
        match published {
            Ok(delivery) => accepted(feed, position, event, *delivery, started),
            Err(PublishError::Cancelled) => Outcome::Cancelled,
            Err(PublishError::Rejected {
                status,
                attempts,
                excerpt,
                last,
                ..
            }) if self.dead_letter.is_some() => {
                let rejection = Rejection {
                    status: *status,
                    attempts: *attempts,
                    excerpt,
                    last,
                };
                self.dead_letter(position, event, body, rejection).await
            }
            Err(error) => {
                let metrics = metrics::get();
                metrics.published("failure");
                metrics.publish_error("max_retries_exceeded");
                Outcome::Failed(error.to_string())
            }
        }
    }

    /// The CloudEvent body to publish, with what `keep` takes from the decoded event (which
    /// borrows from `event`'s document and so stays here), or why the event needs no delivery
    /// (undecodable, no health event, filtered out, an invalid CloudEvent): one bad event
    /// never blocks the rest.
    fn prepare<T>(
        &self,
        position: u64,
        event: &RawEvent,
        keep: impl FnOnce(&Decoded<'_>) -> T,
    ) -> Result<(T, Vec<u8>), Outcome> {
        let metrics = metrics::get();
        let decoded = match decode(&event.document) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => {
                tracing::warn!(changelog_id = position, record_id = %event.record_id, "document has no health event; skipping it");
                metrics.skipped("no_health_event");
                return Err(Outcome::Skipped);
            }
            // Not JSON a parse accepts (nested past 128 levels, `1e400`): as when the driver
            // parsed it, counted as undecodable but not as a transform error.
            Err(DocumentError::Unreadable(error)) => {
                tracing::warn!(changelog_id = position, record_id = %event.record_id, %error, "health event document cannot be read; skipping it");
                metrics.skipped("undecodable");
                return Err(Outcome::Skipped);
            }
            Err(DocumentError::Invalid(error)) => {
                tracing::warn!(changelog_id = position, record_id = %event.record_id, %error, "undecodable health event document; skipping it");
                metrics.transform_errors.inc();
                // A time outside RFC 3339's years would make an invalid CloudEvent `time`.
                metrics.skipped(if error.field.ends_with("generatedTimestamp") {
                    "invalid_time"
                } else {
                    "undecodable"
                });
                return Err(Outcome::Skipped);
            }
        };
        if !self.passes_filter(position, event, &decoded.event) {
            return Err(Outcome::Filtered);
        }
        match self
            .transformer
            .try_encode(&event.record_id, &decoded.event, event.created_at)
        {
            Ok(body) => Ok((keep(&decoded), body)),
            Err(error) => {
                tracing::warn!(changelog_id = position, record_id = %event.record_id, %error, "the CloudEvent built for this event is invalid; skipping it");
                metrics.transform_errors.inc();
                metrics.skipped("invalid_cloudevent");
                Err(Outcome::Skipped)
            }
        }
    }

    /// Whether the filter expression lets the event through; fails open, as upstream: an event
    /// the filter cannot judge is exported.
    fn passes_filter(
        &self,
        position: u64,
        event: &RawEvent,
        health_event: &HealthEvent<'_>,
    ) -> bool {
        let Some(filter) = &self.filter else {
            return true;
        };
        let metrics = metrics::get();
        match filter.matches(health_event) {
            Ok(true) => true,
            Ok(false) => {
                metrics.events_filtered.inc();
                tracing::debug!(changelog_id = position, record_id = %event.record_id, "filter expression is false; not publishing the event");
                false
            }
            Err(error) => {
                metrics.filter_errors.inc();
                tracing::warn!(changelog_id = position, record_id = %event.record_id, %error, "Filter evaluation failed, exporting event");
                true
            }
        }
    }

    /// A permanent rejection with a dead letter configured: written there, the position
    /// finishes; if the write fails, the event is undelivered.
    async fn dead_letter(
        &self,
        position: u64,
        event: &RawEvent,
        body: &[u8],
        rejection: Rejection<'_>,
    ) -> Outcome {
        let Rejection {
            status,
            attempts,
            excerpt,
            last,
        } = rejection;
        let record = dead_letter::Record {
            event_id: &event.record_id,
            changelog_id: position,
            status,
            attempts,
            body_excerpt: excerpt,
            event: body,
        };
        let written = match &self.dead_letter {
            Some(letter) => letter.write(&record).await,
            None => Ok(()),
        };
        let metrics = metrics::get();
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
}

/// A permanent rejection by the sink, as the dead letter records it.
struct Rejection<'a> {
    status: u16,
    attempts: u32,
    excerpt: &'a str,
    last: &'a str,
}

/// The sink accepted the event (or already had it): counted and logged.
fn accepted(
    feed: Feed,
    position: u64,
    event: &RawEvent,
    delivery: Delivery,
    started: Instant,
) -> Outcome {
    let metrics = metrics::get();
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
    /// Concurrent publishes (`workers`, or the adaptive limit), shared by the stream and a
    /// running backfill.
    pub permits: Arc<Concurrency>,
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

impl<S: ChangeSource + 'static, C: CheckpointStore> Pipeline<S, C> {
    /// Runs until `shutdown` or the source is finished (returns `Ok`) or an event cannot be
    /// delivered (returns `Err`). The decisions are the [`Dispatcher`]'s; this loop does the
    /// I/O: intake until the dispatcher stops it, then the drain within the grace period.
    pub async fn run(self, shutdown: CancellationToken) -> Result<Summary, PipelineError> {
        let Pipeline {
            feed,
            source,
            checkpoints,
            handler,
            permits,
            grace,
            had_token,
            save_interval,
        } = self;
        let now = tokio::time::Instant::now();
        let start = source.start_position();
        let mut dispatcher = Dispatcher::new(feed, start, had_token, save_interval, now);
        if let Some(limits) = handler.batch {
            dispatcher = dispatcher.with_batching(limits.max_events, limits.linger);
        }
        let mut reader = ReaderTask::spawn(source);
        let mut workers = Workers::new(handler, feed);
        let mut io = Io {
            saving: Saving::new(&*checkpoints),
            shutdown: &shutdown,
        };
        io.intake(&mut dispatcher, &mut workers, &mut reader, &permits)
            .await;
        // Intake is closed: let in-flight publishes finish within the grace period.
        reader.stop().await;
        let abandoned = io.drain(&mut dispatcher, &mut workers, grace).await;
        let final_save = io.final_save(&mut dispatcher).await;
        dispatcher.finish(abandoned, final_save)
    }
}

/// The reader task: pulls batches from the source, running ahead of dispatch by at most a few.
struct ReaderTask {
    changes: mpsc::Receiver<Result<Option<Vec<Change>>, DatastoreError>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ReaderTask {
    fn spawn<S: ChangeSource + 'static>(mut source: S) -> ReaderTask {
        let (changes_tx, changes) = mpsc::channel(2);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
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
        ReaderTask {
            changes,
            stop,
            task,
        }
    }

    /// Stops the reader and waits for it. The receiver goes first: a reader whose channel is
    /// full (intake stopped while batches were queued, as in any drain) waits in `send`, where
    /// only a closed channel reaches it.
    async fn stop(self) {
        let ReaderTask {
            changes,
            stop,
            task,
        } = self;
        stop.cancel();
        drop(changes);
        let _ = task.await;
    }
}

/// A checkpoint write and the checkpoint it writes.
type SaveFuture<'a> =
    Pin<Box<dyn Future<Output = (Checkpoint, Result<(), DatastoreError>)> + Send + 'a>>;

/// The checkpoint write in flight (at most one), polled beside intake rather than awaited.
struct Saving<'a, C> {
    store: &'a C,
    in_flight: Option<SaveFuture<'a>>,
}

impl<'a, C: CheckpointStore> Saving<'a, C> {
    fn new(store: &'a C) -> Self {
        Saving {
            store,
            in_flight: None,
        }
    }

    /// A write is due: starts writing the checkpoint if it moved.
    fn start(&mut self, dispatcher: &mut Dispatcher) -> Flow {
        if let Some(checkpoint) = dispatcher.begin_save(tokio::time::Instant::now()) {
            let store = self.store;
            self.in_flight = Some(Box::pin(async move {
                let result = store.save(&checkpoint).await;
                (checkpoint, result)
            }));
        }
        Flow::Continue
    }

    /// The write in flight ends: the checkpoint and the result for [`Dispatcher::saved`].
    /// Pending while none is in flight; cancel-safe (the write stays in flight).
    async fn done(&mut self) -> (Checkpoint, Result<(), DatastoreError>) {
        let Some(write) = self.in_flight.as_mut() else {
            return std::future::pending().await;
        };
        let ended = write.await;
        self.in_flight = None;
        ended
    }

    /// Waits for the write in flight, if any, so no older write lands after a newer one.
    async fn settle(&mut self, dispatcher: &mut Dispatcher) {
        if self.in_flight.is_some() {
            let (checkpoint, result) = self.done().await;
            dispatcher.saved(checkpoint, result);
        }
    }
}

/// The pipeline's I/O around the dispatcher: the checkpoint writes and the shutdown signal.
struct Io<'a, C> {
    saving: Saving<'a, C>,
    shutdown: &'a CancellationToken,
}

impl<C: CheckpointStore> Io<'_, C> {
    /// Takes changes and hands events to workers until the dispatcher stops intake (a
    /// failure, the source's end) or shutdown.
    async fn intake(
        &mut self,
        dispatcher: &mut Dispatcher,
        workers: &mut Workers,
        reader: &mut ReaderTask,
        permits: &Concurrency,
    ) {
        let first_tick = after(tokio::time::Instant::now(), LAG_INTERVAL);
        let mut tick = tokio::time::interval_at(first_tick, LAG_INTERVAL);
        // Made once, not every turn: each is a registration (the token's waiter list, the
        // timer wheel) that a fresh future would add and remove again on every event.
        let shutdown = self.shutdown.cancelled();
        tokio::pin!(shutdown);
        let (mut save_alarm, mut linger_alarm) = (Alarm::new(), Alarm::new());
        loop {
            let now = tokio::time::Instant::now;
            let flow = tokio::select! {
                biased;
                _ = &mut shutdown => Flow::Stop,
                // Before results: a steady stream of results must not starve the checkpoint.
                (checkpoint, result) = self.saving.done() => {
                    dispatcher.saved(checkpoint, result);
                    Flow::Continue
                }
                _ = save_alarm.at(dispatcher.save_due()) => self.saving.start(dispatcher),
                _ = tick.tick() => { dispatcher.on_tick(); Flow::Continue }
                Some(done) = workers.next_done() => {
                    let first = workers.record(done, dispatcher);
                    // The others already back, in the same turn of the loop.
                    let rest = workers.record_ready(dispatcher);
                    if first == Flow::Stop { Flow::Stop } else { rest }
                }
                // Waiting for a worker is one arm, so results and saves go on meanwhile.
                permit = permits.acquire(), if dispatcher.has_waiting(now()) => match permit {
                    Ok(permit) => hand_out(dispatcher, workers, permits, permit),
                    Err(_) => Flow::Stop,
                },
                // Fewer than a batch waiting: they go once the linger is over.
                _ = linger_alarm.at(dispatcher.linger_due(now())) => Flow::Continue,
                received = reader.changes.recv(), if dispatcher.accepts_changes() => {
                    dispatcher.on_received(received, now())
                }
            };
            if flow == Flow::Stop {
                return;
            }
        }
    }

    /// Waits for in-flight publishes: all of them after the source finished (saving progress
    /// as usual), within `grace` after a stop or a failure. Returns whether some were abandoned.
    async fn drain(
        &mut self,
        dispatcher: &mut Dispatcher,
        workers: &mut Workers,
        grace: Duration,
    ) -> bool {
        workers.close();
        let grace_from_now = || after(tokio::time::Instant::now(), grace);
        let mut deadline =
            (!dispatcher.source_finished() || dispatcher.failed()).then(grace_from_now);
        let in_flight = workers.in_flight();
        match deadline {
            // A stop or a failure: in-flight events get the grace period.
            Some(_) if in_flight > 0 => {
                tracing::info!(in_flight, grace = ?grace, "waiting for in-flight events");
            }
            // The source ran out (a backfill's end): the last events finish as usual.
            None if in_flight > 0 => {
                tracing::debug!(in_flight, "source finished; waiting for its last events");
            }
            _ => {}
        }
        let mut abandoned = false;
        let (mut save_alarm, mut grace_alarm) = (Alarm::new(), Alarm::new());
        while workers.in_flight() > 0 && !abandoned {
            let flow = tokio::select! {
                Some(done) = workers.next_done() => workers.record(done, dispatcher),
                _ = self.shutdown.cancelled(), if deadline.is_none() => {
                    deadline = Some(grace_from_now());
                    Flow::Continue
                }
                (checkpoint, result) = self.saving.done() => {
                    dispatcher.saved(checkpoint, result);
                    Flow::Continue
                }
                _ = save_alarm.at(dispatcher.save_due()), if deadline.is_none() => {
                    self.saving.start(dispatcher)
                }
                _ = grace_alarm.at(deadline) => {
                    abandoned = true;
                    workers.abandon(dispatcher).await
                }
            };
            let rest = workers.record_ready(dispatcher);
            if flow == Flow::Stop || rest == Flow::Stop {
                deadline.get_or_insert_with(grace_from_now);
            }
        }
        abandoned
    }

    /// The last write, whatever the interval, after the one in flight: its error is the run's
    /// error.
    async fn final_save(&mut self, dispatcher: &mut Dispatcher) -> Result<(), DatastoreError> {
        self.saving.settle(dispatcher).await;
        let Some(checkpoint) = dispatcher.to_save() else {
            return Ok(());
        };
        self.saving.store.save(&checkpoint).await?;
        dispatcher.saved(checkpoint, Ok(()));
        Ok(())
    }
}

/// Hands waiting events to workers: to the one holding `permit`, then to one more for every
/// permit free now while events may go, in the same turn of the loop (one turn per event was
/// most of the loop's cost in a drain). `Stop` once intake is over.
fn hand_out(
    dispatcher: &mut Dispatcher,
    workers: &mut Workers,
    permits: &Concurrency,
    permit: OwnedSemaphorePermit,
) -> Flow {
    let mut permit = Some(permit);
    while let Some(held) = permit.take() {
        let events = dispatcher.next_events();
        if events.is_empty() {
            return Flow::Stop;
        }
        workers.send(held, events);
        if dispatcher.intake_done() {
            return Flow::Stop;
        }
        if dispatcher.has_waiting(tokio::time::Instant::now()) {
            permit = permits.try_acquire();
        }
    }
    Flow::Continue
}

/// Stream lag: the age of the oldest received event not yet finished, and how many changelog
/// ids the resume token is behind the head.
fn report_lag(unfinished: &BTreeMap<u64, DateTime<Utc>>, tracker: &SequenceTracker) {
    let metrics = metrics::get();
    let lag = unfinished
        .values()
        .min()
        .map(|oldest| {
            Utc::now()
                .signed_duration_since(*oldest)
                .num_milliseconds()
                .max(0) as f64
                / 1000.0
        })
        .unwrap_or(0.0);
    metrics.stream_lag_seconds.set(lag);
    let head = metrics.changelog_head_id.get().max(0) as u64;
    let behind = head.saturating_sub(tracker.checkpoint().position);
    metrics.changelog_ids_behind.set(behind as i64);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source with an endless backlog: a batch whenever asked.
    struct Endless;

    impl ChangeSource for Endless {
        fn start_position(&self) -> u64 {
            0
        }

        async fn next_batch(&mut self) -> Result<Option<Vec<Change>>, DatastoreError> {
            Ok(Some(Vec::new()))
        }
    }

    #[tokio::test]
    async fn a_reader_blocked_on_a_full_channel_stops() {
        let reader = ReaderTask::spawn(Endless);
        // Nothing receives: the channel fills and the reader waits to send the next batch.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stopped = tokio::time::timeout(Duration::from_secs(5), reader.stop()).await;
        assert!(
            stopped.is_ok(),
            "the reader did not stop while its channel was full"
        );
    }
}
