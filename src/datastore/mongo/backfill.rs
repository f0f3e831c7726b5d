//! Backfill from MongoDB on a first start (no resume token), with the guarantees of the
//! PostgreSQL one (`crate::backfill`, whose `PagedBackfill` reads these pages): the change stream is opened **first**, then the window
//! `createdAt` in `[start − max_age, start)` (start = the clock read right after the stream
//! opened) is read oldest first in keyset pages of `batch_size` over `(createdAt, _id)`, the
//! newest `max_events` of it, at `rate_limit` events per second, through the same pipeline.
//!
//! The seam: everything inserted before the stream opened has `createdAt` before `start` (one
//! clock), so it is the backfill's; an event inserted between the stream's opening and the
//! clock read is in both (bounded by that instant; its CloudEvent `id` is the same, so a sink
//! deduplicating on `id` sees one). Plan and progress are kept in the token collection under
//! `<client>-backfill` (`{clientName, plan}`), so a restart continues where it stopped.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::Collection;

use super::decode;
use super::keyset::KeysetReader;
use super::token::TokenStore;
use crate::backfill::{
    BackfillPlan, BackfillProgress, Cursor, PageReader, PageRow, PagedBackfill, PlanStore,
};
use crate::config::BackfillConfig;
use crate::datastore::DatastoreError;

impl PlanStore for TokenStore {
    async fn save_plan(&self, plan: &serde_json::Value) -> Result<(), DatastoreError> {
        let plan = Bson::try_from(plan.clone()).map_err(|e| DatastoreError::Token {
            client: self.client_name().to_string(),
            reason: format!("backfill plan is not representable in BSON: {e}"),
        })?;
        self.set(doc! {"plan": plan}).await
    }
}

/// The stored plan of `store`'s client, if any and readable.
pub async fn load_plan(store: &TokenStore) -> Result<Option<BackfillPlan>, DatastoreError> {
    let Some(document) = store.load_document().await? else {
        return Ok(None);
    };
    let Some(plan) = document.get("plan") else {
        return Ok(None);
    };
    let json = plan.clone().into_relaxed_extjson();
    Ok(BackfillPlan::from_value(&json))
}

/// Plans a backfill of the window ending at `started_at`.
pub async fn make_plan(
    collection: &Collection<Document>,
    config: &BackfillConfig,
    started_at: DateTime<Utc>,
) -> Result<BackfillPlan, DatastoreError> {
    let from = chrono::Duration::from_std(config.max_age)
        .ok()
        .and_then(|age| started_at.checked_sub_signed(age))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let window = KeysetReader::new(from, Some(started_at), 1).window();
    let count = collection.count_documents(window.clone()).await?;
    let mut total = count;
    let mut first = None;
    if count > config.max_events {
        let skip = config.max_events.saturating_sub(1);
        let oldest = collection
            .find_one(window)
            .sort(doc! {"createdAt": -1, "_id": -1})
            .skip(skip)
            .await?;
        first = oldest.and_then(|d| {
            Some(Cursor {
                created_at: decode::created_at(&d)?,
                id: decode::record_id(d.get("_id")?),
            })
        });
        total = config.max_events;
    }
    Ok(BackfillPlan {
        started_at,
        from,
        first,
        changelog_end: 0,
        open_ids: Vec::new(),
        total,
        delivered: 0,
        cursor: None,
        done: false,
    })
}

/// A stored `_id` from its CloudEvent id: NVSentinel's `_id`s are ObjectIds.
fn stored_id(id: &str) -> Bson {
    match ObjectId::parse_str(id) {
        Ok(oid) => Bson::ObjectId(oid),
        Err(_) => Bson::String(id.to_string()),
    }
}

/// The plan's documents, keyset page by keyset page.
pub struct Pages {
    collection: Collection<Document>,
    reader: KeysetReader,
}

impl PageReader for Pages {
    async fn next_page(&mut self) -> Result<Vec<PageRow>, DatastoreError> {
        let page = self.reader.next_page(&self.collection).await?;
        Ok(page.iter().map(row).collect())
    }

    fn is_exhausted(&self) -> bool {
        self.reader.is_exhausted()
    }
}

/// One document as a page row: without `_id` or a `createdAt` date it cannot be exported (nor
/// placed on the keyset), so it is skipped.
fn row(document: &Document) -> PageRow {
    let event = decode::raw_event(document);
    match (event, decode::created_at(document)) {
        (Ok(event), Some(created_at)) => PageRow::Event {
            cursor: Cursor {
                created_at,
                id: event.record_id.clone(),
            },
            event,
        },
        (Ok(event), None) => PageRow::Unreadable {
            cursor: None,
            record_id: Some(event.record_id),
            error: Box::new(decode::DocumentError::NoCreatedAt),
        },
        (Err(error), _) => PageRow::Unreadable {
            cursor: None,
            record_id: None,
            error: Box::new(error),
        },
    }
}

/// The source and checkpoint store of one backfill run over `plan`.
pub fn open(
    collection: Collection<Document>,
    store: Arc<TokenStore>,
    plan: BackfillPlan,
    config: &BackfillConfig,
) -> (PagedBackfill<Pages>, Arc<BackfillProgress<TokenStore>>) {
    let progress = Arc::new(BackfillProgress::new(store, &plan));
    let reader = KeysetReader::new(plan.from, Some(plan.started_at), config.batch_size);
    let reader = match (&plan.cursor, &plan.first) {
        (Some(cursor), _) => reader.after(cursor.created_at, stored_id(&cursor.id)),
        (None, Some(first)) => reader.starting_at(first.created_at, stored_id(&first.id)),
        (None, None) => reader,
    };
    let source = PagedBackfill::new(Pages { collection, reader }, &plan, config);
    (source, progress)
}
