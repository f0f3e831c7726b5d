//! Starts the MongoDB wire peer (`tests/mongo_peer/peer.py`) for a test and talks to its HTTP
//! control port. Include it with `#[path = "mongo_peer/launch.rs"] mod mongo_peer_launch;`.
//!
//! The peer runs under `TEST_PYTHON` (set by `scripts/test`, which installs `pymongo` — and with
//! it `bson` — from `tests/requirements.txt`). A Python without `pymongo` fails the test with a
//! message saying so; it is never a skip. The peer process is killed when [`MongoPeer`] drops.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mongodb::bson::{doc, Bson, DateTime, Document};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `tests/mongo_peer/`, where `peer.py` and `check_pymongo.py` live.
pub fn peer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mongo_peer")
}

/// The Python with `pymongo`: `TEST_PYTHON`, else `python3`. Panics (fails the test) when it
/// cannot import `pymongo` and `bson`.
pub fn python() -> String {
    let python = std::env::var("TEST_PYTHON")
        .ok()
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| "python3".to_string());
    let ok = Command::new(&python)
        .args(["-c", "import pymongo, bson"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{python} cannot import pymongo/bson, which the MongoDB wire peer needs: run the tests \
         with `scripts/test`, which installs tests/requirements.txt into target/test-venv"
    );
    python
}

/// A running peer: a one-node replica set `rs0` on 127.0.0.1.
pub struct MongoPeer {
    child: Child,
    /// Wire-protocol port.
    pub port: u16,
    /// HTTP control port.
    pub control_port: u16,
    /// `mongodb://127.0.0.1:<port>/?replicaSet=rs0` (plus `&tls=true` with TLS).
    pub uri: String,
}

impl MongoPeer {
    /// Starts `peer.py --port 0 --control-port 0 <args>` and waits (up to 30 s) for the JSON line
    /// it prints once both ports listen.
    pub fn start(args: &[&str]) -> MongoPeer {
        let python = python();
        let mut child = Command::new(&python)
            .arg(peer_dir().join("peer.py"))
            .args(["--port", "0", "--control-port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start the MongoDB wire peer with {python}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if !line.trim().is_empty() => line,
            other => {
                let _ = child.kill();
                panic!("the MongoDB wire peer did not announce its ports: {other:?}");
            }
        };
        let hello: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("peer announcement {line:?} is not JSON: {e}"));
        let port = |key: &str| -> u16 {
            hello[key]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or_else(|| panic!("peer announcement {line:?} has no {key}"))
        };
        MongoPeer {
            port: port("port"),
            control_port: port("control_port"),
            uri: hello["uri"].as_str().expect("uri").to_string(),
            child,
        }
    }

    /// `http://127.0.0.1:<control_port>`.
    pub fn control_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.control_port)
    }

    /// One control request (`GET /state`, `GET /commands`, `POST /fail {..}`, `POST /trim
    /// {keep}`, `POST /drop-connections`, ...; see tests/mongo_peer/README.md); returns the JSON
    /// answer and panics on a status other than 200.
    pub async fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        control_at(self.control_port, method, path, body).await
    }

    /// The commands the peer received with this name (`{command, db, connection, body}`), in
    /// order.
    pub async fn commands(&self, name: &str) -> Vec<Value> {
        match self.control("GET", "/commands", None).await {
            Value::Array(all) => all.into_iter().filter(|c| c["command"] == name).collect(),
            other => panic!("GET /commands: {other}"),
        }
    }
}

/// Waits (up to 20 s) until the peer holds a change-stream `getMore`, so that a fault injected
/// next hits a request in flight.
pub async fn wait_for_held_get_more(control_port: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while control_at(control_port, "GET", "/state", None).await["waiting_get_mores"]
        .as_u64()
        .unwrap_or(0)
        < 1
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the peer held no getMore within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`MongoPeer::control`] by port, for a task that does not own the peer.
pub async fn control_at(control_port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", control_port))
            .await
            .unwrap_or_else(|e| panic!("connect to the peer's control port: {e}"));
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write control request");
        stream.shutdown().await.expect("half-close control request");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .await
            .expect("read control answer");
        let (head, json) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("control answer without a body: {answer:?}"));
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "control {method} {path}: {answer}"
        );
        serde_json::from_str(json).unwrap_or_else(|e| panic!("control answer {json:?}: {e}"))
    }
}

impl Drop for MongoPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// NVSentinel's MongoDB collections, as the exporter's tests use them.
pub const DB: &str = "HealthEventsDatabase";
pub const EVENTS: &str = "HealthEvents";
pub const TOKENS: &str = "ResumeTokens";

/// A peer holding NVSentinel's two collections (created empty, as its setup job does), and a
/// driver client on it to write events and read tokens.
pub struct Store {
    pub peer: MongoPeer,
    pub client: mongodb::Client,
}

impl Store {
    /// Starts a peer with `args` (see `MongoPeer::start`) and creates the collections.
    pub async fn start(args: &[&str]) -> Store {
        let peer = MongoPeer::start(args);
        let uri = format!("mongodb://127.0.0.1:{}/?directConnection=true", peer.port);
        Store::on(peer, &uri).await
    }

    /// A store on a peer already started, reached through `client_uri` (with TLS options and
    /// credentials when the peer needs them); creates the collections.
    pub async fn on(peer: MongoPeer, client_uri: &str) -> Store {
        let client = mongodb::Client::with_uri_str(client_uri)
            .await
            .expect("client");
        let db = client.database(DB);
        db.create_collection(EVENTS).await.expect("create events");
        db.create_collection(TOKENS).await.expect("create tokens");
        Store { peer, client }
    }

    pub fn events(&self) -> mongodb::Collection<mongodb::bson::Document> {
        self.client.database(DB).collection(EVENTS)
    }

    pub fn tokens(&self) -> mongodb::Collection<mongodb::bson::Document> {
        self.client.database(DB).collection(TOKENS)
    }

    /// The exporter's environment as NVSentinel's chart sets it (no DATASTORE_PROVIDER:
    /// MongoDB).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("MONGODB_URI".into(), self.uri()),
            ("MONGODB_DATABASE_NAME".into(), DB.into()),
            ("MONGODB_COLLECTION_NAME".into(), EVENTS.into()),
            ("MONGODB_TOKEN_COLLECTION_NAME".into(), TOKENS.into()),
        ]
    }

    fn uri(&self) -> String {
        self.peer.uri.clone()
    }

    /// Inserts `health_event(node, i)` for each `i` one by one; returns their `_id` hex.
    pub async fn insert(&self, node: &str, range: std::ops::Range<i64>) -> Vec<String> {
        let mut ids = Vec::new();
        for i in range {
            let result = self
                .events()
                .insert_one(health_event(node, i))
                .await
                .expect("insert");
            ids.push(match result.inserted_id {
                Bson::ObjectId(oid) => oid.to_hex(),
                other => panic!("unexpected _id {other}"),
            });
        }
        ids
    }
}

/// A document as platform-connectors insert it (Go driver: lowercased field names, int32
/// enums, `generatedtimestamp` as `{seconds, nanos}`, zero values stored).
pub fn health_event(node: &str, i: i64) -> Document {
    doc! {
        "createdAt": DateTime::now(),
        "healthevent": {
            "version": 1_i32, "agent": "gpu-health-monitor", "componentclass": "GPU",
            "checkname": "GpuXidError", "isfatal": true, "ishealthy": false,
            "message": format!("XID 79 #{i}"), "recommendedaction": 24_i32,
            "errorcode": ["79"],
            "entitiesimpacted": [{"entitytype": "GPU", "entityvalue": i.to_string()}],
            "metadata": {"idempotencyKey": format!("{node}#{i}")},
            "generatedtimestamp": {"seconds": 1_767_225_600_i64 + i, "nanos": 250_000_000_i32},
            "nodename": node, "quarantineoverrides": Bson::Null, "drainoverrides": Bson::Null,
            "processingstrategy": 1_i32, "id": "", "customrecommendedaction": "",
        },
        "healtheventstatus": Bson::Null,
    }
}
