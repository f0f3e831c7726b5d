//! The resume token in upstream's shape: one document per client in the token collection,
//! `{clientName: "event-exporter", resumeToken: <the newest finished event's own _id>}`,
//! upserted by `clientName` — so a running Go exporter is taken over with nothing re-sent and a
//! rollback to Go still works. Upstream stores the change event's `_id` document
//! (`{_data: "<hex>"}`); explicit bytes are stored as BSON binary, which is read too.
//!
//! Beside it the exporter keeps `lastExportedAt` (the newest finished event's `createdAt`, a
//! BSON date): when the token's history is lost (code 286 and friends), the recovery backfill
//! starts there instead of upstream's silent "start from now". Go ignores the extra field.

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
}

/// Reads and writes one client's token document.
#[derive(Clone)]
pub struct TokenStore {
    collection: Collection<Document>,
    client_name: String,
}

impl TokenStore {
    pub fn new(collection: Collection<Document>, client_name: String) -> TokenStore {
        TokenStore {
            collection,
            client_name,
        }
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
        }))
    }

    /// Upserts fields of this client's document, only while this replica may act as leader
    /// (`crate::leader::gate`, fed by the lease in `super::lease`). Errors:
    /// `DatastoreError::Token` naming the client when it cannot prove it leads (nothing
    /// written), the datastore's.
    pub async fn set(&self, fields: Document) -> Result<(), DatastoreError> {
        self.check_leading()?;
        self.collection
            .update_one(
                doc! {"clientName": &self.client_name},
                doc! {"$set": fields},
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// Removes this client's document (a backfill record that is no longer wanted).
    pub async fn delete(&self) -> Result<(), DatastoreError> {
        self.check_leading()?;
        self.collection
            .delete_one(doc! {"clientName": &self.client_name})
            .await?;
        Ok(())
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
