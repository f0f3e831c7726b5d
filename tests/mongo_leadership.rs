//! High availability on MongoDB (issue 16) through the binary: two exporter processes on one
//! MongoDB wire peer (`tests/mongo_peer/peer.py`), each with its own sink so that every publish
//! is attributed to a replica, a writer inserting health events throughout, and the leader
//! killed (`kill -9`), stopped (SIGTERM) or paused (SIGSTOP past the lease, then SIGCONT).
//!
//! Checked: only the leader publishes while both run (the standby is alive, not ready, and its
//! sink sees nothing); after the hand-over the union of the sinks has every event written; the
//! lease document names the leader; a resumed paused leader publishes nothing more and exits 1.
//! Take-over times are printed.
//!
//! Run with `scripts/test --test mongo_leadership` (it installs pymongo for the peer).

#[path = "mongo_peer/launch.rs"]
mod mongo_peer_launch;
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongo_peer_launch::{health_event, Store};
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::Collection;
use support::exporter::{Exporter, ExporterOptions};
use support::sink::{SinkOptions, SinkServer};

const WAIT: Duration = Duration::from_secs(40);
/// The lease document's validity (`event_exporter::datastore::mongo::lease::VALIDITY`).
const VALIDITY: Duration = event_exporter::datastore::mongo::lease::VALIDITY;

/// The peer with NVSentinel's two collections and a driver client on it.
type Mongo = Store;

impl Store {
    fn replica_env(&self, hostname: &str) -> Vec<(String, String)> {
        let mut env = self.env();
        env.push(("HOSTNAME".into(), hostname.into()));
        env
    }

    async fn lease(&self) -> Option<Document> {
        self.tokens()
            .find_one(doc! {"_id": "leader:event-exporter"})
            .await
            .expect("read the lease")
    }

    /// Waits until the stream's resume token is stored (before that, a successor starts at the
    /// stream's end, as any first start does).
    async fn wait_for_token(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let token = self
                .tokens()
                .find_one(doc! {"clientName": "event-exporter"})
                .await
                .expect("read the token");
            if token.is_some_and(|t| t.get_document("resumeToken").is_ok()) {
                return;
            }
            assert!(Instant::now() < deadline, "no resume token saved");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Inserts a health event every 25 ms until stopped; returns the `_id`s (the CloudEvent ids).
fn start_writer(
    events: Collection<Document>,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Vec<String>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut ids = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let inserted = events
                    .insert_one(health_event("ha-node", i64::from(i)))
                    .await
                    .expect("insert");
                match inserted.inserted_id {
                    Bson::ObjectId(id) => ids.push(id.to_hex()),
                    other => panic!("unexpected _id {other}"),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            ids
        }
    });
    (stop, task)
}

async fn finish_writer(
    stop: Arc<AtomicBool>,
    writer: tokio::task::JoinHandle<Vec<String>>,
) -> Vec<String> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer")
}

/// One exporter process with its own sink.
struct Replica {
    name: &'static str,
    sink: SinkServer,
    exporter: Exporter,
}

impl Replica {
    async fn spawn(name: &'static str, mongo: &Mongo) -> Replica {
        let sink = SinkServer::start(SinkOptions::default()).await;
        let exporter = Exporter::spawn(&ExporterOptions::new(&sink, None, mongo.replica_env(name)));
        Replica {
            name,
            sink,
            exporter,
        }
    }

    async fn is_ready(&self) -> bool {
        matches!(self.exporter.probe("/readyz").await, Some((200, _)))
    }

    async fn leader_gauge(&self) -> Option<u8> {
        self.exporter
            .metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix("health_events_exporter_leader "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Waits until this replica is a standby: alive, not ready, leader gauge 0.
    async fn assert_standby(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let health = self.exporter.probe("/healthz").await.map(|(s, _)| s);
            let ready = self.exporter.probe("/readyz").await.map(|(s, _)| s);
            let gauge = self.leader_gauge().await;
            if health == Some(200) && ready == Some(503) && gauge == Some(0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: expected a standby (healthz 200, readyz 503, leader 0), got {health:?} \
                 {ready:?} {gauge:?}; log:\n{}",
                self.name,
                self.exporter.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until this replica leads (ready, gauge 1); returns how long it took since `since`.
    async fn wait_leading(&self, since: Instant) -> Duration {
        loop {
            if self.is_ready().await && self.leader_gauge().await == Some(1) {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < WAIT,
                "{} did not take over within {WAIT:?}; log:\n{}",
                self.name,
                self.exporter.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `a` leads and exports, `b` is a standby whose sink sees nothing, the lease names `a`; a
/// writer runs and `a`'s first resume token is stored.
async fn two_replicas(
    mongo: &Mongo,
) -> (
    Replica,
    Replica,
    Arc<AtomicBool>,
    tokio::task::JoinHandle<Vec<String>>,
) {
    let mut a = Replica::spawn("replica-a", mongo).await;
    a.exporter.wait_ready(WAIT).await;
    let b = Replica::spawn("replica-b", mongo).await;
    b.assert_standby().await;
    assert_eq!(a.leader_gauge().await, Some(1));
    let lease = mongo.lease().await.expect("the lease document exists");
    let holder = lease.get_str("holder").expect("holder");
    assert!(holder.starts_with("replica-a/"), "{lease}");
    let expires = lease.get_datetime("expiresAt").expect("expiresAt date");
    assert!(*expires > DateTime::now(), "{lease}");
    let (stop, writer) = start_writer(mongo.events());
    a.sink.wait_for_accepted(20, WAIT).await;
    mongo.wait_for_token().await;
    let log = b.exporter.log();
    assert!(
        log.contains("another replica leads") && log.contains("replica-a/"),
        "the standby says who leads:\n{log}"
    );
    (a, b, stop, writer)
}

/// Every written event reached some sink (waits for the stragglers); prints how many were
/// delivered more than once across the hand-over.
async fn assert_all_delivered(replicas: &[&Replica], written: &[String]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut deliveries: HashMap<String, usize> = HashMap::new();
        for r in replicas {
            for id in r.sink.accepted_ids() {
                *deliveries.entry(id).or_default() += 1;
            }
        }
        let missing = written
            .iter()
            .filter(|id| !deliveries.contains_key(*id))
            .count();
        if missing == 0 {
            let twice = deliveries.values().filter(|n| **n > 1).count();
            println!(
                "{} events written, all delivered, {twice} more than once",
                written.len()
            );
            return;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = replicas
                .iter()
                .map(|r| format!("--- {}:\n{}", r.name, r.exporter.log()))
                .collect();
            panic!(
                "{missing} of {} events never reached any sink\n{}",
                written.len(),
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_replicas_exports_and_the_standby_takes_over_after_kill_9() {
    let mongo = Mongo::start(&[]).await;
    let (mut a, b, stop, writer) = two_replicas(&mongo).await;
    // While both run, each event is delivered once, by the leader only.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        b.sink.requests().is_empty(),
        "the standby published: {:?}",
        b.sink.accepted_ids()
    );
    let ids = a.sink.accepted_ids();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        ids.len(),
        "the leader delivered an event twice"
    );
    assert_eq!(b.exporter.probe("/readyz").await.map(|(s, _)| s), Some(503));

    let killed = Instant::now();
    a.exporter.kill();
    let took = b.wait_leading(killed).await;
    println!("take-over after kill -9: {took:?} (lease validity {VALIDITY:?})");
    assert!(
        took < VALIDITY + Duration::from_secs(3),
        "take-over took {took:?}"
    );
    let lease = mongo.lease().await.expect("lease");
    assert!(
        lease
            .get_str("holder")
            .unwrap_or("")
            .starts_with("replica-b/"),
        "{lease}"
    );
    let written = finish_writer(stop, writer).await;
    assert_all_delivered(&[&a, &b], &written).await;
    assert!(b.exporter.log().contains("this replica leads"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lease_and_the_standby_leads_at_its_next_try() {
    let mongo = Mongo::start(&[]).await;
    let (mut a, b, stop, writer) = two_replicas(&mongo).await;
    let stopped = Instant::now();
    let status = a.exporter.terminate().await;
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    let exited = Instant::now();
    let lease = mongo.lease().await.expect("lease");
    assert!(
        *lease.get_datetime("expiresAt").expect("expiresAt") < DateTime::now()
            || lease
                .get_str("holder")
                .unwrap_or("")
                .starts_with("replica-b/"),
        "the old leader released its lease: {lease}"
    );
    let took = b.wait_leading(exited).await;
    println!(
        "SIGTERM: the old leader exited after {:?}, the standby led {took:?} later",
        exited - stopped
    );
    assert!(took < Duration::from_secs(3), "take-over took {took:?}");
    assert!(a.exporter.log().contains("leadership released"));
    let written = finish_writer(stop, writer).await;
    assert_all_delivered(&[&a, &b], &written).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_does_not_publish_after_it_resumes_and_exits_1() {
    let mongo = Mongo::start(&[]).await;
    let (mut a, mut b, stop, writer) = two_replicas(&mongo).await;
    let pid = a.exporter.pid().to_string();
    let paused = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill -STOP")
        .success());
    let took = b.wait_leading(paused).await;
    println!("take-over while the leader is paused: {took:?}");
    assert!(
        took >= VALIDITY - Duration::from_secs(2),
        "the lease was taken early: {took:?}"
    );
    // Paused past the lease; the new leader exports meanwhile.
    tokio::time::sleep((VALIDITY + Duration::from_secs(2)).saturating_sub(paused.elapsed())).await;
    b.sink.wait_for_accepted(5, WAIT).await;
    let published_before = a.sink.requests().len();
    let resumed = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .expect("kill -CONT")
        .success());
    let status = a.exporter.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "log:\n{}", a.exporter.log());
    println!(
        "the resumed old leader exited after {:?}",
        resumed.elapsed()
    );
    assert_eq!(
        a.sink.requests().len(),
        published_before,
        "the old leader published after it resumed"
    );
    let log = a.exporter.log();
    assert!(log.contains("leadership lost"), "{log}");
    let written = finish_writer(stop, writer).await;
    assert_all_delivered(&[&a, &b], &written).await;
    assert!(b.exporter.try_status().is_none(), "the new leader exited");
}

/// The fence behind the lease: once a newer leader (a higher lease epoch) has written the token
/// document, a deposed leader's token write matches nothing — the token does not move back —
/// and that replica exits 1 naming both epochs. Every take of the lease raises the epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_move_the_token_back() {
    let mongo = Mongo::start(&[]).await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, mongo.replica_env("fenced-0"));
    options.max_retries = 0;
    let mut exporter = Exporter::start(&options).await;
    mongo.insert("fence-node", 0..3).await;
    sink.wait_for_accepted(3, WAIT).await;
    mongo.wait_for_token().await;
    let lease = mongo.lease().await.expect("lease document");
    let epoch = lease.get_i64("epoch").expect("the lease counts takes");
    assert!(epoch >= 1, "{lease}");
    let token = mongo
        .tokens()
        .find_one(doc! {"clientName": "event-exporter"})
        .await
        .expect("read")
        .expect("token");
    assert_eq!(token.get_i64("leaderEpoch"), Ok(epoch), "{token}");

    // A newer leader's write, as it lands while this replica is paused or cut off.
    let newer = doc! {"resumeToken": {"_data": "newer-leaders-token"}, "leaderEpoch": epoch + 1};
    mongo
        .tokens()
        .update_one(doc! {"clientName": "event-exporter"}, doc! {"$set": newer})
        .await
        .expect("newer leader's write");
    mongo.insert("fence-node", 3..5).await;
    let status = exporter.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "log:\n{}", exporter.log());
    let after = mongo
        .tokens()
        .find_one(doc! {"clientName": "event-exporter"})
        .await
        .expect("read")
        .expect("token");
    assert_eq!(
        after.get_document("resumeToken").ok(),
        Some(&doc! {"_data": "newer-leaders-token"}),
        "the deposed leader moved the token: {after}"
    );
    assert_eq!(after.get_i64("leaderEpoch"), Ok(epoch + 1));
    assert!(
        exporter
            .log()
            .contains(&format!("lease epoch {}", epoch + 1)),
        "the refusal names the epochs; log:\n{}",
        exporter.log()
    );

    // The next take starts above every epoch seen, the token documents' included.
    let mut next = Exporter::start(&options).await;
    next.wait_ready(WAIT).await;
    let lease = mongo.lease().await.expect("lease document");
    assert!(
        lease.get_i64("epoch").is_ok_and(|e| e > epoch + 1),
        "{lease}"
    );
    next.terminate_cleanly().await;
}
