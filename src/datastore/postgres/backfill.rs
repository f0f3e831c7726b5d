//! PostgreSQL's backfill queries (the shared rules are in `crate::backfill`).
//!
//! **Gapless hand-off.** The stream's start snapshot is taken first (`FreshStart`). The
//! backfill covers exactly the rows the stream passes over: created before that snapshot's
//! clock and not owned by the stream (changelog id above the stream's start, or a row of a
//! transaction that was still open then). Nothing is sent twice and nothing falls between.
//! Plan and progress are kept in `resume_tokens` under `<client>-backfill`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use super::json_text::JsonText;
use super::{describe_conversion, FreshStart, TokenStore};
use crate::backfill::{
    BackfillPlan, BackfillProgress, Cursor, PageReader, PageRow, PagedBackfill, PlanStore,
};
use crate::config::BackfillConfig;
use crate::datastore::{DatastoreError, RawEvent};

/// Rows in the window that the stream does not own. `$1` from, `$2` started_at,
/// `$3` changelog_end, `$4` open_ids.
const DOMAIN: &str = "h.created_at >= $1 AND h.created_at < $2 \
     AND NOT EXISTS (SELECT 1 FROM datastore_changelog c \
                     WHERE c.table_name = 'health_events' AND c.operation = 'INSERT' \
                       AND c.record_id = h.id AND (c.id > $3 OR c.id = ANY($4)))";

/// Plans a backfill for a stream that started at `start`: counts the window and, when it holds
/// more than `max_events`, finds the oldest row of the newest `max_events`.
pub async fn make_plan(
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

impl PlanStore for TokenStore {
    async fn save_plan(&self, plan: &serde_json::Value) -> Result<(), DatastoreError> {
        self.save_value(plan).await
    }
}

/// The plan's rows, keyset page by keyset page.
pub struct Pages {
    store: Arc<TokenStore>,
    client: Option<Client>,
    plan: BackfillPlan,
    batch_size: i64,
    /// Last row read (not necessarily delivered).
    read_cursor: Option<Cursor>,
    exhausted: bool,
}

impl PageReader for Pages {
    async fn next_page(&mut self) -> Result<Vec<PageRow>, DatastoreError> {
        let client = match self.client.take() {
            Some(client) if !client.is_closed() => client,
            _ => self.store.connect().await?,
        };
        let rows = self.query(&client).await;
        self.client = Some(client);
        let rows = rows?;
        if i64::try_from(rows.len()).unwrap_or(i64::MAX) < self.batch_size {
            self.exhausted = true;
        }
        rows.iter().map(|row| self.row(row)).collect()
    }

    fn is_exhausted(&self) -> bool {
        self.exhausted
    }

    fn reset(&mut self) {
        self.client = None;
    }
}

impl Pages {
    /// The next page after the last row read; on the first page, from the plan's first row
    /// (inclusive).
    async fn query(&self, client: &Client) -> Result<Vec<tokio_postgres::Row>, DatastoreError> {
        let end = to_bigint(self.plan.changelog_end);
        let open: Vec<i64> = self.plan.open_ids.iter().map(|id| to_bigint(*id)).collect();
        let (bound, operator) = match (&self.read_cursor, &self.plan.first) {
            (Some(cursor), _) => (Some(cursor), ">"),
            (None, Some(first)) => (Some(first), ">="),
            (None, None) => (None, ">"),
        };
        let bound_time = bound.map(|c| c.created_at).unwrap_or(self.plan.from);
        let bound_id = bound
            .map(|c| c.id.clone())
            .unwrap_or_else(|| "00000000-0000-0000-0000-000000000000".into());
        let sql = format!(
            "SELECT h.id::text, h.document, h.created_at FROM health_events h \
             WHERE {DOMAIN} AND (h.created_at, h.id) {operator} ($5, $6::text::uuid) \
             ORDER BY h.created_at, h.id LIMIT $7"
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
            &self.plan.from,
            &self.plan.started_at,
            &end,
            &open,
            &bound_time,
            &bound_id,
            &self.batch_size,
        ];
        Ok(client.query(&sql, &params).await?)
    }

    /// One row as a page row; `id` (the primary key) and `created_at` (bounded by the query)
    /// are never NULL, so failing to read them is a schema error.
    fn row(&mut self, row: &tokio_postgres::Row) -> Result<PageRow, DatastoreError> {
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
        self.read_cursor = Some(cursor.clone());
        Ok(match row.try_get::<_, Option<JsonText>>(1) {
            Ok(document) => PageRow::Event {
                event: RawEvent {
                    record_id: cursor.id.clone(),
                    document: JsonText::document(document),
                    created_at: Some(cursor.created_at),
                },
                cursor,
            },
            Err(e) => PageRow::Unreadable {
                record_id: Some(cursor.id.clone()),
                cursor: Some(cursor),
                error: describe_conversion(&e).into(),
            },
        })
    }
}

/// The source and checkpoint store of one backfill run over `plan`.
pub fn open(
    store: Arc<TokenStore>,
    plan: BackfillPlan,
    config: &BackfillConfig,
) -> (PagedBackfill<Pages>, Arc<BackfillProgress<TokenStore>>) {
    let progress = Arc::new(BackfillProgress::new(store.clone(), &plan));
    let source = PagedBackfill::new(
        Pages {
            store,
            client: None,
            read_cursor: plan.cursor.clone(),
            batch_size: config.batch_size.clamp(1, 100_000) as i64,
            exhausted: false,
            plan: plan.clone(),
        },
        &plan,
        config,
    );
    (source, progress)
}

/// A changelog id or count as a PostgreSQL `bigint` parameter. Ids come from a `bigint`
/// column, so they fit; anything larger saturates at `i64::MAX` rather than wrapping negative.
fn to_bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
