//! Deadlines from durations that may come from outside (configuration, flags, HTTP answers).
//!
//! `Instant + Duration` panics when the sum does not fit the platform clock; a duration from
//! the configuration or a token endpoint must never reach that panic. These helpers saturate
//! instead: a deadline too far away to represent becomes "about 30 years from now", which is
//! what tokio itself uses for a timer that never fires.

use std::time::Duration;

/// How far away a saturated deadline is: 30 years, as tokio's `Instant::far_future`.
pub const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `now + duration` on tokio's clock; a sum that cannot be represented saturates at
/// `now + FAR_FUTURE` (or `now` if even that cannot be represented).
pub fn deadline_after(duration: Duration) -> tokio::time::Instant {
    saturating_add(tokio::time::Instant::now(), duration)
}

/// `instant + duration` on tokio's clock, saturating as [`deadline_after`] does.
pub fn saturating_add(instant: tokio::time::Instant, duration: Duration) -> tokio::time::Instant {
    instant
        .checked_add(duration.min(FAR_FUTURE))
        .or_else(|| instant.checked_add(FAR_FUTURE))
        .unwrap_or(instant)
}

/// A timer for a `select!` loop whose deadline may change from one turn to the next (or be
/// absent). A `sleep_until` made afresh every turn registers a timer entry and removes it
/// again each turn (two locks of the timer driver per turn, once per event in a drain); an
/// alarm keeps one entry and moves it only when the deadline changes.
pub struct Alarm {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The deadline `sleep` is set to, once one was asked for.
    armed: Option<tokio::time::Instant>,
}

impl Alarm {
    pub fn new() -> Alarm {
        Alarm {
            sleep: Box::pin(tokio::time::sleep_until(deadline_after(FAR_FUTURE))),
            armed: None,
        }
    }

    /// Completes at `deadline` (at once if it has passed); never while `deadline` is `None`.
    /// Cancel-safe: dropping the future keeps the alarm set.
    pub async fn at(&mut self, deadline: Option<tokio::time::Instant>) {
        let Some(deadline) = deadline else {
            return std::future::pending().await;
        };
        if self.armed != Some(deadline) {
            self.sleep.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        self.sleep.as_mut().await
    }
}

impl Default for Alarm {
    fn default() -> Self {
        Alarm::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_alarm_rings_at_its_latest_deadline_and_never_without_one() {
        let mut alarm = Alarm::new();
        let start = tokio::time::Instant::now();
        let none = tokio::time::timeout(Duration::from_secs(3600), alarm.at(None)).await;
        assert!(none.is_err(), "an alarm without a deadline rang");
        let first = tokio::time::Instant::now() + Duration::from_secs(5);
        // Asked for a later deadline before the first rang: it rings at the later one.
        let early = tokio::time::timeout(Duration::from_secs(1), alarm.at(Some(first))).await;
        assert!(early.is_err());
        let later = first + Duration::from_secs(5);
        alarm.at(Some(later)).await;
        assert_eq!(tokio::time::Instant::now(), later);
        // A passed deadline rings at once, and so does an earlier one set afterwards.
        alarm.at(Some(later)).await;
        alarm.at(Some(start)).await;
        assert_eq!(tokio::time::Instant::now(), later);
    }

    #[tokio::test]
    async fn a_huge_duration_saturates_instead_of_panicking() {
        let now = tokio::time::Instant::now();
        let deadline = saturating_add(now, Duration::MAX);
        assert_eq!(deadline, now + FAR_FUTURE);
        assert!(deadline_after(Duration::from_secs(u64::MAX)) > now);
    }

    #[tokio::test]
    async fn a_small_duration_is_added_exactly() {
        let now = tokio::time::Instant::now();
        assert_eq!(
            saturating_add(now, Duration::from_millis(1500)),
            now + Duration::from_millis(1500)
        );
    }
}
