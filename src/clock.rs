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

#[cfg(test)]
mod tests {
    use super::*;

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
