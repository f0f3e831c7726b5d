//! `check-config --connect` (issue 19 item 3) through the binary, against the real PostgreSQL,
//! the test token endpoint and the test sink on loopback: every check ok; an unknown database
//! and an unknown role; a token endpoint refusing the secret; a closed sink port; a sink that
//! never answers (bounded by the 10 s limit); without `--connect` nothing is contacted.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::exporter::{free_port, run_once};
use support::pg::TestDb;
use support::sink::{SinkOptions, SinkServer};
use support::token::{TokenConfig, TokenServer};

/// A config file naming `sink` and `token` (OIDC on, or off when `token` is `None`), with
/// `extra` appended, and a secret file holding `secret` beside it.
fn write_config(
    dir: &Path,
    sink: &str,
    token: Option<&TokenServer>,
    secret: &str,
    extra: &str,
) -> (PathBuf, PathBuf) {
    let oidc = match token {
        Some(token) => format!(
            "token_url = \"{}\"\nclient_id = \"{}\"\nscope = \"{}\"\n",
            token.url(),
            token.client_id(),
            token.scope()
        ),
        None => "enabled = false\n".to_string(),
    };
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[exporter.metadata]\ncluster = \"connect-test\"\n\n[exporter.sink]\n\
             endpoint = \"{sink}\"\ntimeout = \"5s\"\n\n[exporter.oidc]\n{oidc}\n{extra}"
        ),
    )
    .expect("write config");
    let secret_path = dir.join("oidc-client-secret");
    std::fs::write(&secret_path, secret).expect("write secret");
    (config, secret_path)
}

/// Runs `check-config --connect` (plus `extra` flags) off the runtime's thread, so the token
/// endpoint and the sink (served by this runtime) can answer; returns the exit code, the
/// parsed JSON report and stderr.
async fn check_connect(
    config: &Path,
    secret: &Path,
    env: Vec<(String, String)>,
    extra: &[&str],
) -> (Option<i32>, Value, String) {
    let mut args = vec![
        "check-config".to_string(),
        format!("--config={}", config.display()),
        format!("--oidc-secret-path={}", secret.display()),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let (code, out) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_once(&args, &env)
    })
    .await
    .expect("run check-config");
    // run_once gives stderr then stdout; the report is the JSON object on stdout.
    let start = out.find("\n{").map(|i| i + 1).unwrap_or(0);
    let start = if out.starts_with('{') { 0 } else { start };
    let report: Value = serde_json::from_str(&out[start..])
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{out}"));
    (code, report, out[..start].to_string())
}

fn result<'a>(report: &'a Value, check: &str) -> (&'a str, &'a str) {
    let entry = &report["connect"][check];
    (
        entry["result"].as_str().unwrap_or("<missing>"),
        entry["detail"].as_str().unwrap_or("<missing>"),
    )
}

fn with(mut env: Vec<(String, String)>, name: &str, value: &str) -> Vec<(String, String)> {
    env.retain(|(k, _)| k != name);
    env.push((name.to_string(), value.to_string()));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_check_ok_against_real_services() {
    let db = TestDb::create().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    let sink = SinkServer::start(SinkOptions {
        token_registry: Some(token.registry()),
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let dead_letter = format!("{}/dead-letters", sink.base_url());
    let (config, secret) = write_config(
        dir.path(),
        &sink.url(),
        Some(&token),
        &token.secret(),
        &format!(
            "[exporter.failure_handling]\non_rejected = \"dead_letter\"\n\n\
             [exporter.failure_handling.dead_letter]\nendpoint = \"{dead_letter}\"\n"
        ),
    );

    let (code, report, stderr) = check_connect(&config, &secret, db.env(), &["--connect"]).await;
    assert_eq!(code, Some(0), "{stderr}\n{report:#}");
    let (datastore, detail) = result(&report, "datastore");
    assert_eq!(datastore, "ok", "{detail}");
    assert!(detail.contains(&db.name), "{detail}");
    let (oidc, detail) = result(&report, "oidcTokenEndpoint");
    assert_eq!(oidc, "ok", "{detail}");
    assert!(detail.contains("client_secret_basic_raw"), "{detail}");
    // The test sink answers 405 to anything but POST: reachable all the same.
    assert_eq!(
        result(&report, "sink"),
        (
            "ok",
            &*format!("{} answered OPTIONS with HTTP 405", sink.url())
        )
    );
    assert_eq!(result(&report, "deadLetterEndpoint").0, "ok", "{report:#}");
    assert!(
        stderr.contains("connect: datastore: ok: connected to 127.0.0.1:5432/"),
        "{stderr}"
    );
    assert!(stderr.contains("connect: sink: ok: "), "{stderr}");

    // One real token grant; the sink saw OPTIONS requests only and received no event.
    assert_eq!(token.requests(), 1);
    let requests = sink.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(
        requests.iter().all(|r| r.method == "OPTIONS"),
        "{requests:?}"
    );
    assert!(sink.accepted().is_empty());

    // Read-only: the datastore holds no resume token afterwards.
    let rows = db
        .client()
        .await
        .query_one("SELECT count(*) FROM resume_tokens", &[])
        .await
        .expect("count resume_tokens");
    assert_eq!(rows.get::<_, i64>(0), 0);

    // OIDC disabled: the token check is skipped, the rest still ok.
    let (config, secret) = write_config(dir.path(), &sink.url(), None, "", "");
    let (code, report, stderr) = check_connect(&config, &secret, db.env(), &["--connect"]).await;
    assert_eq!(code, Some(0), "{stderr}\n{report:#}");
    assert_eq!(result(&report, "oidcTokenEndpoint").0, "skipped");
    assert_eq!(result(&report, "datastore").0, "ok");
    assert_eq!(result(&report, "deadLetterEndpoint").0, "skipped");
    assert_eq!(token.requests(), 1, "no token requested with OIDC disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_connect_nothing_is_contacted() {
    let db = TestDb::create().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (config, secret) = write_config(dir.path(), &sink.url(), Some(&token), &token.secret(), "");
    let (code, report, stderr) = check_connect(&config, &secret, db.env(), &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(report["connect"], "not tried: pass --connect");
    assert_eq!(token.requests(), 0);
    assert!(sink.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_and_unknown_role_fail_the_datastore_check() {
    let db = TestDb::create().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (config, secret) = write_config(dir.path(), &sink.url(), Some(&token), &token.secret(), "");

    let missing = format!("{}_missing", db.name);
    let env = with(db.env(), "DATASTORE_DATABASE", &missing);
    let (code, report, stderr) = check_connect(&config, &secret, env, &["--connect"]).await;
    assert_eq!(code, Some(2), "{stderr}\n{report:#}");
    let (outcome, detail) = result(&report, "datastore");
    assert_eq!(outcome, "failed");
    assert!(
        detail.contains(&missing) && detail.contains("does not exist"),
        "{detail}"
    );
    assert!(
        stderr.contains("connect: datastore: failed: ") && stderr.contains(&missing),
        "{stderr}"
    );
    // The other checks still ran and passed.
    assert_eq!(result(&report, "oidcTokenEndpoint").0, "ok", "{report:#}");
    assert_eq!(result(&report, "sink").0, "ok", "{report:#}");

    // Trust authentication accepts any password here, so the credentials are wrong by role.
    let env = with(db.env(), "DATASTORE_USERNAME", "no_such_exporter_role");
    let env = with(env, "DATASTORE_PASSWORD", "wrong-password");
    let (code, report, stderr) = check_connect(&config, &secret, env, &["--connect"]).await;
    assert_eq!(code, Some(2), "{stderr}\n{report:#}");
    let (outcome, detail) = result(&report, "datastore");
    assert_eq!(outcome, "failed");
    assert!(detail.contains("no_such_exporter_role"), "{detail}");
    assert!(!detail.contains("wrong-password") && !stderr.contains("wrong-password"));

    // No DATASTORE_* at all: the exporter could not start; reported, not skipped.
    let (code, report, _) = check_connect(&config, &secret, Vec::new(), &["--connect"]).await;
    assert_eq!(code, Some(2));
    let (outcome, detail) = result(&report, "datastore");
    assert_eq!(outcome, "failed");
    assert!(detail.contains("DATASTORE_PROVIDER"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_refusing_the_secret_fails_the_token_check() {
    let db = TestDb::create().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (config, secret) =
        write_config(dir.path(), &sink.url(), Some(&token), "not-the-secret", "");
    let (code, report, stderr) = check_connect(&config, &secret, db.env(), &["--connect"]).await;
    assert_eq!(code, Some(2), "{stderr}\n{report:#}");
    let (outcome, detail) = result(&report, "oidcTokenEndpoint");
    assert_eq!(outcome, "failed");
    assert!(
        detail.contains(&token.url()) && detail.contains("HTTP 401"),
        "{detail}"
    );
    assert!(!stderr.contains("not-the-secret") && !report.to_string().contains("not-the-secret"));
    assert_eq!(token.requests(), 1);
    assert_eq!(result(&report, "datastore").0, "ok");
    assert_eq!(result(&report, "sink").0, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_sink_port_fails_the_sink_check() {
    let db = TestDb::create().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let closed = format!("http://127.0.0.1:{}/api/v1/events", free_port());
    let (config, secret) = write_config(dir.path(), &closed, None, "", "");
    let (code, report, stderr) = check_connect(&config, &secret, db.env(), &["--connect"]).await;
    assert_eq!(code, Some(2), "{stderr}\n{report:#}");
    let (outcome, detail) = result(&report, "sink");
    assert_eq!(outcome, "failed");
    assert!(
        detail.contains(&closed) && detail.contains("Connection refused"),
        "{detail}"
    );
    assert!(
        stderr.contains(&format!("connect: sink: failed: {closed}")),
        "{stderr}"
    );
    assert_eq!(result(&report, "datastore").0, "ok");
}

/// A sink that accepts the connection and never answers: the check ends within its 10 s bound
/// and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sink_is_bounded_by_the_timeout() {
    let db = TestDb::create().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Accept and hold connections without reading or answering.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("http://{addr}/api/v1/events");
    let (config, secret) = write_config(dir.path(), &url, None, "", "");
    let started = Instant::now();
    let (code, report, stderr) = check_connect(&config, &secret, db.env(), &["--connect"]).await;
    let took = started.elapsed();
    holder.abort();
    assert_eq!(code, Some(2), "{stderr}\n{report:#}");
    let (outcome, detail) = result(&report, "sink");
    assert_eq!(outcome, "failed", "{detail}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(30),
        "took {took:?}"
    );
    assert_eq!(result(&report, "datastore").0, "ok");
}

/// A database missing one of the tables the exporter reads: the check names it and creates
/// nothing (SELECTs only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_fails_the_datastore_check_and_is_not_created() {
    let db = TestDb::create().await;
    db.client()
        .await
        .batch_execute("DROP TABLE resume_tokens")
        .await
        .expect("drop resume_tokens");
    let dir = tempfile::tempdir().expect("temp dir");
    let sink = SinkServer::start(SinkOptions::default()).await;
    let (config, secret) = write_config(dir.path(), &sink.url(), None, "", "");
    let (code, report, stderr) = check_connect(&config, &secret, db.env(), &["--connect"]).await;
    assert_eq!(code, Some(2), "{stderr}\n{report:#}");
    let (outcome, detail) = result(&report, "datastore");
    assert_eq!(outcome, "failed");
    assert!(
        detail.contains("missing table resume_tokens") && detail.contains("migrations"),
        "{detail}"
    );
    let still_missing = db
        .client()
        .await
        .query_one("SELECT to_regclass('resume_tokens') IS NULL", &[])
        .await
        .expect("look for resume_tokens");
    assert!(
        still_missing.get::<_, bool>(0),
        "check-config created a table"
    );
}
