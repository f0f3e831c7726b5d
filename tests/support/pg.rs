//! Per-test PostgreSQL databases with NVSentinel's schema, plus helpers that
//! write rows the way NVSentinel's Go code does.

use std::process::{Command, Stdio};

use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};
use tokio_postgres::{AsyncMessage, Client, GenericClient, NoTls, Notification};

/// NVSentinel's schema as migrations 00001-00003 leave it (see the file header).
pub const SCHEMA_SQL: &str = include_str!("../../sql/nvsentinel-schema.sql");

/// Client name NVSentinel's exporter uses for its `resume_tokens` row.
pub const EXPORTER_CLIENT_NAME: &str = "event-exporter";

/// NOTIFY channel written by `log_table_changes()`.
pub const CHANGES_CHANNEL: &str = "nvsentinel_changes";

/// A uniquely named database with the schema applied, dropped on `Drop`.
///
/// Each test gets its own database so tests can run in parallel against one
/// server without seeing each other's changelog rows.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub user: String,
}

impl TestDb {
    /// New database on the shared server at 127.0.0.1:5432 (user `postgres`, trust).
    pub async fn create() -> TestDb {
        Self::create_on("127.0.0.1", 5432).await
    }

    /// New database on another server reachable over plain TCP with trust
    /// auth as `postgres` (e.g. a no-TLS [`super::cluster::Cluster`]).
    pub async fn create_on(host: &str, port: u16) -> TestDb {
        let db = TestDb {
            name: unique_name("ee_test"),
            host: host.to_string(),
            port,
            user: "postgres".to_string(),
        };
        let admin = connect(&db.config("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&db.name)))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {} on {host}:{port}: {e}", db.name));
        // From here on `db` exists, so a failing schema still gets cleaned up.
        db.client()
            .await
            .batch_execute(SCHEMA_SQL)
            .await
            .unwrap_or_else(|e| panic!("apply NVSentinel schema to {}: {e}", db.name));
        db
    }

    /// Connection settings for database `dbname` on this server.
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(dbname)
            .application_name("ee-test-harness")
            .connect_timeout(std::time::Duration::from_secs(10));
        config
    }

    /// libpq-style connection string for this database.
    pub fn conn_string(&self) -> String {
        format!(
            "host={} port={} user={} dbname={} sslmode=disable",
            self.host, self.port, self.user, self.name
        )
    }

    /// A connected client; the connection runs in a spawned task.
    pub async fn client(&self) -> Client {
        connect(&self.config(&self.name)).await
    }

    /// A client that has run `LISTEN <channel>`, with a receiver for the
    /// notifications. Keep the client alive as long as you read the receiver.
    pub async fn listen(
        &self,
        channel: &str,
    ) -> (Client, tokio::sync::mpsc::UnboundedReceiver<Notification>) {
        let (client, mut connection) = self
            .config(&self.name)
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {} for LISTEN: {e}", self.name));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Notifications only surface through Connection::poll_message.
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            use futures_util::StreamExt;
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("LISTEN connection ended: {e}");
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {}", quote_ident(channel)))
            .await
            .unwrap_or_else(|e| panic!("LISTEN {channel}: {e}"));
        (client, rx)
    }

    /// Environment for the exporter, as NVSentinel's datastore ConfigMap would
    /// set it for a password-less, TLS-less PostgreSQL.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("DATASTORE_PROVIDER", "postgresql".to_string()),
            ("DATASTORE_HOST", self.host.clone()),
            ("DATASTORE_PORT", self.port.to_string()),
            ("DATASTORE_DATABASE", self.name.clone()),
            ("DATASTORE_USERNAME", self.user.clone()),
            ("DATASTORE_SSLMODE", "disable".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for TestDb {
    /// Synchronous on purpose: Drop cannot await, and the test runtime may
    /// already be shutting down. Errors are ignored (the server may be gone).
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", &self.host, "-p", &self.port.to_string()])
            .args(["-U", &self.user, "-d", "postgres", "-qAt"])
            .args(["-v", "ON_ERROR_STOP=1", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&self.name)
            ))
            .env("PGCONNECT_TIMEOUT", "5")
            .env("PGSSLMODE", "disable")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `<prefix>_<pid>_<random hex>`: unique across parallel tests and processes.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}_{:016x}", std::process::id(), fastrand::u64(..))
}

/// Double-quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn connect(config: &tokio_postgres::Config) -> Client {
    let (client, connection) = config.connect(NoTls).await.unwrap_or_else(|e| {
        panic!(
            "connect to PostgreSQL {:?} db {:?}: {e}",
            config.get_hosts(),
            config.get_dbname()
        )
    });
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("test PostgreSQL connection ended: {e}");
        }
    });
    client
}

/// Go's time.RFC3339Nano: UTC with trailing fractional zeros trimmed.
pub fn rfc3339_nano(t: chrono::DateTime<Utc>) -> String {
    let s = t.to_rfc3339_opts(SecondsFormat::Nanos, true);
    match s.split_once('.') {
        Some((whole, frac)) => {
            let digits = frac.trim_end_matches('Z').trim_end_matches('0');
            if digits.is_empty() {
                format!("{whole}Z")
            } else {
                format!("{whole}.{digits}Z")
            }
        }
        None => s,
    }
}

/// Enum name NVSentinel stores in `health_events.recommended_action`.
pub fn recommended_action_name(action: i64) -> String {
    match action {
        0 => "NONE",
        2 => "COMPONENT_RESET",
        5 => "CONTACT_SUPPORT",
        6 => "RUN_FIELDDIAG",
        15 => "RESTART_VM",
        24 => "RESTART_BM",
        25 => "REPLACE_VM",
        26 => "RUN_DCGMEUD",
        27 => "CUSTOM",
        99 => "UNKNOWN",
        other => return other.to_string(),
    }
    .to_string()
}

/// A health event `document` as NVSentinel's PostgreSQL path stores it:
/// camelCase protobuf JSON inside `healthevent` with Go `omitempty` (false,
/// 0, "" and empty lists absent; enums as numbers), lowercase status keys.
/// `i` varies the GPU index and the message so events are distinguishable.
pub fn health_event_doc(node: &str, i: u32) -> Value {
    let now = Utc::now();
    let mut generated = serde_json::Map::new();
    generated.insert("seconds".into(), json!(now.timestamp()));
    if now.timestamp_subsec_nanos() != 0 {
        generated.insert("nanos".into(), json!(now.timestamp_subsec_nanos()));
    }
    json!({
        "createdAt": rfc3339_nano(now),
        "healthevent": {
            "version": 1,
            "agent": "gpu-health-monitor",
            "componentClass": "GPU",
            "checkName": "GpuXidError",
            "isFatal": true,
            "message": format!("XID 79 on GPU {i}: GPU has fallen off the bus (event {i})"),
            "recommendedAction": 15,
            "errorCode": ["79"],
            "entitiesImpacted": [{"entityType": "GPU", "entityValue": i.to_string()}],
            "metadata": {
                "chassis_serial": format!("CS-{node}"),
                "node.kubernetes.io/instance-type": "p5.48xlarge",
            },
            "generatedTimestamp": Value::Object(generated),
            "nodeName": node,
            "processingStrategy": 1,
        },
        "healtheventstatus": {
            "nodequarantined": null,
            "userpodsevictionstatus": {"status": ""},
            "faultremediated": null,
        },
    })
}

/// Inserts a health event row like NVSentinel's platform connector (the
/// denormalised columns filled from the document) and returns its UUID.
/// Works with a `Client` or a `Transaction` (hold one open to create a
/// changelog row whose commit is delayed).
pub async fn insert_health_event<C: GenericClient>(client: &C, doc: &Value) -> String {
    let he = &doc["healthevent"];
    let text = |camel: &str, lower: &str| -> Option<String> {
        he.get(camel)
            .or_else(|| he.get(lower))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let node_name = text("nodeName", "nodename").unwrap_or_default();
    let action = he
        .get("recommendedAction")
        .or_else(|| he.get("recommendedaction"))
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let row = client
        .query_one(
            "INSERT INTO health_events \
               (node_name, event_type, severity, recommended_action, document) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id::text",
            &[
                &node_name,
                &text("checkName", "checkname"),
                &text("componentClass", "componentclass"),
                &recommended_action_name(action),
                doc,
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("insert health event for node {node_name:?}: {e}"));
    row.get(0)
}

/// Inserts health events with `documents` in one transaction, so they become visible (and are
/// dispatched) together; their ids, in order.
pub async fn insert_health_events_at_once(
    client: &mut Client,
    documents: impl IntoIterator<Item = Value>,
) -> Vec<String> {
    let transaction = client.transaction().await.expect("begin");
    let mut ids = Vec::new();
    for document in documents {
        ids.push(insert_health_event(&transaction, &document).await);
    }
    transaction.commit().await.expect("commit");
    ids
}

/// Inserts a CSP maintenance event (fires the same trigger on another table,
/// so tests can check that the exporter ignores it). Returns its UUID.
pub async fn insert_maintenance_event<C: GenericClient>(client: &C) -> String {
    let event_id = unique_name("maint");
    let doc = json!({
        "eventId": event_id,
        "csp": "aws",
        "clusterName": "test-cluster",
        "nodeName": "node-maint",
        "status": "MAINTENANCE_SCHEDULED",
        "cspStatus": "scheduled",
    });
    let row = client
        .query_one(
            "INSERT INTO maintenance_events \
               (event_id, csp, cluster_name, node_name, status, csp_status, \
                scheduled_start_time, event_received_timestamp, document) \
             VALUES ($1, 'aws', 'test-cluster', 'node-maint', 'MAINTENANCE_SCHEDULED', \
                     'scheduled', NOW() + INTERVAL '1 hour', NOW(), $2) \
             RETURNING id::text",
            &[&event_id, &doc],
        )
        .await
        .unwrap_or_else(|e| panic!("insert maintenance event: {e}"));
    row.get(0)
}

/// Highest `datastore_changelog.id` (0 when empty).
pub async fn changelog_max_id<C: GenericClient>(client: &C) -> i64 {
    client
        .query_one("SELECT COALESCE(MAX(id), 0) FROM datastore_changelog", &[])
        .await
        .unwrap_or_else(|e| panic!("read changelog max id: {e}"))
        .get(0)
}

/// `SELECT COALESCE(MAX(version), 0) FROM nvsentinel_schema_migrations`, as NVSentinel checks it.
pub async fn schema_version<C: GenericClient>(client: &C) -> i64 {
    client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM nvsentinel_schema_migrations",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("read schema version: {e}"))
        .get(0)
}

/// The stored bookmark of `client_name`, if any.
pub async fn read_resume_token<C: GenericClient>(client: &C, client_name: &str) -> Option<Value> {
    client
        .query_opt(
            "SELECT resume_token FROM resume_tokens WHERE client_name = $1",
            &[&client_name],
        )
        .await
        .unwrap_or_else(|e| panic!("read resume token of {client_name}: {e}"))
        .map(|row| row.get(0))
}

/// Upserts a bookmark exactly as NVSentinel does.
/// The exporter's resume token (`eventID`) is the changelog's newest id: every event was
/// delivered and the token has no gap. `context` is the assertion's message.
pub async fn assert_token_at_head<C: GenericClient>(client: &C, context: &str) {
    let saved = read_resume_token(client, EXPORTER_CLIENT_NAME)
        .await
        .expect("token");
    assert_eq!(
        saved["eventID"],
        serde_json::json!(changelog_max_id(client).await),
        "{context}"
    );
}

pub async fn write_resume_token<C: GenericClient>(client: &C, client_name: &str, value: &Value) {
    client
        .execute(
            "INSERT INTO resume_tokens (client_name, resume_token, last_updated) \
             VALUES ($1, $2, NOW()) \
             ON CONFLICT (client_name) DO UPDATE \
             SET resume_token = EXCLUDED.resume_token, last_updated = NOW()",
            &[&client_name, value],
        )
        .await
        .unwrap_or_else(|e| panic!("write resume token of {client_name}: {e}"));
}
