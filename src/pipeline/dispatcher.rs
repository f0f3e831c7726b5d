//! The dispatcher's decisions, without I/O: one method per event of `Pipeline::run`'s loop
//! (changes received, a result finished, a checkpoint write due or done, the lag tick). The
//! loop in `mod.rs` does the I/O (reading, handing events to workers, writing the resume
//! token) and asks the dispatcher what to do; time is passed in, so the rules are tested
//! without sleeping.
//!
//! Rules:
//! - Skips finish at once; events wait for a worker, and no new batch is taken while one waits
//!   (batch mode: while `batch` wait). A worker takes up to `batch` waiting events at once;
//!   fewer than `batch` wait at most `linger` for more, unless the source ran out.
//! - A failed event stops intake (`Flow::Stop`); its position stays unfinished, so the
//!   checkpoint stops below it. A cancelled event also stays unfinished.
//! - The checkpoint written is the sequence tracker's contiguous prefix, written as soon as it
//!   moves, at most one write at a time and two writes at least `save_interval` apart; a failed
//!   write is retried one interval (at least 100 ms) later. A write runs while intake goes on
//!   (`begin_save` … `saved`): no write is due while one is in flight, and the saved checkpoint
//!   only moves forward.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::{Feed, Outcome, PipelineError, SequenceTracker, Summary, LAG_INTERVAL};
use crate::clock::saturating_add as after;
use smallvec::SmallVec;

use crate::datastore::{Change, ChangeKind, Checkpoint, DatastoreError};
use crate::metrics;

/// Whether intake goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    Stop,
}

/// What the reader task sends: a batch, the source's end (`Ok(None)`), an error; `None` when
/// the reader stopped without saying why.
pub(super) type Received = Option<Result<Option<Vec<Change>>, DatastoreError>>;

pub(super) struct Dispatcher {
    feed: Feed,
    tracker: SequenceTracker,
    summary: Summary,
    /// The checkpoint last written (or found at start).
    saved: Option<Checkpoint>,
    saver: Saver,
    /// Events received and not yet handed to a worker: each change carries its event (moved,
    /// never copied, to the worker and back with its outcome).
    waiting: VecDeque<Change>,
    /// When each received, unfinished event was written: the stream's lag.
    unfinished: BTreeMap<u64, DateTime<Utc>>,
    failure: Option<PipelineError>,
    /// The source ran out.
    finished: bool,
    /// Events one worker takes at once (1 unless batch mode).
    batch: usize,
    /// How long fewer than `batch` waiting events wait for more.
    linger: Duration,
    /// When the oldest waiting event began to wait.
    waiting_since: Option<Instant>,
}

impl Dispatcher {
    /// `had_token`: a resume token existed at start; if not, one write is owed after
    /// [`LAG_INTERVAL`] even if nothing finished, so a restart does not begin at a later "end".
    pub fn new(feed: Feed, start: u64, had_token: bool, interval: Duration, now: Instant) -> Self {
        let tracker = SequenceTracker::new(start);
        let saved = had_token.then(|| tracker.checkpoint());
        Dispatcher {
            feed,
            tracker,
            summary: Summary::default(),
            saver: Saver::new(interval, saved.is_none(), now),
            saved,
            waiting: VecDeque::new(),
            unfinished: BTreeMap::new(),
            failure: None,
            finished: false,
            batch: 1,
            linger: Duration::ZERO,
            waiting_since: None,
        }
    }

    /// Batch mode: a worker takes up to `batch` events (at least 1); fewer wait up to `linger`.
    pub fn with_batching(mut self, batch: usize, linger: Duration) -> Self {
        self.batch = batch.max(1);
        self.linger = linger;
        self
    }

    /// Whether a new batch may be taken: only while fewer than `batch` events wait for a
    /// worker (one: none waits) and the source has not ended.
    pub fn accepts_changes(&self) -> bool {
        self.waiting.len() < self.batch && !self.finished
    }

    /// Whether events wait for a worker and may go now: `batch` of them, or the oldest waited
    /// `linger`, or the source ended.
    pub fn has_waiting(&self, now: Instant) -> bool {
        !self.waiting.is_empty() && self.linger_due(now).is_none()
    }

    /// When waiting events stop lingering for more, if that is still ahead of `now` (`None`:
    /// nothing lingers, or the linger is over and they wait only for a worker; a deadline
    /// already passed would wake the loop at once on every turn while all workers are busy).
    pub fn linger_due(&self, now: Instant) -> Option<Instant> {
        if self.waiting.len() >= self.batch || self.finished {
            return None;
        }
        let due = self.waiting_since.map(|since| after(since, self.linger))?;
        (due > now).then_some(due)
    }

    /// The next events for a worker: at most `batch`, in order.
    pub fn next_events(&mut self) -> SmallVec<[Change; 1]> {
        let take = self.batch.min(self.waiting.len());
        let events: SmallVec<[Change; 1]> = self.waiting.drain(..take).collect();
        if self.waiting.is_empty() {
            self.waiting_since = None;
        }
        events
    }

    /// Whether intake is over: the source ended and nothing waits for a worker.
    pub fn intake_done(&self) -> bool {
        self.finished && self.waiting.is_empty()
    }

    /// A batch from the reader (or its end or error).
    pub fn on_received(&mut self, received: Received, now: Instant) -> Flow {
        let changes = match received {
            Some(Ok(Some(changes))) => changes,
            Some(Ok(None)) => {
                self.finished = true;
                // Events still waiting go to workers first.
                return if self.waiting.is_empty() {
                    Flow::Stop
                } else {
                    Flow::Continue
                };
            }
            Some(Err(error)) => return self.fail(PipelineError::Source(error)),
            None => {
                let stopped = DatastoreError::Schema("the changelog reader stopped".into());
                return self.fail(PipelineError::Source(stopped));
            }
        };
        for change in changes {
            self.on_change(change, now);
        }
        Flow::Continue
    }

    fn on_change(&mut self, change: Change, now: Instant) {
        match &change.kind {
            ChangeKind::Skip(_) => {
                self.tracker.finish_change(&change);
                self.saver.note(&self.tracker, &self.saved, now);
            }
            ChangeKind::Event(_) => {
                if self.feed == Feed::Stream {
                    metrics::get().events_received.inc();
                    if let Some(changed_at) = change.changed_at {
                        self.unfinished.insert(change.position, changed_at);
                    }
                }
                crate::watchdog::global().received();
                self.waiting_since.get_or_insert(now);
                self.waiting.push_back(change);
            }
        }
    }

    /// One event's outcome; `Stop` when it could not be delivered.
    pub fn on_result(&mut self, change: Change, outcome: Outcome, now: Instant) -> Flow {
        self.unfinished.remove(&change.position);
        let error = record(&mut self.tracker, &mut self.summary, change, outcome);
        self.saver.note(&self.tracker, &self.saved, now);
        match error {
            Some(error) => self.fail(error),
            None => Flow::Continue,
        }
    }

    fn fail(&mut self, error: PipelineError) -> Flow {
        self.failure.get_or_insert(error);
        Flow::Stop
    }

    /// When the next checkpoint write is due, if one is owed; `None` while one is in flight.
    pub fn save_due(&self) -> Option<Instant> {
        self.saver.due.filter(|_| !self.saver.in_flight)
    }

    /// A write is due at `now`: the checkpoint to write, or `None` if it has not moved. A
    /// returned checkpoint is in flight until [`Dispatcher::saved`] gets its result.
    pub fn begin_save(&mut self, now: Instant) -> Option<Checkpoint> {
        self.saver.due = None;
        self.saver.last = Some(now);
        let checkpoint = self.to_save();
        self.saver.in_flight = checkpoint.is_some();
        checkpoint
    }

    /// The checkpoint if it moved past the saved one.
    pub fn to_save(&self) -> Option<Checkpoint> {
        let checkpoint = self.tracker.checkpoint();
        let moved = self
            .saved
            .as_ref()
            .is_none_or(|s| s.position != checkpoint.position);
        moved.then_some(checkpoint)
    }

    /// The write of `checkpoint` (from `begin_save`) ended; a failed one is retried one
    /// interval (at least 100 ms) after it began.
    pub fn saved(&mut self, checkpoint: Checkpoint, result: Result<(), DatastoreError>) {
        self.saver.in_flight = false;
        match result {
            Ok(()) => {
                tracing::debug!(
                    position = checkpoint.position,
                    pending = self.tracker.pending(),
                    "resume token saved"
                );
                let now = Utc::now().timestamp_millis() as f64 / 1000.0;
                metrics::get().resume_token_update_timestamp.set(now);
                let behind = |s: &Checkpoint| s.position < checkpoint.position;
                if self.saved.as_ref().is_none_or(behind) {
                    self.saved = Some(checkpoint);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "saving the resume token failed; will retry");
                let retry = self.saver.interval.max(Duration::from_millis(100));
                let retry_at = self.saver.last.map(|last| after(last, retry));
                self.saver.due = self.saver.due.max(retry_at);
            }
        }
    }

    /// The lag tick: reports the stream's lag (stream feed only).
    pub fn on_tick(&self) {
        if self.feed == Feed::Stream {
            super::report_lag(&self.unfinished, &self.tracker);
        }
    }

    /// Whether a failure stopped intake.
    pub fn failed(&self) -> bool {
        self.failure.is_some()
    }

    /// Whether the source ran out.
    pub fn source_finished(&self) -> bool {
        self.finished
    }

    /// The result of the run, after the final checkpoint write (`final_save`).
    pub fn finish(
        mut self,
        abandoned: bool,
        final_save: Result<(), DatastoreError>,
    ) -> Result<Summary, PipelineError> {
        self.summary.checkpoint = self.tracker.checkpoint().position;
        self.summary.finished = self.finished && !abandoned && self.failure.is_none();
        match (self.failure, final_save) {
            (Some(error), _) => Err(error),
            (None, Err(error)) => Err(PipelineError::Checkpoint(error)),
            (None, Ok(())) => Ok(self.summary),
        }
    }
}

/// Applies one outcome; returns the error that must stop the pipeline, if any.
fn record(
    tracker: &mut SequenceTracker,
    summary: &mut Summary,
    change: Change,
    outcome: Outcome,
) -> Option<PipelineError> {
    let count = match outcome {
        Outcome::Published => &mut summary.published,
        Outcome::DeadLettered => &mut summary.dead_lettered,
        Outcome::Skipped => &mut summary.skipped,
        Outcome::Filtered => &mut summary.filtered,
        Outcome::Cancelled => return None,
        Outcome::Failed(reason) => {
            let record_id = match change.kind {
                ChangeKind::Event(event) => event.record_id,
                ChangeKind::Skip(_) => String::new(),
            };
            let position = change.position;
            return Some(PipelineError::Undelivered {
                position,
                record_id,
                reason,
            });
        }
    };
    *count = count.saturating_add(1);
    tracker.finish_change(&change);
    None
}

/// When the next checkpoint write is due: as soon as the prefix advances, but at least
/// `interval` after the previous write.
struct Saver {
    interval: Duration,
    last: Option<Instant>,
    /// `Some` while a write is owed.
    due: Option<Instant>,
    /// A write began and its result has not come back.
    in_flight: bool,
}

impl Saver {
    fn new(interval: Duration, first_write: bool, now: Instant) -> Saver {
        Saver {
            interval,
            last: None,
            due: first_write.then(|| after(now, LAG_INTERVAL)),
            in_flight: false,
        }
    }

    /// Schedules a write if the checkpoint moved past the saved one and none is owed yet.
    fn note(&mut self, tracker: &SequenceTracker, saved: &Option<Checkpoint>, now: Instant) {
        if self.due.is_some() {
            return;
        }
        let moved = saved
            .as_ref()
            .is_none_or(|s| s.position != tracker.checkpoint().position);
        if moved {
            let earliest = self.last.map_or(now, |last| after(last, self.interval));
            self.due = Some(earliest.max(now));
        }
    }
}

#[cfg(test)]
mod tests;
