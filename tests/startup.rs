//! Start-up behaviour of the binary: configuration, flag and datastore-environment errors
//! (exit 2, one message naming the key), unknown keys, a database without NVSentinel's
//! schema, `check-config`, `--help`/`--version`, probes and metrics, a busy metrics port.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::exporter::{binary, free_port, run_once, Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer};

const WAIT: Duration = Duration::from_secs(20);

/// A complete, valid configuration; cases below change one thing in it.
const VALID: &str = r#"[exporter]
workers = 4

[exporter.metadata]
cluster = "test-cluster"
environment = "test"

[exporter.sink]
endpoint = "http://127.0.0.1:9/api/v1/events"
timeout = "5s"

[exporter.oidc]
token_url = "http://127.0.0.1:9/oauth2/token"
client_id = "event-exporter"
scope = "events.write"

[exporter.backfill]
enabled = false
max_events = 100

[exporter.resume_token]
database = "nvsentinel"
collection = "resumetokens"

[exporter.failure_handling]
max_retries = 3
initial_backoff = "1s"
max_backoff = "30s"
backoff_multiplier = 2.0
"#;

/// `VALID` with `from` replaced by `to` (which must occur, or the case would prove nothing).
fn valid_with(from: &str, to: &str) -> String {
    assert!(
        VALID.contains(from),
        "test bug: {from:?} is not in the base config"
    );
    VALID.replacen(from, to, 1)
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

/// Runs `check-config` on the config file at `path` with a readable OIDC secret file beside it
/// (as the pod mounts one) and `extra` flags.
fn check_config(path: &str, extra: &[&str], env: &[(String, String)]) -> (Option<i32>, String) {
    let secret = Path::new(path).with_file_name("oidc-client-secret");
    std::fs::write(&secret, "s3cret").expect("write secret");
    let mut args = vec![
        "check-config".to_string(),
        format!("--config={path}"),
        format!("--oidc-secret-path={}", secret.display()),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_once(&args, env)
}

/// A syntactically valid datastore environment (nothing connects before validation ends).
fn datastore_env() -> Vec<(String, String)> {
    [
        ("DATASTORE_PROVIDER", "postgresql"),
        ("DATASTORE_HOST", "127.0.0.1"),
        ("DATASTORE_PORT", "5432"),
        ("DATASTORE_DATABASE", "nvsentinel"),
        ("DATASTORE_USERNAME", "postgres"),
        ("DATASTORE_SSLMODE", "disable"),
        (
            "POSTGRESQL_CLIENT_CERT_MOUNT_PATH",
            "/nonexistent-client-certs",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn with_env(
    mut env: Vec<(String, String)>,
    name: &str,
    value: Option<&str>,
) -> Vec<(String, String)> {
    env.retain(|(k, _)| k != name);
    if let Some(value) = value {
        env.push((name.to_string(), value.to_string()));
    }
    env
}

/// The `error` field of every ERROR line of a JSON-lines log.
fn error_messages(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|entry| entry["level"] == "ERROR")
        .map(|entry| {
            entry["error"]
                .as_str()
                .or(entry["message"].as_str())
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// Runs the main job with a config, expecting it to stop at once with status 2 and exactly
/// one error that names `key` (at the start for config keys and flags) and `bad_value`.
fn expect_rejected(
    config: &str,
    extra_args: &[&str],
    env: &[(String, String)],
    key: &str,
    bad_value: Option<&str>,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = write_config(dir.path(), config);
    let secret = dir.path().join("oidc-client-secret");
    std::fs::write(&secret, "s3cret").expect("write secret");
    let mut args = vec![
        format!("--config={config_path}"),
        format!("--oidc-secret-path={}", secret.display()),
    ];
    if !extra_args.iter().any(|a| a.starts_with("--metrics-port")) {
        args.push("--metrics-port=0".to_string());
    }
    args.extend(extra_args.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, output) = run_once(&args, env);
    assert_eq!(code, Some(2), "{key}: expected exit 2; output:\n{output}");
    let errors = error_messages(&output);
    assert_eq!(
        errors.len(),
        1,
        "{key}: expected one error message; output:\n{output}"
    );
    let message = &errors[0];
    if key.starts_with("exporter") || key.starts_with("--") {
        assert!(
            message.starts_with(key),
            "{message:?} should start with {key}"
        );
    } else {
        assert!(message.contains(key), "{message:?} should name {key}");
    }
    if let Some(bad) = bad_value {
        assert!(
            message.contains(bad),
            "{message:?} should show the bad value {bad}"
        );
    }
}

#[test]
fn each_invalid_config_value_exits_2_naming_the_key() {
    let env = datastore_env();
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        (
            "exporter.metadata.cluster",
            valid_with("cluster = \"test-cluster\"\n", ""),
            None,
        ),
        (
            "exporter.metadata.cluster",
            valid_with("cluster = \"test-cluster\"", "cluster = \"  \""),
            None,
        ),
        (
            "exporter.sink.endpoint",
            valid_with("http://127.0.0.1:9/api/v1/events", "not a url"),
            Some("not a url"),
        ),
        (
            "exporter.sink.endpoint",
            valid_with(
                "http://127.0.0.1:9/api/v1/events",
                "ftp://sink.example/events",
            ),
            Some("ftp://sink.example/events"),
        ),
        (
            "exporter.sink.timeout",
            valid_with("timeout = \"5s\"", "timeout = \"10\""),
            Some("\"10\""),
        ),
        (
            "exporter.failure_handling.initial_backoff",
            valid_with("initial_backoff = \"1s\"", "initial_backoff = \"soon\""),
            Some("soon"),
        ),
        (
            "exporter.backfill.max_events",
            valid_with("max_events = 100", "max_events = -5"),
            Some("-5"),
        ),
        (
            "exporter.failure_handling.max_retries",
            valid_with("max_retries = 3", "max_retries = -1"),
            Some("-1"),
        ),
        (
            "exporter.workers",
            valid_with("workers = 4", "workers = \"4\""),
            Some("\"4\""),
        ),
        (
            "exporter.sink.insecure_skip_verify",
            valid_with(
                "timeout = \"5s\"",
                "timeout = \"5s\"\ninsecure_skip_verify = \"yes\"",
            ),
            Some("yes"),
        ),
        (
            "exporter.oidc.scope",
            valid_with("scope = \"events.write\"\n", ""),
            None,
        ),
        (
            "exporter.oidc.token_url",
            valid_with("http://127.0.0.1:9/oauth2/token", "token-endpoint"),
            Some("token-endpoint"),
        ),
    ];
    for (key, config, bad) in &cases {
        expect_rejected(config, &[], &env, key, *bad);
    }
}

/// An endpoint typed without its scheme is the common slip: the message says what to write,
/// in the operator's terms, not the URL parser's ("relative URL without a base").
#[test]
fn an_endpoint_without_a_scheme_is_told_to_start_with_http() {
    let env = datastore_env();
    for (from, to) in [
        (
            "http://127.0.0.1:9/api/v1/events",
            "sink.example.com/events",
        ),
        ("http://127.0.0.1:9/api/v1/events", "localhost:8080/events"),
        ("http://127.0.0.1:9/oauth2/token", "auth.example.com/token"),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_config(dir.path(), &valid_with(from, to));
        let (code, output) = check_config(&path, &[], &env);
        assert_eq!(code, Some(2), "{to}: {output}");
        assert!(
            output.contains("must start with http:// or https://") && output.contains(to),
            "{to}: {output}"
        );
        assert!(!output.contains("relative URL without a base"), "{output}");
    }
}

#[test]
fn oidc_fields_are_not_required_when_oidc_is_disabled() {
    // The counterpart of the missing-scope case: proves the check is tied to `enabled`.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = valid_with(
        "token_url = \"http://127.0.0.1:9/oauth2/token\"\nclient_id = \"event-exporter\"\nscope = \"events.write\"\n",
        "enabled = false\n",
    );
    let path = write_config(dir.path(), &config);
    let (code, output) = check_config(&path, &[], &[]);
    assert_eq!(code, Some(0), "{output}");
    let report = json_report(&output);
    assert_eq!(report["exporter"]["oidc"], Value::Null, "{output}");
}

#[test]
fn bad_flags_and_datastore_environment_exit_2_naming_them() {
    let env = datastore_env();
    expect_rejected(VALID, &["--workers=-1"], &env, "--workers", Some("-1"));
    expect_rejected(
        VALID,
        &["--metrics-port=abc"],
        &env,
        "--metrics-port",
        Some("abc"),
    );
    // Unset DATASTORE_PROVIDER now means MongoDB (NVSentinel's default, tests/mongo.rs); an
    // unknown provider is refused, naming it.
    expect_rejected(
        VALID,
        &[],
        &with_env(env.clone(), "DATASTORE_PROVIDER", Some("mysql")),
        "DATASTORE_PROVIDER",
        Some("mysql"),
    );
    expect_rejected(
        VALID,
        &[],
        &with_env(env.clone(), "DATASTORE_SSLMODE", Some("bogus")),
        "DATASTORE_SSLMODE",
        Some("bogus"),
    );
    expect_rejected(
        VALID,
        &[],
        &with_env(env.clone(), "DATASTORE_PORT", Some("54x")),
        "DATASTORE_PORT",
        Some("54x"),
    );
    expect_rejected(
        VALID,
        &[],
        &with_env(
            with_env(env, "DATASTORE_SSLMODE", Some("verify-full")),
            "DATASTORE_SSLROOTCERT",
            Some("/nonexistent/ca.crt"),
        ),
        "DATASTORE_SSLROOTCERT",
        Some("/nonexistent/ca.crt"),
    );
}

#[tokio::test]
async fn unknown_keys_are_warned_about_and_ignored() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.sink_extra = "colour = \"blue\"\ntimout = \"9s\"".into();
    options.extra_toml = "[exporter.shiny_new_feature]\nlevel = 3\n".into();
    let mut exporter = Exporter::start(&options).await;

    let record_id = pg::insert_health_event(&client, &pg::health_event_doc("node-u", 1)).await;
    let events = sink.wait_for_accepted(1, WAIT).await;
    assert_eq!(events[0]["id"].as_str(), Some(record_id.as_str()));

    let log = exporter.log();
    for key in ["exporter.sink.colour", "exporter.shiny_new_feature"] {
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains("unknown") && l.contains(key)),
            "no warning naming {key}; log:\n{log}"
        );
    }
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("exporter.sink.timout")
            && l.contains("did you mean exporter.sink.timeout?")),
        "no correction offered for a misspelled key; log:\n{log}"
    );
    for known in [
        "exporter.sink.endpoint",
        "exporter.resume_token",
        "exporter.metadata",
    ] {
        assert!(
            !log.lines()
                .any(|l| l.contains("unknown") && l.contains(&format!("\"{known}\""))),
            "known key {known} reported as unknown; log:\n{log}"
        );
    }
    exporter.terminate_cleanly().await;
}

/// A database without any table, dropped on `Drop` (made with psql like an operator would).
struct EmptyDb {
    name: String,
}

impl EmptyDb {
    fn create() -> EmptyDb {
        let name = pg::unique_name("ee_empty");
        psql(
            "postgres",
            &format!("CREATE DATABASE {}", pg::quote_ident(&name)),
        );
        EmptyDb { name }
    }

    fn env(&self) -> Vec<(String, String)> {
        with_env(
            with_env(datastore_env(), "DATASTORE_DATABASE", Some(&self.name)),
            "DATASTORE_SSLMODE",
            Some("disable"),
        )
    }

    /// Names of the tables in the public schema.
    fn tables(&self) -> String {
        psql(
            &self.name,
            "SELECT string_agg(tablename, ',') FROM pg_tables WHERE schemaname = 'public'",
        )
    }
}

impl Drop for EmptyDb {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qAtc",
            ])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                pg::quote_ident(&self.name)
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn psql(db: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            db,
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(["-qAtc", sql])
        .env("PGSSLMODE", "disable")
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test]
async fn a_database_without_the_schema_stops_with_a_pointer_to_the_migrations() {
    let empty = EmptyDb::create();
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::spawn(&ExporterOptions::new(&sink, None, empty.env()));
    // A setup mistake, not an outage: no waiting for the datastore to "come back".
    let status = exporter.wait_exit(WAIT).await;
    let log = exporter.log();
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_default();
    assert!(
        last.contains("health_events") && last.contains("datastore_changelog"),
        "the error does not name the missing tables: {last}"
    );
    assert!(
        last.contains("migrations"),
        "the error does not point at the migrations: {last}"
    );
    assert_eq!(empty.tables(), "", "the exporter must never create tables");
}

#[tokio::test]
async fn a_database_without_the_schema_is_never_modified() {
    // The part of the missing-schema behaviour that holds today (see the ignored test above).
    let empty = EmptyDb::create();
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::spawn(&ExporterOptions::new(&sink, None, empty.env()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ready = exporter.probe("/readyz").await.map(|(status, _)| status);
    assert_ne!(ready, Some(200), "ready without a schema");
    exporter.kill();
    assert_eq!(empty.tables(), "", "the exporter must never create tables");
    assert!(sink.requests().is_empty());
}

/// The JSON object printed by `check-config` (stdout follows stderr in `run_once`).
fn json_report(output: &str) -> Value {
    let start = output
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in:\n{output}"));
    serde_json::from_str(&output[start..]).unwrap_or_else(|e| panic!("{e}: not JSON:\n{output}"))
}

#[test]
fn check_config_prints_effective_settings_with_the_password_redacted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = valid_with("timeout = \"5s\"", "timeout = \"5s\"\ncolour = \"blue\"")
        .replace("max_backoff = \"30s\"\n", "");
    let path = write_config(dir.path(), &config);
    let password = "pg-Passw0rd-do-not-print";
    let env = with_env(datastore_env(), "DATASTORE_PASSWORD", Some(password));
    let (code, output) = check_config(&path, &[], &env);
    // The unknown key fails the check, after the report is printed.
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("invalid configuration: exporter.sink.colour: unknown key"),
        "{output}"
    );
    assert!(
        !output.contains(password),
        "the password is printed:\n{output}"
    );
    let report = json_report(&output);
    let exporter = &report["exporter"];
    assert_eq!(
        exporter["sink"]["endpoint"],
        "http://127.0.0.1:9/api/v1/events"
    );
    assert_eq!(exporter["sink"]["timeout"], "5s");
    assert_eq!(exporter["workers"], 4);
    assert_eq!(exporter["metadata"]["cluster"], "test-cluster");
    assert_eq!(exporter["oidc"]["scope"], "events.write");
    assert_eq!(exporter["failure_handling"]["max_retries"], 3);
    // Defaults filled in for keys the file leaves out.
    assert_eq!(exporter["failure_handling"]["max_backoff"], "1m0s");
    assert_eq!(exporter["backfill"]["max_age"], "720h0m0s");
    assert_eq!(exporter["client_name"], "event-exporter");
    let datastore = &report["datastore"];
    assert_eq!(datastore["password"], "<redacted>", "{output}");
    assert_eq!(datastore["host"], "127.0.0.1");
    assert_eq!(datastore["sslmode"], "disable");
    assert_eq!(
        report["unknownKeys"],
        serde_json::json!(["exporter.sink.colour"])
    );

    // Without a password there is nothing to redact; without the unknown key it passes.
    let path = write_config(dir.path(), &config.replace("colour = \"blue\"\n", ""));
    let (code, output) = check_config(&path, &[], &datastore_env());
    assert_eq!(code, Some(0), "{output}");
    assert_eq!(json_report(&output)["datastore"]["password"], Value::Null);
}

#[test]
fn check_config_exits_2_on_an_invalid_config_or_environment() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(
        dir.path(),
        &valid_with("timeout = \"5s\"", "timeout = \"10\""),
    );
    let (code, output) = check_config(&path, &[], &datastore_env());
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("exporter.sink.timeout"), "{output}");
    assert!(
        !output.contains("\"exporter\""),
        "no report for an invalid config: {output}"
    );

    let path = write_config(dir.path(), VALID);
    let env = with_env(datastore_env(), "DATASTORE_SSLMODE", Some("bogus"));
    let (code, output) = check_config(&path, &[], &env);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("DATASTORE_SSLMODE"), "{output}");

    let missing = dir.path().join("missing.toml");
    let (code, output) = run_once(
        &["check-config", &format!("--config={}", missing.display())],
        &[],
    );
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("missing.toml"), "{output}");
}

/// A misspelled key is an error for `check-config` with the likely correction, and a WARN
/// with the same correction for the exporter; a misspelled table is an error for both, named
/// as a misspelling (not as "token_url is required … set enabled = false").
#[test]
fn misspelled_keys_and_tables_are_named_with_the_likely_correction() {
    let dir = tempfile::tempdir().expect("temp dir");
    let env = datastore_env();
    let cases = [
        (
            valid_with("max_retries = 3", "max_retires = 17"),
            "exporter.failure_handling.max_retires: unknown key (did you mean \
             exporter.failure_handling.max_retries?)",
        ),
        (
            valid_with("timeout = \"5s\"", "timout = \"5s\""),
            "exporter.sink.timout: unknown key (did you mean exporter.sink.timeout?)",
        ),
    ];
    for (config, message) in &cases {
        let path = write_config(dir.path(), config);
        let (code, output) = check_config(&path, &[], &env);
        assert_eq!(code, Some(2), "{output}");
        assert!(output.contains(message), "{message}\n{output}");
    }
    // Far from every known key: reported, with no made-up correction.
    let path = write_config(
        dir.path(),
        &valid_with("timeout = \"5s\"", "timeout = \"5s\"\ncolour = \"blue\""),
    );
    let (code, output) = check_config(&path, &[], &env);
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("exporter.sink.colour: unknown key\n"),
        "{output}"
    );

    for (from, to, key, meant) in [
        (
            "[exporter.oidc]",
            "[exporter.odic]",
            "exporter.odic",
            "[exporter.oidc]",
        ),
        (
            "[exporter.backfill]",
            "[exporter.backfil]",
            "exporter.backfil",
            "[exporter.backfill]",
        ),
        (
            "[exporter.failure_handling]",
            "[exporter.failure-handling]",
            "exporter.failure-handling",
            "[exporter.failure_handling]",
        ),
    ] {
        let path = write_config(dir.path(), &valid_with(from, to));
        let (code, output) = check_config(&path, &[], &env);
        assert_eq!(code, Some(2), "{output}");
        assert!(
            output.contains(&format!(
                "{key}: unknown table [{key}]: did you mean {meant}?"
            )),
            "{output}"
        );
        assert!(!output.contains("is required"), "{output}");
        // The exporter refuses it the same way.
        expect_rejected(&valid_with(from, to), &[], &env, key, Some(meant));
    }
}

/// `check-config` takes the exporter's flags and checks what the exporter checks at start
/// without connecting: the OIDC secret file and CA files (exit 2 naming them, for the exporter
/// too), and shows effective values as used.
#[test]
fn check_config_checks_the_secret_file_ca_files_and_flags_like_the_exporter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let env = datastore_env();
    let missing = dir.path().join("no-such-secret");
    let path = write_config(dir.path(), VALID);
    let (code, output) = run_once(
        &[
            "check-config",
            &format!("--config={path}"),
            &format!("--oidc-secret-path={}", missing.display()),
        ],
        &env,
    );
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("--oidc-secret-path: cannot read") && output.contains("no-such-secret"),
        "{output}"
    );
    // Outside the pod (a rendered config in CI), --skip-files leaves the mounted files out.
    let (code, output) = run_once(
        &[
            "check-config",
            &format!("--config={path}"),
            &format!("--oidc-secret-path={}", missing.display()),
            "--skip-files",
        ],
        &env,
    );
    assert_eq!(code, Some(0), "{output}");
    assert_eq!(json_report(&output)["files"], "not checked: --skip-files");
    // The exporter exits 2 (a configuration error), not 1, on the same mistake.
    let (code, output) = run_once(
        &[
            &format!("--config={path}"),
            &format!("--oidc-secret-path={}", missing.display()),
            "--metrics-port=0",
        ],
        &env,
    );
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("--oidc-secret-path"), "{output}");

    let not_pem = dir.path().join("ca.crt");
    std::fs::write(&not_pem, "not a certificate").expect("write");
    let config = valid_with(
        "timeout = \"5s\"",
        &format!("timeout = \"5s\"\nca_file = \"{}\"", not_pem.display()),
    );
    let path = write_config(dir.path(), &config);
    let (code, output) = check_config(&path, &[], &env);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("exporter.sink.ca_file"), "{output}");

    // Effective values: workers from the file, then the flag; the default when neither.
    let path = write_config(dir.path(), VALID);
    let (code, output) = check_config(&path, &["--workers=7"], &env);
    assert_eq!(code, Some(0), "{output}");
    assert_eq!(json_report(&output)["exporter"]["workers"], 7);
    let path = write_config(dir.path(), &valid_with("workers = 4\n", ""));
    let (code, output) = check_config(&path, &[], &env);
    assert_eq!(code, Some(0), "{output}");
    let report = json_report(&output);
    assert_eq!(report["exporter"]["workers"], 10, "{output}");
    assert_eq!(report["flags"]["metrics_port"], 2112, "{output}");
    let (code, output) = check_config(&path, &["--metrics-port=x"], &env);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("--metrics-port"), "{output}");

    // The log level and the runtime's threads: refused by check-config as by the exporter.
    let with = |name: &str, value: &str| {
        let mut env = env.clone();
        env.push((name.to_string(), value.to_string()));
        env
    };
    for (env, extra, named) in [
        (with("LOG_LEVEL", "verbose"), vec![], "LOG_LEVEL"),
        (env.clone(), vec!["--log-level=verbose"], "--log-level"),
        (
            with("TOKIO_WORKER_THREADS", "abc"),
            vec![],
            "TOKIO_WORKER_THREADS",
        ),
        (
            with("TOKIO_WORKER_THREADS", "0"),
            vec![],
            "TOKIO_WORKER_THREADS",
        ),
    ] {
        let (code, output) = check_config(&path, &extra, &env);
        assert_eq!(code, Some(2), "{named}: {output}");
        assert!(output.contains(named), "{named}: {output}");
        let mut run = vec![format!("--config={path}"), "--metrics-port=0".to_string()];
        run.extend(extra.iter().map(|a| a.to_string()));
        let run: Vec<&str> = run.iter().map(String::as_str).collect();
        let (code, output) = run_once(&run, &env);
        assert_eq!(code, Some(2), "the exporter, {named}: {output}");
        assert!(output.contains(named), "the exporter, {named}: {output}");
    }
    let (code, output) = check_config(
        &path,
        &["--log-level=WARNING"],
        &with("TOKIO_WORKER_THREADS", "3"),
    );
    assert_eq!(code, Some(0), "{output}");
    let report = json_report(&output);
    assert_eq!(report["runtime"]["workerThreads"], 3, "{output}");
    assert_eq!(report["runtime"]["logLevel"], "warn", "{output}");
}

#[test]
fn help_mentions_every_flag_and_version_prints_the_package_version() {
    let (code, help) = run_once(&["--help"], &[]);
    assert_eq!(code, Some(0), "{help}");
    for flag in [
        "--config",
        "--metrics-port",
        "--oidc-secret-path",
        "--workers",
        "check-config",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
    for default in [
        "/etc/config/config.toml",
        "2112",
        "/var/secrets/oidc-client-secret",
    ] {
        assert!(
            help.contains(default),
            "--help does not show the default {default}"
        );
    }
    let (code, version) = run_once(&["--version"], &[]);
    assert_eq!(code, Some(0), "{version}");
    assert_eq!(
        version.trim(),
        format!("event-exporter {}", env!("CARGO_PKG_VERSION"))
    );
    // Go-style single-dash spelling, as upstream's flag package accepts.
    let (code, version) = run_once(&["-version"], &[]);
    assert_eq!(code, Some(0), "{version}");
    assert!(version.contains(env!("CARGO_PKG_VERSION")));
}

#[tokio::test]
async fn probes_and_metrics_report_the_running_exporter() {
    let db = TestDb::create().await;
    let client = db.client().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut exporter = Exporter::start(&ExporterOptions::new(&sink, None, db.env())).await;

    assert_eq!(exporter.probe("/healthz").await.map(|(s, _)| s), Some(200));
    assert_eq!(exporter.probe("/readyz").await.map(|(s, _)| s), Some(200));
    assert_eq!(exporter.probe("/nope").await.map(|(s, _)| s), Some(404));

    pg::insert_health_event(&client, &pg::health_event_doc("node-m", 1)).await;
    sink.wait_for_accepted(1, WAIT).await;
    let wanted = "health_events_exporter_events_published_total{status=\"success\"} 1";
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let metrics = exporter.metrics().await;
        if metrics.lines().any(|l| l == wanted) || Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        metrics.lines().any(|l| l == wanted),
        "no {wanted:?} in:\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nvsentinel_feature_flag_enabled{")
                && l.contains("flag=\"backfill_enabled\"")
                && l.ends_with(" 0")),
        "no backfill feature flag series in:\n{metrics}"
    );
    assert!(
        metrics.contains("health_events_exporter_events_received_total 1"),
        "{metrics}"
    );
    exporter.terminate_cleanly().await;
}

/// Runs the binary with a time limit (killing it when over); `None` exit code on timeout.
fn run_bounded(
    args: &[String],
    env: &[(String, String)],
    limit: Duration,
) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log_path = dir.path().join("out.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new(binary())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log"))
        .stderr(log)
        .spawn()
        .expect("spawn event-exporter");
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, std::fs::read_to_string(&log_path).unwrap_or_default())
}

#[tokio::test]
async fn a_busy_metrics_port_stops_the_exporter_naming_the_port() {
    let db = TestDb::create().await;
    // Taken on all interfaces, where the exporter listens.
    let busy = std::net::TcpListener::bind("0.0.0.0:0").expect("bind a port");
    let port = busy.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("temp dir");
    let sink_url = "http://127.0.0.1:9/api/v1/events";
    let config = valid_with("http://127.0.0.1:9/api/v1/events", sink_url).replace(
        "token_url = \"http://127.0.0.1:9/oauth2/token\"\nclient_id = \"event-exporter\"\nscope = \"events.write\"\n",
        "enabled = false\n",
    );
    let path = write_config(dir.path(), &config);
    let args = vec![format!("--config={path}"), format!("--metrics-port={port}")];
    let (code, output) = run_bounded(&args, &db.env(), Duration::from_secs(15));
    assert_eq!(code, Some(1), "output:\n{output}");
    let errors = error_messages(&output);
    assert!(
        errors
            .iter()
            .any(|e| e.contains(&port.to_string()) && e.contains("metrics port")),
        "no error naming metrics port {port}:\n{output}"
    );
    drop(busy);

    // The same command line with a free port runs (so the port was the only problem).
    let free = free_port();
    let args = vec![format!("--config={path}"), format!("--metrics-port={free}")];
    let (code, output) = run_bounded(&args, &db.env(), Duration::from_secs(3));
    assert_eq!(code, None, "should still be running; output:\n{output}");
}
