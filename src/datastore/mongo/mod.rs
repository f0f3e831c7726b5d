//! NVSentinel's MongoDB datastore (the chart's default): a change stream on inserts into the
//! health-events collection, resumed from upstream's token document
//! `{clientName, resumeToken}` in the token collection.

mod backfill;
pub mod decode;
mod keyset;
pub mod lease;
mod rotation;
pub(crate) mod settings;
mod start;
mod stream;
mod token;

pub(crate) use backfill::load_plan;
pub use keyset::KeysetReader;
pub use settings::{MongoSettings, MongoSettingsError};
pub(crate) use start::start;
pub use stream::{history_lost, ChangeStreamSource, StreamOptions, HISTORY_LOST_CODES};
pub use token::{StoredToken, TokenStore};

/// Whether retrying later can help: a network error, a server selection timeout, a primary
/// stepping down or shutting down, or anything the server labels retryable or resumable — as
/// opposed to bad credentials, a missing collection or a lost change-stream history.
pub fn is_transient(error: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    if error.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
        || error.contains_label("ResumableChangeStreamError")
    {
        return true;
    }
    match error.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. } => true,
        ErrorKind::Command(command) => TRANSIENT_CODES.contains(&command.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteConcernError(concern)) => {
            TRANSIENT_CODES.contains(&concern.code)
        }
        _ => false,
    }
}

/// Server codes of a node that cannot serve now but will (not primary, shutting down,
/// interrupted, host unreachable, network timeout).
const TRANSIENT_CODES: &[i32] = &[
    6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 63, 150, 234, 133,
];

/// What [`open`] hands the pipeline: the change stream (already open, so a backfill misses
/// nothing), the token store, and the backfill to run, if any.
pub type Opened = crate::datastore::start::Feeds<
    ChangeStreamSource,
    TokenStore,
    crate::backfill::PagedBackfill<backfill::Pages>,
    TokenStore,
>;

/// Connects, checks that the collections exist, reads the resume token, opens the change
/// stream and decides the backfill; token writes are fenced with the lease `epoch`. Errors: transient ones (retry) or permanent ones (a
/// missing collection, bad credentials) — see `DatastoreError::is_transient`.
pub async fn open(
    client: &mongodb::Client,
    settings: &MongoSettings,
    config: &crate::config::Config,
    epoch: token::Epoch,
) -> Result<Opened, crate::datastore::DatastoreError> {
    use mongodb::bson::{doc, Document};
    let database = client.database(&settings.database);
    database.run_command(doc! {"ping": 1}).await?;
    let names = database.list_collection_names().await?;
    for (variable, name) in [
        ("MONGODB_COLLECTION_NAME", &settings.collection),
        ("MONGODB_TOKEN_COLLECTION_NAME", &settings.token_collection),
    ] {
        if !names.iter().any(|n| n == name) {
            return Err(crate::datastore::DatastoreError::Schema(format!(
                "database {} has no collection {name:?} ({variable}); NVSentinel's MongoDB \
                 setup job creates it — the exporter never creates collections",
                settings.database
            )));
        }
    }
    let events = database.collection::<Document>(&settings.collection);
    let token_collection = database.collection::<Document>(&settings.token_collection);
    let tokens = std::sync::Arc::new(
        TokenStore::new(token_collection.clone(), config.client_name.clone()).fenced(epoch.clone()),
    );
    let stored = tokens.load().await?.unwrap_or_default();
    let had_token = stored.resume_token.is_some();
    match &stored.resume_token {
        Some(token) => tracing::info!(token = %token, "resuming after the stored resume token"),
        None => tracing::info!("no resume token stored: the change stream starts now"),
    }
    let mut stream = ChangeStreamSource::new(
        events.clone(),
        StreamOptions {
            client_name: config.client_name.clone(),
            max_age: config.backfill.max_age,
            batch_size: config.backfill.batch_size,
        },
        stored.resume_token,
        stored.last_exported_at,
    );
    stream.open().await?;
    let started_at = chrono::Utc::now();
    if !had_token {
        // The stream's start point is saved at once: a restart before any event arrived
        // resumes from here (no gap between this run's start and the next) and finds the
        // unfinished backfill to continue, instead of planning a new one from scratch.
        if let Some(token) = stream.start_token() {
            tokens.set(doc! {"resumeToken": token}).await?;
        }
    }
    let store = std::sync::Arc::new(
        TokenStore::new(
            token_collection,
            crate::backfill::record_name(&config.client_name),
        )
        .fenced(epoch),
    );
    let plan = decide_backfill(&events, &store, config, had_token, started_at).await?;
    let backfill = plan.map(|plan| backfill::open(events, store, plan, &config.backfill));
    Ok(Opened {
        stream,
        checkpoints: tokens,
        had_token,
        backfill,
    })
}

/// A new backfill on a first start (no resume token), the unfinished one after a restart
/// mid-backfill, none otherwise.
async fn decide_backfill(
    events: &mongodb::Collection<mongodb::bson::Document>,
    store: &TokenStore,
    config: &crate::config::Config,
    had_token: bool,
    started_at: chrono::DateTime<chrono::Utc>,
) -> Result<Option<crate::backfill::BackfillPlan>, crate::datastore::DatastoreError> {
    let unfinished = backfill::load_plan(store).await?.filter(|plan| !plan.done);
    if !config.backfill.enabled {
        tracing::info!("backfill disabled in configuration");
        return Ok(None);
    }
    if had_token {
        if let Some(plan) = &unfinished {
            tracing::info!(
                delivered = plan.delivered,
                total = plan.total,
                "resuming the unfinished backfill"
            );
        }
        return Ok(unfinished);
    }
    let plan = backfill::make_plan(events, &config.backfill, started_at).await?;
    crate::backfill::PlanStore::save_plan(store, &plan.to_value()).await?;
    tracing::info!(
        total = plan.total,
        "no resume token: backfilling existing events while streaming new ones"
    );
    Ok(Some(plan))
}
