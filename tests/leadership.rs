//! High availability (issue 16) through the binary: two and three exporter processes on one real
//! PostgreSQL, each with its own sink (so every publish is attributed to a replica), a writer
//! inserting health events throughout, and the leader killed (`kill -9`), stopped (SIGTERM),
//! paused (SIGSTOP longer than the lease, then SIGCONT) or cut from the datastore (a TCP proxy
//! in front of PostgreSQL drops its connections).
//!
//! Checked every time: the union of the sinks received every event; an event is delivered
//! twice only if its changelog id is above the last resume token the old leader saved (the
//! stated duplicate bound); every write of the resume token — recorded by a trigger into a side
//! table, with the writing session's `application_name` (which names the replica) — is
//! monotonic, and no replica writes after it lost the leadership. Take-over times are printed.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::exporter::{Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::proxy::FaultProxy;
use support::sink::{SinkOptions, SinkServer};
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(40);

/// One exporter process with its own sink.
struct Replica {
    name: &'static str,
    sink: SinkServer,
    exporter: Exporter,
}

async fn replica(name: &'static str, env: Vec<(String, String)>) -> Replica {
    replica_with(name, env, None).await
}

async fn replica_with(
    name: &'static str,
    env: Vec<(String, String)>,
    backfill: Option<&str>,
) -> Replica {
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut env = env;
    env.push(("HOSTNAME".into(), name.into()));
    let mut options = ExporterOptions::new(&sink, None, env);
    if let Some(backfill) = backfill {
        options.backfill = backfill.into();
    }
    let exporter = Exporter::spawn(&options);
    Replica {
        name,
        sink,
        exporter,
    }
}

impl Replica {
    async fn is_ready(&self) -> bool {
        matches!(self.exporter.probe("/readyz").await, Some((200, _)))
    }

    async fn leader_gauge(&self) -> Option<u8> {
        let metrics = self.exporter.metrics().await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("health_events_exporter_leader "))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// Records every write of `resume_tokens` (insert or update) with the writer's
/// `application_name` in `token_writes`, in commit-serial order of `seq`.
async fn audit_token_writes(client: &Client) {
    client
        .batch_execute(
            "CREATE TABLE token_writes (seq BIGSERIAL PRIMARY KEY, client_name TEXT, \
               token JSONB, app TEXT, at TIMESTAMPTZ DEFAULT clock_timestamp());
             CREATE FUNCTION record_token_write() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO token_writes (client_name, token, app)
               VALUES (NEW.client_name, NEW.resume_token, current_setting('application_name'));
               RETURN NEW;
             END $$;
             CREATE TRIGGER record_token_write AFTER INSERT OR UPDATE ON resume_tokens
               FOR EACH ROW EXECUTE FUNCTION record_token_write();",
        )
        .await
        .expect("token write audit");
}

/// `(seq, eventID, app)` of every token write of the stream's row.
async fn token_writes(client: &Client) -> Vec<(i64, i64, String, Instant)> {
    let now = Instant::now();
    client
        .query(
            "SELECT seq, (token->>'eventID')::bigint, app, \
                    EXTRACT(EPOCH FROM clock_timestamp() - at)::float8 \
             FROM token_writes WHERE client_name = 'event-exporter' ORDER BY seq",
            &[],
        )
        .await
        .expect("read token writes")
        .iter()
        .map(|r| {
            let age: f64 = r.get(3);
            (
                r.get(0),
                r.get(1),
                r.get(2),
                now.checked_sub(Duration::from_secs_f64(age.max(0.0)))
                    .unwrap_or(now),
            )
        })
        .collect()
}

/// Waits until the stream's resume token exists.
async fn wait_for_token(db: &TestDb) {
    let client = db.client().await;
    let deadline = Instant::now() + WAIT;
    while pg::read_resume_token(&client, "event-exporter")
        .await
        .is_none()
    {
        assert!(Instant::now() < deadline, "no resume token saved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Inserts a health event every 20 ms until stopped; returns the ids written.
fn start_writer(client: Client) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Vec<String>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut ids = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                ids.push(pg::insert_health_event(&client, &pg::health_event_doc("ha", i)).await);
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ids
        }
    });
    (stop, task)
}

/// Waits until exactly one of `replicas` is ready; returns its index and the time it took.
async fn wait_for_one_leader(replicas: &[&Replica], since: Instant) -> (usize, Duration) {
    loop {
        let mut ready = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            if r.is_ready().await {
                ready.push(i);
            }
        }
        if ready.len() == 1 {
            return (ready[0], since.elapsed());
        }
        assert!(
            ready.len() <= 1,
            "two replicas ready (leading) at once: {:?}",
            ready.iter().map(|&i| replicas[i].name).collect::<Vec<_>>()
        );
        assert!(
            since.elapsed() < WAIT,
            "no replica took over within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A standby is alive but not ready, and says it does not lead.
async fn assert_standby(r: &Replica) {
    let deadline = Instant::now() + WAIT;
    loop {
        let health = r.exporter.probe("/healthz").await.map(|(s, _)| s);
        let ready = r.exporter.probe("/readyz").await.map(|(s, _)| s);
        let gauge = r.leader_gauge().await;
        if health == Some(200) && ready == Some(503) && gauge == Some(0) {
            let metrics = r.exporter.metrics().await;
            assert!(
                metrics.contains("health_events_exporter_leadership_changes_total 0"),
                "{}: the changes counter exists from the first scrape:\n{metrics}",
                r.name
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: expected a standby (healthz 200, readyz 503, leader 0), got {health:?} {ready:?} {gauge:?}",
            r.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The checks every scenario ends with. `old_leader_app` is the old leader's lock-session
/// `application_name` suffix (`HOSTNAME/pid`), `lost_at` when it lost the leadership.
async fn check_outcome(
    client: &Client,
    replicas: &[&Replica],
    written: &[String],
    old_leader: &str,
    lost_at: Instant,
) {
    // Every event at least once, across all sinks.
    let mut deliveries: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + WAIT;
    loop {
        deliveries.clear();
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
            break;
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = replicas
                .iter()
                .map(|r| {
                    let log = r.exporter.log();
                    let lines: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
                    format!("--- {}:\n{}", r.name, lines.join("\n"))
                })
                .collect();
            panic!(
                "{missing} of {} events never reached any sink\n{}",
                written.len(),
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The token never moves backwards, and the old leader never writes after losing.
    let writes = token_writes(client).await;
    assert!(!writes.is_empty(), "no token write recorded");
    for pair in writes.windows(2) {
        assert!(
            pair[1].1 >= pair[0].1,
            "the resume token moved backwards: write {} set {} after write {} set {} ({} then {})",
            pair[1].0,
            pair[1].1,
            pair[0].0,
            pair[0].1,
            pair[0].2,
            pair[1].2
        );
    }
    let old_writes: Vec<_> = writes
        .iter()
        .filter(|w| w.2.contains(&format!(" {old_leader}/")))
        .collect();
    // Time stamps come from PostgreSQL's clock, compared with a 300 ms slack.
    for w in &old_writes {
        assert!(
            w.3 <= lost_at + Duration::from_millis(300),
            "the old leader {old_leader} wrote the token (write {}, {}) after it lost the leadership",
            w.0,
            w.2
        );
    }
    let old_last = old_writes.iter().map(|w| w.1).max().unwrap_or(0);

    // Duplicates only above the old leader's last saved token.
    let duplicated: Vec<&String> = deliveries
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    let rows = client
        .query(
            "SELECT record_id::text, id FROM datastore_changelog WHERE record_id::text = ANY($1)",
            &[&duplicated.iter().map(|s| s.to_string()).collect::<Vec<_>>()],
        )
        .await
        .expect("changelog ids of duplicates");
    for row in &rows {
        let id: i64 = row.get(1);
        let record: String = row.get(0);
        assert!(
            id > old_last,
            "event {record} (changelog id {id}) was delivered twice although the old leader's \
             last token ({old_last}) covered it"
        );
    }
    println!(
        "{} events, {} delivered more than once (all above the old leader's last token {old_last}), {} token writes",
        written.len(),
        duplicated.len(),
        writes.len()
    );
}

/// Starts `names` in order (the first leads), a writer, and waits until the others are standbys.
async fn cluster(
    db: &TestDb,
    names: &[&'static str],
) -> (
    Vec<Replica>,
    Arc<AtomicBool>,
    tokio::task::JoinHandle<Vec<String>>,
) {
    let mut replicas = Vec::new();
    for name in names {
        let mut r = replica(name, db.env()).await;
        if replicas.is_empty() {
            r.exporter.wait_ready(WAIT).await;
        }
        replicas.push(r);
    }
    for r in &replicas[1..] {
        assert_standby(r).await;
    }
    assert_eq!(replicas[0].leader_gauge().await, Some(1));
    let (stop, writer) = start_writer(db.client().await);
    // Some traffic through the first leader, and its first resume token saved (before that,
    // a successor would start at the changelog's end, as any first start does).
    replicas[0].sink.wait_for_accepted(20, WAIT).await;
    wait_for_token(db).await;
    (replicas, stop, writer)
}

async fn finish_writer(
    stop: Arc<AtomicBool>,
    writer: tokio::task::JoinHandle<Vec<String>>,
) -> Vec<String> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_hands_over_to_the_standby() {
    let db = TestDb::create().await;
    let client = db.client().await;
    audit_token_writes(&client).await;
    let (mut replicas, stop, writer) = cluster(&db, &["replica-a", "replica-b"]).await;
    assert!(replicas[1].exporter.log().contains("another replica leads"));
    assert!(
        replicas[1].exporter.log().contains("replica-a/"),
        "the standby says who leads:\n{}",
        replicas[1].exporter.log()
    );

    let killed = Instant::now();
    replicas[0].exporter.kill();
    let survivors: Vec<&Replica> = replicas[1..].iter().collect();
    let (_, took) = wait_for_one_leader(&survivors, killed).await;
    println!("take-over after kill -9: {took:?}");
    assert!(took < Duration::from_secs(10), "take-over took {took:?}");
    let written = finish_writer(stop, writer).await;
    check_outcome(
        &client,
        &replicas.iter().collect::<Vec<_>>(),
        &written,
        "replica-a",
        killed,
    )
    .await;
    assert_eq!(replicas[1].leader_gauge().await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lock_at_once_and_exits_0() {
    let db = TestDb::create().await;
    let client = db.client().await;
    audit_token_writes(&client).await;
    let (mut replicas, stop, writer) = cluster(&db, &["replica-a", "replica-b", "replica-c"]).await;

    let stopped = Instant::now();
    let status = replicas[0].exporter.terminate().await;
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    let released = Instant::now();
    let survivors: Vec<&Replica> = replicas[1..].iter().collect();
    let (_, took) = wait_for_one_leader(&survivors, released).await;
    println!(
        "SIGTERM: the old leader exited after {:?}, a standby led {took:?} later",
        released - stopped
    );
    assert!(took < Duration::from_secs(5), "take-over took {took:?}");
    let written = finish_writer(stop, writer).await;
    check_outcome(
        &client,
        &replicas.iter().collect::<Vec<_>>(),
        &written,
        "replica-a",
        released,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_neither_publishes_nor_writes_after_it_resumes() {
    let db = TestDb::create().await;
    let client = db.client().await;
    audit_token_writes(&client).await;
    let (mut replicas, stop, writer) = cluster(&db, &["replica-a", "replica-b", "replica-c"]).await;

    let pid = replicas[0].exporter.pid().to_string();
    let paused = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let survivors: Vec<&Replica> = replicas[1..].iter().collect();
    let (_, took) = wait_for_one_leader(&survivors, paused).await;
    println!("take-over while the leader is paused: {took:?}");
    // Paused for longer than the lease (3 s) and the check interval.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(paused.elapsed())).await;
    let published_before = replicas[0].sink.requests().len();
    let resumed = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    // It notices it lost the leadership and exits 1 (restarted as a standby by Kubernetes).
    let status = replicas[0].exporter.wait_exit(WAIT).await;
    assert_eq!(
        status.code(),
        Some(1),
        "log:\n{}",
        replicas[0].exporter.log()
    );
    println!(
        "the resumed old leader exited after {:?}",
        resumed.elapsed()
    );
    assert_eq!(
        replicas[0].sink.requests().len(),
        published_before,
        "the old leader published after it resumed"
    );
    let written = finish_writer(stop, writer).await;
    // The old leader lost when the standby took over.
    check_outcome(
        &client,
        &replicas.iter().collect::<Vec<_>>(),
        &written,
        "replica-a",
        paused + took,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_from_the_datastore_is_replaced_and_stops_publishing() {
    let db = TestDb::create().await;
    let client = db.client().await;
    audit_token_writes(&client).await;
    let proxy = FaultProxy::start(format!("{}:{}", db.host, db.port).parse().unwrap()).await;
    let mut env = db.env();
    for (k, v) in env.iter_mut() {
        if k == "DATASTORE_PORT" {
            *v = proxy.addr.port().to_string();
        }
    }
    let mut a = replica("replica-a", env).await;
    a.exporter.wait_ready(WAIT).await;
    let b = replica("replica-b", db.env()).await;
    assert_standby(&b).await;
    let (stop, writer) = start_writer(db.client().await);
    a.sink.wait_for_accepted(20, WAIT).await;
    wait_for_token(&db).await;

    let cut = Instant::now();
    proxy.drop_new_connections(true);
    proxy.cut_all();
    let (_, took) = wait_for_one_leader(&[&b], cut).await;
    println!("take-over after the leader was cut from the datastore: {took:?}");
    assert!(took < Duration::from_secs(10), "take-over took {took:?}");
    // The cut leader publishes nothing once its lease (3 s) has expired.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let published = a.sink.requests().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        a.sink.requests().len(),
        published,
        "the cut leader kept publishing"
    );
    // Reconnected, it finds the lock held by the new leader and exits 1.
    proxy.drop_new_connections(false);
    let status = a.exporter.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1), "log:\n{}", a.exporter.log());
    let written = finish_writer(stop, writer).await;
    check_outcome(&client, &[&a, &b], &written, "replica-a", cut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_backfill_continues_on_the_new_leader_from_its_cursor() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let mut expected = Vec::new();
    for i in 0..300 {
        expected.push(pg::insert_health_event(&client, &pg::health_event_doc("old", i)).await);
    }
    // 300 events at 60/s: about 5 s of backfill.
    let backfill = "enabled = true\nmax_events = 1000\nbatch_size = 50\nrate_limit = 60";
    let mut a = replica_with("replica-a", db.env(), Some(backfill)).await;
    a.exporter.wait_ready(WAIT).await;
    let b = replica_with("replica-b", db.env(), Some(backfill)).await;
    assert_standby(&b).await;
    a.sink.wait_for_accepted(100, WAIT).await;
    // The backfill record has a saved cursor.
    let deadline = Instant::now() + WAIT;
    loop {
        let record = pg::read_resume_token(&client, "event-exporter-backfill").await;
        let delivered = record
            .as_ref()
            .and_then(|r| r.get("delivered"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if delivered >= 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no backfill progress saved: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed = Instant::now();
    a.exporter.kill();
    let before = a.sink.accepted_ids().len();
    assert!(
        before < expected.len(),
        "the backfill finished before the kill; slow it down"
    );
    let (_, took) = wait_for_one_leader(&[&b], killed).await;
    println!("backfill: take-over after kill -9 {took:?}, {before} delivered by the old leader");

    let deadline = Instant::now() + WAIT;
    loop {
        let mut all: Vec<String> = a.sink.accepted_ids();
        all.extend(b.sink.accepted_ids());
        all.sort();
        all.dedup();
        if expected.iter().all(|id| all.binary_search(id).is_ok()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backfilled events lost across the hand-over; new leader log:\n{}",
            b.exporter.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = b.exporter.log();
    assert!(log.contains("resuming the unfinished backfill"), "{log}");
    let resent = b
        .sink
        .accepted_ids()
        .iter()
        .filter(|id| a.sink.accepted_ids().contains(id))
        .count();
    println!("backfill: the new leader re-sent {resent} of the {before} the old one delivered");
    // Restarting from zero would re-send all of them; the cursor is at most one save interval
    // plus the in-flight window behind.
    assert!(
        resent < before,
        "the new leader restarted the backfill from zero"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_replica_rides_out_the_loss_of_its_lock_session() {
    let db = TestDb::create().await;
    let client = db.client().await;
    audit_token_writes(&client).await;
    let mut a = replica("replica-a", db.env()).await;
    a.exporter.wait_ready(WAIT).await;
    let (stop, writer) = start_writer(db.client().await);
    a.sink.wait_for_accepted(20, WAIT).await;
    wait_for_token(&db).await;
    // PostgreSQL ends the lock session (as a failover or an idle-timeout proxy would).
    let terminated: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'event-exporter-leader %'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(terminated, 1);
    // It gets the lock back (nobody else wrote the token) and carries on.
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = a.exporter.metrics().await;
        if metrics.contains("health_events_exporter_leadership_changes_total 3")
            && metrics.contains("health_events_exporter_leader 1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not leading again:\n{metrics}\n{}",
            a.exporter.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.exporter.log().contains("leadership regained"));
    let written = finish_writer(stop, writer).await;
    let mut sorted = written.clone();
    sorted.sort();
    let deadline = Instant::now() + WAIT;
    loop {
        let mut got = a.sink.accepted_ids();
        got.sort();
        got.dedup();
        if sorted.iter().all(|id| got.binary_search(id).is_ok()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "events lost after the lock session was lost"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        a.exporter.try_status().is_none(),
        "the single replica exited"
    );
    let writes = token_writes(&client).await;
    assert!(
        writes.windows(2).all(|w| w[1].1 >= w[0].1),
        "token moved backwards"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_shows_the_leadership_key() {
    let sink_config = "[exporter.metadata]\ncluster = \"c\"\n[exporter.sink]\nendpoint = \"http://127.0.0.1:1/\"\n[exporter.oidc]\nenabled = false\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, sink_config).unwrap();
    let (code, output) = support::exporter::run_once(
        &["check-config", &format!("--config={}", path.display())],
        &[],
    );
    assert_eq!(code, Some(0), "{output}");
    let expected = event_exporter::leadership::lock_key("event-exporter");
    assert!(
        output.contains(&format!("\"advisoryLockKey\": {expected}")),
        "{output}"
    );
    assert!(output.contains("event-exporter:event-exporter"), "{output}");
}
