//! The streaming scenario's writer: live health events written at a target rate while the
//! exporter streams, from several PostgreSQL connections (one backend can use one core; on
//! loopback with NVSentinel's schema — the changelog trigger and the GIN index — one
//! connection tops out well below 10,000 rows/s).
//!
//! The rows are generated before the first tick (building a document costs about as much CPU
//! as the reference sink spends on it; made during the run, that CPU would be taken from
//! PostgreSQL and the exporter on the machine being measured). A pacer then cuts the run into
//! 10 ms ticks and hands the rows due by then (elapsed × rate, less what was handed out) to
//! the connections as batches of at most [`MAX_BATCH`] rows; each connection writes a batch in
//! one multi-row INSERT (autocommit: one statement, one commit).
//! When the connections fall behind, the queue fills, the pacer waits, and the next batches
//! are larger: the writer catches up if PostgreSQL can, and its achieved rate says if not.
//!
//! Invariant: every row's latency is measured from the moment its own INSERT returned (its
//! commit): the INSERT returns the rows' ids and each id is mapped to that moment; a
//! delivered CloudEvent's `id` is its row id.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_exporter::datastore::postgres::{Connector, PgSettings};
use tokio::sync::{mpsc, Mutex};
use tokio_postgres::Client;

use super::error::{datastore, BenchError};
use crate::generate::{self, Generator, RawDocument, Row};
use crate::sink::{nearest_rank, ReceivedEvent};

/// The largest batch one INSERT writes.
pub const MAX_BATCH: u64 = 500;

/// The pacer's tick.
const TICK: Duration = Duration::from_millis(10);

type Stamp = chrono::DateTime<chrono::Utc>;

/// What the writer did.
#[derive(Debug, Default)]
pub struct Written {
    /// Each written row's id (`health_events.id` as text) and when its INSERT returned.
    pub commits: HashMap<String, Stamp>,
    /// From the first tick to the return of the last INSERT.
    pub seconds: f64,
}

impl Written {
    /// Rows written per second over the run.
    pub fn rate(&self) -> f64 {
        self.commits.len() as f64 / self.seconds.max(1e-9)
    }
}

/// Generates `count` live events, then writes them at `rate` events/s through `connections`
/// connections (connected before the first tick). Errors: a connection or an INSERT failed
/// ([`BenchError::Datastore`]), or a connection's task panicked ([`BenchError::Task`]).
pub async fn write_paced(
    settings: PgSettings,
    rate: u64,
    count: u64,
    connections: usize,
) -> Result<Written, BenchError> {
    let connector = Connector::new(settings).map_err(datastore("the writer's connector"))?;
    let mut generator = Generator::new(256, 0.1, Some(2));
    let now = chrono::Utc::now();
    let rows: VecDeque<Row<RawDocument>> = (0..count)
        .map(|_| generator.row(now, None).serialized())
        .collect();
    let (batches, queue) = mpsc::channel::<Vec<Row<RawDocument>>>(connections.max(1));
    let queue = Arc::new(Mutex::new(queue));
    let mut tasks = Vec::new();
    for _ in 0..connections.max(1) {
        let client = connector
            .connect()
            .await
            .map_err(datastore("connecting the writer"))?;
        tasks.push(tokio::spawn(write_batches(client, queue.clone())));
    }
    let started = Instant::now();
    pace(&batches, rows, rate, started).await;
    drop(batches);
    let mut commits = HashMap::with_capacity(count as usize);
    for task in tasks {
        commits.extend(task.await??);
    }
    Ok(Written {
        commits,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Hands out `rows` as batches, elapsed × `rate` of them by each tick; returns when all are
/// handed out (or every connection has stopped).
async fn pace(
    batches: &mpsc::Sender<Vec<Row<RawDocument>>>,
    mut rows: VecDeque<Row<RawDocument>>,
    rate: u64,
    started: Instant,
) {
    let count = rows.len() as u64;
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut handed = 0;
    while handed < count {
        ticks.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(count);
        while handed < due {
            let size = (due - handed).min(MAX_BATCH);
            let batch: Vec<Row<RawDocument>> = rows.drain(..size as usize).collect();
            if batches.send(batch).await.is_err() {
                return;
            }
            handed += size;
        }
    }
}

/// One connection: takes batches from `queue` until it is closed, writes each in one
/// INSERT, and returns each row's id with the moment its INSERT returned.
async fn write_batches(
    client: Client,
    queue: Arc<Mutex<mpsc::Receiver<Vec<Row<RawDocument>>>>>,
) -> Result<Vec<(String, Stamp)>, BenchError> {
    let mut commits = Vec::new();
    loop {
        let next = queue.lock().await.recv().await;
        let Some(rows) = next else {
            return Ok(commits);
        };
        let ids = generate::insert_returning_ids(&client, &rows)
            .await
            .map_err(datastore("the writer's INSERT"))?;
        let committed = chrono::Utc::now();
        commits.extend(ids.into_iter().map(|id| (id, committed)));
    }
}

/// Commit-to-sink latency of the streamed events.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Latency {
    pub p50: Duration,
    pub p99: Duration,
    /// The p99 of the events committed in each second of the run (from the first commit; the
    /// last second may be partial; `None` for a second without commits): whether the slow
    /// events bunch in a few seconds (a stall) or spread over all.
    pub p99_by_second: Vec<Option<Duration>>,
}

/// Commit-to-sink latency: each received event's arrival minus the commit of the row its `id`
/// names; events the writer did not write are left out. `None` when none is left.
pub fn commit_to_sink(
    events: &[ReceivedEvent],
    commits: &HashMap<String, Stamp>,
) -> Option<Latency> {
    let timed: Vec<(Stamp, Duration)> = events
        .iter()
        .filter_map(|received| {
            let committed = commits.get(received.event["id"].as_str()?)?;
            let latency = (received.received_at - *committed)
                .to_std()
                .unwrap_or_default();
            Some((*committed, latency))
        })
        .collect();
    let first = timed.iter().map(|(committed, _)| *committed).min()?;
    let mut seconds: Vec<Vec<Duration>> = Vec::new();
    for (committed, latency) in &timed {
        let second = (*committed - first).num_seconds().max(0) as usize;
        if seconds.len() <= second {
            seconds.resize_with(second + 1, Vec::new);
        }
        if let Some(bucket) = seconds.get_mut(second) {
            bucket.push(*latency);
        }
    }
    let mut all: Vec<Duration> = timed.iter().map(|(_, latency)| *latency).collect();
    all.sort_unstable();
    Some(Latency {
        p50: nearest_rank(&all, 0.50)?,
        p99: nearest_rank(&all, 0.99)?,
        p99_by_second: seconds
            .iter_mut()
            .map(|bucket| {
                bucket.sort_unstable();
                nearest_rank(bucket, 0.99)
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_measured_from_each_rows_commit() {
        let t0 = chrono::Utc::now();
        let ms = chrono::Duration::milliseconds;
        let commits: HashMap<String, Stamp> =
            (0..100).map(|i| (format!("row-{i}"), t0 + ms(i))).collect();
        // Row i arrives i + 1 ms after its commit; an event the writer did not write is
        // left out.
        let mut events: Vec<ReceivedEvent> = (0..100)
            .map(|i| ReceivedEvent {
                received_at: t0 + ms(2 * i + 1),
                event: serde_json::json!({ "id": format!("row-{i}") }),
            })
            .collect();
        events.push(ReceivedEvent {
            received_at: t0 + ms(10_000),
            event: serde_json::json!({ "id": "someone-else" }),
        });
        let latency = commit_to_sink(&events, &commits).expect("latencies");
        assert_eq!(latency.p50, Duration::from_millis(50));
        assert_eq!(latency.p99, Duration::from_millis(99));
        // All 100 rows committed within the first second.
        assert_eq!(latency.p99_by_second, vec![Some(Duration::from_millis(99))]);
        assert_eq!(commit_to_sink(&events[100..], &commits), None);
    }

    #[test]
    fn slow_events_are_placed_in_the_second_they_committed() {
        let t0 = chrono::Utc::now();
        let ms = chrono::Duration::milliseconds;
        // One row every 10 ms for 3 s, 1 ms to the sink, except those committed in the
        // second second: 200 ms; then nothing for a second, then one row.
        let mut commits: HashMap<String, Stamp> = (0..300)
            .map(|i| (format!("row-{i}"), t0 + ms(i * 10)))
            .collect();
        commits.insert("row-300".into(), t0 + ms(4_500));
        let events: Vec<ReceivedEvent> = (0..=300)
            .map(|i| {
                let id = format!("row-{i}");
                let latency = if (100..200).contains(&i) { 200 } else { 1 };
                ReceivedEvent {
                    received_at: commits[&id] + ms(latency),
                    event: serde_json::json!({ "id": id }),
                }
            })
            .collect();
        let latency = commit_to_sink(&events, &commits).expect("latencies");
        assert_eq!(
            latency.p99_by_second,
            vec![
                Some(ms(1).to_std().unwrap()),
                Some(ms(200).to_std().unwrap()),
                Some(ms(1).to_std().unwrap()),
                None,
                Some(ms(1).to_std().unwrap()),
            ]
        );
        assert_eq!(latency.p50, Duration::from_millis(1));
        assert_eq!(latency.p99, Duration::from_millis(200));
    }

    #[test]
    fn written_rate_is_rows_over_seconds() {
        let now = chrono::Utc::now();
        let written = Written {
            commits: (0..50).map(|i| (i.to_string(), now)).collect(),
            seconds: 0.5,
        };
        assert!((written.rate() - 100.0).abs() < 1e-9);
    }
}
