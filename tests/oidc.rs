//! The token endpoint's answers as real identity providers send them (issue 13 item 2, item 7
//! for token answers; issue 14 item 4), through the binary: a real token endpoint and a real
//! sink that accepts only tokens the endpoint issued and that have not expired, so every
//! accepted event proves it went out with a valid token.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::exporter::{run_once, Exporter, ExporterOptions};
use support::pg::{self, TestDb};
use support::sink::{SinkOptions, SinkServer};
use support::token::{TokenConfig, TokenServer};

const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    db: TestDb,
    token: TokenServer,
    sink: SinkServer,
    inserted: usize,
}

impl Setup {
    async fn new(config: TokenConfig) -> Setup {
        let db = TestDb::create().await;
        let token = TokenServer::start(config).await;
        let sink = SinkServer::start(SinkOptions {
            token_registry: Some(token.registry()),
            ..SinkOptions::default()
        })
        .await;
        Setup {
            db,
            token,
            sink,
            inserted: 0,
        }
    }

    fn options(&self, oidc_extra: &str) -> ExporterOptions {
        let mut options = ExporterOptions::new(&self.sink, Some(&self.token), self.db.env());
        options.oidc_extra = oidc_extra.to_string();
        options
    }

    /// Inserts `n` events and waits until the sink accepted every event inserted so far,
    /// each exactly once.
    async fn deliver(&mut self, n: usize) {
        let client = self.db.client().await;
        for _ in 0..n {
            self.inserted += 1;
            let doc = pg::health_event_doc("node-oidc", self.inserted as u32);
            pg::insert_health_event(&client, &doc).await;
        }
        let accepted = self.sink.wait_for_accepted(self.inserted, WAIT).await;
        let ids: BTreeSet<&str> = accepted
            .iter()
            .filter_map(|e| e.get("id").and_then(Value::as_str))
            .collect();
        assert_eq!(ids.len(), self.inserted, "each event accepted once");
        let messages: BTreeSet<String> = accepted
            .iter()
            .filter_map(|e| {
                e.pointer("/data/healthEvent/message")
                    .and_then(Value::as_str)
            })
            .map(str::to_string)
            .collect();
        for i in 1..=self.inserted {
            assert!(
                messages
                    .iter()
                    .any(|m| m.ends_with(&format!("(event {i})"))),
                "event {i} missing from the sink; accepted messages: {messages:?}"
            );
        }
    }
}

fn assert_no_panic(exporter: &Exporter) {
    let log = exporter.log();
    assert!(!log.contains("panicked"), "exporter panicked:\n{log}");
}

#[tokio::test]
async fn a_token_answer_without_expires_in_is_used_for_the_assumed_lifetime_then_refreshed_on_401()
{
    // The registry lets tokens live 5 s, the answer does not say so, and the exporter assumes
    // an hour: after 5 s the sink answers 401 and the exporter must fetch a new token.
    let mut setup = Setup::new(TokenConfig {
        expires_in: 5,
        ..TokenConfig::default()
    })
    .await;
    setup.token.set_expires_in_json(Some(None));
    let mut exporter = Exporter::start(&setup.options("default_token_lifetime = \"1h\"\n")).await;

    setup.deliver(3).await;
    assert_eq!(setup.token.requests(), 1, "one token for the first events");
    tokio::time::sleep(Duration::from_millis(5500)).await;
    setup.deliver(3).await;
    assert_eq!(
        setup.token.requests(),
        2,
        "the expired token was dropped on the sink's 401 and one new token fetched"
    );
    let unauthorized = setup
        .sink
        .requests()
        .iter()
        .filter(|r| r.status == 401)
        .count();
    assert!(unauthorized >= 1, "the sink rejected the expired token");
    assert!(
        exporter.log().contains("without a usable expires_in"),
        "the assumed lifetime is logged:\n{}",
        exporter.log()
    );
    assert_no_panic(&exporter);
    assert!(exporter.terminate().await.success());
}

#[tokio::test]
async fn the_assumed_lifetime_is_honoured_without_any_401() {
    // Tokens really live 1 h; the answer omits expires_in and the exporter assumes 4 s: it
    // refreshes after 2 s (half-life margin), before the sink ever rejects a token.
    let mut setup = Setup::new(TokenConfig::default()).await;
    setup.token.set_expires_in_json(Some(None));
    let mut exporter = Exporter::start(&setup.options("default_token_lifetime = \"4s\"\n")).await;
    setup.deliver(2).await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    setup.deliver(2).await;
    assert_eq!(
        setup.token.requests(),
        2,
        "refetched after the assumed lifetime"
    );
    assert!(setup.sink.requests().iter().all(|r| r.status != 401));
    assert_no_panic(&exporter);
    assert!(exporter.terminate().await.success());
}

#[tokio::test]
async fn expires_in_as_a_numeric_string_is_accepted_and_the_token_reused() {
    let mut setup = Setup::new(TokenConfig::default()).await;
    setup.token.set_expires_in_json(Some(Some(json!("3599"))));
    let mut exporter = Exporter::start(&setup.options("")).await;
    setup.deliver(10).await;
    assert_eq!(setup.token.requests(), 1, "one token for all events");
    assert_no_panic(&exporter);
    assert!(exporter.terminate().await.success());
}

#[tokio::test]
async fn never_expiring_zero_and_negative_expires_in_never_panic_and_every_event_is_delivered() {
    let mut setup = Setup::new(TokenConfig::default()).await;
    let cases = [
        json!(9223372036854775807i64),
        json!(18446744073709551615u64),
        json!(1e300),
        json!("9223372036854775807"),
        json!(0),
        json!(-1),
        json!(-9223372036854775808i64),
    ];
    for (round, value) in cases.into_iter().enumerate() {
        setup.token.set_expires_in_json(Some(Some(value.clone())));
        let before = setup.token.requests();
        let mut exporter = Exporter::start(&setup.options("")).await;
        setup.deliver(4).await;
        assert_eq!(
            setup.token.requests() - before,
            1,
            "expires_in {value}: one token reused for every event"
        );
        assert_eq!(
            exporter.probe("/healthz").await.map(|(s, _)| s),
            Some(200),
            "expires_in {value}"
        );
        assert!(
            exporter.try_status().is_none(),
            "expires_in {value}: still running"
        );
        assert_no_panic(&exporter);
        let log = exporter.log();
        if round < 4 {
            assert!(
                log.contains("exceeds 24h"),
                "expires_in {value}: cap logged:\n{log}"
            );
        } else {
            assert!(
                log.contains("without a usable expires_in"),
                "expires_in {value}: assumed lifetime logged:\n{log}"
            );
        }
        assert!(
            exporter.terminate().await.success(),
            "expires_in {value}: clean stop"
        );
    }
}

#[tokio::test]
async fn an_oversized_token_answer_fails_clearly_and_delivery_resumes_once_it_is_fixed() {
    let mut setup = Setup::new(TokenConfig::default()).await;
    setup.token.set_padding(1024 * 1024);
    let mut options = setup.options("");
    options.max_retries = 1000;
    options.max_backoff = "300ms".into();
    let mut exporter = Exporter::start(&options).await;
    let client = setup.db.client().await;
    setup.inserted += 1;
    pg::insert_health_event(&client, &pg::health_event_doc("node-oidc", 1)).await;
    let deadline = std::time::Instant::now() + WAIT;
    while !exporter
        .log()
        .contains("the body is longer than 65536 bytes")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no bounded-body error logged:\n{}",
            exporter.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        setup.sink.accepted().is_empty(),
        "nothing delivered without a token"
    );
    // An error answer with a huge body is cut to an excerpt too.
    setup.token.fail_next(1, 503);
    let deadline = std::time::Instant::now() + WAIT;
    while !exporter.log().contains("answered HTTP 503") {
        assert!(std::time::Instant::now() < deadline, "no 503 logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let longest = exporter.log().lines().map(str::len).max().unwrap_or(0);
    assert!(
        longest < 4096,
        "a log line of {longest} bytes quotes the whole answer"
    );
    setup.token.set_padding(0);
    setup.deliver(2).await;
    assert_no_panic(&exporter);
    assert!(exporter.terminate().await.success());
}

#[test]
fn check_config_validates_and_shows_the_new_oidc_keys() {
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |extra: &str| {
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            format!(
                "[exporter.metadata]\ncluster = \"c\"\n[exporter.sink]\nendpoint = \
                 \"https://sink.example/events\"\n[exporter.oidc]\ntoken_url = \
                 \"https://idp.example/token\"\nclient_id = \"id\"\nscope = \"s\"\n{extra}"
            ),
        )
        .expect("write config");
        format!("--config={}", path.display())
    };
    let (code, out) = run_once(&["check-config", "--skip-files", &write("")], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("\"client_auth_method\": \"client_secret_basic_raw\""),
        "{out}"
    );
    assert!(
        out.contains("\"default_token_lifetime\": \"5m0s\""),
        "{out}"
    );
    let (code, out) = run_once(
        &[
            "check-config",
            "--skip-files",
            &write("client_auth_method = \"client_secret_post\"\ndefault_token_lifetime = \"90s\""),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("\"client_auth_method\": \"client_secret_post\""),
        "{out}"
    );
    assert!(
        out.contains("\"default_token_lifetime\": \"1m30s\""),
        "{out}"
    );
    for (extra, key) in [
        (
            "client_auth_method = \"private_key_jwt\"",
            "exporter.oidc.client_auth_method",
        ),
        (
            "default_token_lifetime = \"0s\"",
            "exporter.oidc.default_token_lifetime",
        ),
        (
            "default_token_lifetime = \"25h\"",
            "exporter.oidc.default_token_lifetime",
        ),
        (
            "default_token_lifetime = 5",
            "exporter.oidc.default_token_lifetime",
        ),
    ] {
        let (code, out) = run_once(&["check-config", "--skip-files", &write(extra)], &[]);
        assert_eq!(code, Some(2), "{extra}: {out}");
        assert!(out.contains(key), "{extra}: {out}");
    }
}
