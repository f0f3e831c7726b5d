//! How many requests to the sink may be in flight (`exporter.sink.concurrency`).
//!
//! `fixed` (default): always `workers`, upstream's behaviour. `adaptive`: `workers` is the
//! ceiling and the limit follows the sink, AIMD on observed round-trip time in the manner of
//! TCP congestion control:
//!
//! - Time is cut into windows about one baseline RTT long (at least [`MIN_WINDOW`]). Each
//!   request's RTT and outcome is a [`Sample`]. Only requests *sent* after the limit last
//!   changed count (sent: when the publisher sent it under the limit, before any wait for a
//!   connection; [`Sample::age`]): one sent before describes the old limit (its answer arrives
//!   up to an RTT, or a handshake and an RTT, later), and judging the new limit by it would
//!   repeat a decrease for one overload.
//! - A window that saw a back-pressure answer (429, 503, a timeout) multiplies the limit by
//!   [`DECREASE`] (rounded down, so it always drops by at least one, never below 1).
//! - A window whose mean RTT rose past the baseline (more than [`RTT_RATIO`] × baseline and
//!   more than [`MIN_RISE`] above it) decreases the same way: the sink is queueing.
//! - A window whose RTT stayed near the baseline and in which the limit was reached (all
//!   permits in use: more concurrency could have been used) adds one, up to `workers`; until
//!   the first back-pressure answer or rise (slow start, as TCP's), it doubles instead. A
//!   slow-start window lasts two baseline RTTs, so that the answers to requests that queued
//!   behind a doubling are in it, or ends as soon as a full round (as many answers as the
//!   limit) is in, which on a sink that does not queue is about one RTT after the change: a
//!   300 ms sink with `workers = 100` is found in 7 doublings (4 s in the bench), not 200
//!   steps of one (60 s). The first back-pressure answer or rise in slow start halves the
//!   limit (back to the last one that was fine), as TCP does; afterwards each takes a tenth
//!   off.
//! - A request's RTT is its POST's, from sending it to the end of the answer: fetching the
//!   bearer token is not in it (the first request waits for one, and had that wait counted,
//!   the baseline would start as slow as the identity provider, too slow to see the sink's
//!   queue later). Nor is waiting for a connection: the RTT starts when a connection takes the
//!   request (`SinkClient`'s `Answer::round_trip`). Every doubling opens as many connections as
//!   it adds requests, and against a remote sink their TCP and TLS handshakes (two or three
//!   network round trips) read as a queue when they were counted: slow start ended at once and
//!   the limit crept up one step per window (a 300 ms TLS sink with 600 ms of handshakes in
//!   the bench: short of the ceiling of 100 in three of four runs; at it after 6 s now).
//! - The baseline estimates the sink's RTT *without our load*: it follows windows that were
//!   faster than it (in slow start at once, since those windows are below any queue and the
//!   first may include a new connection's handshake; afterwards as a moving average, so one
//!   lucky window does not set it), and never the windows that were slower. A baseline that
//!   also followed slower windows would let a queueing sink's latency become the new normal
//!   one step at a time: each +1 adds less than [`RTT_RATIO`] to the RTT of the step before,
//!   so the limit would creep to the ceiling and the sink's queue with it
//!   (tests/adaptive_concurrency.rs has such a sink).
//! - A window that rose while the limit is already 1 cannot be our queue: the sink itself got
//!   slower, and that RTT becomes the baseline, so a lasting latency step costs one descent to
//!   1 and a climb back (in slow start again: a new sink, as far as the rule knows) rather
//!   than pinning the limit at 1.
//!
//! Invariant: the limit is always within `1..=workers`. The rule ([`AdaptiveLimit`]) is pure
//! (time is passed in); [`Concurrency`] applies it to the semaphore the pipelines' workers
//! take their permits from, and publishes it as `health_events_exporter_concurrency_limit`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

use crate::config::ConcurrencyMode;

/// The shortest window: below it, loopback jitter would dominate the mean.
pub const MIN_WINDOW: Duration = Duration::from_millis(10);
/// The factor applied to the limit on back-pressure or a latency rise.
pub const DECREASE: f64 = 0.9;
/// A window's mean RTT above `baseline × RTT_RATIO` is a rise.
pub const RTT_RATIO: f64 = 1.5;
/// In slow start a smaller rise ends the doubling (as TCP's HyStart leaves slow start on an
/// RTT increase of an eighth): a doubling overshoots by up to the whole limit, so it must stop
/// at the first sign of a queue.
pub const SLOW_START_RTT_RATIO: f64 = 1.125;
/// … and only if it is also this much above the baseline (loopback RTTs are tiny and noisy).
pub const MIN_RISE: Duration = Duration::from_millis(2);
/// Weight of a faster window in the baseline's moving average.
const BASELINE_WEIGHT: f64 = 0.2;

/// What one request to the sink said about its load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The sink answered (2xx or an error status that is not back-pressure): the RTT counts.
    Answered,
    /// 429, 503 or a timeout: the sink asks for less.
    Backpressure,
    /// Says nothing about the sink's load (a connect error, a token failure): ignored.
    Ignored,
}

/// One POST's timing, as the publisher measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundTrip {
    /// From when a connection took the request to the end of the answer: what is judged.
    pub rtt: Duration,
    /// From the call (when the request went out under the limit of the time, before any wait
    /// for a connection) to the end: which limit the request belongs to. At least `rtt`.
    pub age: Duration,
}

/// One finished request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// From when a connection took the request to the end of the response body.
    pub rtt: Duration,
    /// From when the request was sent under the limit (before any wait for a connection) to
    /// the end: a request sent before the limit last changed is not judged, even if its
    /// connection took it after (it was one of the old limit's requests).
    pub age: Duration,
    pub signal: Signal,
    /// Whether every permit was in use when it finished (the limit was what held intake back).
    pub at_limit: bool,
}

/// The current window's observations.
#[derive(Debug, Default, Clone)]
struct Window {
    /// When it began (the first sample's time).
    start: Option<Duration>,
    rtt_sum: f64,
    answered: u32,
    backpressure: bool,
    at_limit: bool,
}

impl Window {
    fn add(&mut self, sample: &Sample) {
        match sample.signal {
            Signal::Answered => {
                self.rtt_sum += sample.rtt.as_secs_f64();
                self.answered = self.answered.saturating_add(1);
            }
            Signal::Backpressure => self.backpressure = true,
            Signal::Ignored => {}
        }
        self.at_limit |= sample.at_limit;
    }

    /// Mean RTT in seconds of the answered requests.
    fn mean(&self) -> Option<f64> {
        (self.answered > 0).then(|| self.rtt_sum / f64::from(self.answered))
    }
}

/// The AIMD rule: fed with samples and the time they finished, keeps a limit in
/// `1..=ceiling`. Starts at 1 and finds the sink's capacity from there.
#[derive(Debug, Clone)]
pub struct AdaptiveLimit {
    ceiling: usize,
    limit: usize,
    /// The sink's RTT without our load, in seconds (see the module docs for how it moves).
    baseline: Option<f64>,
    /// Doubling rather than adding one: until the first back-pressure answer or rise.
    slow_start: bool,
    /// Samples of requests sent before this are ignored: when the limit last changed.
    judge_from: Duration,
    window: Window,
}

impl AdaptiveLimit {
    /// A limit of 1 that may grow to `ceiling` (at least 1).
    pub fn new(ceiling: usize) -> AdaptiveLimit {
        AdaptiveLimit {
            ceiling: ceiling.max(1),
            limit: 1,
            baseline: None,
            slow_start: true,
            judge_from: Duration::ZERO,
            window: Window::default(),
        }
    }

    /// The current limit, within `1..=ceiling`.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The baseline RTT the windows are compared with, once one window closed.
    pub fn baseline(&self) -> Option<Duration> {
        self.baseline
            .and_then(|b| Duration::try_from_secs_f64(b).ok())
    }

    /// Records a request that finished at `now` (any monotonic origin); closes the window
    /// when it is long enough. Returns the limit.
    pub fn observe(&mut self, sample: Sample, now: Duration) -> usize {
        if now.saturating_sub(sample.age.max(sample.rtt)) < self.judge_from {
            return self.limit;
        }
        let start = *self.window.start.get_or_insert(now);
        self.window.add(&sample);
        let length = self.window_length();
        // In slow start a window also ends once a full round at this limit (as many answers
        // as the limit, each to a request sent at it) is in: the queued answers are in it
        // then, and a doubling need not wait out two round trips.
        let full_round = self.slow_start && self.window.answered as usize >= self.limit;
        if now.saturating_sub(start) >= length || full_round {
            self.close_window(now);
        }
        self.limit
    }

    fn close_window(&mut self, now: Duration) {
        let before = self.limit;
        let window = std::mem::take(&mut self.window);
        self.judge(window);
        if self.limit == before {
            self.window.start = Some(now);
        } else {
            // Only requests sent from now on count; the next window starts with the first.
            self.judge_from = now;
        }
    }

    /// Applies the rule to what a closed window saw.
    fn judge(&mut self, window: Window) {
        if window.backpressure {
            self.decrease();
            return;
        }
        let Some(mean) = window.mean() else {
            return;
        };
        let baseline = *self.baseline.get_or_insert(mean);
        let rise = mean - baseline;
        let ratio = if self.slow_start {
            SLOW_START_RTT_RATIO
        } else {
            RTT_RATIO
        };
        if mean > baseline * ratio && rise > MIN_RISE.as_secs_f64() {
            if self.limit == 1 {
                self.baseline = Some(mean);
                self.slow_start = true;
            } else {
                self.decrease();
            }
            return;
        }
        if window.at_limit {
            let step = if self.slow_start { self.limit } else { 1 };
            self.limit = self.limit.saturating_add(step).min(self.ceiling);
        }
        if mean < baseline {
            // In slow start the windows are below any queue, so a faster one is the sink's
            // unloaded RTT: taken at once, as TCP's HyStart takes the minimum. (The first
            // window can be slow for reasons of its own, a new connection's handshake.)
            self.baseline = Some(if self.slow_start {
                mean
            } else {
                baseline + BASELINE_WEIGHT * (mean - baseline)
            });
        }
    }

    /// One baseline RTT (at least [`MIN_WINDOW`]); two in slow start, so that the answers to
    /// requests that queued behind a doubling are in the window, not only the first answers,
    /// which found a free slot.
    fn window_length(&self) -> Duration {
        let one = self.baseline().map_or(MIN_WINDOW, |b| b.max(MIN_WINDOW));
        if self.slow_start {
            one.saturating_mul(2)
        } else {
            one
        }
    }

    /// Halves the limit at the end of slow start, else takes a tenth off; never below 1.
    fn decrease(&mut self) {
        let factor = if self.slow_start { 0.5 } else { DECREASE };
        self.slow_start = false;
        // ⌊limit × 0.9⌋ is below the limit for every limit ≥ 2.
        let scaled = (self.limit as f64 * factor).floor() as usize;
        self.limit = scaled.clamp(1, self.ceiling);
    }
}

/// The permits the pipelines' workers take before publishing: `workers` of them in fixed
/// mode, the adaptive limit's count in adaptive mode. Shared by the stream and a backfill.
pub struct Concurrency {
    permits: Arc<Semaphore>,
    workers: usize,
    adaptive: Option<Mutex<Adaptive>>,
}

/// The adaptive state: the rule and how many permits exist now.
struct Adaptive {
    rule: AdaptiveLimit,
    /// Permits in existence (available or held); brought down to the limit as they return.
    issued: usize,
    origin: tokio::time::Instant,
}

impl Concurrency {
    /// `workers` permits (fixed), or a limit starting at 1 with `workers` as its ceiling.
    /// Sets the `concurrency_limit` gauge.
    pub fn new(workers: usize, mode: ConcurrencyMode) -> Arc<Concurrency> {
        let workers = workers.max(1);
        let (issued, adaptive) = match mode {
            ConcurrencyMode::Fixed => (workers, None),
            ConcurrencyMode::Adaptive => {
                let rule = AdaptiveLimit::new(workers);
                let issued = rule.limit();
                let origin = tokio::time::Instant::now();
                let state = Adaptive {
                    rule,
                    issued,
                    origin,
                };
                (issued, Some(Mutex::new(state)))
            }
        };
        set_gauge(issued);
        Arc::new(Concurrency {
            permits: Arc::new(Semaphore::new(issued)),
            workers,
            adaptive,
        })
    }

    /// The number of requests allowed in flight now.
    pub fn limit(&self) -> usize {
        match &self.adaptive {
            Some(state) => lock(state).rule.limit(),
            None => self.workers,
        }
    }

    /// Waits for a permit; a permit beyond a limit that dropped is retired instead of used.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, AcquireError> {
        loop {
            let permit = self.permits.clone().acquire_owned().await?;
            if let Some(permit) = self.admit(permit) {
                return Ok(permit);
            }
        }
    }

    /// A permit if one is free now (as [`Concurrency::acquire`] would give it), else `None`.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        loop {
            let permit = self.permits.clone().try_acquire_owned().ok()?;
            if let Some(permit) = self.admit(permit) {
                return Some(permit);
            }
        }
    }

    /// `permit` if it is within the limit; a permit beyond a limit that dropped is retired.
    fn admit(&self, permit: OwnedSemaphorePermit) -> Option<OwnedSemaphorePermit> {
        let Some(state) = &self.adaptive else {
            return Some(permit);
        };
        let mut state = lock(state);
        if state.issued <= state.rule.limit() {
            return Some(permit);
        }
        permit.forget();
        state.issued = state.issued.saturating_sub(1);
        None
    }

    /// Feeds one finished request to the adaptive rule (no-op in fixed mode) and resizes.
    pub fn observe(&self, round_trip: RoundTrip, signal: Signal) {
        let Some(state) = &self.adaptive else {
            return;
        };
        let at_limit = self.permits.available_permits() == 0;
        let mut state = lock(state);
        let now = tokio::time::Instant::now().saturating_duration_since(state.origin);
        let sample = Sample {
            rtt: round_trip.rtt,
            age: round_trip.age,
            signal,
            at_limit,
        };
        let before = state.rule.limit();
        let limit = state.rule.observe(sample, now);
        if limit != before {
            let baseline_ms = state.rule.baseline().map_or(0, |b| b.as_millis());
            tracing::debug!(
                from = before,
                to = limit,
                baseline_ms,
                "concurrency limit changed"
            );
        }
        if limit > state.issued {
            self.permits.add_permits(limit.saturating_sub(state.issued));
            state.issued = limit;
        } else if limit < state.issued {
            let retired = self
                .permits
                .forget_permits(state.issued.saturating_sub(limit));
            state.issued = state.issued.saturating_sub(retired);
        }
        set_gauge(limit);
    }
}

fn lock(state: &Mutex<Adaptive>) -> std::sync::MutexGuard<'_, Adaptive> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

fn set_gauge(limit: usize) {
    let value = i64::try_from(limit).unwrap_or(i64::MAX);
    crate::metrics::get().concurrency_limit.set(value);
}

#[cfg(test)]
mod tests;
