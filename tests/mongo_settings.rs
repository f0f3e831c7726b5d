//! MongoDB connection settings (issue 20): `MongoSettings::from_env` + `client_options()` against
//! the MongoDB wire peer (`tests/mongo_peer/peer.py`) with a test CA made here — X.509 from the
//! client-certificate mount, CA-only TLS with SCRAM credentials in the URI (the managed-database
//! case), a CA file that appears late (waited for) or never (fails naming the variable) — and
//! `check-config` with the MongoDB environment (redaction, `--connect` ok and failing).
//!
//! Run with `scripts/test --test mongo_settings` (it installs pymongo for the peer).

#[path = "mongo_peer/launch.rs"]
mod mongo_peer_launch;
mod support;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_exporter::datastore::mongo::MongoSettings;
use mongo_peer_launch::{MongoPeer, Store, EVENTS, TOKENS};
use mongodb::bson::doc;
use mongodb::Client;
use serde_json::Value;
use support::exporter::{run_once, Exporter, ExporterOptions};
use support::sink::{SinkOptions, SinkServer};
use support::tls::{PkiPaths, TestPki};

const DB: &str = "HealthEventsDatabase";

fn settings(pairs: &[(&str, String)]) -> MongoSettings {
    try_settings(pairs).expect("valid MongoDB environment")
}

fn try_settings(
    pairs: &[(&str, String)],
) -> Result<MongoSettings, event_exporter::datastore::mongo::MongoSettingsError> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    MongoSettings::from_env(|name| map.get(name).cloned())
}

/// A test CA, the peer's server certificate and a client certificate `CN=mongo-client`, written
/// as NVSentinel mounts them (`ca.crt`, `tls.crt`, `tls.key`) into `dir`.
fn pki(dir: &Path) -> PkiPaths {
    TestPki::generate_with_client_cn("mongo-client").write_to(dir)
}

fn tls_peer(paths: &PkiPaths, extra: &[&str]) -> MongoPeer {
    let mut args = vec![
        "--tls-cert".to_string(),
        paths.server_cert.display().to_string(),
        "--tls-key".to_string(),
        paths.server_key.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    MongoPeer::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The peer's logins (`{user, mechanism}`).
async fn logins(peer: &MongoPeer) -> Vec<(String, String)> {
    peer.commands("authenticated")
        .await
        .iter()
        .map(|c| {
            (
                c["user"].as_str().unwrap_or_default().to_string(),
                c["mechanism"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn ping(options: mongodb::options::ClientOptions) -> Client {
    let client = Client::with_options(options).expect("client");
    client
        .database(DB)
        .run_command(doc! {"ping": 1})
        .await
        .expect("ping through the exporter's options");
    client
}

async fn shutdown(client: Client) {
    tokio::time::timeout(Duration::from_secs(20), client.shutdown())
        .await
        .expect("client shuts down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_from_the_client_certificate_mount() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = pki(dir.path());
    let ca = paths.ca_cert.display().to_string();
    let peer = tls_peer(
        &paths,
        &["--tls-client-ca", &ca, "--tls-client-cert", "required"],
    );
    let settings = settings(&[
        ("MONGODB_URI", peer.uri.clone()),
        ("MONGODB_DATABASE_NAME", DB.into()),
        ("APP_NAME", "event-exporter".into()),
        (
            "MONGODB_CLIENT_CERT_MOUNT_PATH",
            dir.path().display().to_string(),
        ),
    ]);
    assert!(settings.tls_mode().starts_with("client certificate"));
    let options = settings.client_options().await.expect("client options");
    let credential = options.credential.clone().expect("X.509 credential");
    assert_eq!(
        credential.mechanism,
        Some(mongodb::options::AuthMechanism::MongoDbX509)
    );
    assert_eq!(credential.source.as_deref(), Some("$external"));
    // The certificate and key the driver reads: one private PEM file, mode 0600.
    let pem = match &options.tls {
        Some(mongodb::options::Tls::Enabled(tls)) => {
            assert_eq!(tls.ca_file_path.as_deref(), Some(paths.ca_cert.as_path()));
            tls.cert_key_file_path.clone().expect("client certificate")
        }
        other => panic!("TLS not enabled: {other:?}"),
    };
    let mode = std::fs::metadata(&pem).expect("pem").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", pem.display());
    let dir_mode = std::fs::metadata(pem.parent().expect("parent"))
        .expect("pem dir")
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);

    let client = ping(options).await;
    assert!(
        logins(&peer)
            .await
            .contains(&("CN=mongo-client".into(), "MONGODB-X509".into())),
        "{:?}",
        logins(&peer).await
    );
    // APP_NAME reaches the handshake as the driver's application name.
    let hellos = peer.commands("isMaster").await;
    let hellos = [hellos, peer.commands("hello").await].concat();
    assert!(
        hellos
            .iter()
            .any(|h| h["body"]["client"]["application"]["name"] == "event-exporter"),
        "{hellos:?}"
    );
    shutdown(client).await;
}

/// The managed-database case: only `ca.crt` is mounted (the chart still names the missing
/// `tls.crt`/`tls.key`), the credentials are in the URI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_only_tls_with_scram_credentials_in_the_uri() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = pki(dir.path());
    let peer = tls_peer(&paths, &["--user", "app:s3cret", "--require-auth"]);
    let ca_dir = tempfile::tempdir().expect("ca dir");
    std::fs::copy(&paths.ca_cert, ca_dir.path().join("ca.crt")).expect("copy ca.crt");
    let uri = peer
        .uri
        .replacen("mongodb://", "mongodb://app:s3cret@", 1)
        .replace("?", &format!("{DB}?authSource=admin&"));
    let file = |name: &str| ca_dir.path().join(name).display().to_string();
    let settings = settings(&[
        ("MONGODB_URI", uri),
        ("MONGODB_DATABASE_NAME", DB.into()),
        ("MONGODB_CA_CERT_PATH", file("ca.crt")),
        ("MONGODB_CLIENT_CERT_PATH", file("tls.crt")),
        ("MONGODB_CLIENT_KEY_PATH", file("tls.key")),
    ]);
    assert!(settings.tls_mode().starts_with("CA only"));
    assert!(!settings.describe().contains("s3cret"));
    let report = settings.report().to_string();
    assert!(
        !report.contains("s3cret") && report.contains("app:***@"),
        "{report}"
    );
    let options = settings.client_options().await.expect("client options");
    let credential = options.credential.clone().expect("SCRAM credential");
    assert_eq!(credential.username.as_deref(), Some("app"));
    assert_ne!(
        credential.mechanism,
        Some(mongodb::options::AuthMechanism::MongoDbX509)
    );
    match &options.tls {
        Some(mongodb::options::Tls::Enabled(tls)) => {
            assert_eq!(tls.cert_key_file_path, None);
            assert_eq!(
                tls.ca_file_path.as_deref(),
                Some(ca_dir.path().join("ca.crt").as_path())
            );
        }
        other => panic!("TLS not enabled: {other:?}"),
    }
    let client = ping(options).await;
    let names = client
        .database(DB)
        .list_collection_names()
        .await
        .expect("listCollections as app");
    assert!(names.is_empty(), "{names:?}");
    assert!(
        logins(&peer)
            .await
            .contains(&("app".into(), "SCRAM-SHA-256".into())),
        "{:?}",
        logins(&peer).await
    );
    shutdown(client).await;
}

/// The managed-database case end to end through the binary: CA-only TLS with SCRAM credentials
/// in `MONGODB_URI`, as the chart wires it (the client certificate paths name missing files);
/// every event written is delivered once and the token is saved over that connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exporter_over_ca_only_tls_delivers_every_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = pki(dir.path());
    let peer = tls_peer(&paths, &["--user", "app:s3cret", "--require-auth"]);
    let ca_dir = tempfile::tempdir().expect("ca dir");
    std::fs::copy(&paths.ca_cert, ca_dir.path().join("ca.crt")).expect("copy ca.crt");
    let ca = ca_dir.path().join("ca.crt").display().to_string();
    let uri = peer
        .uri
        .replacen("mongodb://", "mongodb://app:s3cret@", 1)
        .replace("?", &format!("{DB}?authSource=admin&"));
    let writer_uri = format!("{uri}&tlsCAFile={ca}&directConnection=true");
    let store = Store::on(peer, &writer_uri).await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let file = |name: &str| ca_dir.path().join(name).display().to_string();
    let env = vec![
        ("MONGODB_URI".to_string(), uri),
        ("MONGODB_DATABASE_NAME".into(), DB.into()),
        ("MONGODB_COLLECTION_NAME".into(), EVENTS.into()),
        ("MONGODB_TOKEN_COLLECTION_NAME".into(), TOKENS.into()),
        ("MONGODB_CA_CERT_PATH".into(), file("ca.crt")),
        ("MONGODB_CLIENT_CERT_PATH".into(), file("tls.crt")),
        ("MONGODB_CLIENT_KEY_PATH".into(), file("tls.key")),
    ];
    let mut exporter = Exporter::start(&ExporterOptions::new(&sink, None, env)).await;
    let written = store.insert("tls-node", 0..5).await;
    let accepted = sink.wait_for_accepted(5, Duration::from_secs(30)).await;
    let mut ids: Vec<String> = accepted
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    let mut expected = written.clone();
    expected.sort();
    assert_eq!(ids, expected, "log:\n{}", exporter.log());
    exporter.terminate_cleanly().await;
    let token = store
        .tokens()
        .find_one(doc! {"clientName": "event-exporter"})
        .await
        .expect("find token")
        .expect("token saved over CA-only TLS");
    assert!(token.get("resumeToken").is_some(), "{token}");
    assert!(
        logins(&store.peer)
            .await
            .iter()
            .all(|(user, mechanism)| user == "app" && mechanism.starts_with("SCRAM")),
        "{:?}",
        logins(&store.peer).await
    );
    assert!(!exporter.log().contains("s3cret"), "the password is logged");
}

/// `MONGODB_ENABLE_CERT_ROTATION`: the client certificate in the mount is replaced (a new one
/// from the same CA, another CN); the exporter restarts in place — same process, no exit — logs
/// in with the new certificate, and every event, before and after, is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_certificate_is_used_after_an_in_place_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate_with_client_cn("mongo-client");
    let paths = pki.write_to(dir.path());
    let ca = paths.ca_cert.display().to_string();
    let peer = tls_peer(
        &paths,
        &["--tls-client-ca", &ca, "--tls-client-cert", "required"],
    );
    let mount = tempfile::tempdir().expect("mount");
    for (from, name) in [
        (&paths.ca_cert, "ca.crt"),
        (&paths.client_cert, "tls.crt"),
        (&paths.client_key, "tls.key"),
    ] {
        std::fs::copy(from, mount.path().join(name)).expect("mount file");
    }
    let writer_uri = format!(
        "{}&tlsCAFile={ca}&tlsCertificateKeyFile={}&directConnection=true",
        peer.uri,
        combined_pem(dir.path(), &paths).display()
    );
    let store = Store::on(peer, &writer_uri).await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut env = store.env();
    env.push((
        "MONGODB_CLIENT_CERT_MOUNT_PATH".into(),
        mount.path().display().to_string(),
    ));
    env.push(("MONGODB_ENABLE_CERT_ROTATION".into(), "true".into()));
    env.push(("MONGODB_CERT_ROTATION_CHECK_SECONDS".into(), "1".into()));
    let mut exporter = Exporter::start(&ExporterOptions::new(&sink, None, env)).await;
    let mut written = store.insert("rotating", 0..3).await;
    sink.wait_for_accepted(3, Duration::from_secs(30)).await;

    let (cert, key) = pki.issue_client("mongo-client-rotated");
    std::fs::write(mount.path().join("tls.crt"), cert).expect("rotate tls.crt");
    std::fs::write(mount.path().join("tls.key"), key).expect("rotate tls.key");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logins(&store.peer)
        .await
        .iter()
        .any(|(user, _)| user == "CN=mongo-client-rotated")
    {
        assert!(
            Instant::now() < deadline,
            "no login with the rotated certificate; log:\n{}",
            exporter.log()
        );
        assert!(
            exporter.try_status().is_none(),
            "the exporter exited; log:\n{}",
            exporter.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    written.extend(store.insert("rotating", 3..6).await);
    let accepted = sink.wait_for_accepted(6, Duration::from_secs(30)).await;
    let mut ids: Vec<String> = accepted
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect();
    ids.sort();
    written.sort();
    assert_eq!(ids, written, "log:\n{}", exporter.log());
    assert!(
        exporter.try_status().is_none(),
        "restarted in place, not exited"
    );
    assert!(
        exporter.log().contains("restarting in place"),
        "log:\n{}",
        exporter.log()
    );
    exporter.terminate_cleanly().await;
}

/// The client certificate and key in one PEM file, as the Rust driver reads them.
fn combined_pem(dir: &Path, paths: &PkiPaths) -> PathBuf {
    let pem = dir.join("writer.pem");
    let cert = std::fs::read_to_string(&paths.client_cert).expect("tls.crt");
    let key = std::fs::read_to_string(&paths.client_key).expect("tls.key");
    std::fs::write(&pem, format!("{cert}{key}")).expect("writer.pem");
    pem
}

/// Without any CA and with the default mount absent, TLS is as the URI says: the peer's private
/// CA is then unknown and the connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ca_means_tls_only_as_the_uri_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = pki(dir.path());
    let peer = tls_peer(&paths, &[]);
    let settings = settings(&[
        ("MONGODB_URI", peer.uri.clone()),
        ("MONGODB_CLIENT_CERT_MOUNT_PATH", String::new()),
        ("MONGODB_PING_TIMEOUT_TOTAL_SECONDS", "2".into()),
        ("MONGODB_PING_INTERVAL_SECONDS", "1".into()),
    ]);
    assert_eq!(settings.tls_mode(), "as the URI says");
    let options = settings.client_options().await.expect("client options");
    assert!(options.credential.is_none());
    match &options.tls {
        Some(mongodb::options::Tls::Enabled(tls)) => {
            assert_eq!(tls.ca_file_path, None);
            assert_eq!(tls.cert_key_file_path, None);
        }
        other => panic!("the URI's tls=true is kept: {other:?}"),
    }
    let client = Client::with_options(options).expect("client");
    let error = client
        .database(DB)
        .run_command(doc! {"ping": 1})
        .await
        .expect_err("system roots do not know the test CA");
    assert!(
        matches!(
            *error.kind,
            mongodb::error::ErrorKind::ServerSelection { .. }
        ),
        "{error}"
    );
    shutdown(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_mounted_late_is_waited_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = pki(dir.path());
    let peer = tls_peer(&paths, &[]);
    let mount = tempfile::tempdir().expect("mount");
    let ca = mount.path().join("ca.crt");
    let settings = settings(&[
        ("MONGODB_URI", peer.uri.clone()),
        ("MONGODB_CA_CERT_PATH", ca.display().to_string()),
        ("CA_CERT_MOUNT_TIMEOUT_TOTAL_SECONDS", "20".into()),
        ("CA_CERT_READ_INTERVAL_SECONDS", "1".into()),
    ]);
    let source = paths.ca_cert.clone();
    let target = ca.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        std::fs::copy(source, target).expect("mount ca.crt");
    });
    let started = Instant::now();
    let options = settings.client_options().await.expect("the CA appears");
    let waited = started.elapsed();
    writer.join().expect("writer");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    let client = ping(options).await;
    shutdown(client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_never_appears_fails_naming_the_variable() {
    let mount = tempfile::tempdir().expect("mount");
    for (variable, value, path) in [
        (
            "MONGODB_CA_CERT_PATH",
            mount.path().join("ca.crt").display().to_string(),
            mount.path().join("ca.crt"),
        ),
        (
            "MONGODB_CLIENT_CERT_MOUNT_PATH",
            mount.path().join("nothing-here").display().to_string(),
            mount.path().join("nothing-here/ca.crt"),
        ),
    ] {
        let settings = settings(&[
            (variable, value),
            ("CA_CERT_MOUNT_TIMEOUT_TOTAL_SECONDS", "2".into()),
            ("CA_CERT_READ_INTERVAL_SECONDS", "1".into()),
        ]);
        let started = Instant::now();
        let error = settings
            .client_options()
            .await
            .expect_err("no CA ever appears");
        let waited = started.elapsed();
        let text = error.to_string();
        assert!(
            text.starts_with(variable) && text.contains(&path.display().to_string()),
            "{text}"
        );
        assert!(
            text.contains("CA_CERT_MOUNT_TIMEOUT_TOTAL_SECONDS"),
            "{text}"
        );
        assert!(
            waited >= Duration::from_millis(1900) && waited < Duration::from_secs(8),
            "{waited:?}"
        );
    }
}

#[tokio::test]
async fn half_a_client_certificate_and_bad_values_name_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = pki(dir.path());
    std::fs::remove_file(&paths.client_key).expect("remove tls.key");
    let settings = settings(&[(
        "MONGODB_CLIENT_CERT_MOUNT_PATH",
        dir.path().display().to_string(),
    )]);
    let text = settings
        .client_options()
        .await
        .expect_err("tls.crt without tls.key")
        .to_string();
    assert!(
        text.contains("tls.key") && text.contains("tls.crt"),
        "{text}"
    );

    for (variable, value) in [
        ("MONGODB_CA_CERT_PATH", "relative/ca.crt"),
        ("MONGODB_CLIENT_KEY_PATH", "tls.key"),
        ("MONGODB_PING_TIMEOUT_TOTAL_SECONDS", "-3"),
        ("CA_CERT_MOUNT_TIMEOUT_TOTAL_SECONDS", "six minutes"),
        ("MONGODB_CHANGE_STREAM_RETRY_INTERVAL_SECONDS", "0"),
        ("MONGODB_ENABLE_CERT_ROTATION", "enabled"),
        ("MONGODB_CERT_ROTATION_CHECK_SECONDS", "0"),
    ] {
        let text = try_settings(&[(variable, value.into())])
            .expect_err(variable)
            .to_string();
        assert!(text.starts_with(variable) && text.contains(value), "{text}");
    }
    // The interval must be below the timeout; the error names both.
    let text = try_settings(&[
        ("MONGODB_PING_TIMEOUT_TOTAL_SECONDS", "5".into()),
        ("MONGODB_PING_INTERVAL_SECONDS", "5".into()),
    ])
    .expect_err("interval = timeout")
    .to_string();
    assert!(
        text.starts_with("MONGODB_PING_INTERVAL_SECONDS")
            && text.contains("MONGODB_PING_TIMEOUT_TOTAL_SECONDS"),
        "{text}"
    );
    // A URI that does not parse: named, password not shown.
    let text =
        settings_error_for_uri("mongodb://app:hunter2@127.0.0.1:notaport/?replicaSet=rs0").await;
    assert!(
        text.starts_with("MONGODB_URI") && !text.contains("hunter2"),
        "{text}"
    );
}

async fn settings_error_for_uri(uri: &str) -> String {
    settings(&[("MONGODB_URI", uri.to_string())])
        .client_options()
        .await
        .expect_err("bad URI")
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// check-config with the MongoDB environment
// ---------------------------------------------------------------------------------------------

fn write_config(dir: &Path) -> (PathBuf, PathBuf) {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        "[exporter.metadata]\ncluster = \"mongo-settings\"\n\n[exporter.sink]\n\
         endpoint = \"http://127.0.0.1:9/events\"\n\n[exporter.oidc]\nenabled = false\n",
    )
    .expect("write config");
    let secret = dir.join("oidc-client-secret");
    std::fs::write(&secret, "unused").expect("write secret");
    (config, secret)
}

/// Runs `check-config` (plus `extra`) with exactly `env`; returns the exit code, the JSON report
/// (stdout) and everything printed.
fn check_config(env: &[(&str, String)], extra: &[&str]) -> (Option<i32>, Value, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, secret) = write_config(dir.path());
    let mut args = vec![
        "check-config".to_string(),
        format!("--config={}", config.display()),
        format!("--oidc-secret-path={}", secret.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out) = run_once(&args, &env);
    let start = if out.starts_with('{') {
        Some(0)
    } else {
        out.find("\n{").map(|i| i + 1)
    };
    let report = start
        .and_then(|s| serde_json::from_str(&out[s..]).ok())
        .unwrap_or(Value::Null);
    (code, report, out)
}

#[test]
fn check_config_prints_the_mongodb_environment_redacted() {
    let (code, report, out) = check_config(
        &[
            (
                "MONGODB_URI",
                "mongodb+srv://app:pa55word@cluster0.example.net/?tls=true".into(),
            ),
            ("MONGODB_DATABASE_NAME", DB.into()),
            ("MONGODB_CLIENT_CERT_MOUNT_PATH", String::new()),
            ("APP_NAME", "event-exporter".into()),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("pa55word"), "{out}");
    let datastore = &report["datastore"];
    assert_eq!(datastore["provider"], "mongodb", "{out}");
    assert_eq!(
        datastore["uri"],
        "mongodb+srv://app:***@cluster0.example.net/?tls=true"
    );
    assert_eq!(datastore["database"], DB);
    assert_eq!(datastore["collection"], "HealthEvents");
    assert_eq!(datastore["tokenCollection"], "ResumeTokens");
    assert_eq!(datastore["appName"], "event-exporter");
    assert_eq!(datastore["tls"]["mode"], "as the URI says");
    assert!(
        datastore["providerFrom"]
            .as_str()
            .is_some_and(|s| s.contains("DATASTORE_PROVIDER is not set")),
        "{out}"
    );

    // A mount directory with only the CA: the report says which files are there.
    let mount = tempfile::tempdir().expect("temp dir");
    std::fs::write(mount.path().join("ca.crt"), "not read by check-config").expect("write");
    let (code, report, out) = check_config(
        &[
            ("DATASTORE_PROVIDER", "mongodb".into()),
            (
                "MONGODB_CLIENT_CERT_MOUNT_PATH",
                mount.path().display().to_string(),
            ),
        ],
        &["--skip-files"],
    );
    assert_eq!(code, Some(0), "{out}");
    let tls = &report["datastore"]["tls"];
    assert_eq!(tls["caFile"]["present"], true, "{out}");
    assert_eq!(tls["clientCert"]["present"], false, "{out}");
    assert_eq!(tls["clientKey"]["present"], false, "{out}");
    assert_eq!(tls["mode"], "CA only (credentials from the URI)", "{out}");

    // A bad value fails the check naming the variable.
    let (code, _, out) = check_config(
        &[
            ("DATASTORE_PROVIDER", "mongodb".into()),
            ("MONGODB_PING_INTERVAL_SECONDS", "60".into()),
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("invalid configuration: ")
            && out.contains("MONGODB_PING_INTERVAL_SECONDS: 60s must be less than"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_with_mongodb() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = pki(dir.path());
    let peer = tls_peer(&paths, &["--user", "app:s3cret", "--require-auth"]);
    let ca_dir = tempfile::tempdir().expect("ca dir");
    std::fs::copy(&paths.ca_cert, ca_dir.path().join("ca.crt")).expect("copy ca.crt");
    let uri = |password: &str| {
        peer.uri
            .replacen("mongodb://", &format!("mongodb://app:{password}@"), 1)
    };
    let env = |password: &str| {
        vec![
            ("DATASTORE_PROVIDER", "mongodb".to_string()),
            ("MONGODB_URI", uri(password)),
            ("MONGODB_DATABASE_NAME", DB.to_string()),
            (
                "MONGODB_CLIENT_CERT_MOUNT_PATH",
                ca_dir.path().display().to_string(),
            ),
        ]
    };
    let connect = |env: Vec<(&'static str, String)>| async move {
        tokio::task::spawn_blocking(move || check_config(&env, &["--connect"]))
            .await
            .expect("check-config")
    };

    // Only the health-events collection exists: the token collection is reported missing.
    let options = settings(&env("s3cret"))
        .client_options()
        .await
        .expect("options");
    let client = Client::with_options(options).expect("client");
    client
        .database(DB)
        .create_collection("HealthEvents")
        .await
        .expect("create HealthEvents");
    let (code, report, out) = connect(env("s3cret")).await;
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(report["connect"]["datastore"]["result"], "failed", "{out}");
    let detail = report["connect"]["datastore"]["detail"]
        .as_str()
        .unwrap_or_default();
    assert!(
        detail.contains("MONGODB_TOKEN_COLLECTION_NAME") && detail.contains("ResumeTokens"),
        "{detail}"
    );

    // Both exist: ok, through CA-only TLS and SCRAM.
    client
        .database(DB)
        .create_collection("ResumeTokens")
        .await
        .expect("create ResumeTokens");
    shutdown(client).await;
    let (code, report, out) = connect(env("s3cret")).await;
    let datastore = &report["connect"]["datastore"];
    assert_eq!(datastore["result"], "ok", "{out}");
    let detail = datastore["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("CA only") && detail.contains("HealthEvents"),
        "{detail}"
    );
    assert!(!out.contains("s3cret"), "{out}");
    // The sink (port 9) is closed, so the command as a whole still fails; only the datastore
    // check is under test here.
    assert_eq!(code, Some(2), "{out}");

    // A wrong password: failed, the password never printed.
    let (code, report, out) = connect(env("wrong-pa55")).await;
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(report["connect"]["datastore"]["result"], "failed", "{out}");
    assert!(!out.contains("wrong-pa55"), "{out}");
}
