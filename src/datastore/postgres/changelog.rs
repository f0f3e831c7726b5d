//! Reads `datastore_changelog` without ever skipping a row.
//!
//! Changelog ids are taken when a row is inserted, not when its transaction commits, so they
//! become visible out of order. The reader keeps `read_pos` (highest id seen) and a set of
//! *holes*: ids below `read_pos` that were not visible when a larger id was. Each hole is tagged
//! with a transaction id assigned after the hole was seen (`pg_current_xact_id()`): the
//! transaction that holds a hole took its own id before it took the changelog id, so it is
//! older than the tag. Once every transaction older than the tag has ended (`xmin` of a later
//! snapshot >= tag) the hole is decided: re-read by id, it is either a committed row (delivered
//! like any other) or gone for good. (The snapshot's `xmax` would not do as a tag: it is one
//! past the newest *completed* transaction, and a running transaction can be newer than that.)
//! Holes are re-read on every poll, so a row that commits late is delivered as soon as it is
//! visible; only the decision that an id will never come waits for older transactions. Visible rows go out at once;
//! only the resume token waits for holes, because positions are reported exactly once each
//! and the pipeline advances over the contiguous prefix.
//!
//! A resume token (at start) or a read position (while running) above the changelog's head
//! means the ids went back (`TRUNCATE … RESTART IDENTITY`, a restored datastore, a bogus
//! token): the reader logs an error, counts it, and restarts at the new changelog's beginning
//! within the backfill window (see `reset`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_postgres::{Client, Row, Statement};

use super::holes::{self, Holes, Span};
use super::json_text::JsonText;
use super::reset::{self, ResetWindow, Restart};
use super::{Connector, StartPoint};
use crate::datastore::{Change, ChangeKind, ChangeSource, DatastoreError, RawEvent, SkipReason};
use crate::reconnect::Backoff;

/// On a fresh start, ids this far below the changelog's end are examined so that rows of
/// transactions still open at start-up (which hold smaller ids) are not passed over.
const START_WINDOW: u64 = 10_000;

/// The changelog's head (see `reset`): the larger of the id sequence's last value (`$3`, the
/// sequence's name or NULL) and the highest id present; NULL when both are.
const HEAD: &str = "greatest((SELECT max(id) FROM datastore_changelog), \
                              pg_sequence_last_value($3::text::regclass))";

/// Columns every changelog query returns, in this order.
const ROW_COLUMNS: &str = "c.id, c.table_name, c.operation, c.changed_at, c.record_id::text, \
     CASE WHEN c.table_name = 'health_events' AND c.operation = 'INSERT' \
          THEN c.new_values->'document' END, \
     CASE WHEN c.table_name = 'health_events' AND c.operation = 'INSERT' \
          THEN c.new_values->>'created_at' END";

/// The two statements of a poll, prepared once per connection (a `Statement` is a cheap
/// handle; preparing costs a round trip and a parse on the server).
#[derive(Clone)]
struct Statements {
    /// `read_new_sql`.
    read_new: Statement,
    /// `reread_holes_sql`.
    reread_holes: Statement,
}

/// New rows above `$1` (at most `$2`), with the snapshot's `xmin` and the changelog's head
/// (`$3`: the id sequence's name or NULL) in one statement: one snapshot. Public so that a
/// test can check the plan on a long changelog (tests/gapless.rs).
pub fn read_new_sql() -> String {
    format!(
        "SELECT pg_snapshot_xmin(s.snap)::text, s.head, \
                {ROW_COLUMNS} \
         FROM (SELECT pg_current_snapshot() AS snap, {HEAD} AS head) s \
         LEFT JOIN LATERAL (SELECT * FROM datastore_changelog \
                            WHERE id > $1 ORDER BY id LIMIT $2) c ON true"
    )
}

/// The rows inside the id spans `$1[i]..=$2[i]` (the holes), by id.
///
/// Each span is its own range scan of the primary key: the `LATERAL` subquery runs once per
/// span, and `OFFSET 0` keeps PostgreSQL from flattening it into a plain join. As a plain join
/// (`JOIN unnest(…) ON c.id BETWEEN …`), the prepared statement's generic plan walked the
/// whole changelog in id order and tested every row against every span: on a 90,000-row
/// changelog with 125 holes that was 11 million comparisons and 2 s per poll, growing with
/// the changelog (the cost is the holes' rows now). Public so that a test can check the plan
/// on a long changelog (tests/gapless.rs).
pub fn reread_holes_sql() -> String {
    format!(
        "SELECT {ROW_COLUMNS} FROM unnest($1::bigint[], $2::bigint[]) AS h(first, last) \
         CROSS JOIN LATERAL (SELECT * FROM datastore_changelog \
                             WHERE id BETWEEN h.first AND h.last OFFSET 0) c \
         ORDER BY c.id"
    )
}

pub struct ChangelogReader {
    connector: Connector,
    client: Option<Client>,
    /// The statements every poll runs, prepared on `client` (`None` until the first poll on a
    /// connection: a new connection prepares them again).
    statements: Option<Statements>,
    /// Highest id seen.
    read_pos: u64,
    /// Runs of ids below `read_pos` not yet visible, with their tags (the rule: `holes`).
    holes: Holes,
    /// Taking over a Go token: health-event rows up to `(changed_at, id)` were exported by it.
    exported_before: Option<(DateTime<Utc>, u64)>,
    /// Changes decided but not yet handed out.
    ready: VecDeque<Change>,
    batch_size: i64,
    poll_interval: Duration,
    wake: Arc<Notify>,
    /// Every position at or below this one was finished before this reader started.
    start_position: u64,
    /// Whether the last read reached PostgreSQL.
    up: Arc<AtomicBool>,
    /// Set when the reader started at the changelog's end (no resume token).
    fresh_start: Option<FreshStart>,
    /// `datastore_changelog`'s id sequence, when its last value is readable (see `reset`).
    sequence: Option<String>,
    /// Bounds a restart after the changelog's ids went back.
    window: ResetWindow,
    /// After a reset: health-event rows with ids up to `.0` changed before `.1` are passed over.
    not_before: Option<(u64, DateTime<Utc>)>,
}

impl ChangeSource for ChangelogReader {
    fn start_position(&self) -> u64 {
        self.start_position
    }

    async fn next_batch(&mut self) -> Result<Option<Vec<Change>>, DatastoreError> {
        self.read_next().await.map(Some)
    }
}

/// Where a reader without a resume token started: what a backfill must cover (everything
/// visible then) and must leave to the stream (ids above `changelog_end`, and `open_ids`).
#[derive(Debug, Clone)]
pub struct FreshStart {
    /// The database's clock at the start snapshot.
    pub started_at: DateTime<Utc>,
    /// Highest changelog id visible at the start snapshot.
    pub changelog_end: u64,
    /// Ids below `changelog_end` not visible at the start snapshot: rows of transactions still
    /// open then (the stream delivers them when they commit) or never committed.
    pub open_ids: Vec<u64>,
}

impl ChangelogReader {
    /// Opens the reader at the position the token gives (the caller has checked the schema with
    /// `Connector::check_schema`), with the window that bounds a restart after the changelog's
    /// ids went back (the backfill's `max_age` and `max_events`). Fails if PostgreSQL is
    /// unreachable.
    pub async fn open_bounded(
        connector: Connector,
        start: StartPoint,
        wake: Arc<Notify>,
        window: ResetWindow,
    ) -> Result<ChangelogReader, DatastoreError> {
        let client = connector.connect().await?;
        let sequence = find_sequence(&client).await;
        let mut reader = ChangelogReader {
            connector,
            client: None,
            statements: None,
            read_pos: 0,
            holes: Holes::default(),
            exported_before: None,
            ready: VecDeque::new(),
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            wake,
            start_position: 0,
            up: Arc::new(AtomicBool::new(true)),
            fresh_start: None,
            sequence,
            window,
            not_before: None,
        };
        let resuming = start != StartPoint::End;
        reader.start_from(&client, start).await?;
        if resuming {
            reader.restart_if_ahead_at_start(&client).await?;
        }
        if reader.ready.is_empty() && reader.holes.is_empty() {
            reader.start_position = reader.read_pos;
        }
        reader.client = Some(client);
        Ok(reader)
    }

    /// Sets the read position from the token (or the changelog's end without one).
    async fn start_from(
        &mut self,
        client: &Client,
        start: StartPoint,
    ) -> Result<(), DatastoreError> {
        match start {
            StartPoint::Contiguous(id) => self.read_pos = id,
            StartPoint::End => self.start_at_end(client).await?,
            StartPoint::Keyset { changed_at, id } => {
                self.start_after_keyset(client, changed_at, id).await?
            }
            StartPoint::EventId(id) => {
                // Upstream resolves an id-only token through the row's changed_at.
                let row = client
                    .query_opt(
                        "SELECT changed_at FROM datastore_changelog WHERE id = $1",
                        &[&to_sql_id(id)],
                    )
                    .await?;
                let changed_at: Option<DateTime<Utc>> = match row {
                    Some(row) => row.try_get(0)?,
                    None => None,
                };
                match changed_at {
                    Some(changed_at) => self.start_after_keyset(client, changed_at, id).await?,
                    None => self.read_pos = id,
                }
            }
        }
        Ok(())
    }

    /// A resume token above the changelog's head: the ids went back; restart (see `reset`).
    async fn restart_if_ahead_at_start(&mut self, client: &Client) -> Result<(), DatastoreError> {
        let head = changelog_head(client, self.sequence.as_deref()).await?;
        let Some(restart) = reset::restart_point(self.read_pos, head, Utc::now(), &self.window)
        else {
            return Ok(());
        };
        tracing::error!(
            resume_token = self.read_pos,
            changelog_head = head,
            restart_after = restart.after,
            passing_over_before = %restart.not_before,
            "the resume token is ahead of the changelog's head: the changelog's ids went \
             back (TRUNCATE ... RESTART IDENTITY, a restored or re-created datastore, or a \
             bogus token row); restarting from the new changelog's beginning within the \
             backfill window"
        );
        crate::metrics::get().resume_token_reset("ahead_at_start");
        self.restart(restart);
        Ok(())
    }

    /// Continues after `restart.after` of a changelog whose ids went back; nothing seen so far
    /// is kept.
    fn restart(&mut self, restart: Restart) {
        self.read_pos = restart.after;
        self.holes = Holes::default();
        self.exported_before = None;
        self.not_before = Some((restart.through, restart.not_before));
    }

    /// A reset found while running: the holes of the old changelog are passed over (their ids
    /// now belong to other rows), positions go on growing in a new epoch, and reading restarts.
    fn restart_while_running(&mut self, head: u64, restart: Restart) {
        let positions = self.connector.positions();
        for (first, last) in self.holes.take() {
            let mut span = Change::skip_span(first, last, SkipReason::ChangelogReset);
            span.position = positions.position_of(span.position);
            span.through = positions.position_of(span.through);
            self.ready.push_back(span);
        }
        let base = positions.position_of(self.read_pos);
        tracing::error!(
            read_position = self.read_pos,
            changelog_head = head,
            restart_after = restart.after,
            passing_over_before = %restart.not_before,
            "the changelog's head went back below ids already read: its ids were reset \
             (TRUNCATE ... RESTART IDENTITY, a restored or re-created datastore); restarting \
             from the new changelog's beginning within the backfill window"
        );
        crate::metrics::get().resume_token_reset("ahead_while_running");
        positions.start_epoch(base, restart.after);
        self.restart(restart);
        self.wake.notify_one();
    }

    /// Where a token-less start began (for the backfill hand-off); `None` after a resume.
    pub fn fresh_start(&self) -> Option<&FreshStart> {
        self.fresh_start.as_ref()
    }

    /// Fresh start: everything visible now is "before", everything that becomes visible later
    /// is new, including rows of transactions that are open right now and hold smaller ids.
    async fn start_at_end(&mut self, client: &Client) -> Result<(), DatastoreError> {
        let row = client
            .query_one(
                "SELECT pg_current_xact_id()::text, \
                        (SELECT coalesce(max(id), 0) FROM datastore_changelog), \
                        now(), \
                        array(SELECT id FROM datastore_changelog \
                              WHERE id > (SELECT coalesce(max(id), 0) FROM datastore_changelog) - $1 \
                              ORDER BY id)",
                &[&(START_WINDOW as i64)],
            )
            .await?;
        let tag = parse_xid(row.get(0))?;
        let end = u64::try_from(row.get::<_, i64>(1)).unwrap_or(0);
        let started_at: DateTime<Utc> = row.get(2);
        let visible: Vec<i64> = row.get(3);
        let before_window = end.saturating_sub(START_WINDOW);
        let visible: Vec<u64> = visible
            .into_iter()
            .filter_map(|id| u64::try_from(id).ok())
            .filter(|&id| id > before_window)
            .collect();
        let mut open_ids = Vec::new();
        for gap in holes::gaps(before_window, &visible) {
            open_ids.extend(gap.0..=gap.1);
            self.holes.add(gap, tag);
        }
        for id in visible {
            let skip = ChangeKind::Skip(SkipReason::BeforeStart);
            self.ready.push_back(Change::new(id, None, skip));
        }
        self.read_pos = end;
        self.start_position = before_window;
        self.fresh_start = Some(FreshStart {
            started_at,
            changelog_end: end,
            open_ids,
        });
        tracing::info!(
            changelog_end = end,
            "no resume token: starting at the end of the changelog"
        );
        Ok(())
    }

    /// Takes over the Go exporter's `(changed_at, id)` bookmark: start below the first row it
    /// had not exported, and pass over the rows it had.
    async fn start_after_keyset(
        &mut self,
        client: &Client,
        changed_at: DateTime<Utc>,
        id: u64,
    ) -> Result<(), DatastoreError> {
        let row = client
            .query_one(
                "SELECT min(id) FROM datastore_changelog \
                 WHERE table_name = 'health_events' AND operation = 'INSERT' \
                   AND (changed_at > $1 OR (changed_at = $1 AND id > $2))",
                &[&changed_at, &to_sql_id(id)],
            )
            .await?;
        let first_unexported: Option<i64> = row.get(0);
        self.read_pos = match first_unexported.and_then(|first| u64::try_from(first).ok()) {
            Some(first) if first <= id => first.saturating_sub(1),
            _ => id,
        };
        self.exported_before = Some((changed_at, id));
        tracing::info!(
            event_id = id,
            %changed_at,
            resume_from = self.read_pos,
            "taking over a keyset resume token"
        );
        Ok(())
    }

    /// Shares a flag that says whether the last read reached PostgreSQL (for `/readyz`).
    pub fn report_connection(&mut self, up: Arc<AtomicBool>) {
        up.store(true, Ordering::Relaxed);
        self.up = up;
    }

    /// The next decided changes, in no particular order; waits (LISTEN wake-up or poll) when
    /// there are none. Reconnects after connection failures, so it only returns an error for a
    /// problem that retrying cannot fix.
    async fn read_next(&mut self) -> Result<Vec<Change>, DatastoreError> {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            // `ready` holds changes already at their positions.
            if !self.ready.is_empty() {
                return Ok(self.ready.drain(..).collect());
            }
            let polled = self.poll().await.map(|mut changes| {
                let positions = self.connector.positions();
                for change in &mut changes {
                    change.position = positions.position_of(change.position);
                    change.through = positions.position_of(change.through);
                }
                changes
            });
            self.up.store(polled.is_ok(), Ordering::Relaxed);
            match polled {
                Ok(changes) if !changes.is_empty() => return Ok(changes),
                Ok(_) => {
                    backoff.reset();
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(self.poll_interval) => {}
                    }
                }
                Err(error) if error.is_transient() => {
                    let wait = backoff.failed(tokio::time::Instant::now());
                    tracing::warn!(%error, retry_in = ?wait, "reading the changelog failed; reconnecting");
                    crate::metrics::get().datastore_reconnects.inc();
                    self.client = None;
                    self.statements = None;
                    tokio::time::sleep(wait).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn poll(&mut self) -> Result<Vec<Change>, DatastoreError> {
        let client = match self.client.take() {
            Some(client) if !client.is_closed() => client,
            _ => {
                self.statements = None;
                self.connector.connect().await?
            }
        };
        let started = std::time::Instant::now();
        let result = self.poll_with(&client).await;
        self.client = Some(client);
        if let Ok(changes) = &result {
            crate::metrics::get()
                .changelog_poll_duration
                .observe(started.elapsed().as_secs_f64());
            // change_stream_lag_seconds: an empty poll is caught up now (see `crate::lag`).
            match changes.iter().filter_map(|change| change.changed_at).max() {
                Some(newest) => crate::lag::global().event(newest),
                None if changes.is_empty() => crate::lag::global().caught_up(),
                None => {}
            }
        }
        result
    }

    /// One poll: new rows and the holes they leave, then the holes re-read (see `holes`).
    async fn poll_with(&mut self, client: &Client) -> Result<Vec<Change>, DatastoreError> {
        let Some((xmin, mut changes)) = self.read_new(client).await? else {
            return Ok(Vec::new()); // the changelog was reset; reading restarts
        };
        if !self.holes.is_empty() {
            self.reread_holes(client, xmin, &mut changes).await?;
        }
        let open_ids = self.holes.open_ids();
        crate::metrics::get()
            .changelog_open_ids
            .set(i64::try_from(open_ids).unwrap_or(i64::MAX));
        if let Some(floor) = self.holes.undecided_floor() {
            tracing::debug!(
                open_ids,
                undecided_floor = floor,
                "the resume token waits below an id whose transaction may still be open"
            );
        }
        Ok(changes)
    }

    /// The poll statements on `client`, prepared on the first poll of a connection.
    async fn statements(&mut self, client: &Client) -> Result<Statements, DatastoreError> {
        if let Some(statements) = &self.statements {
            return Ok(statements.clone());
        }
        let statements = Statements {
            read_new: client.prepare(&read_new_sql()).await?,
            reread_holes: client.prepare(&reread_holes_sql()).await?,
        };
        self.statements = Some(statements.clone());
        Ok(statements)
    }

    /// Reads rows above `read_pos` and the snapshot they were read under (one statement, one
    /// snapshot), tags the gaps they leave as holes, and returns the snapshot's `xmin` with
    /// the changes; `None` after a changelog reset.
    async fn read_new(
        &mut self,
        client: &Client,
    ) -> Result<Option<(u64, Vec<Change>)>, DatastoreError> {
        let statement = self.statements(client).await?.read_new;
        let rows = client
            .query(
                &statement,
                &[&to_sql_id(self.read_pos), &self.batch_size, &self.sequence],
            )
            .await?;
        let Some(first) = rows.first() else {
            return Err(DatastoreError::Schema(
                "snapshot query returned no row".into(),
            ));
        };
        let xmin = parse_xid(first.try_get(0)?)?;
        let head: Option<i64> = first.try_get(1)?;
        crate::metrics::get()
            .changelog_head_id
            .set(head.unwrap_or(0));
        let head = head.and_then(|h| u64::try_from(h).ok()).unwrap_or(0);
        if let Some(restart) = reset::restart_point(self.read_pos, head, Utc::now(), &self.window) {
            self.restart_while_running(head, restart);
            return Ok(None);
        }
        // A NULL id: no new rows, only the snapshot came back.
        let mut changes = Vec::new();
        for row in &rows {
            if row.try_get::<_, Option<i64>>(2)?.is_some() {
                changes.push(self.change_from_row(row, 2)?);
            }
        }
        let visible: Vec<u64> = changes.iter().map(|change| change.position).collect();
        let gaps = holes::gaps(self.read_pos, &visible);
        if let Some(&last) = visible.last() {
            self.read_pos = self.read_pos.max(last);
        }
        self.add_holes(client, gaps).await?;
        Ok(Some((xmin, changes)))
    }

    /// Adds the gaps as holes, tagged with a transaction id taken now, after the snapshot that
    /// found them; costs one transaction id, only on polls with gaps.
    async fn add_holes(&mut self, client: &Client, gaps: Vec<Span>) -> Result<(), DatastoreError> {
        if gaps.is_empty() {
            return Ok(());
        }
        let row = client
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await?;
        let tag = parse_xid(row.try_get(0)?)?;
        gaps.into_iter().for_each(|gap| self.holes.add(gap, tag));
        Ok(())
    }

    /// Re-reads the holes by id. A row that has appeared is delivered now, whatever else is
    /// still running; an id still absent is gone for good only once its hole is decided
    /// (`xmin`, from a snapshot before this re-read, reached its tag), else it stays a hole.
    async fn reread_holes(
        &mut self,
        client: &Client,
        xmin: u64,
        changes: &mut Vec<Change>,
    ) -> Result<(), DatastoreError> {
        let spans = self.holes.spans();
        let firsts: Vec<i64> = spans.iter().map(|&(first, _)| to_sql_id(first)).collect();
        let lasts: Vec<i64> = spans.iter().map(|&(_, last)| to_sql_id(last)).collect();
        let statement = self.statements(client).await?.reread_holes;
        let found = client.query(&statement, &[&firsts, &lasts]).await?;
        let found = found
            .iter()
            .map(|row| self.change_from_row(row, 0))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<u64> = found.iter().map(|change| change.position).collect();
        for (first, last) in self.holes.resolve(&ids, xmin) {
            changes.push(Change::skip_span(first, last, SkipReason::NeverCommitted));
        }
        changes.extend(found);
        Ok(())
    }

    /// Builds a change from the `ROW_COLUMNS` starting at column `at`. Only an unreadable id
    /// is an error; any other column the driver cannot convert (text that is not UTF-8, a NULL
    /// where text belongs) makes the row a skipped, logged and counted `Undecodable` position,
    /// so one bad row never stops the feed. The document is kept as its JSON text: the worker
    /// that delivers it parses it once (`model::decode`), and skips it the same way when it is
    /// not JSON a parse accepts (nested deeper than 128 levels, a number beyond `f64`).
    fn change_from_row(&self, row: &Row, at: usize) -> Result<Change, DatastoreError> {
        let position = row_position(row, at)?;
        let changed_at: Option<DateTime<Utc>> = row.try_get(at.saturating_add(3)).ok().flatten();
        let skip = |reason| Change::new(position, changed_at, ChangeKind::Skip(reason));
        // Text columns are borrowed from the row; only what the event keeps is copied.
        let record_id: Option<&str> = row.try_get(at.saturating_add(4)).ok().flatten();
        let undecodable = |column: &str, error: &dyn std::fmt::Display| {
            tracing::warn!(
                changelog_id = position,
                record_id = record_id.unwrap_or("-"),
                column,
                %error,
                "changelog row cannot be decoded; skipping it"
            );
            crate::metrics::get().skipped("undecodable");
            skip(SkipReason::Undecodable)
        };
        let (table, operation) = match (
            row.try_get::<_, Option<&str>>(at.saturating_add(1)),
            row.try_get::<_, Option<&str>>(at.saturating_add(2)),
        ) {
            (Ok(table), Ok(operation)) => {
                (table.unwrap_or_default(), operation.unwrap_or_default())
            }
            (Err(e), _) => return Ok(undecodable("table_name", &e)),
            (_, Err(e)) => return Ok(undecodable("operation", &e)),
        };
        if table != "health_events" || operation != "INSERT" {
            return Ok(skip(SkipReason::NotAHealthEventInsert));
        }
        if self.passed_over(position, changed_at) {
            return Ok(skip(SkipReason::BeforeStart));
        }
        let Some(record_id) = record_id else {
            return Ok(undecodable("record_id", &"is NULL or unreadable"));
        };
        let document: Option<JsonText> = match row.try_get(at.saturating_add(5)) {
            Ok(document) => document,
            Err(e) => return Ok(undecodable("document", &describe_conversion(&e))),
        };
        let created_at: Option<&str> = row.try_get(at.saturating_add(6)).ok().flatten();
        let event = RawEvent {
            record_id: record_id.to_string(),
            document: JsonText::document(document),
            created_at: created_at.and_then(parse_rfc3339),
        };
        Ok(Change::new(position, changed_at, ChangeKind::Event(event)))
    }

    /// Whether a health-event row at `position` was exported before this reader started: by
    /// the Go exporter whose keyset token was taken over, or before a changelog reset's window.
    fn passed_over(&self, position: u64, changed_at: Option<DateTime<Utc>>) -> bool {
        let Some(row_time) = changed_at else {
            return false;
        };
        let by_token = self.exported_before.is_some_and(|(token_time, token_id)| {
            position <= token_id && (row_time, position) <= (token_time, token_id)
        });
        let before_reset = self
            .not_before
            .is_some_and(|(through, not_before)| position <= through && row_time < not_before);
        by_token || before_reset
    }
}

/// The driver's conversion error with its cause (serde_json's reason, e.g. "recursion limit
/// exceeded"), which `Display` alone leaves out.
pub fn describe_conversion(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The changelog id sequence's name, when its last value can be read (USAGE or SELECT on it).
async fn find_sequence(client: &Client) -> Option<String> {
    let row = client
        .query_one(
            "SELECT pg_get_serial_sequence('datastore_changelog', 'id')",
            &[],
        )
        .await
        .ok()?;
    let name: String = row.try_get::<_, Option<String>>(0).ok().flatten()?;
    match client
        .query_one(
            "SELECT pg_sequence_last_value($1::text::regclass)",
            &[&name],
        )
        .await
    {
        Ok(_) => Some(name),
        Err(error) => {
            tracing::warn!(
                sequence = name,
                error = %crate::datastore::describe_postgres_error(&error),
                "cannot read the changelog's id sequence (grant USAGE on it); the changelog's \
                 head is taken as its highest id, so a changelog whose newest rows were deleted \
                 looks reset and some events may be re-sent"
            );
            None
        }
    }
}

/// The changelog's head (see `HEAD`), 0 when empty and never used.
async fn changelog_head(client: &Client, sequence: Option<&str>) -> Result<u64, DatastoreError> {
    let row = client
        .query_one(
            &format!("SELECT {} FROM (SELECT 1) one", HEAD.replace("$3", "$1")),
            &[&sequence],
        )
        .await?;
    let head: Option<i64> = row.try_get(0)?;
    Ok(head.and_then(|h| u64::try_from(h).ok()).unwrap_or(0))
}

/// The changelog id in column `at`: the only column whose failure is an error (see
/// `change_from_row`).
fn row_position(row: &Row, at: usize) -> Result<u64, DatastoreError> {
    let id: i64 = row.try_get(at).map_err(|e| DatastoreError::Row {
        id: -1,
        reason: format!("unreadable changelog id: {e}"),
    })?;
    u64::try_from(id).map_err(|_| DatastoreError::Row {
        id,
        reason: "changelog ids are positive".into(),
    })
}

/// The row's `created_at` text as a time; `None` if it is not RFC 3339.
fn parse_rfc3339(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A changelog id as PostgreSQL's `bigint` (ids above `i64::MAX` cannot exist there).
fn to_sql_id(id: u64) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

fn parse_xid(text: String) -> Result<u64, DatastoreError> {
    text.parse()
        .map_err(|_| DatastoreError::Schema(format!("unexpected transaction id {text:?}")))
}
