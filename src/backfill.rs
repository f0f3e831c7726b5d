//! Backfill: on a first start (no resume token), export the health events that already exist,
//! through the same worker pool, retry policy and transform as the live stream.
//!
//! - **Gapless hand-off.** The stream's start snapshot is taken first (`FreshStart`). The
//!   backfill covers exactly the rows the stream passes over: created before that snapshot's
//!   clock and not owned by the stream (changelog id above the stream's start, or a row of a
//!   transaction that was still open then). Nothing is sent twice and nothing falls between.
//! - **Window.** `created_at` in `[start − max_age, start)`; the newest `max_events` of them,
//!   delivered oldest first in keyset pages of `batch_size` over `(created_at, id)`.
//! - **Rate.** `rate_limit` events per second (0 = unlimited), spaced evenly without bursts.
//! - **Resumable.** The plan and the last contiguous `(created_at, id)` delivered are kept in
//!   `resume_tokens` under `<client>-backfill`; a restart continues from there.

use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::config::BackfillConfig;
use crate::datastore::postgres::{FreshStart, TokenStore};
use crate::datastore::{
    Change, ChangeKind, ChangeSource, Checkpoint, CheckpointStore, DatastoreError, RawEvent,
    SkipReason,
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

/// Rows in the window that the stream does not own. `$1` from, `$2` started_at,
/// `$3` changelog_end, `$4` open_ids.
const DOMAIN: &str = "h.created_at >= $1 AND h.created_at < $2 \
     AND NOT EXISTS (SELECT 1 FROM datastore_changelog c \
                     WHERE c.table_name = 'health_events' AND c.operation = 'INSERT' \
                       AND c.record_id = h.id AND (c.id > $3 OR c.id = ANY($4)))";

impl BackfillPlan {
    /// Plans a backfill for a stream that started at `start`.
    pub async fn make(
        client: &Client,
        config: &BackfillConfig,
        start: &FreshStart,
    ) -> Result<BackfillPlan, DatastoreError> {
        // A window reaching before the representable range covers everything.
        let from = chrono::Duration::from_std(config.max_age)
            .ok()
            .and_then(|age| start.started_at.checked_sub_signed(age))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let end = to_bigint(start.changelog_end);
        let open: Vec<i64> = start.open_ids.iter().map(|id| to_bigint(*id)).collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&from, &start.started_at, &end, &open];
        let count: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM health_events h WHERE {DOMAIN}"),
                &params,
            )
            .await?
            .get(0);
        let mut total = u64::try_from(count).unwrap_or(0);
        let mut first = None;
        if total > config.max_events {
            // Keep the newest max_events: find the oldest of them.
            let row = client
                .query_one(
                    &format!(
                        "SELECT h.created_at, h.id::text FROM health_events h WHERE {DOMAIN} \
                         ORDER BY h.created_at DESC, h.id DESC OFFSET $5 LIMIT 1"
                    ),
                    &[
                        &from,
                        &start.started_at,
                        &end,
                        &open,
                        &to_bigint(config.max_events.saturating_sub(1)),
                    ],
                )
                .await?;
            first = Some(Cursor {
                created_at: row.get(0),
                id: row.get(1),
            });
            total = config.max_events;
        }
        Ok(BackfillPlan {
            started_at: start.started_at,
            from,
            first,
            changelog_end: start.changelog_end,
            open_ids: start.open_ids.clone(),
            total,
            delivered: 0,
            cursor: None,
            done: false,
        })
    }

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

impl PlanStore for TokenStore {
    async fn save_plan(&self, plan: &serde_json::Value) -> Result<(), DatastoreError> {
        self.save_value(plan).await
    }
}

/// Cursor of every backfill position handed out and not yet checkpointed (shared by a
/// backfill source and its progress).
pub type Cursors = Arc<Mutex<BTreeMap<u64, Cursor>>>;

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

/// Rows of the plan, page by page, as a finite change source.
pub struct BackfillSource {
    store: Arc<TokenStore>,
    client: Option<Client>,
    plan: BackfillPlan,
    batch_size: i64,
    /// Last row read (not necessarily delivered).
    read_cursor: Option<Cursor>,
    next_position: u64,
    /// Rows read, with their document or why the driver could not decode it.
    page: VecDeque<(Cursor, Result<serde_json::Value, String>)>,
    exhausted: bool,
    pacer: Pacer,
    /// Cursor of every position handed out and not yet checkpointed.
    cursors: Cursors,
}

impl ChangeSource for BackfillSource {
    fn start_position(&self) -> u64 {
        self.plan.delivered
    }

    async fn next_batch(&mut self) -> Result<Option<Vec<Change>>, DatastoreError> {
        let mut backoff =
            crate::reconnect::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        while self.page.is_empty() && !self.exhausted {
            match self.fetch_page().await {
                Ok(()) => backoff.reset(),
                Err(error) if error.is_transient() => {
                    let wait = backoff.failed(tokio::time::Instant::now());
                    tracing::warn!(%error, retry_in = ?wait, "backfill query failed; reconnecting");
                    self.client = None;
                    tokio::time::sleep(wait).await;
                }
                Err(error) => return Err(error),
            }
        }
        if self.page.is_empty() {
            return Ok(None);
        }
        // `admit` never returns more than asked for (or 1); `min` keeps `drain` in range anyway.
        let admitted = self
            .pacer
            .admit(self.page.len().min(100))
            .await
            .min(self.page.len());
        let mut changes = Vec::with_capacity(admitted);
        let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
        for (cursor, document) in self.page.drain(..admitted) {
            self.next_position = self.next_position.saturating_add(1);
            cursors.insert(self.next_position, cursor.clone());
            let kind = match document {
                Ok(document) => ChangeKind::Event(RawEvent {
                    record_id: cursor.id,
                    document,
                    created_at: Some(cursor.created_at),
                }),
                // One bad row never costs its neighbours: it takes its position and is passed.
                Err(error) => {
                    tracing::warn!(
                        record_id = %cursor.id,
                        backfill_position = self.next_position,
                        %error,
                        "backfill: health_events document cannot be decoded; skipping it"
                    );
                    metrics::get().skipped("undecodable");
                    ChangeKind::Skip(SkipReason::Undecodable)
                }
            };
            changes.push(Change::new(
                self.next_position,
                Some(cursor.created_at),
                kind,
            ));
        }
        Ok(Some(changes))
    }
}

impl BackfillSource {
    async fn fetch_page(&mut self) -> Result<(), DatastoreError> {
        let client = match self.client.take() {
            Some(client) if !client.is_closed() => client,
            _ => self.store.connect().await?,
        };
        let end = to_bigint(self.plan.changelog_end);
        let open: Vec<i64> = self.plan.open_ids.iter().map(|id| to_bigint(*id)).collect();
        // After the last row read; on the first page, from the plan's first row (inclusive).
        let (bound, operator) = match (&self.read_cursor, &self.plan.first) {
            (Some(cursor), _) => (Some(cursor), ">"),
            (None, Some(first)) => (Some(first), ">="),
            (None, None) => (None, ">"),
        };
        let bound_time = bound.map(|c| c.created_at).unwrap_or(self.plan.from);
        let bound_id = bound
            .map(|c| c.id.clone())
            .unwrap_or_else(|| "00000000-0000-0000-0000-000000000000".into());
        let rows = client
            .query(
                &format!(
                    "SELECT h.id::text, h.document, h.created_at FROM health_events h \
                     WHERE {DOMAIN} AND (h.created_at, h.id) {operator} ($5, $6::text::uuid) \
                     ORDER BY h.created_at, h.id LIMIT $7"
                ),
                &[
                    &self.plan.from,
                    &self.plan.started_at,
                    &end,
                    &open,
                    &bound_time,
                    &bound_id,
                    &self.batch_size,
                ],
            )
            .await;
        self.client = Some(client);
        let rows = rows?;
        if i64::try_from(rows.len()).unwrap_or(i64::MAX) < self.batch_size {
            self.exhausted = true;
        }
        for row in rows {
            // `id` (the primary key) and `created_at` (bounded by the query) are never NULL.
            let cursor = Cursor {
                id: row.try_get(0).map_err(|e| {
                    DatastoreError::Schema(format!("backfill: unreadable health_events.id: {e}"))
                })?,
                created_at: row.try_get(2).map_err(|e| {
                    DatastoreError::Schema(format!(
                        "backfill: unreadable health_events.created_at: {e}"
                    ))
                })?,
            };
            let document = match row.try_get::<_, Option<serde_json::Value>>(1) {
                Ok(document) => Ok(document.unwrap_or(serde_json::Value::Null)),
                Err(e) => Err(crate::datastore::postgres::describe_conversion(&e)),
            };
            self.read_cursor = Some(cursor.clone());
            self.page.push_back((cursor, document));
        }
        Ok(())
    }
}

/// Saves the plan's progress as the pipeline's checkpoint advances, and reports progress.
pub struct BackfillProgress<S: PlanStore = TokenStore> {
    store: Arc<S>,
    plan: Mutex<BackfillPlan>,
    cursors: Cursors,
    started: Instant,
    first_delivered: u64,
    last_report: Mutex<Instant>,
    terminal: bool,
}

const REPORT_INTERVAL: Duration = Duration::from_secs(5);

impl<S: PlanStore> CheckpointStore for BackfillProgress<S> {
    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), DatastoreError> {
        let value = {
            let mut cursors = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
            let mut plan = self.plan.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(cursor) = cursors.get(&checkpoint.position) {
                plan.cursor = Some(cursor.clone());
            }
            *cursors = cursors.split_off(&checkpoint.position.saturating_add(1));
            plan.delivered = checkpoint.position;
            plan.to_value()
        };
        self.store.save_plan(&value).await?;
        self.report(checkpoint.position, false);
        Ok(())
    }
}

impl<S: PlanStore> BackfillProgress<S> {
    /// The progress of `plan`, saved in `store`; the cursors map is the source's.
    pub fn new(store: Arc<S>, plan: &BackfillPlan, cursors: Cursors) -> BackfillProgress<S> {
        BackfillProgress {
            store,
            plan: Mutex::new(plan.clone()),
            cursors,
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
            .set(to_bigint(total.saturating_sub(delivered)));
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

/// The source and checkpoint store of one backfill run over `plan`.
pub fn open(
    store: Arc<TokenStore>,
    plan: BackfillPlan,
    config: &BackfillConfig,
) -> (BackfillSource, Arc<BackfillProgress>) {
    let cursors = Cursors::default();
    let progress = Arc::new(BackfillProgress::new(store.clone(), &plan, cursors.clone()));
    let source = BackfillSource {
        store,
        client: None,
        read_cursor: plan.cursor.clone(),
        next_position: plan.delivered,
        plan,
        batch_size: config.batch_size.clamp(1, 100_000) as i64,
        page: VecDeque::new(),
        exhausted: false,
        pacer: Pacer::new(config.rate_limit),
        cursors,
    };
    (source, progress)
}

/// A changelog id or count as a PostgreSQL `bigint` parameter. Ids come from a `bigint`
/// column, so they fit; anything larger saturates at `i64::MAX` rather than wrapping negative.
fn to_bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

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
