//! MongoDB start-up: build the driver's options (waiting for a CA file that is not mounted yet,
//! but never past SIGTERM), wait for the leadership lease as a standby, then open the change
//! stream and decide the backfill, retrying a datastore that is not reachable yet.

use std::sync::Arc;

use super::MongoSettings;
use crate::datastore::start::{
    open_patiently, opened_or_give_up, Background, Launch, StartError, Startup,
};
use crate::datastore::DatastoreError;
use crate::leader::Held;

/// Starts the MongoDB backend (see [`crate::datastore::DatastoreSettings::start`]).
pub(crate) async fn start<L: Launch>(
    settings: MongoSettings,
    startup: &Startup<'_>,
    launch: &L,
) -> Result<Option<L::Running>, StartError> {
    let Some(client) = client(&settings, startup).await? else {
        return Ok(None);
    };
    // Leadership (issue 16): a standby (alive, not ready) until this replica holds the lease.
    startup.status.set_standby(true);
    let leases = client
        .database(&settings.database)
        .collection::<mongodb::bson::Document>(&settings.token_collection);
    let leadership = super::lease::acquire(leases, &startup.config.client_name, startup.shutdown)
        .await
        .map_err(|source| StartError::Leadership {
            datastore: settings.describe(),
            source,
        })?;
    let Some(leadership) = leadership else {
        return Ok(None);
    };
    let epoch = leadership.epoch();
    let held = Held::start(Arc::new(leadership), |leadership, stop| async move {
        leadership.keep(stop).await
    });
    let opened = open_patiently(startup.shutdown, || {
        super::open(&client, &settings, startup.config, epoch.clone())
    })
    .await;
    let Some((mut feeds, held)) = opened_or_give_up(opened, held, || settings.describe()).await?
    else {
        return Ok(None);
    };
    feeds
        .stream
        .report_connection(startup.status.datastore_flag());
    let background = Background {
        listener: super::rotation::spawn(&settings, startup.shutdown),
        leadership: held,
    };
    Ok(Some(launch.launch(feeds, background)))
}

/// The driver's client. Waiting for the CA file (`CA_CERT_MOUNT_TIMEOUT_TOTAL_SECONDS`) gives up
/// on SIGTERM (`Ok(None)`). Errors are configuration errors (exit status 2).
async fn client(
    settings: &MongoSettings,
    startup: &Startup<'_>,
) -> Result<Option<mongodb::Client>, StartError> {
    let options = tokio::select! {
        _ = startup.shutdown.cancelled() => return Ok(None),
        options = settings.client_options() => options,
    };
    let options = options.map_err(|e| StartError::Settings(DatastoreError::MongoSettings(e)))?;
    mongodb::Client::with_options(options)
        .map(Some)
        .map_err(|source| StartError::Settings(DatastoreError::Mongo(source)))
}
