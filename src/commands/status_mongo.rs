//! `event-exporter status` on MongoDB: where the exporter stands, read from the token
//! collection and the health-events collection (read-only), with the exit status of the
//! PostgreSQL report (0 healthy, 1 unhealthy, 2 bad input).
//!
//! **What "behind" means here.** A change-stream resume token is opaque: it cannot be compared
//! with stored documents. The exporter also keeps `lastExportedAt` in the token document (the
//! `createdAt` of the newest event of the delivered prefix), so the events *waiting* are those
//! stored with a later `createdAt`, and the lag is the age of the oldest of them (`now −
//! createdAt`, the reader's clock against the writers'), 0 when none waits. Events written by
//! clocks behind the last exported one can be missed by this count (not by the exporter); it is
//! the datastore's view of `change_stream_lag_seconds`, with no running exporter needed.
//!
//! Who leads: the lease document `leader:<client>` (`crate::datastore::mongo::lease`), when
//! its `expiresAt` is in the future.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Bson, Document};
use serde::Serialize;

use super::status::{
    backfill_status, format_seconds, print_report, run_query, time, Position, Report, StatusArgs,
    StatusError, Verdict,
};
use crate::config::Config;
use crate::datastore::mongo::{decode, load_plan, MongoSettings, StoredToken, TokenStore};
use crate::datastore::DatastoreError;

/// The token document of `exporter.client_name`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MongoTokenStatus {
    /// The stored resume token, as relaxed extended JSON (`{"_data": "…"}`).
    pub resume_token: serde_json::Value,
    /// `createdAt` of the newest exported event (absent in a Go exporter's document).
    pub last_exported_at: Option<DateTime<Utc>>,
    /// The lease epoch of the last write (absent in a Go exporter's document).
    pub leader_epoch: Option<i64>,
}

/// Events stored after the last exported one.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MongoBehindStatus {
    pub waiting_events: u64,
    /// Age in seconds of the oldest waiting event (0 when none waits).
    pub seconds: f64,
    pub oldest_waiting_created_at: Option<DateTime<Utc>>,
}

/// The replica the lease document names while it is valid.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MongoLeaderStatus {
    /// `HOSTNAME/pid/nonce` of the leading exporter.
    pub replica: String,
    pub expires_at: DateTime<Utc>,
    pub epoch: Option<i64>,
}

/// MongoDB's part of the report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MongoPosition {
    pub resume_token: Option<MongoTokenStatus>,
    /// Absent without `lastExportedAt` (no token, or a Go exporter's token).
    pub behind: Option<MongoBehindStatus>,
    pub leader: Option<MongoLeaderStatus>,
}

/// The MongoDB report.
pub type MongoStatus = Report<MongoPosition>;

/// Runs the command on MongoDB: prints the status and returns 0, 1 or 2.
pub fn main(args: &StatusArgs, settings: MongoSettings) -> ExitCode {
    print_report(read(args, settings), args.output)
}

/// Loads the configuration, connects with the exporter's own client options, and queries.
pub fn read(args: &StatusArgs, settings: MongoSettings) -> Result<MongoStatus, StatusError> {
    let config = Config::load(&args.config)?;
    let datastore = settings.describe();
    let query = async {
        let options = settings
            .client_options()
            .await
            .map_err(DatastoreError::MongoSettings)?;
        let client = mongodb::Client::with_options(options).map_err(DatastoreError::Mongo)?;
        let status = query(&client, &settings, &config, datastore.clone(), args).await;
        // No stream is open: the driver's shutdown does not wait on one.
        client.shutdown().await;
        status
    };
    run_query(query, &datastore, args.timeout)
}

async fn query(
    client: &mongodb::Client,
    settings: &MongoSettings,
    config: &Config,
    datastore: String,
    args: &StatusArgs,
) -> Result<MongoStatus, DatastoreError> {
    let database = client.database(&settings.database);
    let tokens = database.collection::<Document>(&settings.token_collection);
    let events = database.collection::<Document>(&settings.collection);
    let client_name = config.client_name.clone();
    let token = TokenStore::new(tokens.clone(), client_name.clone())
        .load()
        .await?
        .and_then(token_status);
    let behind = match token.as_ref().and_then(|t| t.last_exported_at) {
        Some(at) => Some(behind(&events, at).await?),
        None => None,
    };
    let plans = TokenStore::new(tokens.clone(), crate::backfill::record_name(&client_name));
    let backfill = load_plan(&plans)
        .await?
        .map(|plan| backfill_status(&plan, None));
    let lease_id = crate::datastore::mongo::lease::lease_id(&client_name);
    let leader = tokens
        .find_one(doc! {"_id": lease_id})
        .await?
        .and_then(|d| leader_status(&d, Utc::now()));
    let verdict = Verdict {
        config,
        datastore,
        backfill,
        max_behind: args.max_behind,
        has_token: token.is_some(),
        waiting_seconds: behind.as_ref().map(|b| b.seconds),
        change_noun: "event",
    };
    let position = MongoPosition {
        resume_token: token,
        behind,
        leader,
    };
    Ok(Report::new(verdict, position))
}

/// The stored token's fields; `None` when it holds no resume token.
fn token_status(stored: StoredToken) -> Option<MongoTokenStatus> {
    let token = stored.resume_token?;
    Some(MongoTokenStatus {
        resume_token: Bson::Document(token).into_relaxed_extjson(),
        last_exported_at: stored.last_exported_at,
        leader_epoch: stored.leader_epoch,
    })
}

/// Events stored after `last_exported_at`, and the oldest of them.
async fn behind(
    events: &mongodb::Collection<Document>,
    last_exported_at: DateTime<Utc>,
) -> Result<MongoBehindStatus, DatastoreError> {
    let after = doc! {"createdAt": {"$gt": mongodb::bson::DateTime::from_chrono(last_exported_at)}};
    let waiting = events.count_documents(after.clone()).await?;
    let oldest = events
        .find_one(after)
        .sort(doc! {"createdAt": 1, "_id": 1})
        .await?
        .and_then(|d| decode::created_at(&d));
    let seconds = oldest
        .map(|at| {
            Utc::now()
                .signed_duration_since(at)
                .num_milliseconds()
                .max(0) as f64
                / 1000.0
        })
        .unwrap_or(0.0);
    Ok(MongoBehindStatus {
        waiting_events: waiting,
        seconds,
        oldest_waiting_created_at: oldest,
    })
}

/// The lease's holder while it is valid at `now`.
fn leader_status(lease: &Document, now: DateTime<Utc>) -> Option<MongoLeaderStatus> {
    let expires_at = match lease.get("expiresAt") {
        Some(Bson::DateTime(at)) => at.to_chrono(),
        _ => return None,
    };
    (expires_at > now).then(|| MongoLeaderStatus {
        replica: lease.get_str("holder").unwrap_or("unknown").to_string(),
        expires_at,
        epoch: decode::integer(lease, "epoch"),
    })
}

impl Position for MongoPosition {
    fn lines(&self) -> Vec<(&'static str, String)> {
        vec![
            ("resume token", token_text(self.resume_token.as_ref())),
            ("behind", behind_text(self.behind.as_ref())),
            ("leader", leader_text(self.leader.as_ref())),
        ]
    }
}

fn token_text(token: Option<&MongoTokenStatus>) -> String {
    match token {
        Some(token) => format!(
            "{}, last exported event created at {}, lease epoch {}",
            token.resume_token,
            time(token.last_exported_at),
            token
                .leader_epoch
                .map_or_else(|| "-".to_string(), |e| e.to_string())
        ),
        None => "none saved".into(),
    }
}

fn behind_text(behind: Option<&MongoBehindStatus>) -> String {
    match behind {
        Some(b) if b.waiting_events == 0 => "caught up (0 events waiting)".into(),
        Some(b) => format!(
            "{} events waiting; oldest {} ({})",
            b.waiting_events,
            format_seconds(b.seconds),
            time(b.oldest_waiting_created_at)
        ),
        None => "unknown (no lastExportedAt in the token document)".into(),
    }
}

fn leader_text(leader: Option<&MongoLeaderStatus>) -> String {
    match leader {
        Some(l) => format!("{} (lease until {})", l.replica, time(Some(l.expires_at))),
        None => "none: no exporter holds the leadership lease".into(),
    }
}
