//! The `sink` subcommand with real HTTP clients on 127.0.0.1 (no mocks): every rule of the events
//! endpoint, the OAuth2 token endpoint, the test switches, the in-process API the integration
//! tests use (scripted answers, "fail always", the request registry and its waits, another token
//! endpoint's tokens, HTTPS), the binary's SIGTERM handling and `--out` file, and an independent
//! check of the accepted events with the CloudEvents Python SDK (`tests/validate_cloudevents.py`;
//! the SDK comes from `scripts/test`, and without it the test fails).

#[path = "../../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_exporter::cloudevent::{Transformer, CONTENT_TYPE};
use event_exporter::model::decode_document;
use event_exporter_dev::sink::{self, Reason, RunningSink, Scripted, SinkArgs, SinkError};
use reqwest::header::{HeaderMap, ALLOW, CACHE_CONTROL, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use serde_json::{json, Value};

const CLIENT_ID: &str = "nvsentinel-exporter";
const SECRET: &str = "sink-test-secret-8d1f";
const SCOPE: &str = "events:write";
const VALIDATOR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/validate_cloudevents.py");

/// HTTP Basic client credentials of a token request, if any.
type Basic<'a> = Option<(&'a str, &'a str)>;
/// Form fields of a token request.
type Form<'a> = &'a [(&'a str, &'a str)];

/// An in-process sink on a free port plus an HTTP client for it.
struct Harness {
    sink: RunningSink,
    http: reqwest::Client,
}

/// Status, headers and JSON body (`Null` when the body is not JSON) of one answer.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Harness {
    async fn start(configure: impl FnOnce(&mut SinkArgs)) -> Harness {
        let mut args = SinkArgs {
            listen: "127.0.0.1:0".parse().expect("address"),
            client_secret: SECRET.into(),
            ..SinkArgs::default()
        };
        configure(&mut args);
        let sink = sink::start(args).await.expect("sink starts");
        Harness {
            sink,
            http: support::tls::plain_reqwest_client(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.sink.local_addr())
    }

    fn token_url(&self) -> String {
        self.sink.token_url().expect("token endpoint enabled")
    }

    /// A token from the token endpoint, the way the exporter asks for one.
    async fn token(&self) -> String {
        let answer = request_token(
            &self.http,
            &self.token_url(),
            Some((CLIENT_ID, SECRET)),
            &[("grant_type", "client_credentials"), ("scope", SCOPE)],
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        answer.body["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    /// POSTs `body` to the events URL with an optional token and Content-Type.
    async fn post_event(
        &self,
        token: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Answer {
        let mut request = self.http.post(self.sink.events_url()).body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        answer(request).await
    }

    /// A well-formed authenticated CloudEvent POST.
    async fn deliver(&self, token: &str, body: &[u8]) -> Answer {
        self.post_event(Some(token), Some(CONTENT_TYPE), body.to_vec())
            .await
    }
}

async fn answer(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("the sink answers");
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("answer body");
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

async fn request_token(
    http: &reqwest::Client,
    url: &str,
    basic: Basic<'_>,
    form: Form<'_>,
) -> Answer {
    let mut request = http.post(url).form(form);
    if let Some((id, secret)) = basic {
        request = request.basic_auth(id, Some(secret));
    }
    answer(request).await
}

/// A CloudEvent exactly as the exporter sends it, built from a document like NVSentinel's.
/// Returns the event id and the JSON body.
fn exporter_event(node: &str, i: u32) -> (String, Vec<u8>) {
    exporter_event_from("test-cluster", node, i)
}

fn exporter_event_from(cluster: &str, node: &str, i: u32) -> (String, Vec<u8>) {
    let document = support::pg::health_event_doc(node, i);
    let event = decode_document(&document)
        .expect("the document decodes")
        .expect("the document holds a health event");
    let transformer = Transformer::new(BTreeMap::from([
        ("cluster".to_string(), cluster.to_string()),
        ("environment".to_string(), "test".to_string()),
    ]));
    let id = format!("{:08x}-7d1c-4e55-9a0b-{:012x}", fastrand::u32(..), i);
    let body = transformer.encode(&id, &event, None);
    (id, body)
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is one JSON value"))
        .collect()
}

/// The Python with the CloudEvents SDK: `TEST_PYTHON` (set by `scripts/test`, which installs
/// the SDK into a project-local virtualenv), else `python3`.
fn python() -> String {
    std::env::var("TEST_PYTHON")
        .ok()
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

/// Runs the independent Python validator on `path`. A missing SDK fails the test (a check that
/// cannot run is never reported as passed): run the tests with `scripts/test`.
fn python_validate(path: &Path, extra: &[&str]) -> (bool, String) {
    let python = python();
    let sdk = Command::new(&python)
        .args(["-c", "import cloudevents"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        sdk,
        "the CloudEvents Python SDK cannot be imported by {python}: run the tests with \
         `scripts/test`, which installs it (tests/requirements.txt) into target/test-venv"
    );
    let output = Command::new(&python)
        .arg(VALIDATOR)
        .arg(path)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run the Python validator");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test]
async fn only_post_at_the_events_path() {
    let h = Harness::start(|_| {}).await;
    for method in ["GET", "PUT", "DELETE", "PATCH"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let a = answer(h.http.request(method.clone(), h.sink.events_url())).await;
        assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(a.headers.get(ALLOW).expect("Allow"), "POST");
        assert_eq!(a.body["error"], "method_not_allowed");
    }
    for path in ["/", "/api/v1/event", "/api/v1/events/", "/api/v1/events/x"] {
        let a = answer(
            h.http
                .post(h.url(path))
                .header("content-type", CONTENT_TYPE),
        )
        .await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(a.body["error"], "not_found");
    }
    let stats = h.sink.stats();
    assert_eq!(stats.rejected_for(Reason::MethodNotAllowed), 4);
    assert_eq!(stats.rejected_for(Reason::NotFound), 4);
    assert_eq!(h.sink.rejected(), 8);
    assert_eq!(h.sink.accepted(), 0);
}

#[tokio::test]
async fn custom_path() {
    let h = Harness::start(|args| {
        args.path = "/ingest/*".into();
        args.no_auth = true;
    })
    .await;
    assert!(h.sink.events_url().ends_with("/ingest/*"));
    let (_, body) = exporter_event("node-a", 1);
    let a = h.post_event(None, Some(CONTENT_TYPE), body).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let a = answer(h.http.post(h.url("/api/v1/events"))).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn content_type_must_be_cloudevents_json() {
    let h = Harness::start(|_| {}).await;
    let token = h.token().await;
    let (_, body) = exporter_event("node-a", 1);
    for content_type in [
        None,
        Some("application/json"),
        Some("text/plain"),
        Some("application/cloudevents-batch+json; charset=latin1"),
        Some("application/cloudevents+json; charset=latin1"),
    ] {
        let a = h.post_event(Some(&token), content_type, body.clone()).await;
        assert_eq!(
            a.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert_eq!(a.body["error"], "unsupported_media_type");
    }
    let a = h
        .post_event(
            Some(&token),
            Some("application/cloudevents+json; charset=utf-8"),
            body,
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    assert_eq!(a.body, json!({"status": "accepted"}));
    assert_eq!(h.sink.stats().rejected_for(Reason::UnsupportedMediaType), 5);
    assert_eq!(h.sink.accepted(), 1);
}

#[tokio::test]
async fn bearer_token_must_be_issued_here() {
    let h = Harness::start(|_| {}).await;
    let other = Harness::start(|_| {}).await;
    let foreign = other.token().await;
    let (_, body) = exporter_event("node-a", 1);
    // The right client credentials, but as Basic: the events endpoint wants a Bearer token.
    let basic = "Basic ZXZlbnQtZXhwb3J0ZXI6c2luay10ZXN0LXNlY3JldC04ZDFm".to_string();
    let cases: [(Option<String>, &str); 4] = [
        (None, "no Authorization"),
        (Some(basic), "Basic instead of Bearer"),
        (Some("Bearer made-up-token".into()), "unknown token"),
        (Some(format!("Bearer {foreign}")), "token of another sink"),
    ];
    for (authorization, case) in cases {
        let mut request = h
            .http
            .post(h.sink.events_url())
            .header("content-type", CONTENT_TYPE)
            .body(body.clone());
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let a = answer(request).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{case}");
        assert_eq!(a.body["error"], "unauthorized", "{case}");
        let challenge = a.headers.get(WWW_AUTHENTICATE).expect("WWW-Authenticate");
        assert!(challenge.to_str().expect("ascii").starts_with("Bearer"));
    }
    // Authentication comes before the other checks: nothing is disclosed without a token.
    let a = h.post_event(None, Some("text/plain"), "{").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    let token = h.token().await;
    let a = h.deliver(&token, &body).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    assert_eq!(h.sink.stats().rejected_for(Reason::Unauthorized), 5);
}

#[tokio::test]
async fn invalid_events_get_400_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("received.ndjson");
    let h = Harness::start(|args| args.out = Some(out.clone())).await;
    let token = h.token().await;
    let (_, good) = exporter_event("node-a", 1);
    let good: Value = serde_json::from_slice(&good).expect("event JSON");
    let with = |key: &str, value: Value| {
        let mut event = good.clone();
        event[key] = value;
        serde_json::to_vec(&event).expect("serializable")
    };
    let without = |key: &str| {
        let mut event = good.clone();
        event.as_object_mut().expect("object").remove(key);
        serde_json::to_vec(&event).expect("serializable")
    };
    let cases: Vec<(Vec<u8>, Reason, &str)> = vec![
        (
            b"{\"specversion\": ".to_vec(),
            Reason::InvalidJson,
            "not JSON",
        ),
        (b"".to_vec(), Reason::InvalidJson, "not JSON"),
        (b"[1, 2]".to_vec(), Reason::NotAnObject, "an array"),
        (
            without("specversion"),
            Reason::InvalidSpecversion,
            "specversion",
        ),
        (
            with("specversion", json!("0.3")),
            Reason::InvalidSpecversion,
            "0.3",
        ),
        (without("id"), Reason::InvalidId, "id"),
        (with("id", json!("")), Reason::InvalidId, "id"),
        (with("id", json!(42)), Reason::InvalidId, "id"),
        (without("source"), Reason::InvalidSource, "source"),
        (with("source", json!("")), Reason::InvalidSource, "source"),
        (without("type"), Reason::InvalidType, "type"),
        (with("type", json!(true)), Reason::InvalidType, "type"),
        (
            with("time", json!("2025-13-01T00:00:00Z")),
            Reason::InvalidTime,
            "time",
        ),
        (
            with("time", json!("last tuesday")),
            Reason::InvalidTime,
            "time",
        ),
        (
            with("datacontenttype", json!(5)),
            Reason::InvalidDatacontenttype,
            "datacontenttype",
        ),
        (
            with("subject", json!({"node": "a"})),
            Reason::InvalidSubject,
            "subject",
        ),
    ];
    for (body, reason, mentions) in &cases {
        let a = h.deliver(&token, body).await;
        let shown = String::from_utf8_lossy(body);
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{shown}");
        assert_eq!(a.body["error"], reason.as_str(), "{shown}");
        let message = a.body["message"].as_str().expect("message");
        assert!(message.contains(mentions), "{message:?} for {shown}");
    }
    let stats = h.sink.stats();
    for (_, reason, _) in &cases {
        let expected = cases.iter().filter(|(_, r, _)| r == reason).count() as u64;
        assert_eq!(stats.rejected_for(*reason), expected, "{reason:?}");
    }
    assert_eq!(stats.rejected_total(), cases.len() as u64);
    assert_eq!(stats.accepted, 0);
    assert!(read_lines(&out).is_empty(), "nothing invalid is stored");
}

#[tokio::test]
async fn batches_are_refused_whole_naming_the_problem_and_stored_as_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("received.ndjson");
    let h = Harness::start(|args| {
        args.no_auth = true;
        args.out = Some(out.clone());
    })
    .await;
    let (_, one) = exporter_event("node-batch", 1);
    let (_, two) = exporter_event("node-batch", 2);
    let (one, two) = (String::from_utf8_lossy(&one), String::from_utf8_lossy(&two));
    let cases: Vec<(String, Reason, &str)> = vec![
        ("[".into(), Reason::InvalidJson, "not JSON"),
        ("".into(), Reason::InvalidJson, "not JSON"),
        (
            format!("[{one}, {{\"id\": "),
            Reason::InvalidJson,
            "not JSON",
        ),
        (one.to_string(), Reason::NotAnObject, "JSON array"),
        ("\"events\"".into(), Reason::NotAnObject, "JSON array"),
        (
            format!("[{one}, 7]"),
            Reason::NotAnObject,
            "batch element 1",
        ),
        (
            format!("[{one}, {}]", two.replace("\"1.0\"", "\"0.3\"")),
            Reason::InvalidSpecversion,
            "batch element 1",
        ),
    ];
    for (body, reason, mentions) in &cases {
        let a = h
            .post_event(None, Some(BATCH_CONTENT_TYPE), body.clone())
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(a.body["error"], reason.as_str(), "{body}");
        let message = a.body["message"].as_str().expect("message");
        assert!(message.contains(mentions), "{message:?} for {body}");
    }
    assert!(
        read_lines(&out).is_empty(),
        "a refused batch stores nothing"
    );
    // A good batch, spaced and indented as a sender may: each element is stored as its own
    // bytes, one line each.
    let batch = format!("[\n  {one} ,\n  {two}\n]\n");
    let a = h.post_event(None, Some(BATCH_CONTENT_TYPE), batch).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    assert_eq!(a.body["accepted"], 2);
    let text = std::fs::read_to_string(&out).expect("--out");
    assert_eq!(text, format!("{one}\n{two}\n"));
    // An empty batch is a batch of nothing.
    let a = h.post_event(None, Some(BATCH_CONTENT_TYPE), "[]").await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    assert_eq!(a.body["accepted"], 0);
}

#[tokio::test]
async fn accepts_deduplicates_and_appends_to_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("received.ndjson");
    let h = Harness::start(|args| args.out = Some(out.clone())).await;
    let token = h.token().await;
    let events: Vec<(String, Vec<u8>)> = (0..5).map(|i| exporter_event("node-b", i)).collect();
    for (_, body) in &events {
        let a = h.deliver(&token, body).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
        assert_eq!(a.body, json!({"status": "accepted"}));
        // Flushed per event: the line is in the file when the 202 arrives.
        let line = read_lines(&out).pop().expect("a line per event");
        assert_eq!(line, serde_json::from_slice::<Value>(body).expect("JSON"));
    }
    // Redeliveries (same source + id) are answered 202 but not stored again.
    for (_, body) in &events[1..3] {
        let a = h.deliver(&token, body).await;
        assert_eq!(a.status, StatusCode::ACCEPTED);
        assert_eq!(a.body["duplicate"], true);
    }
    // The same id from another source is a different event.
    let mut other: Value = serde_json::from_slice(&events[0].1).expect("JSON");
    other["source"] = json!("nvsentinel://other-cluster/healthevents");
    let other = serde_json::to_vec_pretty(&other).expect("serializable");
    assert_eq!(h.deliver(&token, &other).await.status, StatusCode::ACCEPTED);

    assert_eq!(h.sink.accepted(), 6);
    assert_eq!(h.sink.duplicates(), 2);
    assert_eq!(h.sink.rejected(), 0);
    let lines = read_lines(&out);
    assert_eq!(lines.len(), 6);
    let sent: Vec<Value> = events
        .iter()
        .map(|(_, body)| serde_json::from_slice(body).expect("JSON"))
        .chain([serde_json::from_slice(&other).expect("JSON")])
        .collect();
    assert_eq!(lines, sent, "the file holds each new event once, in order");
    // The pretty-printed body became one line.
    let text = std::fs::read_to_string(&out).expect("read out");
    assert_eq!(text.lines().count(), 6);

    let kept: Vec<Value> = h.sink.events().into_iter().map(|r| r.event).collect();
    assert_eq!(kept, sent);
    let ids: Vec<&str> = events.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(lines[2]["id"], ids[2]);

    let (ok, output) = python_validate(&out, &["--expect", "6", "--unique"]);
    assert!(
        ok,
        "the CloudEvents SDK rejected accepted events:\n{output}"
    );
}

#[tokio::test]
async fn python_validator_catches_invalid_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mixed.ndjson");
    let (_, good) = exporter_event("node-c", 1);
    let mut text = String::from_utf8(good).expect("utf-8");
    text.push('\n');
    text.push_str(r#"{"specversion":"1.0","id":"x","type":"t"}"#);
    text.push('\n');
    std::fs::write(&path, text).expect("write");
    let (ok, output) = python_validate(&path, &[]);
    assert!(
        !ok,
        "an event without source must fail validation:\n{output}"
    );
    assert!(output.contains(":2:"), "names the bad line:\n{output}");
}

#[tokio::test]
async fn token_endpoint_grants_and_refuses() {
    let h = Harness::start(|_| {}).await;
    let url = h.token_url();
    let grant = [("grant_type", "client_credentials"), ("scope", SCOPE)];

    let a = request_token(&h.http, &url, Some((CLIENT_ID, SECRET)), &grant).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["token_type"], "Bearer");
    assert_eq!(a.body["expires_in"], 3600);
    let first = a.body["access_token"].as_str().expect("token").to_string();
    assert!(first.len() >= 32);
    assert_eq!(
        a.headers.get(CACHE_CONTROL).expect("Cache-Control"),
        "no-store"
    );

    // Client credentials in the form instead of HTTP Basic.
    let form = [
        ("grant_type", "client_credentials"),
        ("scope", SCOPE),
        ("client_id", CLIENT_ID),
        ("client_secret", SECRET),
    ];
    let a = request_token(&h.http, &url, None, &form).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let second = a.body["access_token"].as_str().expect("token");
    assert_ne!(first, second, "every grant issues a new token");

    let refused: [(Basic, Form, StatusCode, &str); 6] = [
        (
            Some((CLIENT_ID, "wrong")),
            &grant,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            Some(("someone-else", SECRET)),
            &grant,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (None, &grant, StatusCode::UNAUTHORIZED, "invalid_client"),
        (
            Some((CLIENT_ID, SECRET)),
            &[("grant_type", "password"), ("scope", SCOPE)],
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            Some((CLIENT_ID, SECRET)),
            &[("grant_type", "client_credentials"), ("scope", "admin")],
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
        (
            Some((CLIENT_ID, SECRET)),
            &[("grant_type", "client_credentials")],
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
    ];
    for (basic, form, status, error) in refused {
        let a = request_token(&h.http, &url, basic, form).await;
        assert_eq!(a.status, status, "{basic:?} {form:?}: {}", a.body);
        assert_eq!(a.body["error"], error, "{basic:?} {form:?}");
        assert!(a.body.get("access_token").is_none());
        assert!(
            !a.body.to_string().contains(SECRET),
            "never echoes the secret"
        );
        if status == StatusCode::UNAUTHORIZED {
            assert!(a.headers.contains_key(WWW_AUTHENTICATE));
        }
    }
    // A JSON body is not a token request.
    let a = answer(
        h.http
            .post(&url)
            .basic_auth(CLIENT_ID, Some(SECRET))
            .header("content-type", "application/json")
            .body(r#"{"grant_type":"client_credentials"}"#),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["error"], "invalid_request");
    let a = answer(h.http.get(&url)).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);

    let stats = h.sink.stats();
    assert_eq!(stats.tokens_issued, 2);
    assert_eq!(stats.token_errors, 8);
    assert_eq!(
        stats.rejected_total(),
        0,
        "token errors are not event rejections"
    );
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let h = Harness::start(|args| args.token_lifetime = Duration::from_secs(1)).await;
    let answer = request_token(
        &h.http,
        &h.token_url(),
        Some((CLIENT_ID, SECRET)),
        &[("grant_type", "client_credentials"), ("scope", SCOPE)],
    )
    .await;
    assert_eq!(answer.body["expires_in"], 1);
    let token = answer.body["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    let (_, first) = exporter_event("node-d", 1);
    let (_, second) = exporter_event("node-d", 2);
    assert_eq!(h.deliver(&token, &first).await.status, StatusCode::ACCEPTED);

    tokio::time::sleep(Duration::from_millis(1300)).await;
    let a = h.deliver(&token, &second).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.body["message"]
        .as_str()
        .expect("message")
        .contains("expired"));

    let fresh = h.token().await;
    assert_eq!(
        h.deliver(&fresh, &second).await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(h.sink.accepted(), 2);
    assert_eq!(h.sink.stats().rejected_for(Reason::Unauthorized), 1);
}

#[tokio::test]
async fn fail_rate_injects_failures_with_retry_after() {
    let h = Harness::start(|args| {
        args.fail_rate = 1.0;
        args.fail_status = 503;
        args.retry_after = Some(7);
    })
    .await;
    let token = h.token().await;
    let (_, body) = exporter_event("node-e", 1);
    for _ in 0..3 {
        let a = h.deliver(&token, &body).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.headers.get(RETRY_AFTER).expect("Retry-After"), "7");
        assert_eq!(a.body["error"], "injected_failure");
    }
    // Only otherwise-valid requests are failed on purpose.
    assert_eq!(
        h.deliver(&token, b"{}").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        h.post_event(None, Some(CONTENT_TYPE), body.clone())
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let stats = h.sink.stats();
    assert_eq!(stats.injected_failures, 3);
    assert_eq!(stats.accepted, 0, "a failed request is not accepted");
    assert_eq!(stats.duplicates, 0);
    assert!(h.sink.events().is_empty());

    let h = Harness::start(|args| {
        args.no_auth = true;
        args.fail_rate = 1.0;
        args.fail_status = 429;
    })
    .await;
    let a = h.post_event(None, Some(CONTENT_TYPE), body).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        !a.headers.contains_key(RETRY_AFTER),
        "none unless asked for"
    );
}

#[tokio::test]
async fn partial_fail_rate_fails_some_and_accepts_the_rest() {
    let h = Harness::start(|args| {
        args.no_auth = true;
        args.fail_rate = 0.5;
    })
    .await;
    let mut failed = 0;
    for i in 0..200 {
        let (_, body) = exporter_event("node-f", i);
        match h.post_event(None, Some(CONTENT_TYPE), body).await.status {
            StatusCode::ACCEPTED => {}
            StatusCode::SERVICE_UNAVAILABLE => failed += 1,
            other => panic!("unexpected {other}"),
        }
    }
    let stats = h.sink.stats();
    assert_eq!(stats.injected_failures, failed);
    assert_eq!(stats.accepted, 200 - failed);
    assert!(
        (40..=160).contains(&failed),
        "{failed} of 200 failed at rate 0.5"
    );
}

#[tokio::test]
async fn latency_delays_every_answer() {
    let h = Harness::start(|args| {
        args.latency = Duration::from_millis(300);
        args.latency_jitter = Duration::from_millis(200);
    })
    .await;
    let started = Instant::now();
    let token = h.token().await;
    let token_time = started.elapsed();
    let (_, body) = exporter_event("node-g", 1);
    let started = Instant::now();
    assert_eq!(h.deliver(&token, &body).await.status, StatusCode::ACCEPTED);
    let event_time = started.elapsed();
    let started = Instant::now();
    assert_eq!(
        answer(h.http.get(h.url("/nowhere"))).await.status,
        StatusCode::NOT_FOUND
    );
    let not_found_time = started.elapsed();
    for elapsed in [token_time, event_time, not_found_time] {
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    }
}

#[tokio::test]
async fn no_auth_accepts_without_a_token() {
    let h = Harness::start(|args| args.no_auth = true).await;
    assert!(h.sink.token_url().is_none());
    let (_, body) = exporter_event("node-h", 1);
    let a = h.post_event(None, Some(CONTENT_TYPE), body).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let a = request_token(
        &h.http,
        &h.url(sink::TOKEN_PATH),
        Some((CLIENT_ID, SECRET)),
        &[("grant_type", "client_credentials"), ("scope", SCOPE)],
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "no token endpoint");
}

#[tokio::test]
async fn scripted_answers_then_fail_always_then_accepted() {
    let h = Harness::start(|args| args.no_auth = true).await;
    h.sink
        .push_responses(vec![
            Scripted {
                status: 503,
                retry_after: Some("4".into()),
                delay: None,
            },
            Scripted::status(200),
        ])
        .expect("valid script");
    h.sink.fail_always(500).expect("valid status");
    let (_, body) = exporter_event("node-s", 1);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let a = h.post_event(None, Some(CONTENT_TYPE), body.clone()).await;
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(a.headers.get(RETRY_AFTER).expect("Retry-After"), "4");
        }
        statuses.push(a.status.as_u16());
    }
    h.sink.clear_failures();
    let a = h.post_event(None, Some(CONTENT_TYPE), body).await;
    statuses.push(a.status.as_u16());
    assert_eq!(statuses, vec![503, 200, 500, 202]);
    let stats = h.sink.stats();
    assert_eq!(
        (stats.accepted, stats.duplicates),
        (1, 1),
        "a scripted 200 stores"
    );
    assert_eq!(stats.injected_failures, 2);
    // An unusable script is refused whole.
    assert!(matches!(
        h.sink
            .push_responses(vec![Scripted::status(99), Scripted::status(503)]),
        Err(SinkError::ScriptedStatus(99))
    ));
    assert!(matches!(
        h.sink.fail_always(1000),
        Err(SinkError::ScriptedStatus(1000))
    ));
}

#[tokio::test]
async fn the_request_registry_records_every_request_with_its_status() {
    let h = Harness::start(|args| {
        args.no_auth = true;
        args.keep_requests = 100;
    })
    .await;
    let (first, one) = exporter_event("node-r", 1);
    let (second, two) = exporter_event("node-r", 2);
    let batch = format!(
        "[{},{}]",
        String::from_utf8_lossy(&one),
        String::from_utf8_lossy(&two)
    );
    h.post_event(None, Some(CONTENT_TYPE), one.clone()).await;
    h.post_event(None, Some("text/plain"), one.clone()).await;
    answer(h.http.get(h.sink.events_url())).await;
    answer(h.http.post(h.url("/elsewhere")).body("x")).await;
    h.post_event(None, Some("application/cloudevents-batch+json"), batch)
        .await;
    let requests = h
        .sink
        .wait_for_requests(5, Duration::from_secs(10))
        .await
        .expect("five requests");
    let seen: Vec<(&str, &str, u16)> = requests
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str(), r.status))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("POST", "/api/v1/events", 202),
            ("POST", "/api/v1/events", 415),
            ("GET", "/api/v1/events", 405),
            ("POST", "/elsewhere", 404),
            ("POST", "/api/v1/events", 202),
        ]
    );
    assert_eq!(requests[1].header("Content-Type"), Some("text/plain"));
    assert_eq!(requests[1].body, one);
    assert_eq!(requests[3].body, b"x");
    // Events of the 2xx answers, a batch's one by one, the duplicate included.
    assert_eq!(h.sink.accepted_ids(), vec![first.clone(), first, second]);
    assert_eq!(h.sink.accepted(), 2);
    assert!(h.sink.max_in_flight() >= 1);
    assert_eq!(h.sink.in_flight(), 0);
    let timed_out = h
        .sink
        .wait_for_accepted(4, Duration::from_millis(50))
        .await
        .expect_err("only three events");
    assert_eq!((timed_out.arrived, timed_out.requests), (3, 5));
    assert_eq!(timed_out.statuses, vec![202, 404, 405, 415]);
    h.sink.clear_requests();
    assert!(h.sink.requests().is_empty());
}

#[tokio::test]
async fn tokens_of_another_endpoint_and_https() {
    let pki = support::tls::TestPki::generate();
    let h = Harness::start(|args| {
        args.no_auth = true;
        args.tls = Some(Arc::new(pki.server_config()));
    })
    .await;
    assert!(h.sink.events_url().starts_with("https://127.0.0.1:"));
    let http = pki.reqwest_client();
    let (_, body) = exporter_event("node-t", 1);
    let post = |token: Option<&str>| {
        let mut request = http
            .post(h.sink.events_url())
            .header("content-type", CONTENT_TYPE)
            .body(body.clone());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        answer(request)
    };
    let registry = Arc::new(sink::TokenIssuer::new(Duration::from_secs(60)));
    h.sink.set_token_registry(Some(registry.clone()));
    assert_eq!(post(None).await.status, StatusCode::UNAUTHORIZED);
    let token = registry.issue();
    assert_eq!(post(Some(&token)).await.status, StatusCode::ACCEPTED);
    registry.revoke_all();
    assert_eq!(post(Some(&token)).await.status, StatusCode::UNAUTHORIZED);
    h.sink.set_token_registry(None);
    assert_eq!(post(None).await.status, StatusCode::ACCEPTED);
    // Plain HTTP gets no answer from an HTTPS sink.
    assert!(h
        .http
        .post(h.sink.events_url().replace("https", "http"))
        .send()
        .await
        .is_err());
}

#[tokio::test]
async fn shutdown_stops_serving_and_returns_the_counts() {
    let h = Harness::start(|args| args.no_auth = true).await;
    let (_, body) = exporter_event("node-i", 1);
    h.post_event(None, Some(CONTENT_TYPE), body.clone()).await;
    h.post_event(None, Some(CONTENT_TYPE), body.clone()).await;
    let address = h.sink.local_addr();
    let stats = h.sink.shutdown().await.expect("clean shutdown");
    assert_eq!((stats.accepted, stats.duplicates), (1, 1));
    let refused = h
        .http
        .post(format!("http://{address}/api/v1/events"))
        .body(body)
        .send()
        .await;
    assert!(refused.is_err(), "nothing listens after shutdown");
}

#[tokio::test]
async fn unusable_arguments_are_refused_at_start() {
    let bad = [
        SinkArgs {
            fail_rate: 2.0,
            ..SinkArgs::default()
        },
        SinkArgs {
            path: "events".into(),
            ..SinkArgs::default()
        },
    ];
    for args in bad {
        let result = sink::start(args).await;
        assert!(matches!(result, Err(SinkError::InvalidArgs(_))));
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let result = sink::start(SinkArgs {
        listen: taken.local_addr().expect("address"),
        ..SinkArgs::default()
    })
    .await;
    assert!(matches!(result, Err(SinkError::Bind { .. })));
}

/// The real binary: serves, prints counts, stops on SIGTERM with status 0, and leaves the
/// accepted events in `--out`.
#[tokio::test]
async fn binary_serves_until_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("received.ndjson");
    let log_path = dir.path().join("sink.log");
    let port = support::exporter::free_port();
    let mut child = Command::new(support::exporter::binary())
        .arg("sink")
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--out={}", out.display()))
        .args(["--scope", "custom:scope"])
        .env("SINK_CLIENT_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .spawn()
        .expect("spawn event-exporter-dev sink");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let http = support::tls::plain_reqwest_client();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while http.get(&base).send().await.is_err() {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "exited early:\n{}",
            log()
        );
        assert!(
            Instant::now() < deadline,
            "the sink never listened:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let granted = request_token(
        &http,
        &format!("{base}/oauth2/token"),
        Some((CLIENT_ID, SECRET)),
        &[
            ("grant_type", "client_credentials"),
            ("scope", "custom:scope"),
        ],
    )
    .await;
    assert_eq!(granted.status, StatusCode::OK, "{}", granted.body);
    let token = granted.body["access_token"].as_str().expect("token");
    let events: Vec<Vec<u8>> = (0..3).map(|i| exporter_event("node-j", i).1).collect();
    let post = |body: Vec<u8>| {
        http.post(format!("{base}/api/v1/events"))
            .bearer_auth(token)
            .header("content-type", CONTENT_TYPE)
            .body(body)
    };
    for body in events.iter().chain([&events[0]]) {
        assert_eq!(
            answer(post(body.clone())).await.status,
            StatusCode::ACCEPTED
        );
    }
    let invalid = post(br#"{"specversion":"1.0","source":"s","type":"t"}"#.to_vec());
    assert_eq!(answer(invalid).await.status, StatusCode::BAD_REQUEST);

    // The running count shows up within about a second.
    let expected = "accepted 3, duplicates 1, rejected 2 (not_found 1, invalid_id 1)";
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log().contains(expected) {
        assert!(Instant::now() < deadline, "no running count:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running 10 s after SIGTERM:\n{}", log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains(&format!("listening on {base}/api/v1/events")),
        "{log}"
    );
    assert!(
        log.contains(&format!("stopped (SIGTERM): {expected}")),
        "{log}"
    );
    assert!(!log.contains(SECRET), "the secret is never printed:\n{log}");

    let lines = read_lines(&out);
    let sent: Vec<Value> = events
        .iter()
        .map(|body| serde_json::from_slice(body).expect("JSON"))
        .collect();
    assert_eq!(lines, sent);
    let (ok, output) = python_validate(&out, &["--expect", "3", "--unique"]);
    assert!(
        ok,
        "the CloudEvents SDK rejected accepted events:\n{output}"
    );
}

#[test]
fn binary_refuses_bad_flags_with_status_2() {
    let (code, output) = support::exporter::run_once(&["sink", "--fail-rate", "1.5"], &[]);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("--fail-rate"), "{output}");
}

const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

#[tokio::test]
async fn batches_are_validated_whole_deduplicated_and_stored_event_by_event() {
    let h = Harness::start(|_| {}).await;
    let token = h.token().await;
    let events: Vec<Value> = (0..4)
        .map(|i| serde_json::from_slice(&exporter_event("node-batch", i).1).expect("JSON"))
        .collect();
    let batch = |events: &[Value]| serde_json::to_vec(events).expect("serializable");
    let a = h
        .post_event(Some(&token), Some(BATCH_CONTENT_TYPE), batch(&events[..3]))
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    assert_eq!(
        a.body,
        json!({"status": "accepted", "accepted": 3, "duplicates": 0})
    );
    // A re-sent batch overlapping the first: the known events are duplicates.
    let a = h
        .post_event(Some(&token), Some(BATCH_CONTENT_TYPE), batch(&events[2..]))
        .await;
    assert_eq!(
        a.body,
        json!({"status": "accepted", "accepted": 1, "duplicates": 1})
    );
    assert_eq!((h.sink.accepted(), h.sink.duplicates()), (4, 1));
    let kept: Vec<Value> = h.sink.events().into_iter().map(|r| r.event).collect();
    assert_eq!(kept, events, "each event stored once, in order");

    // One bad element refuses the whole batch, naming it; nothing of it is stored.
    let mut bad = events.clone();
    bad[1]["specversion"] = json!("0.3");
    let a = h
        .post_event(Some(&token), Some(BATCH_CONTENT_TYPE), batch(&bad))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(
        a.body["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("batch element 1:")),
        "{}",
        a.body
    );
    let a = h
        .post_event(Some(&token), Some(BATCH_CONTENT_TYPE), b"{}".to_vec())
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    // A structured body sent as a batch, or a batch sent as one event, is refused too.
    let a = h
        .post_event(Some(&token), Some(CONTENT_TYPE), batch(&events[..1]))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert_eq!(h.sink.accepted(), 4);
}
