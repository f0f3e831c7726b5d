//! Gapless reading of `datastore_changelog`, end to end against the exporter binary: changelog
//! ids that become visible out of order (late commits, long and rolled-back transactions,
//! concurrent writers), resume tokens (ours, the Go exporter's, none), crashes, undecodable
//! documents and PostgreSQL restarts.
//!
//! The rule under test is `/work/shared/reference/gapless-changelog.md`: every committed health
//! event is delivered (at least once), and the resume token never moves past a changelog id that
//! is not finished.
//!
//! Hole decisions wait for every transaction that was running when the hole was seen, in the
//! whole PostgreSQL cluster, so tests that hold transactions open slow the others down a little:
//! waits are generous, and assertions never depend on timing except where a test watches the
//! token while a transaction is deliberately held open.

mod support;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use support::cluster::{self, Cluster};
use support::exporter::{Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer};
use tokio_postgres::{Client, GenericClient};

/// Upper bound for every wait on the exporter.
const WAIT: Duration = Duration::from_secs(25);

/// The pipeline's checkpoint interval (`CHECKPOINT_INTERVAL` in src/pipeline/mod.rs).
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Changelog id of the INSERT row of health event `record_id`. Inside the inserting
/// transaction this sees the uncommitted row.
async fn changelog_id<C: GenericClient>(client: &C, record_id: &str) -> i64 {
    client
        .query_one(
            "SELECT id FROM datastore_changelog \
             WHERE record_id::text = $1 AND operation = 'INSERT'",
            &[&record_id],
        )
        .await
        .unwrap_or_else(|e| panic!("changelog id of {record_id}: {e}"))
        .get(0)
}

/// `changed_at` of changelog row `id`.
async fn changed_at<C: GenericClient>(client: &C, id: i64) -> DateTime<Utc> {
    client
        .query_one(
            "SELECT changed_at FROM datastore_changelog WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap_or_else(|e| panic!("changed_at of changelog row {id}: {e}"))
        .get(0)
}

/// The exporter's stored token and its `eventID`, if a token exists.
async fn token(client: &Client) -> Option<(i64, Value)> {
    let value = pg::read_resume_token(client, pg::EXPORTER_CLIENT_NAME).await?;
    let id = value["eventID"]
        .as_i64()
        .unwrap_or_else(|| panic!("token eventID is not an integer: {value}"));
    Some((id, value))
}

/// Waits until the exporter's token exists and its `eventID` satisfies `accept`.
async fn wait_for_token(client: &Client, what: &str, accept: impl Fn(i64) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let current = token(client).await;
        if let Some((id, value)) = &current {
            if accept(*id) {
                return value.clone();
            }
        }
        if Instant::now() > deadline {
            panic!(
                "resume token never became {what} within {WAIT:?}; last: {:?}",
                current.map(|(_, v)| v)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every one of `ids` was accepted by the sink.
async fn wait_for_ids(sink: &SinkServer, ids: &[String]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let accepted: HashSet<String> = sink.accepted_ids().into_iter().collect();
        let missing: Vec<&String> = ids.iter().filter(|id| !accepted.contains(*id)).collect();
        if missing.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{} of {} events not delivered within {WAIT:?} ({} accepted in all); missing: {:?}",
                missing.len(),
                ids.len(),
                accepted.len(),
                &missing[..missing.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `/readyz` answers and its status satisfies `accept`; returns the status.
async fn wait_for_readyz(exporter: &mut Exporter, what: &str, accept: impl Fn(u16) -> bool) -> u16 {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    loop {
        assert!(
            exporter.try_status().is_none(),
            "exporter exited while waiting for /readyz {what}; log:\n{}",
            exporter.log()
        );
        if let Some((status, _)) = exporter.probe("/readyz").await {
            if accept(status) {
                return status;
            }
            last = Some(status);
        }
        if Instant::now() > deadline {
            panic!("/readyz never answered {what} within {WAIT:?}; last answer: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every one of `expected` accepted exactly once, and nothing else.
fn assert_exactly_once(sink: &SinkServer, expected: &[String]) {
    let mut accepted = sink.accepted_ids();
    accepted.sort();
    let mut expected = expected.to_vec();
    expected.sort();
    if accepted == expected {
        return;
    }
    let got: BTreeSet<&String> = accepted.iter().collect();
    let want: BTreeSet<&String> = expected.iter().collect();
    let missing: Vec<&&String> = want.difference(&got).collect();
    let unexpected: Vec<&&String> = got.difference(&want).collect();
    panic!(
        "every event exactly once, and nothing else: {} expected, {} accepted; {} never \
         delivered {:?}; {} not expected {:?}; {} duplicates",
        expected.len(),
        accepted.len(),
        missing.len(),
        &missing[..missing.len().min(5)],
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)],
        accepted.len() - got.len()
    );
}

/// Whether every one of `ids` is accepted within `timeout` (no panic).
async fn delivered_within(sink: &SinkServer, ids: &[String], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let accepted: HashSet<String> = sink.accepted_ids().into_iter().collect();
        if ids.iter().all(|id| accepted.contains(id)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn doc(node: &str, i: u32) -> Value {
    pg::health_event_doc(node, i)
}

/// Whether `line` has the field `changelog_id=<id>` (not a longer number starting with it).
fn names_changelog_id(line: &str, id: i64) -> bool {
    let needle = format!("changelog_id={id}");
    line.match_indices(&needle).any(|(at, _)| {
        !line[at + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

async fn start_exporter(sink: &SinkServer, db: &TestDb) -> Exporter {
    Exporter::start(&ExporterOptions::new(sink, None, db.env())).await
}

async fn stop_cleanly(exporter: &mut Exporter) {
    let status = exporter.terminate().await;
    assert_eq!(status.code(), Some(0), "log:\n{}", exporter.log());
}

// ---------------------------------------------------------------------------------------------
// 1-4: ids that become visible out of order
// ---------------------------------------------------------------------------------------------

/// Transaction A takes the smaller changelog id and commits after B: B goes out at once, the
/// token waits below A, and A is delivered once it commits.
#[tokio::test]
async fn late_commit_below_a_delivered_row_is_delivered_and_holds_the_token_back() {
    let db = TestDb::create().await;
    let observer = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = start_exporter(&sink, &db).await;

    // A first event moves the token, so "the token did not move past A" below cannot be
    // satisfied by a token that is never written.
    let first = pg::insert_health_event(&observer, &doc("node-warm", 0)).await;
    let first_id = changelog_id(&observer, &first).await;
    wait_for_ids(&sink, std::slice::from_ref(&first)).await;
    wait_for_token(&observer, &format!(">= {first_id}"), |id| id >= first_id).await;

    let mut a_conn = db.client().await;
    let a = a_conn.transaction().await.expect("BEGIN A");
    let a_record = pg::insert_health_event(&a, &doc("node-a", 1)).await;
    let a_id = changelog_id(&a, &a_record).await;
    let b_record = pg::insert_health_event(&observer, &doc("node-b", 2)).await;
    let b_id = changelog_id(&observer, &b_record).await;
    assert!(a_id < b_id, "A must hold the smaller id ({a_id} vs {b_id})");

    wait_for_ids(&sink, std::slice::from_ref(&b_record)).await;
    assert!(
        !sink.accepted_ids().contains(&a_record),
        "A's row is not committed and cannot have been delivered"
    );
    // Longer than one checkpoint interval: the token must stay below A's id all along.
    let watch_until = Instant::now() + CHECKPOINT_INTERVAL + Duration::from_millis(600);
    let mut samples = 0;
    while Instant::now() < watch_until {
        let (id, value) = token(&observer).await.expect("token written");
        assert!(
            (first_id..a_id).contains(&id),
            "token must stay in [{first_id}, {a_id}) while A is open: {value}"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(samples >= 10, "token sampled only {samples} times");

    a.commit().await.expect("COMMIT A");
    wait_for_ids(&sink, std::slice::from_ref(&a_record)).await;
    wait_for_token(&observer, &format!(">= {b_id}"), |id| id >= b_id).await;
    assert_exactly_once(&sink, &[first, a_record, b_record]);
    stop_cleanly(&mut exporter).await;
}

/// A transaction held open for ~3 s while 20 later inserts commit: the 20 go out while it is
/// open, the token never passes it, and all 21 are delivered exactly once.
#[tokio::test]
async fn long_open_transaction_holds_only_the_token_never_delivery() {
    const LATER: u32 = 20;
    const HOLD: Duration = Duration::from_secs(3);
    let db = TestDb::create().await;
    let observer = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = start_exporter(&sink, &db).await;
    // Without a token the first checkpoint is written one interval after start.
    wait_for_token(&observer, "written", |_| true).await;

    let mut long_conn = db.client().await;
    let long = long_conn.transaction().await.expect("BEGIN");
    let long_record = pg::insert_health_event(&long, &doc("node-long", 0)).await;
    let long_id = changelog_id(&long, &long_record).await;
    let opened = Instant::now();

    let mut later = Vec::new();
    let mut samples = 0;
    let check_token = async |samples: &mut u32| {
        let (id, value) = token(&observer).await.expect("token written");
        assert!(
            id < long_id,
            "token passed the open transaction's id {long_id}: {value}"
        );
        *samples += 1;
    };
    for i in 1..=LATER {
        later.push(pg::insert_health_event(&observer, &doc("node-later", i)).await);
        check_token(&mut samples).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_ids(&sink, &later).await;
    assert!(
        !sink.accepted_ids().contains(&long_record),
        "the open transaction's row cannot have been delivered"
    );
    while opened.elapsed() < HOLD {
        check_token(&mut samples).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(samples >= 25, "token sampled only {samples} times");

    long.commit().await.expect("COMMIT");
    let max_id = pg::changelog_max_id(&observer).await;
    wait_for_token(&observer, &format!("== {max_id}"), |id| id == max_id).await;
    later.push(long_record);
    assert_exactly_once(&sink, &later);
    stop_cleanly(&mut exporter).await;
}

/// An insert rolled back between committed ones is never delivered, and the token passes its
/// id once the rollback happened.
#[tokio::test]
async fn rolled_back_insert_is_never_delivered_and_the_token_passes_it() {
    let db = TestDb::create().await;
    let observer = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = start_exporter(&sink, &db).await;
    wait_for_token(&observer, "written", |_| true).await;

    let e1 = pg::insert_health_event(&observer, &doc("node-r", 1)).await;
    let mut r_conn = db.client().await;
    let r = r_conn.transaction().await.expect("BEGIN");
    let r_record = pg::insert_health_event(&r, &doc("node-r", 2)).await;
    let r_id = changelog_id(&r, &r_record).await;
    let e2 = pg::insert_health_event(&observer, &doc("node-r", 3)).await;
    wait_for_ids(&sink, &[e1.clone(), e2.clone()]).await;
    let (held, value) = token(&observer).await.expect("token written");
    assert!(held < r_id, "token passed the open insert {r_id}: {value}");

    r.rollback().await.expect("ROLLBACK");
    let e3 = pg::insert_health_event(&observer, &doc("node-r", 4)).await;
    wait_for_ids(&sink, std::slice::from_ref(&e3)).await;
    let max_id = pg::changelog_max_id(&observer).await;
    assert!(max_id > r_id);
    // Every id up to max is finished: nothing else can still be on its way.
    wait_for_token(&observer, &format!("== {max_id}"), |id| id == max_id).await;
    assert!(!sink.accepted_ids().contains(&r_record));
    assert_exactly_once(&sink, &[e1, e2, e3]);
    stop_cleanly(&mut exporter).await;
}

/// The hole's owner has the *newer* transaction id: B takes an xid first, A then inserts
/// (smaller changelog id), B inserts and commits while A stays open. The snapshot after B's
/// commit has `xmin = xmax = A's xid` and an empty `xip` (xids >= xmax are never listed), so a
/// check `xmin(now) >= xmax(when the hole was seen)` is already true while A is running.
/// A's row must still be waited for, and delivered when A commits.
///
/// Runs on a throwaway cluster so that no other transaction completes in between (which would
/// push `xmax` past A's xid and hide the problem).
#[tokio::test]
async fn hole_of_a_transaction_newer_than_the_committer_is_not_decided_early() {
    cluster::require();
    let cluster = Cluster::start(None);
    let db = TestDb::create_on("127.0.0.1", cluster.port()).await;
    let observer = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = start_exporter(&sink, &db).await;
    // The first token write is a transaction too: let it happen before the setup.
    wait_for_token(&observer, "written", |_| true).await;

    let mut b_conn = db.client().await;
    let b = b_conn.transaction().await.expect("BEGIN B");
    let b_xid: String = b
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .expect("B xid")
        .get(0);
    let mut a_conn = db.client().await;
    let a = a_conn.transaction().await.expect("BEGIN A");
    let a_record = pg::insert_health_event(&a, &doc("node-a", 1)).await;
    let a_id = changelog_id(&a, &a_record).await;
    let a_xid: String = a
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .expect("A xid")
        .get(0);
    let b_record = pg::insert_health_event(&b, &doc("node-b", 2)).await;
    let b_id = changelog_id(&b, &b_record).await;
    b.commit().await.expect("COMMIT B");
    assert!(a_id < b_id, "A must hold the smaller changelog id");
    let snapshot: String = observer
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .expect("snapshot")
        .get(0);

    wait_for_ids(&sink, std::slice::from_ref(&b_record)).await;
    let watch_until = Instant::now() + CHECKPOINT_INTERVAL + Duration::from_millis(600);
    let mut passed = None;
    while Instant::now() < watch_until && passed.is_none() {
        let (id, value) = token(&observer).await.expect("token written");
        if id >= a_id {
            passed = Some(value);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.commit().await.expect("COMMIT A");
    let delivered = delivered_within(&sink, std::slice::from_ref(&a_record), WAIT).await;
    assert!(
        passed.is_none() && delivered,
        "B xid {b_xid} (changelog id {b_id}) committed while A xid {a_xid} (changelog id \
         {a_id}) was open; snapshot then {snapshot}. Token while A was open: {passed:?} \
         (must stay below {a_id}); A delivered after its commit: {delivered}"
    );
    let max_id = pg::changelog_max_id(&observer).await;
    wait_for_token(&observer, &format!("== {max_id}"), |id| id == max_id).await;
    assert_exactly_once(&sink, &[a_record, b_record]);
    stop_cleanly(&mut exporter).await;
}

/// A row that commits late is delivered as soon as it is visible, even while an unrelated,
/// older transaction keeps its hole undecided; the token passes it once it is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_is_delivered_while_an_older_unrelated_transaction_stays_open() {
    cluster::require();
    let cluster = Cluster::start(None);
    let db = TestDb::create_on("127.0.0.1", cluster.port()).await;
    let observer = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = start_exporter(&sink, &db).await;
    wait_for_token(&observer, "written", |_| true).await;

    // An old transaction with a transaction id, touching nothing the exporter reads.
    let mut old_conn = db.client().await;
    let old = old_conn.transaction().await.expect("BEGIN old");
    old.query_one("SELECT pg_current_xact_id()", &[])
        .await
        .expect("old xid");

    let mut a_conn = db.client().await;
    let a = a_conn.transaction().await.expect("BEGIN A");
    let a_record = pg::insert_health_event(&a, &doc("node-a", 1)).await;
    let b_record = pg::insert_health_event(&observer, &doc("node-b", 2)).await;
    wait_for_ids(&sink, std::slice::from_ref(&b_record)).await;
    a.commit().await.expect("COMMIT A");

    // The old transaction is still open: A must not wait for it.
    assert!(
        delivered_within(
            &sink,
            std::slice::from_ref(&a_record),
            Duration::from_secs(5)
        )
        .await,
        "A was not delivered while an unrelated older transaction stayed open"
    );
    let max_id = pg::changelog_max_id(&observer).await;
    wait_for_token(
        &observer,
        &format!("== {max_id} with the old transaction open"),
        |id| id == max_id,
    )
    .await;
    old.rollback().await.expect("ROLLBACK old");
    assert_exactly_once(&sink, &[a_record, b_record]);
    stop_cleanly(&mut exporter).await;
}

/// 8 writers on their own connections, small transactions (some with 2-3 inserts) with random
/// tiny delays inside and between them: 400 events, each delivered exactly once, and after a
/// clean stop the token is at the changelog's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_are_delivered_exactly_once() {
    const WRITERS: u32 = 8;
    const PER_WRITER: u32 = 50;
    let db = TestDb::create().await;
    let observer = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = start_exporter(&sink, &db).await;
    wait_for_token(&observer, "written", |_| true).await;

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = db.client().await;
        writers.push(tokio::spawn(async move {
            let node = format!("node-w{w}");
            let mut written = Vec::new();
            let mut multi = 0;
            let mut i = 0;
            while i < PER_WRITER {
                let size = if fastrand::u8(..4) == 0 {
                    fastrand::u32(2..=3)
                } else {
                    1
                }
                .min(PER_WRITER - i);
                multi += u32::from(size > 1);
                let tx = client.transaction().await.expect("BEGIN");
                for _ in 0..size {
                    written.push(pg::insert_health_event(&tx, &doc(&node, i)).await);
                    i += 1;
                    if fastrand::bool() {
                        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..3))).await;
                    }
                }
                tx.commit().await.expect("COMMIT");
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..4))).await;
            }
            (written, multi)
        }));
    }
    let mut written = Vec::new();
    let mut multi = 0;
    for writer in writers {
        let (ids, m) = writer.await.expect("writer task");
        written.extend(ids);
        multi += m;
    }
    assert_eq!(written.len(), (WRITERS * PER_WRITER) as usize);
    assert!(multi > 0, "some transactions must hold several inserts");

    // Once the token is at the end, every position is finished: the set is final.
    let max_id = pg::changelog_max_id(&observer).await;
    wait_for_token(&observer, &format!("== {max_id}"), |id| id == max_id).await;
    assert_exactly_once(&sink, &written);
    stop_cleanly(&mut exporter).await;
    let (id, value) = token(&observer).await.expect("token written");
    assert_eq!(id, max_id, "token after a clean stop: {value}");
}

// ---------------------------------------------------------------------------------------------
// 5: kill -9
// ---------------------------------------------------------------------------------------------

const KILL_WORKERS: usize = 4;
const KILL_LATENCY: Duration = Duration::from_millis(100);
const KILL_EVENTS: u32 = 200;

/// What one kill -9 run measured.
struct KillRun {
    accepted_at_kill: usize,
    token_at_kill: i64,
    duplicates: usize,
}

/// Starts the exporter (workers 4, sink latency 100 ms), inserts `KILL_EVENTS` events in one
/// burst, SIGKILLs it once `kill_after` were accepted, restarts it and waits for everything.
/// Asserts no loss, and that nothing at or below the token the crash left was sent again.
async fn kill_9_run(kill_after: usize) -> KillRun {
    let db = TestDb::create().await;
    let mut observer = db.client().await;
    let sink = SinkServer::answering_after(KILL_LATENCY).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.workers = KILL_WORKERS;
    let mut exporter = Exporter::start(&options).await;
    // Where a restart would begin if the crash came before any event finished.
    wait_for_token(&observer, "written", |_| true).await;

    // One burst: the exporter finds all of it in one read.
    let tx = observer.transaction().await.expect("BEGIN");
    let mut written = Vec::new();
    for i in 0..KILL_EVENTS {
        written.push(pg::insert_health_event(&tx, &doc("node-k", i)).await);
    }
    tx.commit().await.expect("COMMIT");

    sink.wait_for_accepted(kill_after, WAIT).await;
    exporter.kill();
    let accepted_at_kill = sink.accepted().len();
    let (token_at_kill, _) = token(&observer).await.expect("token written");

    let mut exporter = Exporter::start(&options).await;
    wait_for_ids(&sink, &written).await;
    let max_id = pg::changelog_max_id(&observer).await;
    wait_for_token(&observer, &format!("== {max_id}"), |id| id == max_id).await;
    stop_cleanly(&mut exporter).await;

    let accepted = sink.accepted_ids();
    let unique: BTreeSet<&String> = accepted.iter().collect();
    let expected: BTreeSet<&String> = written.iter().collect();
    assert_eq!(unique, expected, "every event delivered, nothing else");
    let duplicates = accepted.len() - unique.len();

    // The restart resumed after the token: nothing at or below it was sent twice.
    let mut seen = HashSet::new();
    for id in &accepted {
        if !seen.insert(id) {
            let position = changelog_id(&observer, id).await;
            assert!(
                position > token_at_kill,
                "event {id} (changelog id {position}) was sent again although the token \
                 at the crash ({token_at_kill}) covered it"
            );
        }
    }
    eprintln!(
        "kill -9 after >= {kill_after} accepted: {accepted_at_kill} accepted at kill, token \
         at kill {token_at_kill}, {} accepted in all, {duplicates} duplicates",
        accepted.len()
    );
    KillRun {
        accepted_at_kill,
        token_at_kill,
        duplicates,
    }
}

/// The redelivery bound after a crash: events in flight (accepted by the sink, not yet
/// recorded) + events finished out of order above an unfinished one + what the sink accepts
/// in one checkpoint interval at this rate + a margin for save latency and scheduling.
fn kill_9_duplicate_bound() -> usize {
    let rate_per_interval = (KILL_WORKERS as f64 * CHECKPOINT_INTERVAL.as_secs_f64()
        / KILL_LATENCY.as_secs_f64())
    .ceil() as usize;
    KILL_WORKERS + KILL_WORKERS + rate_per_interval + 10
}

/// SIGKILL mid-stream: after a restart every event is delivered, duplicates are only events
/// above the token the crash left (at most those accepted before the kill, plus the in-flight).
#[tokio::test]
async fn kill_9_mid_stream_loses_nothing_and_resumes_from_the_token() {
    let run = kill_9_run(40).await;
    assert!(
        run.duplicates <= run.accepted_at_kill + KILL_WORKERS,
        "{} duplicates, but only {} events were accepted before the kill",
        run.duplicates,
        run.accepted_at_kill
    );
}

/// SIGKILL well into a burst: with a checkpoint every second, a crash re-sends at most about one
/// interval's worth of events. Killed after 120 accepted (three intervals at 40 events/s).
#[tokio::test]
async fn kill_9_redelivers_at_most_one_checkpoint_interval_of_events() {
    let bound = kill_9_duplicate_bound();
    let run = kill_9_run(120).await;
    assert!(
        run.duplicates <= bound,
        "{} duplicates after kill -9 (token at kill {}, {} accepted before it); bound with \
         {KILL_WORKERS} workers, {KILL_LATENCY:?} per event and a {CHECKPOINT_INTERVAL:?} \
         checkpoint interval: {bound}",
        run.duplicates,
        run.token_at_kill,
        run.accepted_at_kill
    );
}

// ---------------------------------------------------------------------------------------------
// 6-7: where reading starts
// ---------------------------------------------------------------------------------------------

/// Inserts 10 events with no exporter running, stores `token_for(changelog id of the 5th,
/// its changed_at)` for `event-exporter`, starts the exporter: exactly events 6..10 go out.
/// After a clean stop the token is ours: contiguous, at the changelog's end, with that row's
/// `changed_at` as its timestamp.
async fn takes_over_a_token(token_for: impl Fn(i64, DateTime<Utc>) -> Value) {
    let db = TestDb::create().await;
    let observer = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;

    let mut written = Vec::new();
    for i in 1..=10 {
        written.push(pg::insert_health_event(&observer, &doc("node-t", i)).await);
    }
    let fifth_id = changelog_id(&observer, &written[4]).await;
    let fifth_time = changed_at(&observer, fifth_id).await;
    let upstream = token_for(fifth_id, fifth_time);
    pg::write_resume_token(&observer, pg::EXPORTER_CLIENT_NAME, &upstream).await;

    let mut exporter = start_exporter(&sink, &db).await;
    let after = written[5..].to_vec();
    wait_for_ids(&sink, &after).await;
    let max_id = pg::changelog_max_id(&observer).await;
    wait_for_token(&observer, &format!("== {max_id}"), |id| id == max_id).await;
    assert_exactly_once(&sink, &after);

    stop_cleanly(&mut exporter).await;
    let (id, value) = token(&observer).await.expect("token");
    assert_eq!(id, max_id, "{value}");
    assert_eq!(value["contiguous"], json!(true), "{value}");
    let stamp = value["timestamp"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .unwrap_or_else(|| panic!("token timestamp is not RFC 3339: {value}"));
    assert_eq!(
        stamp,
        changed_at(&observer, max_id).await,
        "token timestamp is the last row's changed_at (upstream keyset): {value}"
    );
}

/// Upstream's `{"timestamp": "<RFC3339Nano changed_at>", "eventID": N}`.
#[tokio::test]
async fn takes_over_the_go_exporters_keyset_token() {
    takes_over_a_token(|id, time| json!({"timestamp": pg::rfc3339_nano(time), "eventID": id}))
        .await;
}

/// Upstream's older `{"eventID": N}`.
#[tokio::test]
async fn takes_over_the_go_exporters_id_only_token() {
    takes_over_a_token(|id, _| json!({"eventID": id})).await;
}

/// A Go keyset token where `(changed_at, id)` order and id order disagree: X began before Y
/// but inserted after it, so X has the larger id and the earlier `changed_at`. Go exports in
/// `(changed_at, id)` order, so its token at X means X was exported and Y was not.
#[tokio::test]
async fn keyset_takeover_follows_upstream_order_not_id_order() {
    let db = TestDb::create().await;
    let observer = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;

    let before = pg::insert_health_event(&observer, &doc("node-k", 0)).await;
    let mut x_conn = db.client().await;
    let x = x_conn.transaction().await.expect("BEGIN X");
    // Fix X's transaction start (its changed_at) before Y runs.
    x.batch_execute("SELECT now()").await.expect("start X");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let y = pg::insert_health_event(&observer, &doc("node-k", 1)).await;
    let x_record = pg::insert_health_event(&x, &doc("node-k", 2)).await;
    x.commit().await.expect("COMMIT X");
    let (y_id, x_id) = (
        changelog_id(&observer, &y).await,
        changelog_id(&observer, &x_record).await,
    );
    let (y_time, x_time) = (
        changed_at(&observer, y_id).await,
        changed_at(&observer, x_id).await,
    );
    assert!(
        y_id < x_id && x_time < y_time,
        "setup: Y ({y_id}, {y_time}) X ({x_id}, {x_time})"
    );
    let upstream = json!({"timestamp": pg::rfc3339_nano(x_time), "eventID": x_id});
    pg::write_resume_token(&observer, pg::EXPORTER_CLIENT_NAME, &upstream).await;

    let mut exporter = start_exporter(&sink, &db).await;
    let after = pg::insert_health_event(&observer, &doc("node-k", 3)).await;
    let max_id = pg::changelog_max_id(&observer).await;
    wait_for_ids(&sink, &[y.clone(), after.clone()]).await;
    wait_for_token(&observer, &format!("== {max_id}"), |id| id == max_id).await;
    assert!(!sink.accepted_ids().contains(&before));
    assert_exactly_once(&sink, &[y, after]);
    stop_cleanly(&mut exporter).await;
}

/// No token on first start: what was committed before is not exported, what comes after is,
/// and the first token is written at the changelog's end.
#[tokio::test]
async fn without_a_token_only_events_after_start_are_exported() {
    let db = TestDb::create().await;
    let observer = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;

    let mut before = Vec::new();
    for i in 0..5 {
        before.push(pg::insert_health_event(&observer, &doc("node-old", i)).await);
    }
    let end = pg::changelog_max_id(&observer).await;
    assert!(pg::read_resume_token(&observer, pg::EXPORTER_CLIENT_NAME)
        .await
        .is_none());

    let mut exporter = start_exporter(&sink, &db).await;
    wait_for_token(&observer, &format!("== {end}"), |id| id == end).await;
    let mut after = Vec::new();
    for i in 0..5 {
        after.push(pg::insert_health_event(&observer, &doc("node-new", i)).await);
    }
    wait_for_ids(&sink, &after).await;
    let max_id = pg::changelog_max_id(&observer).await;
    wait_for_token(&observer, &format!("== {max_id}"), |id| id == max_id).await;
    let accepted = sink.accepted_ids();
    for id in &before {
        assert!(
            !accepted.contains(id),
            "event {id} predates the first start"
        );
    }
    assert_exactly_once(&sink, &after);
    stop_cleanly(&mut exporter).await;
}

/// No token, but a transaction that took a changelog id before the first start commits after
/// it: its row was not visible at start, so it is new and is exported (below a row that was
/// visible and is not).
#[tokio::test]
async fn without_a_token_a_transaction_open_at_start_is_exported_when_it_commits() {
    let db = TestDb::create().await;
    let observer = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;

    let mut open_conn = db.client().await;
    let open = open_conn.transaction().await.expect("BEGIN");
    let open_record = pg::insert_health_event(&open, &doc("node-o", 0)).await;
    let open_id = changelog_id(&open, &open_record).await;
    let visible = pg::insert_health_event(&observer, &doc("node-o", 1)).await;
    let visible_id = changelog_id(&observer, &visible).await;
    assert!(open_id < visible_id);

    let mut exporter = start_exporter(&sink, &db).await;
    let after = pg::insert_health_event(&observer, &doc("node-o", 2)).await;
    wait_for_ids(&sink, std::slice::from_ref(&after)).await;
    // The first token is written one interval after start; it must stay below the open id.
    wait_for_token(&observer, "written", |_| true).await;
    let (held, value) = token(&observer).await.expect("token written");
    assert!(held < open_id, "token passed the open transaction: {value}");

    open.commit().await.expect("COMMIT");
    wait_for_ids(&sink, std::slice::from_ref(&open_record)).await;
    let max_id = pg::changelog_max_id(&observer).await;
    wait_for_token(&observer, &format!("== {max_id}"), |id| id == max_id).await;
    assert_exactly_once(&sink, &[open_record, after]);
    stop_cleanly(&mut exporter).await;
}

// ---------------------------------------------------------------------------------------------
// 8-9: bad rows and a datastore outage
// ---------------------------------------------------------------------------------------------

/// Undecodable documents between good ones are passed over: not delivered, logged with their
/// changelog id, the token moves past them, and the exporter keeps running.
#[tokio::test]
async fn malformed_documents_are_logged_skipped_and_passed_over() {
    let db = TestDb::create().await;
    let observer = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = start_exporter(&sink, &db).await;
    wait_for_token(&observer, "written", |_| true).await;

    let good1 = pg::insert_health_event(&observer, &doc("node-m", 1)).await;
    let mut not_a_bool = doc("node-m", 2);
    not_a_bool["healthevent"]["isFatal"] = json!("yes");
    let bad1 = pg::insert_health_event(&observer, &not_a_bool).await;
    let mut not_an_object = doc("node-m", 3);
    not_an_object["healthevent"] = json!("GPU fell off the bus");
    let bad2 = pg::insert_health_event(&observer, &not_an_object).await;
    let good2 = pg::insert_health_event(&observer, &doc("node-m", 4)).await;
    let bad_ids = [
        changelog_id(&observer, &bad1).await,
        changelog_id(&observer, &bad2).await,
    ];

    wait_for_ids(&sink, &[good1.clone(), good2.clone()]).await;
    let max_id = pg::changelog_max_id(&observer).await;
    wait_for_token(&observer, &format!("== {max_id}"), |id| id == max_id).await;
    assert!(
        exporter.try_status().is_none(),
        "exporter stopped; log:\n{}",
        exporter.log()
    );
    let log = exporter.log();
    for id in bad_ids {
        assert!(
            log.lines()
                .any(|line| line.contains("WARN") && names_changelog_id(line, id)),
            "no warning names changelog_id={id}; log:\n{log}"
        );
    }

    // Still streaming.
    let good3 = pg::insert_health_event(&observer, &doc("node-m", 5)).await;
    wait_for_ids(&sink, std::slice::from_ref(&good3)).await;
    let accepted = sink.accepted_ids();
    assert!(!accepted.contains(&bad1) && !accepted.contains(&bad2));
    assert_exactly_once(&sink, &[good1, good2, good3]);
    stop_cleanly(&mut exporter).await;
}

/// PostgreSQL stops under the running exporter: `/readyz` answers non-200 while it is down and
/// 200 once it is back, the exporter keeps running, and events before and after are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restart_under_the_exporter() {
    cluster::require();
    let cluster = Cluster::start(None);
    let db = TestDb::create_on("127.0.0.1", cluster.port()).await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = start_exporter(&sink, &db).await;

    let mut written = Vec::new();
    {
        let client = db.client().await;
        for i in 0..5 {
            written.push(pg::insert_health_event(&client, &doc("node-p", i)).await);
        }
        wait_for_ids(&sink, &written).await;
    }

    tokio::task::block_in_place(|| cluster.stop());
    let down = wait_for_readyz(&mut exporter, "non-200 while PostgreSQL is down", |s| {
        s != 200
    })
    .await;
    assert_eq!(down, 503);
    tokio::task::block_in_place(|| cluster.start_again());
    wait_for_readyz(&mut exporter, "200 after PostgreSQL is back", |s| s == 200).await;

    let client = db.client().await;
    for i in 5..10 {
        written.push(pg::insert_health_event(&client, &doc("node-p", i)).await);
    }
    wait_for_ids(&sink, &written).await;
    let max_id = pg::changelog_max_id(&client).await;
    wait_for_token(&client, &format!("== {max_id}"), |id| id == max_id).await;
    let accepted = sink.accepted_ids();
    let unique: BTreeSet<&String> = accepted.iter().collect();
    assert_eq!(unique, written.iter().collect::<BTreeSet<_>>());
    eprintln!(
        "PostgreSQL restart: {} accepted for {} events",
        accepted.len(),
        written.len()
    );
    stop_cleanly(&mut exporter).await;
}

#[test]
fn log_field_matching_is_exact() {
    assert!(names_changelog_id(
        "WARN x: skipping changelog_id=5 record_id=a",
        5
    ));
    assert!(names_changelog_id("changelog_id=5", 5));
    assert!(!names_changelog_id("changelog_id=50 record_id=a", 5));
    assert!(names_changelog_id("changelog_id=50 changelog_id=5", 5));
}

// ---------------------------------------------------------------------------------------------
// 6: the poll's statements on a long changelog
// ---------------------------------------------------------------------------------------------

/// Rows of a long changelog: enough that a plan walking it shows, written straight into the
/// table (no trigger needed for a plan).
const LONG_CHANGELOG: i64 = 50_000;

/// A database whose changelog holds [`LONG_CHANGELOG`] rows, with a session that plans
/// prepared statements generically (the plan the reader's prepared statements settle on after
/// their first executions). `analyzed`: statistics as autovacuum leaves them; else none since
/// the table was empty, as on a fresh install that fills faster than autovacuum looks (the
/// case that walked the whole changelog), with autovacuum off for the table so that it stays
/// so during the test.
async fn long_changelog(analyzed: bool) -> (TestDb, Client) {
    let db = TestDb::create().await;
    let client = db.client().await;
    let (before, after) = if analyzed {
        ("", "ANALYZE datastore_changelog;")
    } else {
        (
            "ALTER TABLE datastore_changelog SET (autovacuum_enabled = false);",
            "",
        )
    };
    client
        .batch_execute(&format!(
            "{before} \
             INSERT INTO datastore_changelog (table_name, record_id, operation, new_values) \
             SELECT 'health_events', gen_random_uuid(), 'INSERT', \
                    jsonb_build_object('document', jsonb_build_object('i', i)) \
             FROM generate_series(1, {LONG_CHANGELOG}) AS i; \
             {after} \
             SET plan_cache_mode = force_generic_plan;"
        ))
        .await
        .expect("filling the changelog");
    (db, client)
}

/// How many changelog rows the executed plan produced or threw away, summed over its nodes
/// and loops: the rows it touched, whatever the plan's shape. (EXPLAIN gives a node's rows
/// per loop, rounded: the sum may be off by up to half a row per loop.)
fn changelog_rows_touched(plan: &Value) -> f64 {
    let loops = plan["Actual Loops"].as_f64().unwrap_or(1.0);
    let mut touched = 0.0;
    if plan["Relation Name"] == "datastore_changelog" {
        touched += plan["Actual Rows"].as_f64().unwrap_or(0.0) * loops;
        touched += plan["Rows Removed by Filter"].as_f64().unwrap_or(0.0);
    }
    // A join that tests each pair against a condition: rows of the changelog it walked.
    touched += plan["Rows Removed by Join Filter"].as_f64().unwrap_or(0.0);
    for child in plan["Plans"].as_array().into_iter().flatten() {
        touched += changelog_rows_touched(child);
    }
    touched
}

/// `EXPLAIN (ANALYZE, FORMAT JSON)` of the prepared `statement` executed with `arguments`
/// (SQL literals): the plan's root node.
async fn executed_plan(client: &Client, statement: &str, arguments: &str) -> Value {
    client
        .batch_execute(&format!("DEALLOCATE ALL; PREPARE q AS {statement}"))
        .await
        .unwrap_or_else(|e| panic!("PREPARE {statement}: {e}"));
    let row = client
        .query_one(
            &format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE q({arguments})"),
            &[],
        )
        .await
        .expect("EXPLAIN EXECUTE");
    let explained: Value = row.get(0);
    explained[0]["Plan"].clone()
}

#[tokio::test]
async fn rereading_holes_touches_only_the_rows_inside_them_on_a_long_changelog() {
    let statement = event_exporter::datastore::postgres::reread_holes_sql();
    for analyzed in [false, true] {
        let (_db, client) = long_changelog(analyzed).await;
        // Three holes of 3 + 2 + 6 ids spread over the changelog; one hole of one id; holes
        // past the end (nothing to find). At most the ids inside, plus rounding (one per hole).
        let cases = [
            ("{100,20000,40000}", "{102,20001,40005}", 11.0 + 3.0),
            ("{7}", "{7}", 1.0 + 1.0),
            ("{60000,70000}", "{60005,70001}", 2.0),
        ];
        for (firsts, lasts, most) in cases {
            let plan = executed_plan(
                &client,
                &statement,
                &format!("'{firsts}'::bigint[], '{lasts}'::bigint[]"),
            )
            .await;
            let touched = changelog_rows_touched(&plan);
            assert!(
                touched <= most,
                "analyzed: {analyzed}; holes {firsts}..{lasts} of a {LONG_CHANGELOG}-row \
                 changelog touched {touched} rows: {plan:#}"
            );
        }
    }
}

#[tokio::test]
async fn reading_new_rows_touches_only_the_page_it_returns_on_a_long_changelog() {
    let statement = event_exporter::datastore::postgres::read_new_sql();
    for analyzed in [false, true] {
        let (_db, client) = long_changelog(analyzed).await;
        for (after, limit) in [
            (0, 500),
            (25_000, 500),
            (LONG_CHANGELOG - 10, 500),
            (100, 1),
        ] {
            let plan = executed_plan(
                &client,
                &statement,
                &format!("{after}::bigint, {limit}::bigint, 'datastore_changelog_id_seq'"),
            )
            .await;
            let touched = changelog_rows_touched(&plan);
            // The page, the row `max(id)` finds, and rounding.
            let most = (LONG_CHANGELOG - after).min(limit) as f64 + 2.0;
            assert!(
                touched <= most,
                "analyzed: {analyzed}; reading {limit} rows after id {after} touched \
                 {touched} rows: {plan:#}"
            );
        }
    }
}
