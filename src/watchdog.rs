//! Liveness that means progress: `/healthz` answers 200 only while the exporter is moving.
//!
//! The rule (the invariant the probe reports):
//!
//! * **Pending work** is every health event that was received from the changelog (stream or
//!   backfill) and has no final outcome yet: waiting for a worker, in flight, or sleeping
//!   between delivery attempts.
//! * **Progress** is any outcome: an event finished (published, skipped, filtered out, given up
//!   on) *or a single delivery attempt failed*. A retry schedule that keeps failing is therefore
//!   not a stall — each failed attempt is an outcome — so the quiet gap a healthy exporter can
//!   leave is at most one attempt (`exporter.sink.timeout`, plus a token fetch) plus one backoff
//!   sleep (`exporter.failure_handling.max_backoff` + 10 % jitter).
//! * **Stalled** means: work is pending and nothing progressed for `exporter.liveness_timeout`.
//!   The clock starts when work arrives on an idle exporter, so a long quiet period with
//!   nothing to do never counts; an idle exporter is always alive.
//! * **Dead**: a background task (changelog reader, dispatcher, checkpoint writer, LISTEN
//!   connection) stopped while the exporter is meant to be running, or any task panicked.
//!
//! [`Watchdog`] is the pure rule (time is passed in, so it is tested without sleeping);
//! [`global`] is the process's shared instance the pipeline and the HTTP server use.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The default `exporter.liveness_timeout` floor: 5 minutes.
pub const DEFAULT_LIVENESS_TIMEOUT_FLOOR: Duration = Duration::from_secs(300);

/// `exporter.liveness_timeout` when the key is not set: the larger of 5 minutes and twice the
/// longest quiet gap a healthy retry schedule can leave (`sink_timeout + max_backoff`), so the
/// default never fails an exporter that is merely waiting out a backoff.
pub fn default_liveness_timeout(sink_timeout: Duration, max_backoff: Duration) -> Duration {
    sink_timeout
        .saturating_add(max_backoff)
        .saturating_mul(2)
        .max(DEFAULT_LIVENESS_TIMEOUT_FLOOR)
}

/// The longest quiet gap a healthy delivery can leave between two outcomes: one attempt
/// (`sink_timeout`) plus one backoff sleep with upstream's 10 % jitter (`max_backoff × 1.1`).
pub fn longest_quiet_gap(sink_timeout: Duration, max_backoff: Duration) -> Duration {
    sink_timeout
        .saturating_add(max_backoff.saturating_add(max_backoff.checked_div(10).unwrap_or_default()))
}

/// What `/healthz` should answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing pending: alive however long it has been quiet.
    Idle,
    /// Work pending and the last outcome is younger than the timeout.
    Progressing { pending: u64, since: Duration },
    /// Work pending and no outcome for at least the timeout.
    Stalled { pending: u64, since: Duration },
    /// A background task stopped or panicked (its name and why).
    Dead(String),
}

impl Verdict {
    /// Whether the liveness probe passes (the tests' shorthand; the server matches on the
    /// verdict itself).
    #[cfg(test)]
    pub fn alive(&self) -> bool {
        matches!(self, Verdict::Idle | Verdict::Progressing { .. })
    }
}

/// The pure liveness rule; see the module documentation.
#[derive(Debug, Clone)]
pub struct Watchdog {
    timeout: Duration,
    pending: u64,
    /// The last outcome, or the moment work arrived on an idle exporter.
    last_progress: Instant,
    dead: Option<String>,
}

impl Watchdog {
    /// A watchdog with nothing pending; `timeout` is `exporter.liveness_timeout`.
    pub fn new(timeout: Duration, now: Instant) -> Watchdog {
        Watchdog {
            timeout,
            pending: 0,
            last_progress: now,
            dead: None,
        }
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// One event received (now pending). On an idle exporter the clock starts here.
    pub fn on_received(&mut self, now: Instant) {
        if self.pending == 0 {
            self.last_progress = now;
        }
        self.pending = self.pending.saturating_add(1);
    }

    /// An outcome that does not end an event: a failed delivery attempt.
    pub fn on_progress(&mut self, now: Instant) {
        self.last_progress = self.last_progress.max(now);
    }

    /// One pending event reached its final outcome (or was abandoned at shutdown).
    pub fn on_finished(&mut self, now: Instant) {
        self.pending = self.pending.saturating_sub(1);
        self.on_progress(now);
    }

    /// A background task stopped or panicked; the first reason is kept.
    pub fn on_task_died(&mut self, reason: String) {
        self.dead.get_or_insert(reason);
    }

    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// Time since the last progress (zero when idle or when `now` is earlier).
    pub fn since_progress(&self, now: Instant) -> Duration {
        if self.pending == 0 {
            return Duration::ZERO;
        }
        now.saturating_duration_since(self.last_progress)
    }

    pub fn verdict(&self, now: Instant) -> Verdict {
        if let Some(reason) = &self.dead {
            return Verdict::Dead(reason.clone());
        }
        if self.pending == 0 {
            return Verdict::Idle;
        }
        let since = self.since_progress(now);
        if since >= self.timeout {
            Verdict::Stalled {
                pending: self.pending,
                since,
            }
        } else {
            Verdict::Progressing {
                pending: self.pending,
                since,
            }
        }
    }
}

/// The process's watchdog behind a lock (held for a few instructions; a poisoned lock is
/// taken over, never a panic).
pub struct Shared(Mutex<Watchdog>);

static GLOBAL: OnceLock<Shared> = OnceLock::new();

/// The process's watchdog; its timeout is the default floor until [`Shared::configure`].
pub fn global() -> &'static Shared {
    GLOBAL.get_or_init(|| {
        Shared(Mutex::new(Watchdog::new(
            DEFAULT_LIVENESS_TIMEOUT_FLOOR,
            Instant::now(),
        )))
    })
}

impl Shared {
    fn with<T>(&self, f: impl FnOnce(&mut Watchdog) -> T) -> T {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }
    pub fn configure(&self, timeout: Duration) {
        self.with(|w| w.set_timeout(timeout));
    }
    pub fn received(&self) {
        self.with(|w| w.on_received(Instant::now()));
    }
    pub fn progress(&self) {
        self.with(|w| w.on_progress(Instant::now()));
    }
    pub fn finished(&self) {
        self.with(|w| w.on_finished(Instant::now()));
    }
    pub fn task_died(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.with(|w| w.on_task_died(reason));
    }
    pub fn verdict(&self) -> Verdict {
        self.with(|w| w.verdict(Instant::now()))
    }
}

/// Exposes the watchdog at each scrape: `health_events_exporter_liveness_seconds_since_progress`
/// (0 while idle) and `health_events_exporter_liveness_pending_events`.
#[derive(Debug)]
pub struct Collector;

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let (since, pending) = global().with(|w| {
            (
                w.since_progress(Instant::now()).as_secs_f64(),
                i64::try_from(w.pending()).unwrap_or(i64::MAX),
            )
        });
        let since = ConstGauge::new(since);
        since.encode(encoder.encode_descriptor(
            "health_events_exporter_liveness_seconds_since_progress",
            "Seconds since the last delivery outcome while events are pending (0 when idle); /healthz fails at exporter.liveness_timeout",
            None,
            since.metric_type(),
        )?)?;
        let pending = ConstGauge::new(pending);
        pending.encode(encoder.encode_descriptor(
            "health_events_exporter_liveness_pending_events",
            "Events received and not yet finished (waiting, in flight or between attempts)",
            None,
            pending.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn idle_is_alive_however_long() {
        let t0 = Instant::now();
        let w = Watchdog::new(T, t0);
        assert_eq!(w.verdict(t0 + secs(1_000_000)), Verdict::Idle);
        assert!(w.verdict(t0 + secs(1_000_000)).alive());
    }

    #[test]
    fn the_clock_starts_when_work_arrives_on_an_idle_exporter() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        // Quiet for an hour, then one event: not stalled at once.
        w.on_received(t0 + secs(3600));
        assert!(w.verdict(t0 + secs(3605)).alive());
        assert_eq!(
            w.verdict(t0 + secs(3610)),
            Verdict::Stalled {
                pending: 1,
                since: secs(10)
            }
        );
    }

    #[test]
    fn more_work_arriving_does_not_reset_the_clock() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        w.on_received(t0);
        w.on_received(t0 + secs(9));
        assert!(
            !w.verdict(t0 + secs(10)).alive(),
            "new work is not progress"
        );
    }

    #[test]
    fn failed_attempts_are_progress() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        w.on_received(t0);
        for k in 1..=10 {
            w.on_progress(t0 + secs(9 * k));
            assert!(w.verdict(t0 + secs(9 * k + 9)).alive(), "attempt {k}");
        }
        assert!(!w.verdict(t0 + secs(100)).alive());
    }

    #[test]
    fn finishing_the_last_event_returns_to_idle() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        w.on_received(t0);
        w.on_finished(t0 + secs(5));
        assert_eq!(w.verdict(t0 + secs(500)), Verdict::Idle);
        assert_eq!(w.since_progress(t0 + secs(500)), Duration::ZERO);
    }

    #[test]
    fn a_dead_task_fails_even_when_idle_and_keeps_the_first_reason() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(T, t0);
        w.on_task_died("changelog reader stopped".into());
        w.on_task_died("later".into());
        assert_eq!(
            w.verdict(t0),
            Verdict::Dead("changelog reader stopped".into())
        );
    }

    #[test]
    fn counters_saturate_and_time_going_backwards_is_harmless() {
        let t0 = Instant::now() + secs(100);
        let mut w = Watchdog::new(T, t0);
        w.on_finished(t0);
        w.on_finished(t0);
        assert_eq!(w.pending(), 0);
        w.on_received(t0);
        // A stale `now` (taken before the lock) never moves progress back nor panics.
        w.on_progress(t0 - secs(50));
        assert_eq!(w.since_progress(t0 - secs(60)), Duration::ZERO);
        assert!(w.verdict(t0 + secs(9)).alive());
    }

    #[test]
    fn defaults_stay_above_the_longest_healthy_gap() {
        // (sink.timeout, max_backoff, expected default)
        let table = [
            (secs(30), secs(60), secs(300)), // upstream defaults: the 5 min floor
            (secs(30), secs(300), secs(660)), // Helm defaults: 11 min
            (secs(5), secs(1), secs(300)),   // tests
            (secs(600), secs(3600), secs(8400)),
        ];
        for (timeout, backoff, expected) in table {
            let default = default_liveness_timeout(timeout, backoff);
            assert_eq!(default, expected, "{timeout:?} {backoff:?}");
            assert!(default > longest_quiet_gap(timeout, backoff));
        }
        assert_eq!(
            default_liveness_timeout(Duration::MAX, Duration::MAX),
            Duration::MAX
        );
    }

    /// A table of event scripts (seconds, action) and the verdict at the end, checked against
    /// a model that recomputes the rule from the whole history.
    #[test]
    fn scripted_histories_match_the_rule() {
        #[derive(Clone, Copy)]
        enum Act {
            Recv,
            Fail,
            Done,
        }
        /// (history of (second, action), probe second, alive)
        type Script = (&'static [(u64, Act)], u64, bool);
        let scripts: &[Script] = &[
            (&[], 100, true),
            (&[(0, Act::Recv)], 9, true),
            (&[(0, Act::Recv)], 10, false),
            (&[(0, Act::Recv), (5, Act::Done)], 100, true),
            (&[(0, Act::Recv), (0, Act::Recv), (5, Act::Done)], 14, true),
            (&[(0, Act::Recv), (0, Act::Recv), (5, Act::Done)], 15, false),
            (&[(0, Act::Recv), (8, Act::Fail), (16, Act::Fail)], 25, true),
            (
                &[(0, Act::Recv), (8, Act::Fail), (16, Act::Fail)],
                26,
                false,
            ),
            (&[(0, Act::Recv), (1, Act::Done), (50, Act::Recv)], 55, true),
            (
                &[(0, Act::Recv), (1, Act::Done), (50, Act::Recv)],
                60,
                false,
            ),
        ];
        let t0 = Instant::now();
        for (index, (script, at, alive)) in scripts.iter().enumerate() {
            let mut w = Watchdog::new(T, t0);
            for (when, act) in script.iter() {
                let now = t0 + secs(*when);
                match act {
                    Act::Recv => w.on_received(now),
                    Act::Fail => w.on_progress(now),
                    Act::Done => w.on_finished(now),
                }
            }
            assert_eq!(
                w.verdict(t0 + secs(*at)).alive(),
                *alive,
                "script {index}: {:?}",
                w.verdict(t0 + secs(*at))
            );
        }
    }

    /// Pseudo-random histories (fixed seed): the verdict always equals the rule recomputed
    /// from scratch — pending = received − finished, stalled iff pending > 0 and the last
    /// outcome (or the arrival on an idle exporter) is at least the timeout old.
    #[test]
    fn random_histories_match_a_recomputed_model() {
        let mut rng = fastrand::Rng::with_seed(14);
        let t0 = Instant::now();
        for _ in 0..500 {
            let mut w = Watchdog::new(T, t0);
            let mut now = 0u64;
            let mut pending = 0u64;
            let mut last = 0u64;
            for _ in 0..rng.usize(0..40) {
                now += rng.u64(0..8);
                match rng.u8(0..3) {
                    0 => {
                        if pending == 0 {
                            last = now;
                        }
                        pending += 1;
                        w.on_received(t0 + secs(now));
                    }
                    1 => {
                        last = now;
                        w.on_progress(t0 + secs(now));
                    }
                    _ => {
                        pending = pending.saturating_sub(1);
                        last = now;
                        w.on_finished(t0 + secs(now));
                    }
                }
                let probe = now + rng.u64(0..15);
                let expected = pending == 0 || probe - last < T.as_secs();
                assert_eq!(w.verdict(t0 + secs(probe)).alive(), expected);
                assert_eq!(w.pending(), pending);
            }
        }
    }
}
