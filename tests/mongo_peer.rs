//! The MongoDB wire peer (`tests/mongo_peer/peer.py`) checked with two real clients: pymongo
//! (as a platform connector writes events; `tests/mongo_peer/check_pymongo.py`) and the official
//! Rust `mongodb` crate the exporter will use. No MongoDB server exists on these machines; these
//! tests make sure the peer the MongoDB datastore tests run against behaves like a one-node
//! replica-set primary where those tests depend on it: documents kept and found in
//! `(createdAt, _id)` order, change streams with resume tokens minted in event order,
//! `postBatchResumeToken` on every batch, history lost after an oplog trim, injected errors,
//! dropped connections, token upserts, server TLS, MONGODB-X509 and SCRAM.
//!
//! Run with `scripts/test --test mongo_peer` (it installs pymongo into target/test-venv and
//! exports `TEST_PYTHON`); without pymongo the tests fail, they do not skip.

#[path = "mongo_peer/launch.rs"]
mod mongo_peer_launch;
mod support;

use std::process::Command;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use mongo_peer_launch::{control_at, peer_dir, python, wait_for_held_get_more, MongoPeer};
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::change_stream::event::ResumeToken;
use mongodb::error::{Error, ErrorKind};
use mongodb::options::FullDocumentType;
use mongodb::Client;
use serde_json::json;
use support::tls::TestPki;

const DB: &str = "HealthEventsDatabase";
const COLL: &str = "HealthEvents";
const TOKENS: &str = "ResumeTokens";

/// Runs one scenario of `check_pymongo.py` against `peer`; every check it prints must pass.
fn pymongo_scenario(peer: &MongoPeer, scenario: &str, extra: &[&str]) -> String {
    let output = Command::new(python())
        .arg(peer_dir().join("check_pymongo.py"))
        .args([scenario, &peer.uri, &peer.control_url()])
        .args(extra)
        .output()
        .expect("run check_pymongo.py");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains(&format!("DONE {scenario}")),
        "pymongo scenario {scenario} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.lines().filter(|l| l.starts_with("PASS ")).count() >= 2,
        "scenario {scenario} ran too few checks:\n{stdout}"
    );
    stdout
}

#[test]
fn pymongo_insert_find_sort_and_keyset_pages() {
    let peer = MongoPeer::start(&[]);
    let out = pymongo_scenario(&peer, "crud", &[]);
    assert!(out.contains("PASS keyset pages"), "{out}");
}

#[test]
fn pymongo_change_stream_resumes_after_a_reconnect_and_a_dropped_connection() {
    let peer = MongoPeer::start(&[]);
    let out = pymongo_scenario(&peer, "resume", &[]);
    assert!(
        out.contains("PASS a dropped connection resumes automatically"),
        "{out}"
    );
}

#[test]
fn pymongo_post_batch_resume_token_on_empty_batches() {
    let peer = MongoPeer::start(&[]);
    pymongo_scenario(&peer, "post_batch_token", &[]);
}

#[test]
fn pymongo_history_lost_after_an_oplog_trim() {
    let peer = MongoPeer::start(&[]);
    pymongo_scenario(&peer, "history_lost", &[]);
}

#[test]
fn pymongo_bounded_oplog_loses_old_tokens_by_itself() {
    // --oplog-size 3: the fourth write pushes the first event out of the oplog.
    let peer = MongoPeer::start(&["--oplog-size", "3"]);
    let script = r#"
import sys, pymongo
c = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=5000)
col = c.HealthEventsDatabase.HealthEvents
with col.watch(max_await_time_ms=100) as cs:
    col.insert_one({"n": 0})
    first = cs.next()["_id"]
col.insert_many([{"n": i} for i in range(1, 4)])
try:
    col.watch(resume_after=first)
    print("no error")
except pymongo.errors.OperationFailure as e:
    print("code", e.code)
"#;
    let out = Command::new(python())
        .args(["-c", script, &peer.uri])
        .output()
        .expect("run pymongo");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "code 286",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pymongo_injected_errors() {
    let peer = MongoPeer::start(&[]);
    pymongo_scenario(&peer, "injected_errors", &[]);
}

#[test]
fn pymongo_upserts_a_client_name_resume_token_document() {
    let peer = MongoPeer::start(&[]);
    pymongo_scenario(&peer, "token_upsert", &[]);
}

/// A test CA with the peer's server certificate (127.0.0.1) and a client certificate with
/// subject `CN=mongo-client`; `client.pem` is the client certificate followed by its key.
fn pki(dir: &std::path::Path) -> support::tls::PkiPaths {
    let pki = TestPki::generate_with_client_cn("mongo-client");
    let paths = pki.write_to(dir);
    std::fs::write(
        dir.join("client.pem"),
        format!("{}{}", pki.client_cert_pem(), pki.client_key_pem()),
    )
    .expect("write client.pem");
    paths
}

fn tls_args(paths: &support::tls::PkiPaths) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        paths.server_cert.display().to_string(),
        "--tls-key".into(),
        paths.server_key.display().to_string(),
    ]
}

#[test]
fn pymongo_server_tls_with_the_test_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = pki(dir.path());
    let args = tls_args(&paths);
    let peer = MongoPeer::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    pymongo_scenario(&peer, "tls", &[&dir.path().display().to_string()]);
}

#[test]
fn pymongo_x509_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = pki(dir.path());
    let mut args = tls_args(&paths);
    args.extend([
        "--tls-client-ca".into(),
        paths.ca_cert.display().to_string(),
    ]);
    let peer = MongoPeer::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    pymongo_scenario(&peer, "x509", &[&dir.path().display().to_string()]);
}

/// CA-only TLS with SCRAM credentials in the URI (the managed-database case).
fn scram_peer(dir: &std::path::Path) -> MongoPeer {
    let paths = pki(dir);
    let mut args = tls_args(&paths);
    args.extend([
        "--user".into(),
        "app:s3cret".into(),
        "--require-auth".into(),
    ]);
    MongoPeer::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn pymongo_scram_over_ca_only_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let peer = scram_peer(dir.path());
    pymongo_scenario(&peer, "scram", &[&dir.path().display().to_string()]);
}

// ---------------------------------------------------------------------------------------------
// The official Rust driver
// ---------------------------------------------------------------------------------------------

/// The server error code inside a driver error, if it is a command error.
fn command_code(err: &Error) -> Option<i32> {
    match &*err.kind {
        ErrorKind::Command(e) => Some(e.code),
        _ => None,
    }
}

fn health_event(i: i64) -> Document {
    doc! {
        "createdAt": DateTime::from_millis(1_767_225_600_000 + (i / 2) * 1000),
        "healthevent": { "agent": "gpu-health-monitor", "checkname": "GpuXidError",
                         "isfatal": true, "message": format!("XID 79 #{i}"),
                         "nodename": format!("node-{i}"), "errorcode": ["79"] },
    }
}

fn message(event_doc: &Document) -> String {
    event_doc
        .get_document("healthevent")
        .and_then(|h| h.get_str("message"))
        .unwrap_or_default()
        .to_string()
}

/// Client shutdown must not hang once the change stream is dropped (mongodb-driver-notes.md).
async fn shutdown(client: Client) {
    tokio::time::timeout(Duration::from_secs(20), client.shutdown())
        .await
        .expect("Client::shutdown completes once every stream is dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_driver_insert_find_watch_resume_and_upsert() {
    let peer = MongoPeer::start(&[]);
    for (label, uri) in [
        (
            "directConnection",
            format!("mongodb://127.0.0.1:{}/?directConnection=true", peer.port),
        ),
        ("replicaSet", peer.uri.clone()),
    ] {
        let client = Client::with_uri_str(&uri).await.expect(label);
        let db = client.database(DB);
        let coll = db.collection::<Document>(&format!("{COLL}_{label}"));
        db.run_command(doc! {"ping": 1})
            .await
            .unwrap_or_else(|e| panic!("{label}: ping: {e}"));

        let mut stream = coll
            .watch()
            .pipeline([doc! {"$match": {"operationType": "insert"}}])
            .full_document(FullDocumentType::UpdateLookup)
            .max_await_time(Duration::from_millis(300))
            .await
            .unwrap_or_else(|e| panic!("{label}: watch: {e}"));
        coll.insert_many((0..6).rev().map(health_event))
            .await
            .unwrap_or_else(|e| panic!("{label}: insert_many: {e}"));

        let found: Vec<Document> = coll
            .find(doc! {"createdAt": {"$gte": DateTime::from_millis(1_767_225_601_000)}})
            .sort(doc! {"createdAt": 1, "_id": 1})
            .limit(3)
            .await
            .expect("find")
            .try_collect()
            .await
            .expect("find cursor");
        let times: Vec<i64> = found
            .iter()
            .map(|d| {
                d.get_datetime("createdAt")
                    .expect("createdAt")
                    .timestamp_millis()
            })
            .collect();
        assert_eq!(
            times,
            [1_767_225_601_000, 1_767_225_601_000, 1_767_225_602_000],
            "{label}: find with a range, sort and limit"
        );

        let mut seen = Vec::new();
        let mut tokens = Vec::new();
        while seen.len() < 2 {
            let event = stream
                .next()
                .await
                .unwrap_or_else(|| panic!("{label}: stream ended"))
                .unwrap_or_else(|e| panic!("{label}: change event: {e}"));
            let full = event.full_document.expect("fullDocument of an insert");
            seen.push(message(&full));
            tokens.push(event.id.clone());
            assert_eq!(
                stream.resume_token().as_ref(),
                Some(&event.id),
                "{label}: resume_token() after an event is that event's _id"
            );
        }
        assert_eq!(seen, ["XID 79 #5", "XID 79 #4"], "{label}: event order");
        drop(stream);

        // Store the token of the newest event as upstream does, read it back, resume after it.
        let token_doc = mongodb::bson::to_bson(&tokens[1]).expect("token to BSON");
        let tokens_coll = db.collection::<Document>(TOKENS);
        for _ in 0..2 {
            tokens_coll
                .update_one(
                    doc! {"clientName": format!("event-exporter-{label}")},
                    doc! {"$set": {"resumeToken": token_doc.clone()}},
                )
                .upsert(true)
                .await
                .unwrap_or_else(|e| panic!("{label}: upsert token: {e}"));
        }
        let stored = tokens_coll
            .find_one(doc! {"clientName": format!("event-exporter-{label}")})
            .await
            .expect("find token")
            .expect("the token document exists");
        assert_eq!(
            tokens_coll
                .count_documents(doc! {"clientName": format!("event-exporter-{label}")})
                .await
                .expect("count"),
            1,
            "{label}: the upsert wrote one document"
        );
        let stored_token: ResumeToken =
            mongodb::bson::from_bson(stored.get("resumeToken").cloned().unwrap_or(Bson::Null))
                .expect("stored token decodes");
        assert_eq!(stored_token, tokens[1]);

        let mut resumed = coll
            .watch()
            .full_document(FullDocumentType::UpdateLookup)
            .max_await_time(Duration::from_millis(300))
            .resume_after(stored_token)
            .await
            .expect("watch with resume_after");
        let mut rest = Vec::new();
        while rest.len() < 4 {
            let event = resumed.next().await.expect("open").expect("event");
            rest.push(message(&event.full_document.expect("fullDocument")));
        }
        assert_eq!(rest, ["XID 79 #3", "XID 79 #2", "XID 79 #1", "XID 79 #0"]);
        let aggregates = peer.commands("aggregate").await;
        let last = &aggregates.last().expect("an aggregate")["body"]["pipeline"][0];
        assert!(
            last["$changeStream"]["resumeAfter"]["_data"].is_string(),
            "{label}: the driver sent resumeAfter: {last}"
        );
        drop(resumed);
        shutdown(client).await;
    }
    assert!(
        !peer.commands("endSessions").await.is_empty(),
        "shutdown ends the sessions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_driver_surfaces_history_lost_and_invalid_tokens() {
    let peer = MongoPeer::start(&[]);
    let client = Client::with_uri_str(&peer.uri).await.expect("client");
    let coll = client.database(DB).collection::<Document>(COLL);

    // An idle getMore after an event: the driver's position moves to the empty batch's
    // postBatchResumeToken, a high-water mark that is not the event's _id (the trap of
    // upstream bug #1549: store the event's token, not the cursor's position).
    let mut idle = coll
        .watch()
        .max_await_time(Duration::from_millis(200))
        .await
        .expect("watch");
    coll.insert_one(health_event(9)).await.expect("insert");
    let event = idle.next().await.expect("open").expect("event");
    assert_eq!(idle.resume_token().as_ref(), Some(&event.id));
    assert!(idle.next_if_any().await.expect("an idle getMore").is_none());
    let position = idle.resume_token().expect("a token after an empty batch");
    assert_ne!(
        position, event.id,
        "an empty batch's token is a high-water mark, not an event id"
    );
    drop(idle);

    peer.control(
        "POST",
        "/fail",
        Some(json!({"commands": ["aggregate"], "code": 286})),
    )
    .await;
    let err = coll.watch().await.expect_err("injected 286 on aggregate");
    assert_eq!(command_code(&err), Some(286), "{err}");

    let mut stream = coll
        .watch()
        .max_await_time(Duration::from_millis(200))
        .await
        .expect("watch");
    peer.control(
        "POST",
        "/fail",
        Some(json!({"commands": ["getMore"], "code": 286})),
    )
    .await;
    let err = stream
        .next()
        .await
        .expect("the stream yields the error")
        .expect_err("injected 286 on getMore");
    assert_eq!(command_code(&err), Some(286), "{err}");
    drop(stream);

    // A real trim: the token of the first event is older than the oplog afterwards.
    let mut stream = coll
        .watch()
        .max_await_time(Duration::from_millis(200))
        .await
        .expect("watch");
    coll.insert_many((0..3).map(health_event))
        .await
        .expect("insert");
    let first = stream.next().await.expect("open").expect("event").id;
    drop(stream);
    peer.control("POST", "/trim", Some(json!({"keep": 1})))
        .await;
    let err = coll
        .watch()
        .resume_after(first)
        .await
        .expect_err("a trimmed token");
    assert_eq!(command_code(&err), Some(286), "{err}");

    let bogus: ResumeToken =
        mongodb::bson::from_bson(Bson::Document(doc! {"_data": "00ff"})).expect("token");
    let err = coll
        .watch()
        .resume_after(bogus)
        .await
        .expect_err("an unparseable token");
    assert_eq!(command_code(&err), Some(260), "{err}");
    shutdown(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_driver_resumes_by_itself_after_a_dropped_connection_and_a_step_down() {
    let peer = MongoPeer::start(&[]);
    let client = Client::with_uri_str(&peer.uri).await.expect("client");
    let coll = client.database(DB).collection::<Document>(COLL);
    // A long await: the getMore is in flight (held by the peer) when the connections drop.
    let mut stream = coll
        .watch()
        .max_await_time(Duration::from_secs(3))
        .await
        .expect("watch");
    coll.insert_one(health_event(0)).await.expect("insert");
    let first = stream.next().await.expect("open").expect("event");
    assert_eq!(message(&first.full_document.expect("doc")), "XID 79 #0");
    let opened = peer.commands("aggregate").await.len();

    let control_port = peer.control_port;
    let writer = coll.clone();
    let dropper = tokio::spawn(async move {
        wait_for_held_get_more(control_port).await;
        let dropped = control_at(control_port, "POST", "/drop-connections", None).await;
        writer
            .insert_one(health_event(1))
            .await
            .expect("insert after the drop");
        dropped
    });
    let second = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("an event within 20 s")
        .expect("open")
        .expect("the stream resumed instead of failing");
    assert_eq!(message(&second.full_document.expect("doc")), "XID 79 #1");
    let dropped = dropper.await.expect("dropper task");
    assert!(dropped["dropped"].as_u64().unwrap_or(0) >= 1, "{dropped}");

    peer.control(
        "POST",
        "/fail",
        Some(json!({"commands": ["getMore"], "code": 10107})),
    )
    .await;
    coll.insert_one(health_event(2)).await.expect("insert");
    let third = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("an event within 20 s")
        .expect("open")
        .expect("NotWritablePrimary on getMore is resumable");
    assert_eq!(message(&third.full_document.expect("doc")), "XID 79 #2");

    let aggregates = peer.commands("aggregate").await;
    assert!(
        aggregates.len() >= opened + 2,
        "two automatic resumes re-ran aggregate"
    );
    for resume in &aggregates[opened..] {
        let spec = &resume["body"]["pipeline"][0]["$changeStream"];
        assert!(
            spec["resumeAfter"]["_data"].is_string() || spec["startAfter"]["_data"].is_string(),
            "an automatic resume carries a token: {spec}"
        );
    }
    drop(stream);
    shutdown(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_driver_ca_only_tls_and_mongodb_x509() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = pki(dir.path());
    let mut args = tls_args(&paths);
    args.extend([
        "--tls-client-ca".into(),
        paths.ca_cert.display().to_string(),
        "--tls-client-cert".into(),
        "optional".into(),
    ]);
    let peer = MongoPeer::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let ca = paths.ca_cert.display().to_string();

    // CA-only TLS: the server certificate is checked against the test CA, no client cert.
    let client = Client::with_uri_str(format!("{}&tlsCAFile={ca}", peer.uri))
        .await
        .expect("CA-only TLS client");
    let coll = client.database(DB).collection::<Document>(COLL);
    coll.insert_one(doc! {"n": 1})
        .await
        .expect("insert over TLS");
    assert_eq!(coll.count_documents(doc! {}).await.expect("count"), 1);
    shutdown(client).await;

    // MONGODB-X509: the client certificate's subject is the user (speculative authentication).
    let pem = dir.path().join("client.pem").display().to_string();
    let client = Client::with_uri_str(format!(
        "{}&tlsCAFile={ca}&tlsCertificateKeyFile={pem}&authMechanism=MONGODB-X509",
        peer.uri
    ))
    .await
    .expect("X.509 client");
    client
        .database("admin")
        .run_command(doc! {"ping": 1})
        .await
        .expect("ping as the X.509 user");
    let users: Vec<String> = peer
        .commands("authenticated")
        .await
        .iter()
        .filter_map(|c| c["user"].as_str().map(str::to_string))
        .collect();
    assert!(users.iter().any(|u| u == "CN=mongo-client"), "{users:?}");
    shutdown(client).await;

    // Without the test CA the driver refuses the peer's certificate.
    let mut options = mongodb::options::ClientOptions::parse(&peer.uri)
        .await
        .expect("options");
    options.server_selection_timeout = Some(Duration::from_millis(1500));
    let client = Client::with_options(options).expect("client");
    let err = client
        .database("admin")
        .run_command(doc! {"ping": 1})
        .await
        .expect_err("an unknown CA is refused");
    assert!(
        matches!(*err.kind, ErrorKind::ServerSelection { .. }),
        "{err}"
    );
    shutdown(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_driver_scram_over_ca_only_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let peer = scram_peer(dir.path());
    let ca = dir.path().join("ca.crt").display().to_string();
    let with_credentials = |user: &str| {
        format!(
            "{}&tlsCAFile={ca}",
            peer.uri
                .replacen("mongodb://", &format!("mongodb://{user}@"), 1)
        )
    };

    let client = Client::with_uri_str(with_credentials("app:s3cret"))
        .await
        .expect("SCRAM client");
    let coll = client.database(DB).collection::<Document>(COLL);
    coll.insert_one(doc! {"n": 1}).await.expect("insert as app");
    assert_eq!(coll.count_documents(doc! {}).await.expect("count"), 1);
    let logins = peer.commands("authenticated").await;
    assert!(
        logins
            .iter()
            .any(|l| l["user"] == "app" && l["mechanism"] == "SCRAM-SHA-256"),
        "{logins:?}"
    );
    shutdown(client).await;

    let client = Client::with_uri_str(with_credentials("app:wrong"))
        .await
        .expect("client");
    let err = client
        .database(DB)
        .collection::<Document>(COLL)
        .count_documents(doc! {})
        .await
        .expect_err("a wrong password is refused");
    assert!(
        matches!(*err.kind, ErrorKind::Authentication { .. }),
        "{err}"
    );
    assert_eq!(
        peer.commands("authenticated").await.len(),
        logins.len(),
        "the peer verified no proof made with the wrong password"
    );
    shutdown(client).await;
}
