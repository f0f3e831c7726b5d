//! The test switches: a delay before every answer (`--latency`, changeable at run time, plus
//! `--latency-jitter`), a capacity (`--capacity N`: at most N requests are in their delay at
//! once, the rest wait their turn, so the sink queues like a server with N slots and its
//! latency grows with the load past N), and what a valid event request is answered instead of
//! a plain 202.
//!
//! The answer of a valid request comes from the first switch that has one, in this order: the
//! next scripted answer (a queue, each used once), "fail always with status N", one roll of
//! `--fail-rate`; else 202. A scripted 2xx still stores the events (it only changes the status).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::json;
use tokio::sync::Semaphore;

use super::SinkError;

/// One scripted answer for a valid event request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scripted {
    /// The status answered (a 2xx stores the events as usual).
    pub status: u16,
    /// Value of a `Retry-After` header, if any (e.g. `"1"`).
    pub retry_after: Option<String>,
    /// Extra wait before answering (on top of the latency switch).
    pub delay: Option<Duration>,
}

impl Scripted {
    /// `status`, no `Retry-After`, no extra delay.
    pub fn status(status: u16) -> Scripted {
        Scripted {
            status,
            retry_after: None,
            delay: None,
        }
    }
}

/// A checked [`Scripted`].
struct Script {
    status: StatusCode,
    retry_after: Option<HeaderValue>,
    delay: Option<Duration>,
}

impl TryFrom<Scripted> for Script {
    type Error = SinkError;

    fn try_from(scripted: Scripted) -> Result<Script, SinkError> {
        let status = StatusCode::from_u16(scripted.status)
            .map_err(|_| SinkError::ScriptedStatus(scripted.status))?;
        let retry_after = match scripted.retry_after {
            None => None,
            Some(value) => Some(HeaderValue::from_str(&value).map_err(|source| {
                SinkError::ScriptedRetryAfter {
                    value: value.clone(),
                    source,
                }
            })?),
        };
        Ok(Script {
            status,
            retry_after,
            delay: scripted.delay,
        })
    }
}

/// What the switches make of a valid event request.
pub(super) enum Verdict {
    /// Store the events and answer this 2xx status.
    Accept(StatusCode),
    /// Answer this failure instead (nothing stored).
    Fail(Response),
}

/// The switches set at run time.
#[derive(Default)]
struct RunTime {
    scripted: VecDeque<Script>,
    fail_always: Option<StatusCode>,
}

pub(super) struct Faults {
    /// `--latency` in nanoseconds (an atomic: read on every request, set at run time).
    latency_nanos: AtomicU64,
    jitter: Duration,
    fail_rate: f64,
    fail_status: StatusCode,
    retry_after: Option<u64>,
    run_time: Mutex<RunTime>,
    /// The slots of `--capacity` (`None`: every request waits its delay at once). Replaced
    /// whole by [`Faults::set_capacity`]; requests queued on the old slots finish on them.
    capacity: Mutex<Option<Arc<Semaphore>>>,
}

impl Faults {
    /// The command-line switches; `fail_status` must be a status.
    pub fn new(
        latency: Duration,
        jitter: Duration,
        fail_rate: f64,
        fail_status: u16,
        retry_after: Option<u64>,
        capacity: Option<usize>,
    ) -> Result<Faults, SinkError> {
        let fail_status = StatusCode::from_u16(fail_status).map_err(|_| {
            SinkError::InvalidArgs(format!("--fail-status: {fail_status} is not a status"))
        })?;
        Ok(Faults {
            latency_nanos: AtomicU64::new(nanos(latency)),
            jitter,
            fail_rate,
            fail_status,
            retry_after,
            run_time: Mutex::default(),
            capacity: Mutex::new(slots(capacity)),
        })
    }

    /// At most `capacity` requests in their delay at once from now on (`None`: no limit).
    pub fn set_capacity(&self, capacity: Option<usize>) {
        *self.capacity.lock().unwrap_or_else(PoisonError::into_inner) = slots(capacity);
    }

    /// The fixed delay before every answer from now on.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_nanos.store(nanos(latency), Ordering::Relaxed);
    }

    /// Queues answers for the next valid event requests; all or none (a status that is not
    /// one, or a `Retry-After` that is not a header value, refuses the lot).
    pub fn push_scripted(&self, answers: Vec<Scripted>) -> Result<(), SinkError> {
        let checked = answers
            .into_iter()
            .map(Script::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        self.lock().scripted.extend(checked);
        Ok(())
    }

    /// Valid event requests answer `status` until [`Faults::clear`] (scripted answers first).
    pub fn fail_always(&self, status: u16) -> Result<(), SinkError> {
        let status = StatusCode::from_u16(status).map_err(|_| SinkError::ScriptedStatus(status))?;
        self.lock().fail_always = Some(status);
        Ok(())
    }

    /// Drops "fail always" and the queued scripted answers (`--fail-rate` stays).
    pub fn clear(&self) {
        *self.lock() = RunTime::default();
    }

    /// Waits for a slot when a capacity is set, then the latency plus up to the jitter,
    /// before any answer.
    pub async fn delay(&self) {
        let slots = self
            .capacity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // A closed semaphore cannot happen (nothing closes it); then there is no slot to wait.
        let _slot = match slots {
            Some(slots) => slots.acquire_owned().await.ok(),
            None => None,
        };
        let extra = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.jitter.mul_f64(fastrand::f64())
        };
        let total = Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed)) + extra;
        if !total.is_zero() {
            tokio::time::sleep(total).await;
        }
    }

    /// The answer for one valid request (waits a scripted answer's delay).
    pub async fn verdict(&self) -> Verdict {
        let (scripted, fail_always) = {
            let mut run_time = self.lock();
            (run_time.scripted.pop_front(), run_time.fail_always)
        };
        if let Some(script) = scripted {
            if let Some(delay) = script.delay {
                tokio::time::sleep(delay).await;
            }
            if script.status.is_success() {
                return Verdict::Accept(script.status);
            }
            return Verdict::Fail(failure(script.status, script.retry_after, "scripted"));
        }
        if let Some(status) = fail_always {
            return Verdict::Fail(failure(status, None, "set to fail always"));
        }
        if self.fail_rate > 0.0 && fastrand::f64() < self.fail_rate {
            let retry_after = self.retry_after.map(HeaderValue::from);
            return Verdict::Fail(failure(self.fail_status, retry_after, "--fail-rate"));
        }
        Verdict::Accept(StatusCode::ACCEPTED)
    }

    /// A panic elsewhere while holding the lock leaves the switches usable.
    fn lock(&self) -> MutexGuard<'_, RunTime> {
        self.run_time.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `capacity` slots (at least one), or none.
fn slots(capacity: Option<usize>) -> Option<Arc<Semaphore>> {
    capacity.map(|n| Arc::new(Semaphore::new(n.max(1))))
}

/// Saturates at about 584 years.
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// `{"error": "injected_failure", "message": "failure injected by <switch>"}` with `status`.
fn failure(status: StatusCode, retry_after: Option<HeaderValue>, switch: &str) -> Response {
    let body = json!({
        "error": "injected_failure",
        "message": format!("failure injected by {switch}"),
    });
    let mut response = super::http::json_response(status, &body);
    if let Some(value) = retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults() -> Faults {
        Faults::new(Duration::ZERO, Duration::ZERO, 0.0, 503, None, None).expect("valid")
    }

    fn status(verdict: Verdict) -> StatusCode {
        match verdict {
            Verdict::Accept(status) => status,
            Verdict::Fail(response) => response.status(),
        }
    }

    #[tokio::test]
    async fn scripted_then_fail_always_then_accept() {
        let faults = faults();
        faults
            .push_scripted(vec![Scripted::status(429), Scripted::status(200)])
            .expect("valid");
        faults.fail_always(500).expect("valid");
        let mut statuses = Vec::new();
        for _ in 0..3 {
            statuses.push(status(faults.verdict().await).as_u16());
        }
        assert_eq!(statuses, vec![429, 200, 500]);
        faults.clear();
        assert_eq!(status(faults.verdict().await), StatusCode::ACCEPTED);
    }

    #[test]
    fn refuses_unusable_scripts_whole() {
        let faults = faults();
        let bad_header = Scripted {
            retry_after: Some("1\n".into()),
            ..Scripted::status(503)
        };
        assert!(matches!(
            faults.push_scripted(vec![Scripted::status(503), bad_header]),
            Err(SinkError::ScriptedRetryAfter { .. })
        ));
        assert!(matches!(
            faults.push_scripted(vec![Scripted::status(1000)]),
            Err(SinkError::ScriptedStatus(1000))
        ));
        assert!(faults.lock().scripted.is_empty());
        assert!(faults.fail_always(42).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_queues_requests_past_it() {
        let faults = Arc::new(faults());
        faults.set_latency(Duration::from_millis(100));
        faults.set_capacity(Some(2));
        let started = tokio::time::Instant::now();
        let waits: Vec<_> = (0..5)
            .map(|_| {
                let faults = faults.clone();
                tokio::spawn(async move {
                    faults.delay().await;
                    started.elapsed()
                })
            })
            .collect();
        let mut finished = Vec::new();
        for wait in waits {
            finished.push(wait.await.expect("task").as_millis() / 100);
        }
        finished.sort_unstable();
        // Two slots of 100 ms each: 2 answers after 100 ms, 2 after 200, 1 after 300.
        assert_eq!(finished, vec![1, 1, 2, 2, 3]);
        faults.set_capacity(None);
        let started = tokio::time::Instant::now();
        faults.delay().await;
        assert_eq!(started.elapsed().as_millis() / 100, 1);
    }
}
