//! Real TLS with a test CA: an HTTPS sink and an HTTPS token endpoint (CA bundle, missing CA,
//! `insecure_skip_verify`), and PostgreSQL with client-certificate authentication in every
//! TLS mode NVSentinel deploys, with the files given explicitly or found under the mount.

mod support;

use std::time::{Duration, Instant};

use support::cluster::{self, Cluster};
use support::exporter::{Exporter, ExporterOptions};
use support::pg;
use support::sink::{SinkOptions, SinkServer};
use support::tls::TestPki;
use support::token::{TokenConfig, TokenServer};

const WAIT: Duration = Duration::from_secs(20);

fn ca_line(path: &std::path::Path) -> String {
    format!("ca_file = \"{}\"\n", path.display())
}

/// An HTTPS token endpoint and an HTTPS sink that accepts its tokens, both signed by `pki`.
async fn https_peers(pki: &TestPki) -> (TokenServer, SinkServer) {
    let token = TokenServer::start_tls(TokenConfig::default(), pki).await;
    let sink = SinkServer::start_tls(
        SinkOptions {
            token_registry: Some(token.registry()),
            ..SinkOptions::default()
        },
        pki,
    )
    .await;
    (token, sink)
}

#[tokio::test]
async fn https_sink_and_token_endpoint_are_trusted_through_ca_file() {
    let pki = TestPki::generate();
    let dir = tempfile::tempdir().expect("temp dir");
    let paths = pki.write_to(dir.path());
    let db = pg::TestDb::create().await;
    let client = db.client().await;
    let (token, sink) = https_peers(&pki).await;
    assert!(sink.url().starts_with("https://") && token.url().starts_with("https://"));

    let mut options = ExporterOptions::new(&sink, Some(&token), db.env());
    options.sink_extra = ca_line(&paths.ca_cert);
    options.oidc_extra = ca_line(&paths.ca_cert);
    let mut exporter = Exporter::start(&options).await;
    let record_id = pg::insert_health_event(&client, &pg::health_event_doc("node-tls", 1)).await;
    let events = sink.wait_for_accepted(1, WAIT).await;
    assert_eq!(events[0]["id"].as_str(), Some(record_id.as_str()));
    assert_eq!(token.requests(), 1);
    let log = exporter.log();
    assert!(
        !log.contains("DISABLED"),
        "no verification warning expected:\n{log}"
    );
    assert_eq!(exporter.terminate().await.code(), Some(0), "log:\n{log}");
}

#[tokio::test]
async fn without_the_ca_file_the_private_ca_is_not_trusted() {
    let pki = TestPki::generate();
    let dir = tempfile::tempdir().expect("temp dir");
    let paths = pki.write_to(dir.path());
    let db = pg::TestDb::create().await;
    let client = db.client().await;
    let (token, sink) = https_peers(&pki).await;

    // Neither peer trusted: the token fetch fails, every attempt fails, the exporter stops.
    let mut options = ExporterOptions::new(&sink, Some(&token), db.env());
    options.max_retries = 1;
    options.initial_backoff = "100ms".into();
    let mut exporter = Exporter::start(&options).await;
    let record_id = pg::insert_health_event(&client, &pg::health_event_doc("node-ca", 1)).await;
    let status = exporter.wait_exit(WAIT).await;
    let log = exporter.log();
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert_eq!(
        token.requests(),
        0,
        "no token request may complete over an untrusted TLS"
    );
    assert!(sink.requests().is_empty());
    assert!(
        log.contains(&record_id),
        "the failure does not name the event:\n{log}"
    );
    assert!(
        log.contains("UnknownIssuer") || log.to_lowercase().contains("certificate"),
        "no certificate error in the log:\n{log}"
    );

    // Token endpoint trusted, sink not: the token is fetched, the sink is never reached.
    options.oidc_extra = ca_line(&paths.ca_cert);
    let mut exporter = Exporter::start(&options).await;
    let status = exporter.wait_exit(WAIT).await;
    let log = exporter.log();
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert_eq!(
        token.requests(),
        1,
        "the token endpoint is trusted through its ca_file"
    );
    assert!(
        sink.requests().is_empty(),
        "the sink's certificate must not be accepted"
    );
    assert!(
        log.contains("UnknownIssuer") || log.to_lowercase().contains("certificate"),
        "no certificate error in the log:\n{log}"
    );
}

#[tokio::test]
async fn insecure_skip_verify_delivers_and_warns_loudly() {
    let pki = TestPki::generate();
    let db = pg::TestDb::create().await;
    let client = db.client().await;
    let (token, sink) = https_peers(&pki).await;

    let mut options = ExporterOptions::new(&sink, Some(&token), db.env());
    options.sink_extra = "insecure_skip_verify = true\n".into();
    options.oidc_extra = "insecure_skip_verify = true\n".into();
    let mut exporter = Exporter::start(&options).await;
    pg::insert_health_event(&client, &pg::health_event_doc("node-insecure", 1)).await;
    sink.wait_for_accepted(1, WAIT).await;
    exporter.terminate_cleanly().await;

    let log = exporter.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("verification is DISABLED"))
        .collect();
    assert!(
        warnings.iter().any(|l| l.contains("sink")) && warnings.iter().any(|l| l.contains("OIDC")),
        "expected a warning for the sink and for the token endpoint; log:\n{log}"
    );
}

/// A variable to set (`Some`) or remove (`None`).
type EnvOverride = (&'static str, Option<String>);

/// Environment for `db` on the TLS cluster with `overrides` applied (`None` removes a variable).
fn pg_env(cluster: &Cluster, db: &str, overrides: &[EnvOverride]) -> Vec<(String, String)> {
    let mut env = cluster.env(db);
    for (name, value) in overrides {
        env.retain(|(k, _)| k != name);
        if let Some(value) = value {
            env.push((name.to_string(), value.clone()));
        }
    }
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_with_client_certificates_in_every_verifying_mode() {
    cluster::require();
    let pki = TestPki::generate();
    let cluster = Cluster::start(Some(&pki));
    let paths = cluster.tls_paths().expect("TLS cluster").clone();
    let db = cluster.apply_schema_db("").await;
    let admin = cluster.admin_client(&db).await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let path = |p: &std::path::Path| Some(p.display().to_string());

    let cases: Vec<(&str, Vec<EnvOverride>)> = vec![
        // The harness default: verify-full with explicit files.
        ("verify-full, explicit files", vec![]),
        (
            "verify-ca, explicit files",
            vec![("DATASTORE_SSLMODE", Some("verify-ca".into()))],
        ),
        (
            "verify-full, files found under POSTGRESQL_CLIENT_CERT_MOUNT_PATH",
            vec![
                ("DATASTORE_SSLCERT", None),
                ("DATASTORE_SSLKEY", None),
                ("DATASTORE_SSLROOTCERT", None),
                ("POSTGRESQL_CLIENT_CERT_MOUNT_PATH", path(&paths.dir)),
            ],
        ),
        (
            "verify-ca, files found under POSTGRESQL_CLIENT_CERT_MOUNT_PATH",
            vec![
                ("DATASTORE_SSLMODE", Some("verify-ca".into())),
                ("DATASTORE_SSLCERT", None),
                ("DATASTORE_SSLKEY", None),
                ("DATASTORE_SSLROOTCERT", None),
                ("POSTGRESQL_CLIENT_CERT_MOUNT_PATH", path(&paths.dir)),
            ],
        ),
        (
            "verify-full by host name localhost",
            vec![("DATASTORE_HOST", Some("localhost".into()))],
        ),
    ];
    let mut delivered = 0;
    for (i, (name, overrides)) in cases.iter().enumerate() {
        let started = Instant::now();
        let options = ExporterOptions::new(&sink, None, pg_env(&cluster, &db, overrides));
        let mut exporter = Exporter::spawn(&options);
        exporter.wait_ready(WAIT).await;
        let record_id =
            pg::insert_health_event(&admin, &pg::health_event_doc("node-pg", i as u32)).await;
        delivered += 1;
        let events = sink.wait_for_accepted(delivered, WAIT).await;
        assert!(
            events
                .iter()
                .any(|e| e["id"].as_str() == Some(record_id.as_str())),
            "{name}: event not delivered"
        );
        let status = exporter.terminate().await;
        assert_eq!(status.code(), Some(0), "{name}: log:\n{}", exporter.log());
        println!("{name}: delivered and stopped in {:?}", started.elapsed());
    }
    assert_eq!(
        sink.accepted().len(),
        cases.len(),
        "each event exactly once"
    );
}

/// Runs the exporter against a TLS cluster whose server certificate was signed by a CA other
/// than the one the exporter trusts, asserts it never becomes ready within a few seconds and
/// never delivers, kills it and returns its log.
async fn run_against_an_untrusted_server_certificate() -> String {
    let pki = TestPki::generate();
    let cluster = Cluster::start(Some(&pki));
    let db = cluster.apply_schema_db("").await;
    let admin = cluster.admin_client(&db).await;
    let other = TestPki::generate();
    let other_dir = tempfile::tempdir().expect("temp dir");
    let other_paths = other.write_to(other_dir.path());
    let sink = SinkServer::start(SinkOptions::default()).await;

    // Our client certificate is fine; only the CA we trust did not sign the server.
    let env = pg_env(
        &cluster,
        &db,
        &[
            (
                "DATASTORE_SSLROOTCERT",
                Some(other_paths.ca_cert.display().to_string()),
            ),
            (
                "POSTGRESQL_CLIENT_CERT_MOUNT_PATH",
                Some("/nonexistent-client-certs".into()),
            ),
        ],
    );
    let mut exporter = Exporter::spawn(&ExporterOptions::new(&sink, None, env));
    pg::insert_health_event(&admin, &pg::health_event_doc("node-untrusted", 1)).await;
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        let ready = exporter.probe("/readyz").await.map(|(status, _)| status);
        assert_ne!(
            ready,
            Some(200),
            "ready although the server certificate is untrusted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = exporter.log();
    exporter.kill();
    assert!(
        sink.requests().is_empty(),
        "nothing may be read from an untrusted server"
    );
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_rejects_a_server_certificate_from_another_ca() {
    cluster::require();
    let log = run_against_an_untrusted_server_certificate().await;
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("TLS handshake")),
        "the log does not show the failed TLS handshake:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_certificate_failures_are_named_in_the_log() {
    cluster::require();
    let log = run_against_an_untrusted_server_certificate().await;
    assert!(
        log.contains("UnknownIssuer") || log.to_lowercase().contains("certificate"),
        "the log does not show the certificate problem:\n{log}"
    );
}
