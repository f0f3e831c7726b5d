//! Upstream's retry schedule (Kubernetes `wait.Backoff` as the Go exporter configures it):
//! `max_retries + 1` attempts; before attempt k+1 sleep `initial × multiplier^(k-1)`, capped at
//! `max_backoff`, plus 0–10 % jitter. A multiplier of 0 keeps the interval constant.

use std::time::Duration;

use crate::config::RetryPolicy;

/// Yields the sleep before each retry; `None` once the attempts are used up.
pub struct Backoff {
    next: Duration,
    retries_left: u32,
    multiplier: f64,
    cap: Duration,
}

impl Backoff {
    pub fn new(policy: &RetryPolicy) -> Backoff {
        Backoff {
            next: policy.initial_backoff.min(policy.max_backoff),
            retries_left: policy.max_retries,
            multiplier: policy.backoff_multiplier,
            cap: policy.max_backoff,
        }
    }

    /// The base delay (without jitter) before the next retry.
    pub fn next_base(&mut self) -> Option<Duration> {
        if self.retries_left == 0 {
            return None;
        }
        self.retries_left = self.retries_left.saturating_sub(1);
        let delay = self.next;
        if self.multiplier > 0.0 {
            // `mul_f64` would panic past `Duration::MAX`; anything that large is the cap.
            let next = Duration::try_from_secs_f64(self.next.as_secs_f64() * self.multiplier);
            self.next = next.unwrap_or(self.cap).min(self.cap);
        }
        Some(delay)
    }

    /// The delay before the next retry with upstream's +0–10 % jitter.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.next_base()
            .map(|base| base.mul_f64(1.0 + fastrand::f64() * 0.1))
    }
}

/// Total sleeping the schedule allows before giving up (without jitter), for logs and docs.
pub fn total_base_delay(policy: &RetryPolicy) -> Duration {
    let mut backoff = Backoff::new(policy);
    std::iter::from_fn(|| backoff.next_base()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_retries: u32, initial: u64, cap: u64, multiplier: f64) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            initial_backoff: Duration::from_secs(initial),
            max_backoff: Duration::from_secs(cap),
            backoff_multiplier: multiplier,
        }
    }

    #[test]
    fn helm_defaults_sleep_48_and_a_half_minutes() {
        let defaults = policy(17, 1, 300, 2.0);
        let mut backoff = Backoff::new(&defaults);
        let delays: Vec<u64> = std::iter::from_fn(|| backoff.next_base())
            .map(|d| d.as_secs())
            .collect();
        assert_eq!(
            delays,
            vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300, 300, 300, 300, 300]
        );
        assert_eq!(total_base_delay(&defaults), Duration::from_secs(2911));
    }

    #[test]
    fn zero_multiplier_is_constant_and_zero_retries_is_one_attempt() {
        let mut backoff = Backoff::new(&policy(3, 2, 60, 0.0));
        let delays: Vec<_> = std::iter::from_fn(|| backoff.next_base()).collect();
        assert_eq!(delays, vec![Duration::from_secs(2); 3]);
        assert!(Backoff::new(&policy(0, 1, 60, 2.0)).next_base().is_none());
    }

    #[test]
    fn jitter_adds_at_most_ten_percent() {
        for _ in 0..200 {
            let delay = Backoff::new(&policy(1, 10, 60, 2.0))
                .next_delay()
                .expect("one retry");
            assert!(
                delay >= Duration::from_secs(10) && delay < Duration::from_secs(11),
                "{delay:?}"
            );
        }
    }
}
