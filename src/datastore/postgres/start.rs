//! PostgreSQL start-up: wait for the advisory lock as a standby, read the resume token, open the
//! changelog reader (and LISTEN), plan or resume the backfill.

use std::sync::Arc;

use tokio::sync::Notify;

use super::backfill as pages;
use super::{spawn_listener, ChangelogReader, Connector, PgSettings, StartPoint, TokenStore};
use crate::backfill::{self, BackfillPlan};
use crate::config::{format_go_duration, Config};
use crate::datastore::start::{
    open_patiently, opened_or_give_up, Background, Feeds, Launch, StartError, Startup,
};
use crate::datastore::DatastoreError;
use crate::leader::{Fence, Held};

/// Starts the PostgreSQL backend (see [`crate::datastore::DatastoreSettings::start`]).
pub(crate) async fn start<L: Launch>(
    settings: PgSettings,
    startup: &Startup<'_>,
    launch: &L,
) -> Result<Option<L::Running>, StartError> {
    let config = startup.config;
    let connector = Connector::new(settings).map_err(StartError::Settings)?;
    // Leadership (issue 16): wait as a standby (alive, not ready) until this replica holds the
    // advisory lock; from then on every publish and token write requires a fresh proof.
    startup.status.set_standby(true);
    let key = crate::leadership::lock_key(&config.client_name);
    let Some(leadership) = crate::leader::acquire(&connector, key, startup.shutdown).await else {
        return Ok(None);
    };
    let leadership = Arc::new(leadership);
    let held = Held::start(leadership.clone(), |leadership, stop| async move {
        leadership.keep(stop).await
    });
    let tokens = Arc::new(
        TokenStore::new(connector.clone(), config.client_name.clone())
            .fenced(leadership.fence.clone()),
    );
    let wake = Arc::new(Notify::new());
    let opened = open_patiently(startup.shutdown, || {
        open(&connector, &tokens, config, wake.clone(), &leadership.fence)
    })
    .await;
    let Some(((mut reader, had_token, plan), held)) =
        opened_or_give_up(opened, held, || connector.settings().describe()).await?
    else {
        return Ok(None);
    };
    reader.report_connection(startup.status.datastore_flag());
    let listener = spawn_listener(connector.clone(), wake, startup.shutdown.clone());
    let backfill = plan.map(|plan| {
        let store = Arc::new(backfill_store(&connector, config, &leadership.fence));
        pages::open(store, plan, &config.backfill)
    });
    let feeds = Feeds {
        stream: reader,
        checkpoints: tokens,
        had_token,
        backfill,
    };
    let background = Background {
        listener: Some(listener),
        leadership: held,
    };
    Ok(Some(launch.launch(feeds, background)))
}

/// Where the backfill's plan and progress are kept: a token row named after the client.
fn backfill_store(connector: &Connector, config: &Config, fence: &Arc<Fence>) -> TokenStore {
    TokenStore::new(
        connector.clone(),
        backfill::record_name(&config.client_name),
    )
    .fenced(fence.clone())
}

/// One attempt: checks the schema, reads the resume token, opens the changelog reader and
/// decides the backfill. Returns the reader, whether a token was stored, and the plan.
async fn open(
    connector: &Connector,
    tokens: &TokenStore,
    config: &Config,
    wake: Arc<Notify>,
    fence: &Arc<Fence>,
) -> Result<(ChangelogReader, bool, Option<BackfillPlan>), DatastoreError> {
    // The schema first: a missing table is a clear, final error, not a retry.
    connector.check_schema(&connector.connect().await?).await?;
    let token = tokens.load().await?;
    let start = match &token {
        Some(value) => StartPoint::from_token(tokens.client_name(), value)?,
        None => StartPoint::End,
    };
    if let Some(value) = &token {
        tracing::info!(token = %value, "resuming from the stored resume token");
    }
    // A token ahead of the changelog's head restarts within the backfill window.
    let window = super::reset::ResetWindow {
        max_age: config.backfill.max_age,
        max_events: config.backfill.max_events,
    };
    let reader = ChangelogReader::open_bounded(connector.clone(), start, wake, window).await?;
    let store = backfill_store(connector, config, fence);
    let plan = decide_backfill(&store, config, &reader, token.is_some()).await?;
    Ok((reader, token.is_some(), plan))
}

/// Whether a backfill runs: a new one on a first start (no resume token), the unfinished one
/// after a restart mid-backfill, none otherwise.
async fn decide_backfill(
    store: &TokenStore,
    config: &Config,
    reader: &ChangelogReader,
    had_token: bool,
) -> Result<Option<BackfillPlan>, DatastoreError> {
    let previous = store
        .load()
        .await?
        .and_then(|v| BackfillPlan::from_value(&v));
    let unfinished = previous.filter(|plan| !plan.done);
    if !config.backfill.enabled {
        match unfinished {
            Some(plan) => tracing::warn!(
                delivered = plan.delivered,
                total = plan.total,
                "backfill disabled in configuration; an unfinished backfill is left as it is"
            ),
            None => tracing::info!("backfill disabled in configuration"),
        }
        return Ok(None);
    }
    if had_token {
        return Ok(resume_unfinished(unfinished));
    }
    let Some(start) = reader.fresh_start() else {
        return Ok(None);
    };
    let client = store.connect().await?;
    let plan = pages::make_plan(&client, &config.backfill, start).await?;
    // The plan is saved before the stream can write its token, so a restart either starts
    // afresh or finds this plan.
    store
        .save_value(&serde_json::to_value(&plan).unwrap_or_default())
        .await?;
    tracing::info!(
        total = plan.total,
        max_age = %format_go_duration(config.backfill.max_age),
        max_events = config.backfill.max_events,
        rate_limit = config.backfill.rate_limit,
        "no resume token: backfilling existing events while streaming new ones"
    );
    Ok(Some(plan))
}

/// After a restart with a token: the unfinished backfill continues; a finished one stays done.
fn resume_unfinished(unfinished: Option<BackfillPlan>) -> Option<BackfillPlan> {
    match unfinished {
        Some(plan) => {
            tracing::info!(
                delivered = plan.delivered,
                total = plan.total,
                "resuming the unfinished backfill"
            );
            Some(plan)
        }
        None => {
            tracing::info!("backfill skipped: a resume token exists");
            None
        }
    }
}
