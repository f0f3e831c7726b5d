//! Misbehaving HTTP peers on 127.0.0.1: a server whose every answer is decided by a test's
//! closure (redirects, rejections by event, endless bodies), recording each request with the
//! status it got. Two peers are two origins (same host, different ports).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use axum::Router;

use super::tls::{serve, ServerHandle};

/// One request as the peer saw it, with the status it got: the reference sink's record (one
/// implementation, in `tools/`).
pub type Seen = event_exporter_dev::sink::RecordedRequest;

type Responder = dyn Fn(&Seen) -> Response + Send + Sync;

struct PeerState {
    responder: Box<Responder>,
    seen: Mutex<Vec<Seen>>,
}

/// A running peer; dropping it shuts the server down.
pub struct Peer {
    state: Arc<PeerState>,
    server: ServerHandle,
}

impl Peer {
    /// Answers every request with `responder(request)` (the `status` field of the request it
    /// sees is 0).
    pub async fn start(responder: impl Fn(&Seen) -> Response + Send + Sync + 'static) -> Peer {
        let state = Arc::new(PeerState {
            responder: Box::new(responder),
            seen: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .fallback(handler)
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(state.clone());
        let server = serve(router, None).await;
        Peer { state, server }
    }

    /// `http://127.0.0.1:PORT` (the origin).
    pub fn origin(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// `origin` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin())
    }

    /// Every request so far, in the order answered.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("peer mutex").clone()
    }

    /// CloudEvent ids of requests answered 2xx, in order.
    pub fn accepted_ids(&self) -> Vec<String> {
        self.seen()
            .iter()
            .filter(|s| s.is_success())
            .filter_map(Seen::event_id)
            .collect()
    }

    /// Waits until `done(&seen)` holds; panics after `timeout` with what was seen.
    pub async fn wait_until(
        &self,
        timeout: std::time::Duration,
        done: impl Fn(&[Seen]) -> bool,
    ) -> Vec<Seen> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.seen();
            if done(&seen) {
                return seen;
            }
            if Instant::now() > deadline {
                let summary: Vec<(String, String, u16)> = seen
                    .iter()
                    .map(|s| (s.method.clone(), s.path.clone(), s.status))
                    .collect();
                panic!(
                    "peer {}: condition not met after {timeout:?}; seen {summary:?}",
                    self.origin()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

async fn handler(
    State(state): State<Arc<PeerState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut seen = Seen::new(&method, &uri, &headers, &body, Instant::now());
    let response = (state.responder)(&seen);
    seen.status = response.status().as_u16();
    state.seen.lock().expect("peer mutex").push(seen);
    response
}

/// A response with `status`, the given headers and a short text body.
pub fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Response {
    let mut builder = Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Body::from(body.to_string()))
        .expect("valid test response")
}

/// A response with `status` whose body never ends (64 KiB chunks of `x` for ever).
pub fn endless(status: u16) -> Response {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Body::from_stream(stream))
        .expect("valid test response")
}
