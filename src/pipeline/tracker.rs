//! The sequence tracker: positions finish in any order (several workers, holes decided late),
//! but the checkpoint only moves over the contiguous prefix of finished positions. A crash at
//! any moment therefore re-delivers at most what was unfinished, and never skips.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::datastore::{Change, Checkpoint, ResumePoint};

/// A finished run of positions waiting for the ones before it.
#[derive(Debug)]
struct Finished {
    last: u64,
    changed_at: Option<DateTime<Utc>>,
    resume: Option<ResumePoint>,
}

#[derive(Debug)]
pub struct SequenceTracker {
    committed: u64,
    committed_time: Option<DateTime<Utc>>,
    /// The resume point of the newest committed position that had one.
    committed_resume: Option<ResumePoint>,
    /// Finished spans above `committed` by first position.
    finished: BTreeMap<u64, Finished>,
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
            committed_resume: None,
            finished: BTreeMap::new(),
        }
    }

    /// Marks `position` finished; returns whether the contiguous prefix grew.
    #[cfg(test)]
    pub fn finish(&mut self, position: u64, changed_at: Option<DateTime<Utc>>) -> bool {
        self.finish_span(position, position, changed_at)
    }

    /// Marks positions `first..=last` finished; returns whether the contiguous prefix grew.
    #[cfg(test)]
    pub fn finish_span(
        &mut self,
        first: u64,
        last: u64,
        changed_at: Option<DateTime<Utc>>,
    ) -> bool {
        self.finish_marked(first, last, changed_at, None)
    }

    /// Marks `change` (all its positions) finished, with its time and resume point.
    pub fn finish_change(&mut self, change: &Change) -> bool {
        self.finish_marked(
            change.position,
            change.through,
            change.changed_at,
            change.resume.clone(),
        )
    }

    fn finish_marked(
        &mut self,
        first: u64,
        last: u64,
        changed_at: Option<DateTime<Utc>>,
        resume: Option<ResumePoint>,
    ) -> bool {
        if last <= self.committed {
            return false;
        }
        self.finished.insert(
            first.max(self.committed.saturating_add(1)),
            Finished {
                last,
                changed_at,
                resume,
            },
        );
        let before = self.committed;
        while let Some(done) = self.finished.remove(&self.committed.saturating_add(1)) {
            self.committed = done.last;
            if done.changed_at.is_some() {
                self.committed_time = done.changed_at;
            }
            if done.resume.is_some() {
                self.committed_resume = done.resume;
            }
        }
        self.committed != before
    }

    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            position: self.committed,
            changed_at: self.committed_time,
            resume: self.committed_resume.clone(),
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
                changed_at: Some(t),
                resume: None,
            }
        );
        assert!(!tracker.finish(1, None), "an old position changes nothing");
    }

    /// A MongoDB checkpoint is the token of the newest event of the contiguous finished
    /// prefix, never that of an event finished ahead of an unfinished one.
    #[test]
    fn carries_the_resume_point_of_the_contiguous_prefix() {
        use crate::datastore::{ChangeKind, SkipReason};
        let token = |n: i32| ResumePoint::ChangeStream(mongodb::bson::doc! {"_data": n});
        let change = |position: u64, resume: Option<ResumePoint>| {
            let change = Change::new(position, None, ChangeKind::Skip(SkipReason::Undecodable));
            match resume {
                Some(resume) => change.resuming_at(resume),
                None => change,
            }
        };
        let mut tracker = SequenceTracker::new(0);
        assert!(!tracker.finish_change(&change(2, Some(token(2)))));
        assert_eq!(
            tracker.checkpoint().resume,
            None,
            "position 1 is unfinished"
        );
        assert!(tracker.finish_change(&change(1, Some(token(1)))));
        assert_eq!(tracker.checkpoint().resume, Some(token(2)));
        assert!(tracker.finish_change(&change(3, None)));
        assert_eq!(tracker.checkpoint().position, 3);
        assert_eq!(
            tracker.checkpoint().resume,
            Some(token(2)),
            "a position without a token keeps the last one"
        );
    }
}
