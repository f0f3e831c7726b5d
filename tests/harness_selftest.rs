//! Proves the harness pieces work on their own, with real peers only:
//! PostgreSQL (shared server and throwaway clusters, TLS with client
//! certificates), the OAuth2 token endpoint and the CloudEvents sink.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::cluster::{self, Cluster};
use support::pg::{self, TestDb};
use support::sink::{Scripted, SinkOptions, SinkServer, CLOUDEVENTS_JSON};
use support::tls::{self, TestPki};
use support::token::{self, TokenConfig, TokenServer};

const WAIT: Duration = Duration::from_secs(5);

fn sample_event(id: &str) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "nvsentinel://test/node-a",
        "type": "com.nvidia.nvsentinel.health_event.v1",
        "time": "2026-11-25T08:00:00Z",
        "datacontenttype": "application/json",
        "data": {"nodeName": "node-a"},
    })
}

/// Next notification, or a panic saying what was awaited.
async fn next_notification(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
    what: &str,
) -> Value {
    let n = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no NOTIFY within {WAIT:?} for {what}"))
        .expect("LISTEN connection closed");
    assert_eq!(n.channel(), pg::CHANGES_CHANNEL);
    serde_json::from_str(n.payload()).expect("NOTIFY payload must be JSON")
}

/// The server's message for a refused connection (Display says only "db error").
fn db_message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_else(|| err.to_string())
}

#[tokio::test]
async fn schema_applies_and_insert_writes_changelog_and_notifies() {
    let db = TestDb::create().await;
    let client = db.client().await;
    assert_eq!(pg::schema_version(&client).await, 3);
    assert_eq!(pg::changelog_max_id(&client).await, 0);

    let (_listener, mut notes) = db.listen(pg::CHANGES_CHANNEL).await;

    let doc = pg::health_event_doc("node-a", 3);
    let uuid = pg::insert_health_event(&client, &doc).await;
    let note = next_notification(&mut notes, "health event insert").await;
    let max_id = pg::changelog_max_id(&client).await;
    assert_eq!(
        note,
        json!({"id": max_id, "table": "health_events", "operation": "INSERT"})
    );

    let row = client
        .query_one(
            "SELECT table_name, record_id::text, operation, new_values, processed \
             FROM datastore_changelog WHERE id = $1",
            &[&max_id],
        )
        .await
        .expect("changelog row must exist");
    assert_eq!(row.get::<_, String>(0), "health_events");
    assert_eq!(row.get::<_, String>(1), uuid);
    assert_eq!(row.get::<_, String>(2), "INSERT");
    let new_values: Value = row.get(3);
    assert_eq!(new_values["document"], doc);
    assert_eq!(new_values["node_name"], "node-a");
    assert_eq!(new_values["event_type"], "GpuXidError");
    assert_eq!(new_values["severity"], "GPU");
    assert_eq!(new_values["recommended_action"], "RESTART_VM");
    assert!(!row.get::<_, bool>(4), "new rows are unprocessed");

    // Maintenance events fire the same trigger on another table.
    pg::insert_maintenance_event(&client).await;
    let note = next_notification(&mut notes, "maintenance insert").await;
    assert_eq!(note["table"], "maintenance_events");
    assert_eq!(note["operation"], "INSERT");

    // NOTIFY and visibility wait for commit: hold a transaction open.
    let mut tx_client = db.client().await;
    let tx = tx_client.transaction().await.expect("begin");
    pg::insert_health_event(&tx, &pg::health_event_doc("node-b", 1)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), notes.recv())
            .await
            .is_err(),
        "NOTIFY must not arrive before commit"
    );
    let before_commit = pg::changelog_max_id(&client).await;
    tx.commit().await.expect("commit");
    let note = next_notification(&mut notes, "committed insert").await;
    assert!(note["id"].as_i64().expect("numeric id") > before_commit);

    // Resume token upsert round trip.
    let name = pg::EXPORTER_CLIENT_NAME;
    assert_eq!(pg::read_resume_token(&client, name).await, None);
    let first = json!({"timestamp": "2026-11-25T08:00:00.123Z", "eventID": 1});
    pg::write_resume_token(&client, name, &first).await;
    assert_eq!(pg::read_resume_token(&client, name).await, Some(first));
    let second = json!({"timestamp": "2026-11-25T08:00:01Z", "eventID": 2});
    pg::write_resume_token(&client, name, &second).await;
    assert_eq!(pg::read_resume_token(&client, name).await, Some(second));

    // Duplicate idempotency keys are refused by the 00003 unique index.
    let mut keyed = pg::health_event_doc("node-c", 1);
    keyed["healthevent"]["metadata"]["idempotencyKey"] = json!("k-1");
    pg::insert_health_event(&client, &keyed).await;
    let dup = client
        .execute(
            "INSERT INTO health_events (node_name, document) VALUES ('node-c', $1)",
            &[&keyed],
        )
        .await;
    assert!(dup.is_err(), "duplicate idempotencyKey must be rejected");
}

#[tokio::test]
async fn schema_applies_with_psql_on_error_stop() {
    let db = TestDb::create().await;
    // An empty database next to `db`; wrapping it in TestDb drops it at the end.
    let empty = TestDb {
        name: pg::unique_name("ee_psql"),
        host: db.host.clone(),
        port: db.port,
        user: db.user.clone(),
    };
    db.client()
        .await
        .batch_execute(&format!("CREATE DATABASE {}", pg::quote_ident(&empty.name)))
        .await
        .expect("create empty database");
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/nvsentinel-schema.sql");
    let out = Command::new("psql")
        .args([
            "-h",
            &empty.host,
            "-p",
            &empty.port.to_string(),
            "-U",
            "postgres",
        ])
        .args([
            "-d",
            &empty.name,
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-f",
            schema,
        ])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql -f {schema} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "psql printed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = empty.client().await;
    assert_eq!(pg::schema_version(&client).await, 3);
    let indexes: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' AND indexname IN \
             ('idx_changelog_resume', 'healthevent_idempotency_key_unique', \
              'idx_health_events_recovery_identity', 'idx_health_events_fault_quarantine_pending')",
            &[],
        )
        .await
        .expect("count indexes")
        .get(0);
    assert_eq!(indexes, 4);
}

#[test]
fn health_event_doc_has_postgres_path_shape() {
    let doc = pg::health_event_doc("node-a", 7);
    let he = &doc["healthevent"];
    assert_eq!(he["nodeName"], "node-a");
    assert_eq!(he["recommendedAction"], 15);
    assert_eq!(he["entitiesImpacted"][0]["entityValue"], "7");
    assert!(he.get("isHealthy").is_none(), "omitempty drops false");
    assert!(he["generatedTimestamp"]["seconds"].as_i64().is_some());
    let created = doc["createdAt"].as_str().expect("createdAt string");
    chrono::DateTime::parse_from_rfc3339(created).expect("createdAt is RFC 3339");
    assert_eq!(
        doc["healtheventstatus"]["userpodsevictionstatus"]["status"],
        ""
    );
    assert_eq!(pg::recommended_action_name(24), "RESTART_BM");
    assert_eq!(pg::recommended_action_name(1234), "1234");
}

#[test]
fn rfc3339_nano_trims_like_go() {
    use chrono::TimeZone;
    let t = chrono::Utc
        .timestamp_opt(1_764_057_600, 120_000_000)
        .single()
        .expect("valid time");
    assert_eq!(pg::rfc3339_nano(t), "2025-11-25T08:00:00.12Z");
    let whole = chrono::Utc
        .timestamp_opt(1_764_057_600, 0)
        .single()
        .expect("valid time");
    assert_eq!(pg::rfc3339_nano(whole), "2025-11-25T08:00:00Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_cluster_accepts_client_cert_and_rejects_plain() {
    cluster::require();
    let pki = TestPki::generate();
    let cluster = Cluster::start(Some(&pki));
    let db = cluster.apply_schema_db("").await;

    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(cluster.port())
        .user("postgres")
        .dbname(&db)
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(WAIT);

    // TLS + client certificate (CN=postgres) → accepted, and really encrypted.
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(pki.client_config(true));
    let (client, connection) = config
        .connect(tls)
        .await
        .unwrap_or_else(|e| panic!("cert connection failed: {e}{}", cluster.log_tail()));
    tokio::spawn(connection);
    assert_eq!(pg::schema_version(&client).await, 3);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query pg_stat_ssl")
        .get(0);
    assert!(ssl, "connection must use TLS");

    // TLS without a client certificate → refused by `cert` auth.
    let no_cert = tokio_postgres_rustls::MakeRustlsConnect::new(pki.client_config(false));
    let err = config
        .connect(no_cert)
        .await
        .err()
        .expect("TLS without a client cert must be refused");
    let message = db_message(&err);
    assert!(
        message.contains("client certificate"),
        "unexpected no-cert error: {message}"
    );

    // Plain TCP → no pg_hba.conf line matches.
    let mut plain = config.clone();
    plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let err = plain
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("plain TCP must be refused");
    let message = db_message(&err);
    assert!(
        message.contains("no pg_hba.conf entry") && message.contains("no encryption"),
        "unexpected plain-TCP error: {message}"
    );

    // The env points at files that exist.
    let env = cluster.env(&db);
    for key in [
        "DATASTORE_SSLCERT",
        "DATASTORE_SSLKEY",
        "DATASTORE_SSLROOTCERT",
    ] {
        let (_, path) = env.iter().find(|(k, _)| k == key).expect("TLS env var");
        assert!(std::path::Path::new(path).is_file(), "{key}={path} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_cluster_survives_stop_and_restart() {
    cluster::require();
    let cluster = Cluster::start(None);
    let db = TestDb::create_on("127.0.0.1", cluster.port()).await;
    let uuid = pg::insert_health_event(&db.client().await, &pg::health_event_doc("n", 1)).await;

    cluster.stop();
    assert!(
        db.config(&db.name)
            .connect(tokio_postgres::NoTls)
            .await
            .is_err(),
        "connect must fail while the cluster is stopped"
    );
    cluster.start_again();
    let client = db.client().await;
    let found: i64 = client
        .query_one(
            "SELECT count(*) FROM health_events WHERE id::text = $1",
            &[&uuid],
        )
        .await
        .expect("query after restart")
        .get(0);
    assert_eq!(found, 1, "data must survive a restart");

    cluster.restart_after(Duration::from_millis(300));
    assert!(
        db.config(&db.name)
            .connect(tokio_postgres::NoTls)
            .await
            .is_err(),
        "connect must fail during the outage"
    );
    cluster.wait_restarted();
    assert_eq!(pg::changelog_max_id(&db.client().await).await, 1);
}

#[tokio::test]
async fn token_server_and_sink_over_tls() {
    let pki = TestPki::generate();
    let config = TokenConfig::default();
    let tokens = TokenServer::start_tls(config.clone(), &pki).await;
    let sink = SinkServer::start_tls(
        SinkOptions {
            token_registry: Some(tokens.registry()),
            ..SinkOptions::default()
        },
        &pki,
    )
    .await;
    assert!(tokens.url().starts_with("https://127.0.0.1:"));
    assert!(sink.url().starts_with("https://127.0.0.1:"));
    let http = pki.reqwest_client();

    let fetch = |secret: &str, grant: &str, scope: &str| {
        http.post(tokens.url())
            .basic_auth(&config.client_id, Some(secret))
            .form(&[("grant_type", grant), ("scope", scope)])
            .send()
    };

    // Token endpoint: good request, then each way to get it wrong.
    let resp = fetch(&config.client_secret, "client_credentials", &config.scope)
        .await
        .expect("token request");
    assert_eq!(resp.status(), 200);
    let body: Value =
        serde_json::from_slice(&resp.bytes().await.expect("token body")).expect("token JSON");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    let token = body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();

    let resp = fetch("wrong", "client_credentials", &config.scope)
        .await
        .expect("send");
    assert_eq!(resp.status(), 401);
    let body: Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    assert_eq!(body["error"], "invalid_client");
    let resp = fetch(&config.client_secret, "password", &config.scope)
        .await
        .expect("send");
    assert_eq!(resp.status(), 400);
    let resp = fetch(&config.client_secret, "client_credentials", "other")
        .await
        .expect("send");
    assert_eq!(resp.status(), 400);
    let resp = http
        .post(tokens.url())
        .basic_auth(&config.client_id, Some(&config.client_secret))
        .body("grant_type=client_credentials&scope=events.write")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 400, "a missing form content type is refused");

    tokens.fail_next(1, 503);
    let resp = fetch(&config.client_secret, "client_credentials", &config.scope)
        .await
        .expect("send");
    assert_eq!(resp.status(), 503);
    assert_eq!(tokens.requests(), 6);
    let log = tokens.request_log();
    let statuses: Vec<u16> = log.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 401, 400, 400, 400, 503]);
    assert_eq!(
        log[0].content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );

    // Sink: 202 with the token, 401 without, 415 on a wrong content type.
    let event = sample_event("evt-1");
    let post = |bearer: Option<&str>, content_type: &str| {
        let mut req = http
            .post(sink.url())
            .header("content-type", content_type)
            .body(event.to_string());
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let resp = post(Some(&token), CLOUDEVENTS_JSON).await.expect("post");
    assert_eq!(resp.status(), 202);
    let body: Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    assert_eq!(body, json!({"status": "accepted"}));
    assert_eq!(
        post(None, CLOUDEVENTS_JSON).await.expect("post").status(),
        401
    );
    assert_eq!(
        post(Some("forged"), CLOUDEVENTS_JSON)
            .await
            .expect("post")
            .status(),
        401
    );
    assert_eq!(
        post(Some(&token), "application/json")
            .await
            .expect("post")
            .status(),
        415
    );

    // Scripted 503 with Retry-After, then back to 202.
    sink.push_responses(vec![Scripted {
        status: 503,
        retry_after: Some("1".into()),
        delay: None,
    }]);
    let resp = post(Some(&token), CLOUDEVENTS_JSON).await.expect("post");
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(
        post(Some(&token), CLOUDEVENTS_JSON)
            .await
            .expect("post")
            .status(),
        202
    );

    // Revocation and expiry invalidate tokens at the sink.
    tokens.revoke_all();
    assert_eq!(
        post(Some(&token), CLOUDEVENTS_JSON)
            .await
            .expect("post")
            .status(),
        401
    );
    tokens.set_expires_in(0);
    let resp = fetch(&config.client_secret, "client_credentials", &config.scope)
        .await
        .expect("send");
    let body: Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    assert_eq!(body["expires_in"], 0);
    let expired = body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();
    assert_eq!(
        post(Some(&expired), CLOUDEVENTS_JSON)
            .await
            .expect("post")
            .status(),
        401
    );

    // Secret rotation: the old secret stops working.
    tokens.set_secret("rotated");
    let resp = fetch(&config.client_secret, "client_credentials", &config.scope)
        .await
        .expect("send");
    assert_eq!(resp.status(), 401);
    let resp = fetch("rotated", "client_credentials", &config.scope)
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);

    // What the sink recorded.
    let requests = sink.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![202, 401, 401, 415, 503, 202, 401, 401]);
    let first = &requests[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.path, "/api/v1/events");
    assert_eq!(first.header("Content-Type"), Some(CLOUDEVENTS_JSON));
    let expected_auth = format!("Bearer {token}");
    assert_eq!(first.header("authorization"), Some(expected_auth.as_str()));
    assert_eq!(first.json.as_ref(), Some(&event));
    assert_eq!(sink.accepted_ids(), vec!["evt-1", "evt-1"]);
}

#[tokio::test]
async fn plain_sink_records_waits_and_fails_on_demand() {
    let sink = Arc::new(SinkServer::start(SinkOptions::default()).await);
    assert!(sink.url().starts_with("http://127.0.0.1:"));
    let http = tls::plain_reqwest_client();
    let post = |id: &str| {
        http.post(sink.url())
            .header("content-type", CLOUDEVENTS_JSON)
            .body(sample_event(id).to_string())
            .send()
    };

    // Concurrent posts arrive; wait_for_accepted returns them.
    let senders: Vec<_> = (0..3)
        .map(|i| {
            let req = post(&format!("evt-{i}"));
            tokio::spawn(async move { req.await.expect("post").status().as_u16() })
        })
        .collect();
    let accepted = sink.wait_for_accepted(3, WAIT).await;
    assert_eq!(accepted.len(), 3);
    for s in senders {
        assert_eq!(s.await.expect("sender task"), 202);
    }
    let mut ids = sink.accepted_ids();
    ids.sort();
    assert_eq!(ids, vec!["evt-0", "evt-1", "evt-2"]);

    // Wrong path and method are refused (and recorded).
    let resp = http
        .post(format!("{}/other", sink.base_url()))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 404);
    let resp = http.get(sink.url()).send().await.expect("get");
    assert_eq!(resp.status(), 405);

    // fail_always until cleared; a scripted delay holds the answer back.
    sink.fail_always(500);
    assert_eq!(post("evt-x").await.expect("post").status(), 500);
    assert_eq!(post("evt-y").await.expect("post").status(), 500);
    sink.clear_failures();
    sink.push_responses(vec![Scripted {
        status: 202,
        retry_after: None,
        delay: Some(Duration::from_millis(200)),
    }]);
    let started = std::time::Instant::now();
    assert_eq!(post("evt-3").await.expect("post").status(), 202);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(sink.accepted().len(), 4);

    // A timed-out wait panics and says how many arrived.
    let waiter = sink.clone();
    let err = tokio::spawn(async move {
        waiter
            .wait_for_accepted(10, Duration::from_millis(100))
            .await;
    })
    .await
    .expect_err("wait_for_accepted must panic on timeout");
    let panic = err.into_panic();
    let message = panic
        .downcast_ref::<String>()
        .expect("panic message is a String");
    assert!(
        message.contains("only 4 arrived"),
        "unexpected panic message: {message}"
    );
}

#[test]
fn form_and_base64_decoding() {
    assert_eq!(
        token::parse_form(b"grant_type=client_credentials&scope=a+b%2Fc"),
        vec![
            ("grant_type".to_string(), "client_credentials".to_string()),
            ("scope".to_string(), "a b/c".to_string()),
        ]
    );
    assert_eq!(
        token::base64_decode("ZXZlbnQtZXhwb3J0ZXI6czNjcmV0"),
        Some(b"event-exporter:s3cret".to_vec())
    );
    assert_eq!(token::base64_decode("YQ=="), Some(b"a".to_vec()));
    assert_eq!(token::base64_decode("!!"), None);
}
