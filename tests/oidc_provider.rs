//! OAuth2 client authentication (issue 13, "Also expected by operators") against a real
//! OpenID provider: the npm package `oidc-provider` (pinned in `tests/oidc/package.json`),
//! run on loopback by `tests/oidc/provider.mjs`, with a client secret holding `+ / : %`.
//!
//! - `client_secret_basic` (RFC 6749 §2.3.1: id and secret form-encoded, then Basic) and
//!   `client_secret_post` get tokens, and every event reaches the sink with a token the
//!   provider's introspection endpoint (RFC 7662) calls active for that client.
//! - `client_secret_basic_raw` (the Go exporter's default) sends the secret unencoded; a
//!   strict RFC server form-decodes it, so `+` becomes a space and `%41` becomes `A`: the
//!   provider answers 401 `invalid_client`, and a `%` not followed by two hex digits gets
//!   400 `invalid_request`. With a secret of unreserved characters it works.
//!
//! Needs node and `npm ci --prefix target/oidc-provider` (`scripts/test` does it);
//! `OIDC_PROVIDER_DIR` overrides the directory. Without them the tests fail.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::exporter::{Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer};

const WAIT: Duration = Duration::from_secs(20);
/// `+ / : %` and a valid percent-escape: form-decoding the raw secret changes it.
const SECRET: &str = "s3+cr/et:v%41lue";
/// A `%` without two hex digits: form-decoding the raw secret fails.
const SECRET_BAD_ESCAPE: &str = "p+w/d:%zz";
const PLAIN_SECRET: &str = "Plain-Secret_0.9~x";
const INTROSPECTOR_SECRET: &str = "introspector-secret";

fn provider_dir() -> PathBuf {
    match std::env::var("OIDC_PROVIDER_DIR") {
        Ok(dir) if !dir.trim().is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/oidc-provider"),
    }
}

/// The `node_modules` directory holding oidc-provider, or why the tests cannot run.
fn modules() -> Result<PathBuf, String> {
    let modules = provider_dir().join("node_modules");
    if !modules.join("oidc-provider/package.json").is_file() {
        return Err(format!(
            "oidc-provider is not installed in {} (cp tests/oidc/package*.json {dir}/ && \
             npm ci --prefix {dir})",
            modules.display(),
            dir = provider_dir().display()
        ));
    }
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !node.is_ok_and(|s| s.success()) {
        return Err("node is not on PATH".into());
    }
    Ok(modules)
}

/// The provider's modules; fails the test when they are missing (a check that cannot run is
/// never reported as passed): `scripts/test` installs them.
fn modules_or_skip(test: &str) -> Option<PathBuf> {
    match modules() {
        Ok(modules) => Some(modules),
        Err(reason) => panic!(
            "{test} cannot run: {reason}; run the tests with `scripts/test`, which installs the \
             pinned oidc-provider"
        ),
    }
}

/// The running provider; killed on drop.
struct Provider {
    child: Child,
    port: u16,
}

impl Provider {
    fn start(modules: &std::path::Path) -> Provider {
        let clients = json!([
            {"client_id": "basic", "client_secret": SECRET,
             "token_endpoint_auth_method": "client_secret_basic"},
            {"client_id": "basic-bad-escape", "client_secret": SECRET_BAD_ESCAPE,
             "token_endpoint_auth_method": "client_secret_basic"},
            {"client_id": "post", "client_secret": SECRET,
             "token_endpoint_auth_method": "client_secret_post"},
            {"client_id": "plain", "client_secret": PLAIN_SECRET,
             "token_endpoint_auth_method": "client_secret_basic"},
            {"client_id": "introspector", "client_secret": INTROSPECTOR_SECRET,
             "token_endpoint_auth_method": "client_secret_basic"},
        ]);
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oidc/provider.mjs");
        let mut child = Command::new("node")
            .arg(script)
            .env("OIDC_PROVIDER_MODULES", modules)
            .env("OIDC_CLIENTS", clients.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node tests/oidc/provider.mjs");
        let stdout = child.stdout.take().expect("provider stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the provider's port");
        let port = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v["port"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("the provider printed {line:?}, not {{\"port\": N}}"));
        Provider { child, port }
    }

    fn token_url(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// RFC 7662 introspection of `token`, as the `introspector` client.
    async fn introspect(&self, token: &str) -> Value {
        let body = support::tls::plain_reqwest_client()
            .post(format!(
                "http://127.0.0.1:{}/token/introspection",
                self.port
            ))
            .basic_auth("introspector", Some(INTROSPECTOR_SECRET))
            .form(&[("token", token)])
            .send()
            .await
            .expect("introspection request")
            .bytes()
            .await
            .expect("introspection answer");
        serde_json::from_slice(&body).expect("introspection JSON")
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    db: TestDb,
    sink: SinkServer,
    exporter: Exporter,
}

async fn run(provider: &Provider, client_id: &str, secret: &str, method: &str) -> Run {
    let db = TestDb::create().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.oidc = Some((
        provider.token_url(),
        client_id.to_string(),
        "events.write".to_string(),
        secret.to_string(),
    ));
    options.oidc_extra = format!("client_auth_method = \"{method}\"\n");
    options.max_retries = 2;
    let exporter = Exporter::start(&options).await;
    Run { db, sink, exporter }
}

/// Inserts 5 events, waits for them at the sink and checks that every one carried a bearer
/// token the provider issued to `client_id` and still calls active.
async fn delivers_with_introspected_tokens(provider: &Provider, run: &mut Run, client_id: &str) {
    let client = run.db.client().await;
    for i in 1..=5 {
        pg::insert_health_event(&client, &pg::health_event_doc("node-idp", i)).await;
    }
    run.sink.wait_for_accepted(5, WAIT).await;
    let tokens: BTreeSet<String> = run
        .sink
        .requests()
        .iter()
        .filter(|r| r.is_success())
        .map(|r| {
            r.header("authorization")
                .and_then(|h| h.strip_prefix("Bearer "))
                .unwrap_or_else(|| panic!("an event without a bearer token: {:?}", r.headers))
                .to_string()
        })
        .collect();
    assert_eq!(tokens.len(), 1, "one token reused for every event");
    for token in &tokens {
        let answer = provider.introspect(token).await;
        assert_eq!(answer["active"], json!(true), "{answer}");
        assert_eq!(answer["client_id"], json!(client_id), "{answer}");
        assert_eq!(answer["scope"], json!("events.write"), "{answer}");
    }
    let log = run.exporter.log();
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(run.exporter.terminate().await.code(), Some(0), "{log}");
}

/// Waits until the exporter logged `needle`, and checks that nothing reached the sink.
async fn fails_with(run: &mut Run, needle: &str) {
    let client = run.db.client().await;
    pg::insert_health_event(&client, &pg::health_event_doc("node-idp", 1)).await;
    let deadline = Instant::now() + WAIT;
    while !run.exporter.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            run.exporter.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        run.sink.requests().is_empty(),
        "nothing sent without a token"
    );
    assert!(
        !run.exporter.log().contains(SECRET),
        "the secret never appears in the log"
    );
}

#[tokio::test]
async fn client_secret_basic_form_encodes_a_secret_with_reserved_characters() {
    let Some(modules) = modules_or_skip("client_secret_basic") else {
        return;
    };
    let provider = Provider::start(&modules);
    let mut run = run(&provider, "basic", SECRET, "client_secret_basic").await;
    delivers_with_introspected_tokens(&provider, &mut run, "basic").await;
    let mut run = run_bad_escape(&provider, "client_secret_basic").await;
    delivers_with_introspected_tokens(&provider, &mut run, "basic-bad-escape").await;
}

async fn run_bad_escape(provider: &Provider, method: &str) -> Run {
    run(provider, "basic-bad-escape", SECRET_BAD_ESCAPE, method).await
}

#[tokio::test]
async fn client_secret_post_sends_the_credentials_in_the_form() {
    let Some(modules) = modules_or_skip("client_secret_post") else {
        return;
    };
    let provider = Provider::start(&modules);
    let mut run = run(&provider, "post", SECRET, "client_secret_post").await;
    delivers_with_introspected_tokens(&provider, &mut run, "post").await;
}

#[tokio::test]
async fn go_compatible_raw_basic_is_rejected_by_a_strict_rfc_server_for_such_secrets() {
    let Some(modules) = modules_or_skip("client_secret_basic_raw") else {
        return;
    };
    let provider = Provider::start(&modules);
    // `+` → space and `%41` → `A` on the server: the wrong secret.
    let mut raw = run(&provider, "basic", SECRET, "client_secret_basic_raw").await;
    fails_with(&mut raw, "answered HTTP 401").await;
    assert!(raw.exporter.log().contains("invalid_client"));
    drop(raw);
    // `%zz` cannot be form-decoded at all.
    let mut raw = run_bad_escape(&provider, "client_secret_basic_raw").await;
    fails_with(&mut raw, "answered HTTP 400").await;
    assert!(raw.exporter.log().contains("not properly encoded"));
    drop(raw);
    // The default method is the raw one.
    let db = TestDb::create().await;
    let sink = SinkServer::start(SinkOptions::default()).await;
    let mut options = ExporterOptions::new(&sink, None, db.env());
    options.oidc = Some((
        provider.token_url(),
        "basic".into(),
        "events.write".into(),
        SECRET.into(),
    ));
    let exporter = Exporter::start(&options).await;
    let mut default = Run { db, sink, exporter };
    fails_with(&mut default, "answered HTTP 401").await;
    drop(default);
    // Unreserved characters only: raw and RFC encoding are the same bytes, and it works.
    let mut plain = run(&provider, "plain", PLAIN_SECRET, "client_secret_basic_raw").await;
    delivers_with_introspected_tokens(&provider, &mut plain, "plain").await;
}
