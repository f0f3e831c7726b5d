//! The resume token in upstream's shape: one document per client in the token collection,
//! `{clientName: "event-exporter", resumeToken: <the newest finished event's own _id>}`,
//! upserted by `clientName` — so a running Go exporter is taken over with nothing re-sent and a
//! rollback to Go still works. Upstream stores the change event's `_id` document
//! (`{_data: "<hex>"}`); explicit bytes are stored as BSON binary, which is read too.
//!
//! Beside it the exporter keeps `lastExportedAt` (the newest finished event's `createdAt`, a
//! BSON date): when the token's history is lost (code 286 and friends), the recovery backfill
//! starts there instead of upstream's silent "start from now". Go ignores the extra field.
//!
//! **Fencing.** A write also stores `leaderEpoch`, the epoch of the leadership lease under
//! which it was made (`super::lease`: every take of the lease increments it), and succeeds only
//! while the stored `leaderEpoch` is not above the writer's ([`fenced_filter`]). Once a newer
//! leader has written, a deposed one that wakes up (paused, cut off) cannot move the token back:
//! its write matches nothing and fails naming both epochs. A document without `leaderEpoch` (the
//! Go exporter's) is taken over by the first write.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Bson, Document};
use mongodb::Collection;

use crate::datastore::{Checkpoint, CheckpointStore, DatastoreError, ResumePoint};

/// What the token document holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredToken {
    /// The change-stream resume token (`resumeAfter`).
    pub resume_token: Option<Document>,
    /// `createdAt` of the newest finished event (written by this exporter only).
    pub last_exported_at: Option<DateTime<Utc>>,
    /// The lease epoch of the last write (`leaderEpoch`; absent in a Go exporter's document).
    pub leader_epoch: Option<i64>,
}

/// The field holding the lease epoch of the write.
pub const EPOCH_FIELD: &str = "leaderEpoch";

/// The lease epoch under which this process writes (0 until it holds the lease), shared by the
/// lease, which sets it when taken, and the token stores, which write under it. A write the
/// fence refuses proves that another replica took the lease since: the store reports it here
/// and the lease's keeper ends this replica's leadership (exit 1, back as a standby).
#[derive(Debug, Default)]
pub struct EpochFence {
    epoch: AtomicI64,
    deposed: tokio_util::sync::CancellationToken,
    reason: std::sync::Mutex<Option<String>>,
}

impl EpochFence {
    pub fn set(&self, epoch: i64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }

    pub fn get(&self) -> i64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// A newer leader wrote: this replica no longer leads.
    pub fn depose(&self, reason: String) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(reason);
        self.deposed.cancel();
    }

    /// Waits until [`EpochFence::depose`]; returns why.
    pub async fn deposed(&self) -> String {
        self.deposed.cancelled().await;
        let slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        slot.clone().unwrap_or_default()
    }
}

/// A shared [`EpochFence`].
pub type Epoch = Arc<EpochFence>;

/// The filter of a write to `client_name`'s document under lease epoch `epoch`: the document
/// was last written under this epoch or an older one (or by a writer without epochs).
pub fn fenced_filter(client_name: &str, epoch: i64) -> Document {
    doc! {
        "clientName": client_name,
        "$or": [{EPOCH_FIELD: {"$lte": epoch}}, {EPOCH_FIELD: {"$exists": false}}],
    }
}

/// Reads and writes one client's token document.
#[derive(Clone)]
pub struct TokenStore {
    collection: Collection<Document>,
    client_name: String,
    /// The lease epoch writes are fenced with; `None` writes unfenced (tools, tests).
    epoch: Option<Epoch>,
}

impl TokenStore {
    pub fn new(collection: Collection<Document>, client_name: String) -> TokenStore {
        TokenStore {
            collection,
            client_name,
            epoch: None,
        }
    }

    /// Fences every write with the lease epoch `epoch` (see the module docs).
    pub fn fenced(mut self, epoch: Epoch) -> TokenStore {
        self.epoch = Some(epoch);
        self
    }

    pub fn client_name(&self) -> &str {
        &self.client_name
    }

    /// The stored document of this client, if any. Errors: the datastore's, or
    /// `DatastoreError::Token` naming the client when `resumeToken` is neither a document nor
    /// BSON bytes of one.
    pub async fn load(&self) -> Result<Option<StoredToken>, DatastoreError> {
        let Some(document) = self
            .collection
            .find_one(doc! {"clientName": &self.client_name})
            .await?
        else {
            return Ok(None);
        };
        let unusable = |reason: String| DatastoreError::Token {
            client: self.client_name.clone(),
            reason,
        };
        let resume_token = match document.get("resumeToken") {
            None | Some(Bson::Null) => None,
            Some(Bson::Document(token)) if token.is_empty() => None,
            Some(Bson::Document(token)) => Some(token.clone()),
            Some(Bson::Binary(binary)) if binary.bytes.is_empty() => None,
            Some(Bson::Binary(binary)) => {
                Some(Document::from_reader(binary.bytes.as_slice()).map_err(|e| {
                    unusable(format!("resumeToken bytes are not a BSON document: {e}"))
                })?)
            }
            Some(other) => {
                return Err(unusable(format!(
                    "resumeToken is a {:?}, expected a document or binary",
                    other.element_type()
                )))
            }
        };
        let last_exported_at = match document.get("lastExportedAt") {
            Some(Bson::DateTime(date)) => Some(date.to_chrono()),
            _ => None,
        };
        Ok(Some(StoredToken {
            resume_token,
            last_exported_at,
            leader_epoch: super::decode::integer(&document, EPOCH_FIELD),
        }))
    }

    /// Upserts fields of this client's document, only while this replica may act as leader
    /// (`crate::leader::gate`, fed by the lease in `super::lease`). Errors:
    /// `DatastoreError::Token` naming the client when it cannot prove it leads (nothing
    /// written), the datastore's.
    pub async fn set(&self, fields: Document) -> Result<(), DatastoreError> {
        self.check_leading()?;
        let Some(epoch) = self.current_epoch() else {
            self.collection
                .update_one(
                    doc! {"clientName": &self.client_name},
                    doc! {"$set": fields},
                )
                .upsert(true)
                .await?;
            return Ok(());
        };
        let mut fields = fields;
        fields.insert(EPOCH_FIELD, epoch);
        let updated = self
            .collection
            .update_one(
                fenced_filter(&self.client_name, epoch),
                doc! {"$set": fields.clone()},
            )
            .await?;
        if updated.matched_count == 1 {
            return Ok(());
        }
        match self.load_document().await? {
            // No document yet: the first write creates it. (No upsert: with a fenced filter an
            // upsert would insert a second document beside a newer leader's.)
            None => {
                let mut document = doc! {"clientName": &self.client_name};
                document.extend(fields);
                self.collection.insert_one(document).await?;
                Ok(())
            }
            Some(current) => {
                let error = self.fenced_out(epoch, &current);
                if let Some(fence) = &self.epoch {
                    fence.depose(error.to_string());
                }
                Err(error)
            }
        }
    }

    /// Removes this client's document (a backfill record that is no longer wanted), under the
    /// same fence as [`TokenStore::set`].
    pub async fn delete(&self) -> Result<(), DatastoreError> {
        self.check_leading()?;
        let filter = match self.current_epoch() {
            Some(epoch) => fenced_filter(&self.client_name, epoch),
            None => doc! {"clientName": &self.client_name},
        };
        self.collection.delete_one(filter).await?;
        Ok(())
    }

    /// The epoch to write under, when fenced.
    fn current_epoch(&self) -> Option<i64> {
        self.epoch.as_ref().map(|e| e.get())
    }

    /// The error of a write refused by the fence.
    fn fenced_out(&self, epoch: i64, current: &Document) -> DatastoreError {
        let newer = super::decode::integer(current, EPOCH_FIELD)
            .map_or_else(|| "unknown".to_string(), |n| n.to_string());
        DatastoreError::Token {
            client: self.client_name.clone(),
            reason: format!(
                "not written: a newer leader (lease epoch {newer}) wrote it since this replica \
                 took the lease (epoch {epoch}); this replica no longer leads"
            ),
        }
    }

    fn check_leading(&self) -> Result<(), DatastoreError> {
        if crate::leader::gate().may_act() {
            return Ok(());
        }
        Err(DatastoreError::Token {
            client: self.client_name.clone(),
            reason: "not written: this replica cannot prove it leads now".into(),
        })
    }

    /// The whole document of this client (the backfill keeps its plan in one).
    pub async fn load_document(&self) -> Result<Option<Document>, DatastoreError> {
        Ok(self
            .collection
            .find_one(doc! {"clientName": &self.client_name})
            .await?)
    }
}

impl CheckpointStore for TokenStore {
    /// Writes the checkpoint's resume token and time. A checkpoint with neither (nothing
    /// finished yet that carried one) writes nothing.
    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), DatastoreError> {
        let mut fields = Document::new();
        if let Some(ResumePoint::ChangeStream(token)) = &checkpoint.resume {
            fields.insert("resumeToken", token.clone());
        }
        if let Some(at) = checkpoint.changed_at {
            fields.insert("lastExportedAt", mongodb::bson::DateTime::from_chrono(at));
        }
        if fields.is_empty() {
            return Ok(());
        }
        self.set(fields).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_admits_own_and_older_epochs_and_go_documents_only() {
        assert_eq!(
            fenced_filter("event-exporter", 7),
            doc! {"clientName": "event-exporter", "$or": [
                {"leaderEpoch": {"$lte": 7_i64}}, {"leaderEpoch": {"$exists": false}}
            ]}
        );
    }
}
