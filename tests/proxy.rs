//! `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` (issue 13, "Also expected by operators"): the
//! sink and the token endpoint are reached through a real proxy on loopback (CONNECT for
//! https://, absolute-form for http://), `NO_PROXY` bypasses it, and `check-config` shows the
//! proxy in effect for each endpoint with its credentials redacted. The variables are set on
//! the exporter child only.

mod support;

use std::time::Duration;

use support::exporter::{run_once, Exporter, ExporterOptions};
use support::http_proxy::HttpProxy;
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer};
use support::tls::TestPki;
use support::token::{base64_decode, TokenConfig, TokenServer};

const WAIT: Duration = Duration::from_secs(20);

async fn insert(db: &TestDb, n: u32) {
    let client = db.client().await;
    for i in 1..=n {
        pg::insert_health_event(&client, &pg::health_event_doc("node-proxy", i)).await;
    }
}

fn decoded_basic(header: Option<&str>) -> Option<String> {
    header
        .and_then(|h| h.strip_prefix("Basic "))
        .and_then(base64_decode)
        .and_then(|raw| String::from_utf8(raw).ok())
}

#[tokio::test]
async fn https_sink_and_token_endpoint_are_reached_through_https_proxy_with_connect() {
    let pki = TestPki::generate();
    let dir = tempfile::tempdir().expect("temp dir");
    let paths = pki.write_to(dir.path());
    let db = TestDb::create().await;
    let token = TokenServer::start_tls(TokenConfig::default(), &pki).await;
    let sink = SinkServer::start_tls(
        SinkOptions {
            token_registry: Some(token.registry()),
            ..SinkOptions::default()
        },
        &pki,
    )
    .await;
    let proxy = HttpProxy::start().await;
    let mut options = ExporterOptions::new(&sink, Some(&token), db.env());
    let ca = format!("ca_file = \"{}\"\n", paths.ca_cert.display());
    options.sink_extra = ca.clone();
    options.oidc_extra = ca;
    let proxy_url = format!("http://egress:p%40ss@{}", proxy.addr);
    options.env.push(("HTTPS_PROXY".into(), proxy_url));
    // A dead-letter endpoint: never POSTed to here (nothing is rejected), its proxy logged.
    options.failure_extra = "on_rejected = \"dead_letter\"".into();
    options.extra_toml = format!(
        "[exporter.failure_handling.dead_letter]\nendpoint = \"https://{}/dead-letter\"\n",
        sink.addr()
    );
    let mut exporter = Exporter::start(&options).await;

    insert(&db, 5).await;
    sink.wait_for_accepted(5, WAIT).await;
    let seen = proxy.requests();
    let sink_authority = sink.addr().to_string();
    let token_authority = token
        .url()
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    for authority in [&sink_authority, &token_authority] {
        let tunnels: Vec<_> = seen
            .iter()
            .filter(|r| r.method == "CONNECT" && &r.target == authority)
            .collect();
        assert!(
            !tunnels.is_empty(),
            "no CONNECT {authority} through the proxy; it saw {seen:?}"
        );
        for tunnel in tunnels {
            assert_eq!(
                decoded_basic(tunnel.proxy_authorization.as_deref()).as_deref(),
                Some("egress:p@ss"),
                "proxy credentials from the URL, percent-decoded"
            );
        }
    }
    assert!(seen.iter().all(|r| r.method == "CONNECT"), "{seen:?}");
    assert_eq!(token.requests(), 1);
    let log = exporter.log();
    let expected = format!("proxy=http://{}/ (credentials redacted)", proxy.addr);
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("reached through proxy") && l.contains(&expected))
            .count(),
        3,
        "the sink's, the token endpoint's and the dead letter's proxy logged at start, \
         redacted:\n{log}"
    );
    assert!(!log.contains("p%40ss") && !log.contains("p@ss"), "{log}");
    assert_eq!(
        exporter.terminate().await.code(),
        Some(0),
        "{}",
        exporter.log()
    );
}

#[tokio::test]
async fn http_sink_and_token_endpoint_are_forwarded_by_lowercase_http_proxy() {
    let db = TestDb::create().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    let sink = SinkServer::start(SinkOptions {
        token_registry: Some(token.registry()),
        ..SinkOptions::default()
    })
    .await;
    let proxy = HttpProxy::start().await;
    let mut options = ExporterOptions::new(&sink, Some(&token), db.env());
    options.env.push(("http_proxy".into(), proxy.url()));
    let mut exporter = Exporter::start(&options).await;

    insert(&db, 5).await;
    sink.wait_for_accepted(5, WAIT).await;
    let seen = proxy.requests();
    assert!(
        seen.iter()
            .any(|r| r.method == "POST" && r.target == sink.url()),
        "the sink's POST went through the proxy in absolute form; it saw {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|r| r.method == "POST" && r.target == token.url()),
        "the token request went through the proxy; it saw {seen:?}"
    );
    assert_eq!(
        exporter.terminate().await.code(),
        Some(0),
        "{}",
        exporter.log()
    );
}

#[tokio::test]
async fn no_proxy_bypasses_the_proxy_per_host() {
    let db = TestDb::create().await;
    let token = TokenServer::start(TokenConfig::default()).await;
    let sink = SinkServer::start(SinkOptions {
        token_registry: Some(token.registry()),
        ..SinkOptions::default()
    })
    .await;
    let proxy = HttpProxy::start().await;

    // Everything bypassed.
    let mut options = ExporterOptions::new(&sink, Some(&token), db.env());
    options.env.push(("HTTP_PROXY".into(), proxy.url()));
    options.env.push(("HTTPS_PROXY".into(), proxy.url()));
    options
        .env
        .push(("NO_PROXY".into(), "example.com,127.0.0.1".into()));
    let mut exporter = Exporter::start(&options).await;
    insert(&db, 3).await;
    sink.wait_for_accepted(3, WAIT).await;
    assert!(proxy.requests().is_empty(), "{:?}", proxy.requests());
    assert_eq!(
        exporter.terminate().await.code(),
        Some(0),
        "{}",
        exporter.log()
    );

    // Only the token endpoint (reached as localhost) bypassed; the sink (127.0.0.1) proxied.
    let mut options = ExporterOptions::new(&sink, Some(&token), db.env());
    if let Some(oidc) = options.oidc.as_mut() {
        oidc.0 = oidc.0.replace("127.0.0.1", "localhost");
    }
    options.env.push(("HTTP_PROXY".into(), proxy.url()));
    options.env.push(("no_proxy".into(), "localhost".into()));
    let mut exporter = Exporter::start(&options).await;
    let client = db.client().await;
    pg::insert_health_event(&client, &pg::health_event_doc("node-proxy", 4)).await;
    sink.wait_for_accepted(4, WAIT).await;
    let seen = proxy.requests();
    assert!(seen.iter().any(|r| r.target == sink.url()), "{seen:?}");
    assert!(
        seen.iter().all(|r| !r.target.contains("oauth2")),
        "the token endpoint was not bypassed: {seen:?}"
    );
    assert!(token.requests() >= 2, "a fresh token from the second run");
    assert_eq!(
        exporter.terminate().await.code(),
        Some(0),
        "{}",
        exporter.log()
    );
}

#[test]
fn check_config_shows_the_proxy_for_each_endpoint_with_credentials_redacted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[exporter.metadata]\ncluster = \"c\"\n[exporter.sink]\nendpoint = \
         \"https://sink.example/events\"\n[exporter.oidc]\ntoken_url = \
         \"https://idp.internal/token\"\nclient_id = \"id\"\nscope = \"s\"\n\
         [exporter.failure_handling]\non_rejected = \"dead_letter\"\n\
         [exporter.failure_handling.dead_letter]\nendpoint = \"https://quarantine.example/dl\"\n",
    )
    .expect("write config");
    let config = format!("--config={}", path.display());
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };

    let (code, out) = run_once(&["check-config", "--skip-files", &config], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"sink\": \"none (direct)\""), "{out}");
    assert!(
        out.contains("\"oidcTokenEndpoint\": \"none (direct)\""),
        "{out}"
    );
    assert!(
        out.contains("\"deadLetterEndpoint\": \"none (direct)\""),
        "{out}"
    );

    let (code, out) = run_once(
        &["check-config", "--skip-files", &config],
        &env(&[
            ("HTTPS_PROXY", "http://egress:hunter2@proxy.corp:3128"),
            ("NO_PROXY", ".internal"),
        ]),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("\"sink\": \"http://proxy.corp:3128/ (credentials redacted)\""),
        "{out}"
    );
    assert!(
        out.contains("\"oidcTokenEndpoint\": \"none (direct)\""),
        "{out}"
    );
    // The dead letter goes through the sink's proxy settings too.
    assert!(
        out.contains("\"deadLetterEndpoint\": \"http://proxy.corp:3128/ (credentials redacted)\""),
        "{out}"
    );
    assert!(!out.contains("hunter2") && !out.contains("egress"), "{out}");

    // HTTP_PROXY does not apply to https:// endpoints.
    let (code, out) = run_once(
        &["check-config", "--skip-files", &config],
        &env(&[("http_proxy", "http://proxy.corp:3128")]),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"sink\": \"none (direct)\""), "{out}");
}
