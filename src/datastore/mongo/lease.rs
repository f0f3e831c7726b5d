//! Leadership on MongoDB (issue 16): one lease document per `client_name` in the token
//! collection, `{_id: "leader:<client_name>", holder: "<HOSTNAME>/<pid>/<nonce>", expiresAt:
//! <BSON date>}`. Whoever the document names as `holder`, with `expiresAt` in the future, leads.
//!
//! Invariant: **a replica takes the lease only when it is free (absent, or expired) or already
//! its own, in one conditional write**, and it renews only while the document still names it.
//! Taking a free lease is a compare-and-set: inserting the document fails with 11000 when
//! another replica inserted it first, and the update's filter (`holder` = me, or `expiresAt` in
//! the past) matches for one writer only. A renewal that finds another holder means another
//! replica led meanwhile: the exporter exits 1 and comes back as a standby.
//!
//! Every renewal (every [`CHECK_INTERVAL`]) is fed into the process-wide [`crate::leader::Gate`]
//! as on PostgreSQL: publishes and token writes need a proof younger than
//! [`crate::leader::LEASE`] (3 s, monotonic clock), so a paused or cut-off leader has stopped
//! acting well before its lease document expires ([`VALIDITY`], 8 s, wall clock) and a standby
//! may take it. The margin ([`VALIDITY`] − [`CHECK_TIMEOUT`] − [`crate::leader::LEASE`] = 3 s)
//! is what the pods' wall clocks may differ by: `expiresAt` is written with the leader's clock
//! and compared with the standby's.
//!
//! **Fencing.** The lease document also counts takes: `epoch` grows by one each time a replica
//! takes the lease (a compare-and-set on the epoch it read), and starts above any `leaderEpoch`
//! already in the client's token documents (a deleted lease document cannot reset it). Token
//! writes carry that epoch and are refused once a newer epoch has written
//! ([`super::token::fenced_filter`]), so a replica paused between its gate check and its write
//! cannot move the token back after the next leader wrote: the second line of defence, as
//! PostgreSQL's fenced upsert is.

use std::time::Duration;

use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::Collection;
use tokio_util::sync::CancellationToken;

use super::token::{Epoch, EPOCH_FIELD};
use crate::datastore::DatastoreError;
use crate::leader::{gate, Holder, LeadershipError, CHECK_INTERVAL, CHECK_TIMEOUT};
use crate::leadership::{Identity, Observation, Transition};

/// How long one write of the lease document keeps it: `expiresAt` = the writer's now + this.
/// Renewed every second, so eight renewals in a row must fail before a standby may take it.
pub const VALIDITY: Duration = Duration::from_secs(8);

/// A standby's try (read, update, maybe insert) that takes longer counts as failed.
const TRY_TIMEOUT: Duration = Duration::from_secs(5);

/// The lease document's `_id` for the replicas sharing `client_name`.
pub fn lease_id(client_name: &str) -> String {
    format!("leader:{client_name}")
}

/// The `holder` value of this process: `HOSTNAME/pid/nonce`. The random nonce tells two
/// processes apart even when a restarted container gets the same pod name and pid.
pub fn holder_name(identity: &Identity, nonce: u64) -> String {
    format!("{identity}/{nonce:016x}")
}

/// A random nonce for [`holder_name`]; 0 only if the system has no randomness to give.
fn random_nonce() -> u64 {
    let mut bytes = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    u64::from_be_bytes(bytes)
}

/// `expiresAt` of a lease written at `now`.
pub fn expires_at(now: DateTime) -> DateTime {
    let millis = i64::try_from(VALIDITY.as_millis()).unwrap_or(i64::MAX);
    DateTime::from_millis(now.timestamp_millis().saturating_add(millis))
}

/// The filter under which `holder` may take the lease at `now`: it holds it already, or it
/// expired.
pub fn take_filter(id: &str, holder: &str, now: DateTime) -> Document {
    doc! {"_id": id, "$or": [{"holder": holder}, {"expiresAt": {"$lt": now}}]}
}

/// Who a lease document names, for the standbys' log: `holder` (or `expired: holder`).
pub fn describe_holder(document: &Document, now: DateTime) -> String {
    let holder = document.get_str("holder").unwrap_or("unknown");
    match document.get("expiresAt") {
        Some(Bson::DateTime(at)) if *at < now => format!("nobody (the lease of {holder} expired)"),
        Some(Bson::DateTime(_)) => holder.to_string(),
        _ => format!("{holder} (the lease document has no expiresAt date)"),
    }
}

/// The epoch a take writes: one above both the lease document's and every `leaderEpoch` of the
/// client's token documents.
pub fn next_epoch(lease_epoch: i64, token_epochs: &[i64]) -> i64 {
    token_epochs
        .iter()
        .copied()
        .fold(lease_epoch, i64::max)
        .saturating_add(1)
}

/// An epoch field (0 when absent: written before epochs, or by a version without them).
fn epoch_of(document: &Document, field: &str) -> i64 {
    super::decode::integer(document, field).unwrap_or(0)
}

/// The lease document of one `client_name`, as seen by this process.
pub struct LeaseDocument {
    collection: Collection<Document>,
    id: String,
    holder: String,
    /// The token documents whose `leaderEpoch` the epoch must exceed.
    token_clients: [String; 2],
    /// The epoch of this process's take (0 before), shared with its token stores.
    epoch: Epoch,
}

impl LeaseDocument {
    pub fn new(collection: Collection<Document>, client_name: &str, holder: String) -> Self {
        LeaseDocument {
            collection,
            id: lease_id(client_name),
            holder,
            token_clients: [
                client_name.to_string(),
                crate::backfill::record_name(client_name),
            ],
            epoch: Epoch::default(),
        }
    }

    /// The lease epoch token writes are fenced with (set when the lease is taken).
    pub fn epoch(&self) -> Epoch {
        self.epoch.clone()
    }

    /// The newest `leaderEpoch` of the client's token documents.
    async fn token_epochs(&self) -> Result<Vec<i64>, DatastoreError> {
        let mut epochs = Vec::with_capacity(2);
        for client in &self.token_clients {
            if let Some(document) = self
                .collection
                .find_one(doc! {"clientName": client})
                .await?
            {
                epochs.push(epoch_of(&document, EPOCH_FIELD));
            }
        }
        Ok(epochs)
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Takes the lease if it is free or already this process's: `Ok(Holder::Held(()))`, else
    /// who holds it (`Holder::Other`). Errors: the datastore's; `DatastoreError::Schema` when
    /// the token collection does not exist (the exporter never creates collections).
    pub async fn try_take(&self) -> Result<Holder<()>, DatastoreError> {
        let now = DateTime::now();
        let current = self.collection.find_one(doc! {"_id": &self.id}).await?;
        let free = current.as_ref().is_none_or(|c| {
            c.get_str("holder") == Ok(self.holder.as_str())
                || matches!(c.get("expiresAt"), Some(Bson::DateTime(at)) if *at < now)
        });
        if !free {
            let current = current.unwrap_or_default();
            return Ok(Holder::Other(describe_holder(&current, now)));
        }
        if current.is_none() {
            self.check_collection().await?;
        }
        let read = current.as_ref().map(|c| epoch_of(c, "epoch"));
        let epoch = next_epoch(read.unwrap_or(0), &self.token_epochs().await?);
        let lease = doc! {"holder": &self.holder, "expiresAt": expires_at(now), "epoch": epoch};
        let taken = match read {
            // Compare-and-set on what was read: one of two replicas racing wins.
            Some(read) => {
                let mut filter = take_filter(&self.id, &self.holder, now);
                filter.insert("epoch", read_filter(read));
                let updated = self
                    .collection
                    .update_one(filter, doc! {"$set": lease})
                    .await?;
                updated.matched_count == 1
            }
            None => {
                let mut document = doc! {"_id": &self.id};
                document.extend(lease);
                match self.collection.insert_one(document).await {
                    Ok(_) => true,
                    Err(error) if is_duplicate_key(&error) => false,
                    Err(error) => return Err(error.into()),
                }
            }
        };
        if taken {
            self.epoch.set(epoch);
            return Ok(Holder::Held(()));
        }
        let current = self.collection.find_one(doc! {"_id": &self.id}).await?;
        Ok(Holder::Other(
            current
                .map(|c| describe_holder(&c, now))
                .unwrap_or_else(|| "another replica (it just took the lease)".into()),
        ))
    }

    /// Extends the lease while the document still names this process: true when it did
    /// (nobody else took the lease since this process got it), false when another holds it.
    pub async fn renew(&self) -> Result<bool, DatastoreError> {
        let now = DateTime::now();
        let renewed = self
            .collection
            .update_one(
                doc! {"_id": &self.id, "holder": &self.holder},
                doc! {"$set": {"expiresAt": expires_at(now)}},
            )
            .await?;
        Ok(renewed.matched_count == 1)
    }

    /// Ends the lease now (`expiresAt` in the past) if this process holds it; the `holder`
    /// stays, so the document still says who led last.
    pub async fn release(&self) -> Result<(), DatastoreError> {
        self.collection
            .update_one(
                doc! {"_id": &self.id, "holder": &self.holder},
                doc! {"$set": {"expiresAt": DateTime::from_millis(0)}},
            )
            .await?;
        Ok(())
    }

    /// Who holds the lease now (for the exit message).
    async fn current_holder(&self) -> String {
        match self.collection.find_one(doc! {"_id": &self.id}).await {
            Ok(Some(current)) => describe_holder(&current, DateTime::now()),
            Ok(None) => "nobody (the lease document is gone)".into(),
            Err(error) => format!("unknown ({error})"),
        }
    }

    async fn check_collection(&self) -> Result<(), DatastoreError> {
        let name = self.collection.name().to_string();
        let names = self
            .collection
            .client()
            .database(&self.collection.namespace().db)
            .list_collection_names()
            .filter(doc! {"name": &name})
            .await?;
        if names.contains(&name) {
            return Ok(());
        }
        Err(DatastoreError::Schema(format!(
            "database {} has no collection {name:?} (MONGODB_TOKEN_COLLECTION_NAME), which holds \
             the leadership lease; NVSentinel's MongoDB setup job creates it — the exporter \
             never creates collections",
            self.collection.namespace().db
        )))
    }
}

/// Matches the `epoch` a take read: the value, or no field when it read 0 (a lease document
/// written before epochs, or by a version without them).
fn read_filter(read: i64) -> Bson {
    if read == 0 {
        Bson::Document(doc! {"$in": [0_i64, Bson::Null]})
    } else {
        Bson::Int64(read)
    }
}

fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match error.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(write)) => write.code == 11000,
        ErrorKind::Command(command) => command.code == 11000,
        _ => false,
    }
}

/// This replica's leadership on MongoDB: the lease document and the task that renews it.
pub struct MongoLeadership {
    lease: LeaseDocument,
}

/// Waits as a standby until this replica holds the lease (`Ok(None)` on `shutdown`). Logs who
/// leads while waiting, sets `health_events_exporter_leader`. Errors: a permanent datastore
/// error (a missing token collection, bad credentials); transient ones are retried.
pub async fn acquire(
    collection: Collection<Document>,
    client_name: &str,
    shutdown: &CancellationToken,
) -> Result<Option<MongoLeadership>, DatastoreError> {
    let identity = Identity::from_process();
    let lease = LeaseDocument::new(
        collection,
        client_name,
        holder_name(&identity, random_nonce()),
    );
    let id = lease.id.clone();
    let taken = crate::leader::wait_as_standby(&identity, id.as_str(), true, shutdown, || {
        let lease = &lease;
        async move {
            match tokio::time::timeout(TRY_TIMEOUT, lease.try_take()).await {
                Ok(result) => result,
                Err(_) => Err(DatastoreError::Timeout(format!(
                    "taking the leadership lease took longer than {TRY_TIMEOUT:?}"
                ))),
            }
        }
    })
    .await?;
    if taken.is_none() {
        return Ok(None);
    }
    tracing::info!(
        leader = %lease.holder,
        leadership_key = %id,
        lease_validity = ?VALIDITY,
        "this replica leads: exporting"
    );
    Ok(Some(MongoLeadership { lease }))
}

impl MongoLeadership {
    /// The lease epoch this replica's token writes are fenced with.
    pub fn epoch(&self) -> Epoch {
        self.lease.epoch()
    }

    /// Renews the lease every second until `shutdown` (Ok), or until the document names another
    /// holder or a token write finds a newer leader's epoch (`LeadershipError::Lost`). A failed or late renewal closes the gate; the next one
    /// that still finds this process as holder opens it again (nobody else can have led).
    pub async fn keep(&self, shutdown: CancellationToken) -> Result<(), LeadershipError> {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                reason = self.lease.epoch.deposed() => {
                    gate().observe(Observation::HeldElsewhere);
                    return Err(LeadershipError::Lost(reason));
                }
                _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            }
            let observation = match tokio::time::timeout(CHECK_TIMEOUT, self.lease.renew()).await {
                Ok(Ok(true)) => Observation::Holds,
                Ok(Ok(false)) => Observation::HeldElsewhere,
                Ok(Err(_)) | Err(_) => Observation::SessionLost,
            };
            let transition = gate().observe(observation);
            if observation == Observation::HeldElsewhere {
                return Err(LeadershipError::Lost(format!(
                    "the lease document {:?} names {}",
                    self.lease.id,
                    self.lease.current_holder().await
                )));
            }
            match transition {
                Transition::Demoted => tracing::error!(
                    replica = %self.lease.holder,
                    ?observation,
                    "cannot prove this replica still leads: publishing and token writes stopped"
                ),
                Transition::Promoted => tracing::info!(
                    replica = %self.lease.holder,
                    "leadership regained: exporting again"
                ),
                Transition::Stay => {}
            }
        }
    }
}

impl crate::leader::Release for MongoLeadership {
    fn release(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            gate().observe(Observation::SessionLost);
            match tokio::time::timeout(CHECK_TIMEOUT, self.lease.release()).await {
                Ok(Ok(())) => tracing::info!(replica = %self.lease.holder, "leadership released"),
                Ok(Err(error)) => tracing::warn!(
                    %error,
                    "releasing the leadership lease failed; it expires within {VALIDITY:?}"
                ),
                Err(_) => tracing::warn!(
                    "releasing the leadership lease timed out; it expires within {VALIDITY:?}"
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_outlives_the_local_proof_by_a_clock_skew_margin() {
        // A leader whose renewals stop has stopped acting after at most one renewal timeout
        // plus the proof's validity; the lease document must last longer, by the skew margin.
        let stops_acting = CHECK_TIMEOUT + crate::leader::LEASE;
        assert!(VALIDITY >= stops_acting + Duration::from_secs(3));
        assert!(VALIDITY >= CHECK_INTERVAL * 4);
    }

    #[test]
    fn the_epoch_grows_past_the_lease_and_every_token_document() {
        assert_eq!(next_epoch(0, &[]), 1);
        assert_eq!(next_epoch(4, &[]), 5);
        // A deleted (re-created) lease document cannot reset the epoch below a token's.
        assert_eq!(next_epoch(0, &[7, 3]), 8);
        assert_eq!(next_epoch(9, &[7]), 10);
        assert_eq!(next_epoch(i64::MAX, &[]), i64::MAX);
    }

    #[test]
    fn expires_at_adds_the_validity() {
        let now = DateTime::from_millis(1_767_225_600_000);
        assert_eq!(
            expires_at(now).timestamp_millis(),
            1_767_225_600_000 + 8_000
        );
        assert_eq!(
            expires_at(DateTime::MAX).timestamp_millis(),
            DateTime::MAX.timestamp_millis()
        );
    }

    #[test]
    fn the_take_filter_matches_own_or_expired_leases_only() {
        let now = DateTime::from_millis(10_000);
        assert_eq!(
            take_filter("leader:event-exporter", "pod-a/1/00", now),
            doc! {"_id": "leader:event-exporter", "$or": [
                {"holder": "pod-a/1/00"}, {"expiresAt": {"$lt": DateTime::from_millis(10_000)}}
            ]}
        );
    }

    #[test]
    fn holders_of_two_processes_differ_even_with_the_same_pod_and_pid() {
        let identity = Identity::new(Some("exporter-0".into()), 1);
        let a = holder_name(&identity, random_nonce());
        let b = holder_name(&identity, random_nonce());
        assert!(a.starts_with("exporter-0/1/"), "{a}");
        assert_ne!(a, b);
        assert_eq!(
            holder_name(&identity, 0xab),
            "exporter-0/1/00000000000000ab"
        );
    }

    #[test]
    fn the_standby_log_says_who_leads_or_that_the_lease_expired() {
        let now = DateTime::from_millis(10_000);
        let live = doc! {"holder": "pod-a/7/01", "expiresAt": DateTime::from_millis(10_001)};
        assert_eq!(describe_holder(&live, now), "pod-a/7/01");
        let expired = doc! {"holder": "pod-a/7/01", "expiresAt": DateTime::from_millis(9_999)};
        assert_eq!(
            describe_holder(&expired, now),
            "nobody (the lease of pod-a/7/01 expired)"
        );
        assert!(describe_holder(&doc! {}, now).starts_with("unknown"));
        assert_eq!(lease_id("event-exporter"), "leader:event-exporter");
    }
}
