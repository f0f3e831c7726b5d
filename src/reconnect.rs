//! The one reconnect backoff: the wait before reconnecting to the datastore after a failed or
//! dropped connection (the changelog reader, the LISTEN connection, a backfill query, start-up).
//!
//! The wait doubles after each failure, from `initial` up to `max`, and goes back to `initial`
//! once the connection has been healthy: either the caller says so with [`Backoff::reset`]
//! (a query that succeeded), or the last connection was up for at least the backoff's healthy
//! period ([`HEALTHY_PERIOD`] unless given) before it failed. Without that reset a long-lived
//! connection that drops now and then (a PostgreSQL failover, a proxy's idle timeout) would,
//! after a few drops, wait `max` before every later reconnect.
//!
//! Upstream's publish retry schedule (`sink::retry`) is a different contract (attempts counted,
//! jitter, configured by the user) and stays separate.
//!
//! Time is passed in (`tokio::time::Instant`), so the rule is tested without sleeping.

use std::time::Duration;

use tokio::time::Instant;

/// How long a connection must stay up before its failure counts as a first failure again
/// (the wait goes back to `initial`). Long enough that a server which accepts connections and
/// drops them at once (a restarting PostgreSQL, a failing proxy) still sees the wait grow;
/// short enough that a connection which worked for a while reconnects at once.
pub const HEALTHY_PERIOD: Duration = Duration::from_secs(5);

/// Exponential reconnect backoff with a healthy-period reset (see the module docs).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    healthy_after: Duration,
    next: Duration,
    /// When the current connection became usable, if it is up.
    connected_at: Option<Instant>,
}

impl Backoff {
    /// Waits `initial`, `2 × initial`, … capped at `max`; reset after [`HEALTHY_PERIOD`].
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff::with_healthy_period(initial, max, HEALTHY_PERIOD)
    }

    /// `new`, with the time a connection must stay up before its failure resets the wait.
    pub fn with_healthy_period(initial: Duration, max: Duration, healthy: Duration) -> Backoff {
        let initial = initial.min(max);
        Backoff {
            initial,
            max,
            healthy_after: healthy,
            next: initial,
            connected_at: None,
        }
    }

    /// The connection became usable at `now` (e.g. LISTEN succeeded).
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The connection proved healthy (e.g. a query succeeded): the next wait is `initial`.
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.connected_at = None;
    }

    /// A connection attempt or connection failed at `now`: the time to wait before the next
    /// attempt. A connection that was up for the healthy period first resets the wait.
    pub fn failed(&mut self, now: Instant) -> Duration {
        if let Some(since) = self.connected_at.take() {
            if now.saturating_duration_since(since) >= self.healthy_after {
                self.next = self.initial;
            }
        }
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn waits(backoff: &mut Backoff, now: Instant, n: usize) -> Vec<Duration> {
        (0..n).map(|_| backoff.failed(now)).collect()
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let mut backoff = Backoff::new(MS * 500, Duration::from_secs(3));
        let now = Instant::now();
        assert_eq!(
            waits(&mut backoff, now, 5),
            [MS * 500, MS * 1000, MS * 2000, MS * 3000, MS * 3000]
        );
    }

    #[test]
    fn a_connection_up_for_the_healthy_period_resets_the_wait() {
        let mut backoff = Backoff::new(MS * 500, Duration::from_secs(30));
        let start = Instant::now();
        waits(&mut backoff, start, 6); // next wait would be 32 s → 30 s
        backoff.connected(start);
        assert_eq!(backoff.failed(start + HEALTHY_PERIOD), MS * 500);
        assert_eq!(backoff.failed(start + HEALTHY_PERIOD), MS * 1000);
    }

    #[test]
    fn a_connection_dropped_before_the_healthy_period_keeps_growing() {
        let mut backoff = Backoff::new(MS * 500, Duration::from_secs(30));
        let start = Instant::now();
        assert_eq!(backoff.failed(start), MS * 500);
        backoff.connected(start);
        assert_eq!(backoff.failed(start + HEALTHY_PERIOD - MS), MS * 1000);
        // The connection mark is used once: a later failure without a connection grows on.
        assert_eq!(backoff.failed(start + HEALTHY_PERIOD * 10), MS * 2000);
    }

    #[test]
    fn reset_goes_back_to_initial_at_once() {
        let mut backoff = Backoff::new(MS * 250, Duration::from_secs(30));
        let now = Instant::now();
        waits(&mut backoff, now, 4);
        backoff.reset();
        assert_eq!(backoff.failed(now), MS * 250);
    }

    #[test]
    fn an_initial_above_the_cap_is_capped_and_huge_values_saturate() {
        let mut backoff = Backoff::new(Duration::from_secs(60), Duration::from_secs(10));
        assert_eq!(backoff.failed(Instant::now()), Duration::from_secs(10));
        let mut backoff = Backoff::new(Duration::MAX / 2 + MS, Duration::MAX);
        let now = Instant::now();
        assert_eq!(waits(&mut backoff, now, 3)[2], Duration::MAX);
    }
}
