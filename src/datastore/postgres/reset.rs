//! A resume token ahead of the changelog's head: the changelog's ids went back.
//!
//! Changelog ids come from the sequence `datastore_changelog_id_seq`, which never goes back on
//! its own: every id ever taken (committed, rolled back, or held by a transaction still open)
//! is at most the sequence's last value. So the changelog's **head** is the larger of the
//! sequence's last value and the highest id present, and a resume token (or, while running,
//! the highest id read) above the head means the ids were reset: `TRUNCATE … RESTART IDENTITY`,
//! a re-created or restored datastore, or a bogus token row. A token equal to the head, an
//! empty changelog after a fresh install (head 0, token 0), holes at the head and open
//! transactions (their ids are at most the sequence's value) are never taken for a reset.
//! Without privileges on the sequence (USAGE or SELECT) the head is only the highest id
//! present; then a changelog whose newest rows were all deleted also looks reset, which costs
//! re-sent events (bounded by the window below), never lost ones.
//!
//! **Recovery.** Reading restarts at the new changelog's beginning, bounded by the backfill
//! window (`exporter.backfill.max_age`, `exporter.backfill.max_events`, used whether or not
//! the backfill is enabled): only the newest `max_events` ids up to the head at detection are
//! read (1,000,000 when `max_events` is 0), and of those, health events written more than
//! `max_age` before the detection are passed over. Everything after the head is delivered.
//!
//! **Positions.** The pipeline needs positions that only grow; a reset while running makes
//! ids start again below positions already handed out. `PositionMap` keeps positions growing
//! across the reset (an *epoch*: id `start_id + k` is position `base + k`) and turns the
//! checkpoint back into a changelog id when the resume token is written.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// The chart's default `max_events`, used when `exporter.backfill.max_events` is 0 (unset).
pub const DEFAULT_RESET_MAX_EVENTS: u64 = 1_000_000;

/// The backfill window that bounds a restart from a reset changelog.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResetWindow {
    /// Health events older than this at detection are passed over.
    pub max_age: Duration,
    /// At most this many changelog ids below the head are read; 0 means
    /// `DEFAULT_RESET_MAX_EVENTS`.
    pub max_events: u64,
}

impl Default for ResetWindow {
    /// The configuration's defaults: `720h`, and `max_events` unset.
    fn default() -> ResetWindow {
        ResetWindow {
            max_age: Duration::from_secs(720 * 3600),
            max_events: 0,
        }
    }
}

/// Where reading restarts after a reset was detected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Restart {
    /// Reading continues after this changelog id (ids `after+1..` are read).
    pub after: u64,
    /// Health-event rows with ids up to `through` (the head at detection) changed before
    /// `not_before` are passed over; later ids are always delivered.
    pub through: u64,
    pub not_before: DateTime<Utc>,
}

/// The rule: `None` when `token` (every id up to it is finished) is at or below `head`;
/// otherwise where to restart, per the module docs.
pub fn restart_point(
    token: u64,
    head: u64,
    detected_at: DateTime<Utc>,
    window: &ResetWindow,
) -> Option<Restart> {
    if token <= head {
        return None;
    }
    let max_events = match window.max_events {
        0 => DEFAULT_RESET_MAX_EVENTS,
        n => n,
    };
    let not_before = chrono::Duration::from_std(window.max_age)
        .ok()
        .and_then(|age| detected_at.checked_sub_signed(age))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    Some(Restart {
        after: head.saturating_sub(max_events),
        through: head,
        not_before,
    })
}

/// Maps pipeline positions to changelog ids across resets detected while running (see the
/// module docs). Before any reset, positions are ids.
#[derive(Debug, Default)]
pub struct PositionMap {
    epoch: Mutex<Option<Epoch>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Epoch {
    /// The last position of the previous epoch.
    base: u64,
    /// The changelog id this epoch starts after.
    start_id: u64,
}

impl PositionMap {
    /// Starts a new epoch: position `base + k` is changelog id `start_id + k`.
    pub fn start_epoch(&self, base: u64, start_id: u64) {
        *self.epoch.lock().unwrap_or_else(|e| e.into_inner()) = Some(Epoch { base, start_id });
    }

    fn current(&self) -> Option<Epoch> {
        *self.epoch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The position of changelog id `id` (an id read in the current epoch).
    pub fn position_of(&self, id: u64) -> u64 {
        match self.current() {
            None => id,
            Some(epoch) => id.saturating_sub(epoch.start_id).saturating_add(epoch.base),
        }
    }

    /// The changelog id a checkpoint at `position` stands for in the resume token. A position
    /// of an earlier epoch means "nothing of the current changelog finished yet": `start_id`.
    pub fn id_of(&self, position: u64) -> u64 {
        match self.current() {
            None => position,
            Some(epoch) if position <= epoch.base => epoch.start_id,
            Some(epoch) => position
                .saturating_sub(epoch.base)
                .saturating_add(epoch.start_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0)
            .single()
            .expect("valid")
    }

    #[test]
    fn a_token_at_or_below_the_head_is_not_a_reset() {
        let window = ResetWindow::default();
        assert_eq!(
            restart_point(10, 10, at(), &window),
            None,
            "equal to the head"
        );
        assert_eq!(restart_point(3, 10, at(), &window), None, "behind the head");
        assert_eq!(restart_point(0, 0, at(), &window), None, "fresh install");
    }

    #[test]
    fn a_token_ahead_restarts_at_the_new_beginning_within_the_window() {
        let window = ResetWindow {
            max_age: Duration::from_secs(3600),
            max_events: 1000,
        };
        let restart = restart_point(1_000_000, 10, at(), &window).expect("ahead");
        assert_eq!(restart.after, 0);
        assert_eq!(restart.through, 10);
        assert_eq!(restart.not_before, at() - chrono::Duration::hours(1));
        // TRUNCATE ... RESTART IDENTITY with nothing new yet.
        assert_eq!(
            restart_point(20, 0, at(), &window).map(|r| r.after),
            Some(0)
        );
        // A restored datastore larger than the window: only its newest max_events ids.
        assert_eq!(
            restart_point(90_000, 50_000, at(), &window).map(|r| r.after),
            Some(49_000)
        );
        // max_events unset: the chart's default.
        let unset = ResetWindow {
            max_events: 0,
            ..window
        };
        assert_eq!(
            restart_point(u64::MAX, 3_000_000, at(), &unset).map(|r| r.after),
            Some(2_000_000)
        );
        // A window older than chrono can express does not panic.
        let huge = ResetWindow {
            max_age: Duration::MAX,
            max_events: 1,
        };
        assert_eq!(
            restart_point(2, 1, at(), &huge).map(|r| r.not_before),
            Some(DateTime::<Utc>::MIN_UTC)
        );
    }

    #[test]
    fn positions_keep_growing_across_a_reset() {
        let map = PositionMap::default();
        assert_eq!(map.position_of(20), 20);
        assert_eq!(map.id_of(20), 20);
        // Ids reset after position 20; the new changelog is read from id 0.
        map.start_epoch(20, 0);
        assert_eq!(map.position_of(1), 21);
        assert_eq!(map.position_of(5), 25);
        assert_eq!(map.id_of(25), 5);
        assert_eq!(map.id_of(20), 0, "old epoch: nothing new finished");
        assert_eq!(map.id_of(7), 0);
        // A second reset, restarting after id 3 of the newest changelog.
        map.start_epoch(25, 3);
        assert_eq!(map.position_of(4), 26);
        assert_eq!(map.id_of(26), 4);
        assert_eq!(map.id_of(25), 3);
    }
}
