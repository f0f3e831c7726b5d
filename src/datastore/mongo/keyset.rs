//! Reading stored health events oldest first in keyset pages over `(createdAt, _id)` (the
//! index NVSentinel's setup job creates), for the backfill and the recovery after a lost
//! change-stream history.

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime as BsonDate, Document};
use mongodb::Collection;

use crate::datastore::DatastoreError;

/// Pages of documents with `createdAt` in `[from, until)` (`until` open when `None`), after the
/// last one read.
#[derive(Debug, Clone)]
pub struct KeysetReader {
    from: BsonDate,
    until: Option<BsonDate>,
    /// `(createdAt, _id)` of the last document read; the next page starts after it.
    after: Option<(BsonDate, Bson)>,
    /// The `after` bound includes itself (the first page of a window cut by a count).
    inclusive_first: bool,
    batch_size: i64,
    exhausted: bool,
}

impl KeysetReader {
    pub fn new(from: DateTime<Utc>, until: Option<DateTime<Utc>>, batch_size: u64) -> KeysetReader {
        KeysetReader {
            from: BsonDate::from_chrono(from),
            until: until.map(BsonDate::from_chrono),
            after: None,
            inclusive_first: false,
            batch_size: i64::try_from(batch_size.clamp(1, 100_000)).unwrap_or(1000),
            exhausted: false,
        }
    }

    /// Continues after `(created_at, id)` (a resumed backfill).
    pub fn after(mut self, created_at: DateTime<Utc>, id: Bson) -> KeysetReader {
        self.after = Some((BsonDate::from_chrono(created_at), id));
        self
    }

    /// Starts at `(created_at, id)` inclusive: the oldest document of a window cut by a count.
    pub fn starting_at(mut self, created_at: DateTime<Utc>, id: Bson) -> KeysetReader {
        self.after = Some((BsonDate::from_chrono(created_at), id));
        self.inclusive_first = true;
        self
    }

    pub fn is_exhausted(&self) -> bool {
        self.exhausted
    }

    /// The window's filter, without the keyset bound.
    pub fn window(&self) -> Document {
        let mut created = doc! {"$gte": self.from};
        if let Some(until) = self.until {
            created.insert("$lt", until);
        }
        doc! {"createdAt": created}
    }

    /// The next page (empty once exhausted).
    pub async fn next_page(
        &mut self,
        collection: &Collection<Document>,
    ) -> Result<Vec<Document>, DatastoreError> {
        if self.exhausted {
            return Ok(Vec::new());
        }
        let mut filter = self.window();
        if let Some((at, id)) = &self.after {
            let id_bound = if self.inclusive_first { "$gte" } else { "$gt" };
            filter = doc! {"$and": [filter, {"$or": [
                {"createdAt": {"$gt": *at}},
                {"createdAt": *at, "_id": {id_bound: id.clone()}},
            ]}]};
        }
        let page: Vec<Document> = collection
            .find(filter)
            .sort(doc! {"createdAt": 1, "_id": 1})
            .limit(self.batch_size)
            .await?
            .try_collect()
            .await?;
        if i64::try_from(page.len()).unwrap_or(i64::MAX) < self.batch_size {
            self.exhausted = true;
        }
        if let Some(last) = page.last() {
            if let (Some(Bson::DateTime(at)), Some(id)) = (last.get("createdAt"), last.get("_id")) {
                self.after = Some((*at, id.clone()));
                self.inclusive_first = false;
            }
        }
        Ok(page)
    }
}
