//! LISTEN on `nvsentinel_changes`. A notification only wakes the reader early: the changelog
//! is the source of truth, so a lost notification or a dropped connection costs latency, never
//! an event.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::{Connector, NOTIFY_CHANNEL};
use crate::reconnect::Backoff;

/// Runs until `shutdown`, reconnecting with the reconnect [`Backoff`] (500 ms doubling to 30 s,
/// back to 500 ms after a connection that listened for `reconnect::HEALTHY_PERIOD`). Every
/// notification, and every (re)connection, wakes the reader.
pub fn spawn_listener(
    connector: Connector,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            let session = listen_once(&connector, &wake, &mut backoff);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = session => {
                    match result {
                        Ok(()) => tracing::warn!("LISTEN connection closed; reconnecting"),
                        Err(error) => tracing::warn!(%error, "LISTEN connection failed; reconnecting"),
                    }
                }
            }
            let wait = backoff.failed(Instant::now());
            tracing::debug!(retry_in = ?wait, "waiting before listening again");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    })
}

/// One LISTEN session; marks `backoff` connected once the LISTEN is in place.
async fn listen_once(
    connector: &Connector,
    wake: &Notify,
    backoff: &mut Backoff,
) -> Result<(), crate::datastore::DatastoreError> {
    let (client, mut connection) = connector.connect_raw().await?;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {NOTIFY_CHANNEL}");
    // The connection must be polled for the LISTEN to complete.
    {
        let listen = client.batch_execute(&statement);
        tokio::pin!(listen);
        loop {
            tokio::select! {
                result = &mut listen => { result?; break; }
                message = messages.next() => match message {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(error.into()),
                    None => return Ok(()),
                }
            }
        }
    }
    tracing::debug!(
        channel = NOTIFY_CHANNEL,
        "listening for changelog notifications"
    );
    backoff.connected(Instant::now());
    wake.notify_one();
    while let Some(message) = messages.next().await {
        match message? {
            AsyncMessage::Notification(_) => wake.notify_one(),
            AsyncMessage::Notice(notice) => tracing::debug!(%notice, "PostgreSQL notice"),
            _ => {}
        }
    }
    // The client lives until here: dropping it would close the connection.
    drop(client);
    Ok(())
}
