//! The sequence tracker: positions finish in any order (several workers, holes decided late),
//! but the checkpoint only moves over the contiguous prefix of finished positions. A crash at
//! any moment therefore re-delivers at most what was unfinished, and never skips.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::datastore::Checkpoint;

#[derive(Debug)]
pub struct SequenceTracker {
    committed: u64,
    committed_time: Option<DateTime<Utc>>,
    /// Finished spans above `committed` by first position: (last position, change time).
    finished: BTreeMap<u64, (u64, Option<DateTime<Utc>>)>,
}

impl Default for SequenceTracker {
    /// Starts at position 0 (nothing finished).
    fn default() -> SequenceTracker {
        SequenceTracker::new(0)
    }
}

impl SequenceTracker {
    /// Every position up to and including `start` counts as finished.
    pub fn new(start: u64) -> SequenceTracker {
        SequenceTracker {
            committed: start,
            committed_time: None,
            finished: BTreeMap::new(),
        }
    }

    /// Marks `position` finished; returns whether the contiguous prefix grew.
    #[cfg(test)]
    pub fn finish(&mut self, position: u64, changed_at: Option<DateTime<Utc>>) -> bool {
        self.finish_span(position, position, changed_at)
    }

    /// Marks positions `first..=last` finished; returns whether the contiguous prefix grew.
    pub fn finish_span(
        &mut self,
        first: u64,
        last: u64,
        changed_at: Option<DateTime<Utc>>,
    ) -> bool {
        if last <= self.committed {
            return false;
        }
        self.finished.insert(
            first.max(self.committed.saturating_add(1)),
            (last, changed_at),
        );
        let before = self.committed;
        while let Some((last, changed_at)) = self.finished.remove(&self.committed.saturating_add(1))
        {
            self.committed = last;
            if changed_at.is_some() {
                self.committed_time = changed_at;
            }
        }
        self.committed != before
    }

    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            position: self.committed,
            changed_at: self.committed_time,
        }
    }

    /// Finished positions still waiting for an earlier one.
    pub fn pending(&self) -> usize {
        self.finished.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_only_over_the_contiguous_prefix() {
        // Upstream's example: completions 2, 1, 5, 3, 4.
        let mut tracker = SequenceTracker::new(0);
        assert!(!tracker.finish(2, None));
        assert_eq!(tracker.checkpoint().position, 0);
        assert!(tracker.finish(1, None));
        assert_eq!(tracker.checkpoint().position, 2);
        assert!(!tracker.finish(5, None));
        assert_eq!(tracker.pending(), 1);
        assert!(tracker.finish(3, None));
        assert_eq!(tracker.checkpoint().position, 3);
        assert!(tracker.finish(4, None));
        assert_eq!(tracker.checkpoint().position, 5);
        assert_eq!(tracker.pending(), 0);
    }

    #[test]
    fn a_late_first_position_releases_a_long_run() {
        let mut tracker = SequenceTracker::new(10);
        for position in 12..=110 {
            tracker.finish(position, None);
        }
        assert_eq!(tracker.checkpoint().position, 10);
        assert_eq!(tracker.pending(), 99);
        tracker.finish(11, None);
        assert_eq!(tracker.checkpoint().position, 110);
        assert_eq!(tracker.pending(), 0);
    }

    #[test]
    fn spans_cover_many_positions_at_once() {
        let mut tracker = SequenceTracker::new(0);
        assert!(!tracker.finish_span(2, 1_000_000, None));
        assert_eq!(tracker.pending(), 1);
        assert!(tracker.finish(1, None));
        assert_eq!(tracker.checkpoint().position, 1_000_000);
        assert!(tracker.finish(1_000_001, None));
        assert_eq!(tracker.checkpoint().position, 1_000_001);
    }

    #[test]
    fn keeps_the_time_of_the_last_position_that_had_one() {
        let t = Utc::now();
        let mut tracker = SequenceTracker::new(0);
        tracker.finish(1, Some(t));
        tracker.finish(2, None);
        assert_eq!(
            tracker.checkpoint(),
            Checkpoint {
                position: 2,
                changed_at: Some(t)
            }
        );
        assert!(!tracker.finish(1, None), "an old position changes nothing");
    }
}
