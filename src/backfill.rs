//! Backfill: on a first start (no resume token), export the health events that already exist,
//! through the same worker pool, retry policy and transform as the live stream. This module
//! holds what every backend's backfill shares; the queries live with their backend
//! (`crate::datastore::postgres::backfill`, `crate::datastore::mongo::backfill`).
//!
//! - **Gapless hand-off.** The stream is opened first; the backfill covers exactly what the
//!   stream passes over (each backend's module says how it draws that line).
//! - **Window.** Created in `[start − max_age, start)`; the newest `max_events` of them,
//!   delivered oldest first in keyset pages of `batch_size` over `(created_at, id)`.
//! - **Rate.** `rate_limit` events per second (0 = unlimited), spaced evenly without bursts
//!   ([`Pacer`]).
//! - **Resumable.** The plan ([`BackfillPlan`]) and the last contiguous [`Cursor`] delivered are
//!   kept in the backend's token store under `<client>-backfill`; a restart continues from
//!   there. Each row handed to the pipeline carries its cursor as its resume point
//!   (`ResumePoint::Keyset`), so the sequence tracker yields the cursor of the contiguous
//!   delivered prefix: no side map from positions to cursors.
//!
//! [`PagedBackfill`] is the one change source over any backend's keyset pages ([`PageReader`]):
//! it retries transient page failures with backoff, paces, numbers the rows and skips (counted)
//! the rows that cannot be read — only those rows.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::BackfillConfig;
use crate::datastore::{
    Change, ChangeKind, ChangeSource, Checkpoint, CheckpointStore, DatastoreError, RawEvent,
    ResumePoint, SkipReason,
};
use crate::metrics;

/// A position in `(created_at, id)` order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    #[serde(rename = "createdAt")]
    pub created_at: DateTime<Utc>,
    pub id: String,
}

/// What a backfill covers and how far it got; stored as JSON under `<client>-backfill`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackfillPlan {
    /// The stream's start snapshot clock: the window's upper bound (exclusive).
    pub started_at: DateTime<Utc>,
    /// The window's lower bound: `started_at − max_age`.
    pub from: DateTime<Utc>,
    /// When `max_events` cuts the window: the oldest row to include.
    pub first: Option<Cursor>,
    /// Rows whose insert has a changelog id above this belong to the stream.
    pub changelog_end: u64,
    /// Changelog ids not visible at the stream's start: also the stream's.
    pub open_ids: Vec<u64>,
    /// Events in the plan when it was made.
    pub total: u64,
    /// Events delivered so far (a contiguous prefix).
    pub delivered: u64,
    /// The last delivered row of that prefix.
    pub cursor: Option<Cursor>,
    pub done: bool,
}

/// The client name the backfill's record is kept under.
pub fn record_name(client_name: &str) -> String {
    format!("{client_name}-backfill")
}

impl BackfillPlan {
    pub fn from_value(value: &serde_json::Value) -> Option<BackfillPlan> {
        serde_json::from_value(value.clone()).ok()
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// Where a backfill's plan and progress are kept (PostgreSQL: the `resume_tokens` row
/// `<client>-backfill`; MongoDB: the token document of that client name).
pub trait PlanStore: Send + Sync + 'static {
    fn save_plan(
        &self,
        plan: &serde_json::Value,
    ) -> impl std::future::Future<Output = Result<(), DatastoreError>> + Send;
}

/// Spaces events `1/rate` apart. Slots missed in a short hiccup (a page fetch, a busy worker
/// pool) are made up, so the rate holds over any window; after a longer stall at most
/// `CATCH_UP` worth of slots is made up, so a slow sink never turns into a burst.
pub(crate) struct Pacer {
    interval: Option<Duration>,
    next: tokio::time::Instant,
}

const CATCH_UP: Duration = Duration::from_millis(200);

impl Pacer {
    pub(crate) fn new(rate_per_second: u64) -> Pacer {
        Pacer {
            interval: (rate_per_second > 0)
                .then(|| Duration::from_secs_f64(1.0 / rate_per_second as f64)),
            next: tokio::time::Instant::now(),
        }
    }

    /// Waits for the next slot, then returns how many events may go now (at least 1).
    pub(crate) async fn admit(&mut self, wanted: usize) -> usize {
        let Some(interval) = self.interval else {
            return wanted;
        };
        let now = tokio::time::Instant::now();
        let oldest = now.checked_sub(CATCH_UP.max(interval)).unwrap_or(now);
        if self.next < oldest {
            self.next = oldest;
        }
        tokio::time::sleep_until(self.next).await;
        let now = tokio::time::Instant::now();
        let mut admitted = 0;
        while admitted < wanted && self.next <= now {
            self.next = crate::clock::saturating_add(self.next, interval);
            admitted = admitted.saturating_add(1);
        }
        admitted.max(1)
    }
}

/// One row of a backfill page.
pub enum PageRow {
    /// A row to export, at its keyset position.
    Event { cursor: Cursor, event: RawEvent },
    /// A row that cannot be read (its document does not decode, its `createdAt` is missing):
    /// skipped and counted; its cursor, when known, still moves the resume point past it.
    Unreadable {
        cursor: Option<Cursor>,
        /// The stored id, for the log line.
        record_id: Option<String>,
        error: RowError,
    },
}

/// Why one row could not be read (logged, never fatal).
pub type RowError = Box<dyn std::error::Error + Send + Sync>;

/// A backend's keyset pages over a plan's window, oldest first.
pub trait PageReader: Send + 'static {
    /// The next page after the last row read; fewer than a page's size (or none) at the end.
    fn next_page(&mut self) -> impl Future<Output = Result<Vec<PageRow>, DatastoreError>> + Send;
    /// Whether the last page was the window's last.
    fn is_exhausted(&self) -> bool;
    /// Called after a transient failure, before the retry (e.g. to drop a broken connection).
    fn reset(&mut self) {}
}

/// The rows of a plan as a finite change source (see the module docs).
pub struct PagedBackfill<R> {
    reader: R,
    page: VecDeque<PageRow>,
    /// The position of the last row handed out; positions continue the plan's `delivered`.
    position: u64,
    pacer: Pacer,
    backoff: crate::reconnect::Backoff,
}

impl<R: PageReader> PagedBackfill<R> {
    /// Reads `plan`'s rows through `reader` (already positioned after `plan.cursor`).
    pub fn new(reader: R, plan: &BackfillPlan, config: &BackfillConfig) -> PagedBackfill<R> {
        PagedBackfill {
            reader,
            page: VecDeque::new(),
            position: plan.delivered,
            pacer: Pacer::new(config.rate_limit),
            backoff: crate::reconnect::Backoff::new(
                Duration::from_millis(250),
                Duration::from_secs(30),
            ),
        }
    }

    /// Fills the page unless the window is read; transient failures are retried.
    async fn fill(&mut self) -> Result<(), DatastoreError> {
        while self.page.is_empty() && !self.reader.is_exhausted() {
            match self.reader.next_page().await {
                Ok(rows) => {
                    self.backoff.reset();
                    self.page.extend(rows);
                }
                Err(error) if error.is_transient() => {
                    let wait = self.backoff.failed(tokio::time::Instant::now());
                    tracing::warn!(%error, retry_in = ?wait, "backfill query failed; retrying");
                    self.reader.reset();
                    tokio::time::sleep(wait).await;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// The change for the next row, at the next position.
    fn change_of(&mut self, row: PageRow) -> Change {
        self.position = self.position.saturating_add(1);
        match row {
            PageRow::Event { cursor, event } => Change::new(
                self.position,
                Some(cursor.created_at),
                ChangeKind::Event(event),
            )
            .resuming_at(ResumePoint::Keyset(cursor)),
            // One bad row never costs its neighbours: it takes its position and is passed.
            PageRow::Unreadable {
                cursor,
                record_id,
                error,
            } => {
                tracing::warn!(
                    record_id = record_id.as_deref().unwrap_or("-"),
                    backfill_position = self.position,
                    %error,
                    "backfill: health event cannot be read; skipping it"
                );
                metrics::get().skipped("undecodable");
                let created_at = cursor.as_ref().map(|c| c.created_at);
                let change = Change::new(
                    self.position,
                    created_at,
                    ChangeKind::Skip(SkipReason::Undecodable),
                );
                match cursor {
                    Some(cursor) => change.resuming_at(ResumePoint::Keyset(cursor)),
                    None => change,
                }
            }
        }
    }
}

impl<R: PageReader> ChangeSource for PagedBackfill<R> {
    fn start_position(&self) -> u64 {
        self.position
    }

    async fn next_batch(&mut self) -> Result<Option<Vec<Change>>, DatastoreError> {
        self.fill().await?;
        if self.page.is_empty() {
            return Ok(None);
        }
        // `admit` never returns more than asked for (or 1); `min` keeps `drain` in range anyway.
        let admitted = self
            .pacer
            .admit(self.page.len().min(100))
            .await
            .min(self.page.len());
        let rows: Vec<PageRow> = self.page.drain(..admitted).collect();
        Ok(Some(
            rows.into_iter().map(|row| self.change_of(row)).collect(),
        ))
    }
}

/// Saves the plan's progress as the pipeline's checkpoint advances, and reports progress.
pub struct BackfillProgress<S: PlanStore> {
    store: Arc<S>,
    plan: Mutex<BackfillPlan>,
    started: Instant,
    first_delivered: u64,
    last_report: Mutex<Instant>,
    terminal: bool,
}

const REPORT_INTERVAL: Duration = Duration::from_secs(5);

impl<S: PlanStore> CheckpointStore for BackfillProgress<S> {
    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), DatastoreError> {
        let value = {
            let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(ResumePoint::Keyset(cursor)) = &checkpoint.resume {
                plan.cursor = Some(cursor.clone());
            }
            plan.delivered = checkpoint.position;
            plan.to_value()
        };
        self.store.save_plan(&value).await?;
        self.report(checkpoint.position, false);
        Ok(())
    }
}

impl<S: PlanStore> BackfillProgress<S> {
    /// The progress of `plan`, saved in `store`.
    pub fn new(store: Arc<S>, plan: &BackfillPlan) -> BackfillProgress<S> {
        BackfillProgress {
            store,
            plan: Mutex::new(plan.clone()),
            started: Instant::now(),
            first_delivered: plan.delivered,
            last_report: Mutex::new(Instant::now()),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Marks the plan complete.
    pub async fn finish(&self) -> Result<(), DatastoreError> {
        let value = {
            let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
            plan.done = true;
            plan.to_value()
        };
        self.store.save_plan(&value).await?;
        let delivered = self.plan.lock().map(|p| p.delivered).unwrap_or_default();
        self.report(delivered, true);
        if self.terminal {
            crate::logging::print_stderr("");
        }
        Ok(())
    }

    fn report(&self, delivered: u64, force: bool) {
        let total = self.plan.lock().map(|p| p.total).unwrap_or_default();
        metrics::get()
            .backfill_remaining
            .set(i64::try_from(total.saturating_sub(delivered)).unwrap_or(i64::MAX));
        let mut last = self.last_report.lock().unwrap_or_else(|e| e.into_inner());
        if !force && last.elapsed() < REPORT_INTERVAL && !self.terminal {
            return;
        }
        *last = Instant::now();
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = delivered.saturating_sub(self.first_delivered) as f64 / elapsed;
        let remaining = total.saturating_sub(delivered);
        let eta = (rate > 0.0)
            .then(|| Duration::try_from_secs_f64(remaining as f64 / rate).ok())
            .flatten();
        if self.terminal {
            let percent = if total == 0 {
                100.0
            } else {
                delivered as f64 * 100.0 / total as f64
            };
            let filled = (percent / 5.0).round().clamp(0.0, 20.0) as usize;
            let bar = format!(
                "{}{}",
                "#".repeat(filled),
                "-".repeat(20usize.saturating_sub(filled))
            );
            let _ = write!(
                std::io::stderr(),
                "\rbackfill [{bar}] {delivered}/{total} ({percent:.1}%) {rate:.0} events/s ETA {}   ",
                eta.map(|d| crate::config::format_go_duration(Duration::from_secs(d.as_secs())))
                    .unwrap_or_else(|| "-".into())
            );
        } else {
            tracing::info!(
                delivered,
                total,
                events_per_second = format!("{rate:.1}"),
                eta = %eta.map(|d| crate::config::format_go_duration(Duration::from_secs(d.as_secs()))).unwrap_or_else(|| "-".into()),
                "backfill progress"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages scripted in memory: the rule under test is the paging, not a datastore.
    struct Script {
        answers: VecDeque<Result<Vec<PageRow>, DatastoreError>>,
        resets: usize,
    }

    impl PageReader for Script {
        async fn next_page(&mut self) -> Result<Vec<PageRow>, DatastoreError> {
            self.answers.pop_front().unwrap_or(Ok(Vec::new()))
        }
        fn is_exhausted(&self) -> bool {
            self.answers.is_empty()
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn cursor(id: &str) -> Cursor {
        Cursor {
            created_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            id: id.into(),
        }
    }

    fn event(id: &str) -> PageRow {
        PageRow::Event {
            cursor: cursor(id),
            event: RawEvent {
                record_id: id.into(),
                document: crate::model::Document::Tree(serde_json::json!({})),
                created_at: None,
            },
        }
    }

    fn plan(delivered: u64) -> BackfillPlan {
        BackfillPlan {
            started_at: Utc::now(),
            from: Utc::now(),
            first: None,
            changelog_end: 0,
            open_ids: vec![],
            total: 10,
            delivered,
            cursor: None,
            done: false,
        }
    }

    fn config() -> BackfillConfig {
        BackfillConfig {
            enabled: true,
            max_age: Duration::from_secs(3600),
            max_events: 10,
            batch_size: 2,
            rate_limit: 0,
        }
    }

    async fn drain(source: &mut PagedBackfill<Script>) -> Result<Vec<Change>, DatastoreError> {
        let mut all = Vec::new();
        while let Some(batch) = source.next_batch().await? {
            all.extend(batch);
        }
        Ok(all)
    }

    #[tokio::test(start_paused = true)]
    async fn rows_continue_the_plans_positions_and_carry_their_cursor() {
        let script = Script {
            answers: VecDeque::from([Ok(vec![event("a"), event("b")]), Ok(vec![event("c")])]),
            resets: 0,
        };
        let mut source = PagedBackfill::new(script, &plan(4), &config());
        assert_eq!(source.start_position(), 4);
        let changes = drain(&mut source).await.unwrap();
        let positions: Vec<u64> = changes.iter().map(|c| c.position).collect();
        assert_eq!(positions, vec![5, 6, 7]);
        assert_eq!(
            changes.last().and_then(|c| c.resume.clone()),
            Some(ResumePoint::Keyset(cursor("c")))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreadable_row_takes_its_position_and_only_it_is_skipped() {
        let bad = PageRow::Unreadable {
            cursor: Some(cursor("b")),
            record_id: Some("b".into()),
            error: "not JSON".into(),
        };
        let lost = PageRow::Unreadable {
            cursor: None,
            record_id: None,
            error: "no _id".into(),
        };
        let script = Script {
            answers: VecDeque::from([Ok(vec![event("a"), bad, lost, event("d")])]),
            resets: 0,
        };
        let mut source = PagedBackfill::new(script, &plan(0), &config());
        let changes = drain(&mut source).await.unwrap();
        let kinds: Vec<bool> = changes
            .iter()
            .map(|c| matches!(c.kind, ChangeKind::Event(_)))
            .collect();
        assert_eq!(kinds, vec![true, false, false, true]);
        // A skipped row with a known cursor still moves the resume point past it.
        assert_eq!(changes[1].resume, Some(ResumePoint::Keyset(cursor("b"))));
        assert_eq!(changes[2].resume, None);
        assert!(matches!(
            changes[1].kind,
            ChangeKind::Skip(SkipReason::Undecodable)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_after_a_reset_and_permanent_ones_end_it() {
        let script = Script {
            answers: VecDeque::from([
                Err(DatastoreError::Timeout("slow".into())),
                Err(DatastoreError::Timeout("slow".into())),
                Ok(vec![event("a")]),
                Err(DatastoreError::Schema("no table".into())),
                Ok(vec![event("b")]),
            ]),
            resets: 0,
        };
        let mut source = PagedBackfill::new(script, &plan(0), &config());
        let first = source.next_batch().await.unwrap().unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(source.reader.resets, 2);
        let error = source.next_batch().await.unwrap_err();
        assert!(matches!(error, DatastoreError::Schema(_)), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_events_without_bursts() {
        let mut pacer = Pacer::new(100);
        let start = tokio::time::Instant::now();
        let mut sent = 0;
        while sent < 500 {
            sent += pacer.admit(50).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert!(
            (4.9..=5.1).contains(&elapsed),
            "500 events at 100/s took {elapsed}s"
        );
        // After a long stall it makes up at most CATCH_UP (200 ms = 20 events at 100/s).
        tokio::time::sleep(Duration::from_secs(10)).await;
        let admitted = pacer.admit(1000).await;
        assert!(admitted <= 21, "burst of {admitted} after a stall");
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_pacer_admits_everything() {
        let mut pacer = Pacer::new(0);
        assert_eq!(pacer.admit(37).await, 37);
    }

    #[test]
    fn plan_round_trips_through_json() {
        let plan = BackfillPlan {
            started_at: Utc::now(),
            from: Utc::now(),
            first: Some(Cursor {
                created_at: Utc::now(),
                id: "a".into(),
            }),
            changelog_end: 9,
            open_ids: vec![3, 4],
            total: 10,
            delivered: 2,
            cursor: None,
            done: false,
        };
        assert_eq!(BackfillPlan::from_value(&plan.to_value()), Some(plan));
    }
}
