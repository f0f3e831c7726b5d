//! Seeding: the rows an exporter finds at its start (a backlog for the drains, a history for
//! the backfills), written through NVSentinel's schema as platform connectors write them (the
//! changelog trigger fires for every row, the GIN index on `document` is kept up), in
//! batches of [`HISTORY_BATCH`] rows from [`CONNECTIONS`] connections at once.
//!
//! PostgreSQL spends roughly 100–300 µs of CPU per row (measured with psql on the 2-core
//! development machine, under load: the trigger's changelog row and NOTIFY, the GIN index,
//! seven B-tree indexes), and one connection is one backend on one core: the connections let
//! it use every core. Batches are taken in order from one counter, so the
//! rows' physical order still roughly follows `created_at`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_exporter::datastore::postgres::{Connector, PgSettings};

use super::error::{datastore, BenchError};
use crate::generate::{self, Generator, Spread, HISTORY_BATCH};

/// Connections writing at once.
pub const CONNECTIONS: usize = 4;

/// Writes `count` events spread over `history` before now (or at now). Errors: a connection
/// or an INSERT failed ([`BenchError::Datastore`]), or a task panicked.
pub async fn seed(
    settings: PgSettings,
    count: u64,
    history: Option<Duration>,
) -> Result<(), BenchError> {
    let started = Instant::now();
    let connector = Connector::new(settings).map_err(datastore("the seeding connector"))?;
    let spread = Spread::new(count, history);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for connection in 0..CONNECTIONS as u64 {
        let client = connector
            .connect()
            .await
            .map_err(datastore("connecting to seed"))?;
        let generator = Generator::new(256, 0.1, Some(1 + connection));
        let next = next.clone();
        let reports = connection == 0;
        tasks.push(tokio::spawn(async move {
            write_batches(&client, generator, spread, count, &next, reports).await
        }));
    }
    for task in tasks {
        task.await?.map_err(datastore("seeding"))?;
    }
    eprintln!(
        "bench: wrote {count} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Takes the next batch from `next` until all `count` are taken, and writes it; `reports`:
/// prints progress every five seconds.
async fn write_batches(
    client: &tokio_postgres::Client,
    mut generator: Generator,
    spread: Spread,
    count: u64,
    next: &AtomicU64,
    reports: bool,
) -> Result<(), event_exporter::datastore::DatastoreError> {
    let mut last_report = Instant::now();
    loop {
        let start = next.fetch_add(HISTORY_BATCH, Ordering::Relaxed);
        if start >= count {
            return Ok(());
        }
        let rows = spread.rows(&mut generator, start..(start + HISTORY_BATCH).min(count));
        generate::insert(client, &rows).await?;
        if reports && last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("bench: writing events, {start}/{count}");
            last_report = Instant::now();
        }
    }
}
