//! The request registry: every request the sink answered (method, path, headers, body and the
//! status it got), in the order answered, for in-process readers such as the integration tests;
//! and the in-flight gauge (requests being answered now, and the most there ever were at once).
//!
//! Invariant: a request is recorded after its answer is decided and before the answer is sent,
//! so a client that has its answer finds the request in [`RequestLog::snapshot`]. Recording is
//! off (`keep` = 0) unless asked for: the benchmarks send millions of requests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method, Uri};
use serde_json::Value;
use tokio::sync::Notify;

/// One request as a server saw it, with the status it answered.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body parsed as JSON, when it is JSON.
    pub json: Option<Value>,
    /// The status answered (0 until the answer is known).
    pub status: u16,
    /// When the server started on the request (before any latency switch).
    pub received_at: Instant,
}

impl RecordedRequest {
    /// The record of one request, its status still 0 (set once the answer is known).
    pub fn new(
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        received_at: Instant,
    ) -> RecordedRequest {
        RecordedRequest {
            method: method.to_string(),
            path: uri.path().to_string(),
            headers: headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.as_str().to_ascii_lowercase(),
                        String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            json: serde_json::from_slice(body).ok(),
            body: body.to_vec(),
            status: 0,
            received_at,
        }
    }

    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The CloudEvent `id`, when the body is one event.
    pub fn event_id(&self) -> Option<String> {
        self.string_at("/id")
    }

    /// `data.healthEvent.nodeName`, when the body is one NVSentinel health CloudEvent.
    pub fn node_name(&self) -> Option<String> {
        self.string_at("/data/healthEvent/nodeName")
    }

    /// The string at JSON `pointer` in the body, if the body is JSON and has one there.
    fn string_at(&self, pointer: &str) -> Option<String> {
        self.json
            .as_ref()
            .and_then(|json| json.pointer(pointer))
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// Answered 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The events of a request answered 2xx: its JSON body, a batch's elements one by one;
    /// none for a failed request or a body that is not JSON.
    pub fn accepted_events(&self) -> &[Value] {
        match (&self.json, self.is_success()) {
            (Some(Value::Array(events)), true) => events,
            (Some(event), true) => std::slice::from_ref(event),
            _ => &[],
        }
    }
}

/// A wait for requests or events that ran out of time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "waited {waited:?} for {wanted} {what}, only {arrived} arrived \
     ({requests} requests in total, statuses seen: {statuses:?})"
)]
pub struct WaitTimeout {
    /// `"accepted events"` or `"requests"`.
    pub what: &'static str,
    pub wanted: usize,
    pub arrived: usize,
    pub requests: usize,
    /// The distinct statuses answered, ascending.
    pub statuses: Vec<u16>,
    pub waited: Duration,
}

/// The recorded requests (the last `keep`) and the in-flight gauge.
pub(super) struct RequestLog {
    keep: usize,
    requests: Mutex<VecDeque<RecordedRequest>>,
    /// Woken on every recorded request (waiters re-check).
    recorded: Notify,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl RequestLog {
    /// A log keeping the last `keep` requests (0: records nothing).
    pub fn new(keep: usize) -> RequestLog {
        RequestLog {
            keep,
            requests: Mutex::default(),
            recorded: Notify::new(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    /// Whether requests are recorded at all.
    pub fn enabled(&self) -> bool {
        self.keep > 0
    }

    /// Appends `request` (the oldest goes when `keep` are held) and wakes the waiters.
    pub fn record(&self, request: RecordedRequest) {
        if !self.enabled() {
            return;
        }
        {
            let mut requests = self.lock();
            if requests.len() >= self.keep {
                requests.pop_front();
            }
            requests.push_back(request);
        }
        self.recorded.notify_waiters();
    }

    /// The recorded requests, in the order answered.
    pub fn snapshot(&self) -> Vec<RecordedRequest> {
        self.lock().iter().cloned().collect()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Counts one request as being answered until the guard is dropped (also when the client
    /// hangs up and the handler is dropped mid-way).
    pub fn enter(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(self)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Waits until at least `wanted` events were accepted (answered 2xx); returns them all.
    pub async fn wait_for_accepted(
        &self,
        wanted: usize,
        timeout: Duration,
    ) -> Result<Vec<Value>, WaitTimeout> {
        let count = |requests: &VecDeque<RecordedRequest>| {
            requests.iter().map(|r| r.accepted_events().len()).sum()
        };
        self.wait_until("accepted events", wanted, timeout, count)
            .await
            .map(|requests| accepted_events(&requests))
    }

    /// Waits until at least `wanted` requests (any status) were answered; returns them all.
    pub async fn wait_for_requests(
        &self,
        wanted: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedRequest>, WaitTimeout> {
        self.wait_until("requests", wanted, timeout, VecDeque::len)
            .await
    }

    /// Waits until `count(requests) >= wanted`, re-checking on every recorded request.
    async fn wait_until(
        &self,
        what: &'static str,
        wanted: usize,
        timeout: Duration,
        count: impl Fn(&VecDeque<RecordedRequest>) -> usize,
    ) -> Result<Vec<RecordedRequest>, WaitTimeout> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so a request recorded in between still wakes us.
            let recorded = self.recorded.notified();
            tokio::pin!(recorded);
            recorded.as_mut().enable();
            {
                let requests = self.lock();
                let arrived = count(&requests);
                if arrived >= wanted {
                    return Ok(requests.iter().cloned().collect());
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(timed_out(what, wanted, arrived, &requests, timeout));
                }
            }
            // On timeout the loop checks once more and reports.
            let _ = tokio::time::timeout_at(deadline, recorded).await;
        }
    }

    /// A panic elsewhere while holding the lock leaves the log usable.
    fn lock(&self) -> MutexGuard<'_, VecDeque<RecordedRequest>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The events of the requests answered 2xx, in order (a batch's one by one).
pub(super) fn accepted_events(requests: &[RecordedRequest]) -> Vec<Value> {
    requests
        .iter()
        .flat_map(|request| request.accepted_events().iter().cloned())
        .collect()
}

fn timed_out(
    what: &'static str,
    wanted: usize,
    arrived: usize,
    requests: &VecDeque<RecordedRequest>,
    waited: Duration,
) -> WaitTimeout {
    let mut statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    statuses.sort_unstable();
    statuses.dedup();
    WaitTimeout {
        what,
        wanted,
        arrived,
        requests: requests.len(),
        statuses,
        waited,
    }
}

/// One request being answered; see [`RequestLog::enter`].
pub(super) struct InFlight<'a>(&'a RequestLog);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(status: u16, body: &Value) -> RecordedRequest {
        let mut request = RecordedRequest::new(
            &Method::POST,
            &Uri::from_static("/api/v1/events"),
            &HeaderMap::new(),
            body.to_string().as_bytes(),
            Instant::now(),
        );
        request.status = status;
        request
    }

    #[test]
    fn accepted_events_flatten_batches_and_skip_failures() {
        let requests = [
            request(202, &json!({"id": "1"})),
            request(503, &json!({"id": "2"})),
            request(202, &json!([{"id": "3"}, {"id": "4"}])),
        ];
        let ids: Vec<Value> = accepted_events(&requests)
            .into_iter()
            .map(|event| event["id"].clone())
            .collect();
        assert_eq!(ids, vec![json!("1"), json!("3"), json!("4")]);
    }

    #[test]
    fn keeps_the_last_requests_and_counts_in_flight() {
        let log = RequestLog::new(2);
        for id in ["1", "2", "3"] {
            log.record(request(202, &json!({ "id": id })));
        }
        let ids: Vec<Option<String>> = log.snapshot().iter().map(|r| r.event_id()).collect();
        assert_eq!(ids, vec![Some("2".into()), Some("3".into())]);
        let (first, second) = (log.enter(), log.enter());
        assert_eq!(log.in_flight(), 2);
        drop((first, second));
        assert_eq!((log.in_flight(), log.max_in_flight()), (0, 2));
        RequestLog::new(0).record(request(202, &json!({})));
    }

    #[tokio::test]
    async fn waits_end_on_arrival_or_say_what_arrived() {
        let log = std::sync::Arc::new(RequestLog::new(10));
        let writer = log.clone();
        let recorder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer.record(request(202, &json!([{"id": "1"}, {"id": "2"}])));
        });
        let events = log
            .wait_for_accepted(2, Duration::from_secs(10))
            .await
            .expect("two events arrive");
        assert_eq!(events.len(), 2);
        recorder.await.expect("recorder");
        let error = log
            .wait_for_requests(3, Duration::from_millis(10))
            .await
            .expect_err("only one request");
        assert_eq!((error.arrived, error.requests), (1, 1));
        assert_eq!(error.statuses, vec![202]);
        assert!(error.to_string().contains("only 1 arrived"), "{error}");
    }
}
