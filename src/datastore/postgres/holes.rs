//! The gapless hole rule, without I/O (the reader in `changelog` does the queries).
//!
//! A *hole* is a run of changelog ids below the read position that was not visible when a
//! larger id was (its transaction had taken the id and not committed yet, or rolled back).
//! Each run carries a *tag*: a transaction id assigned **after** the snapshot that found it
//! (`pg_current_xact_id()` in a later statement). The transaction that holds a hole id took its
//! own transaction id before it took the changelog id, so it is older than the tag.
//!
//! Rules (see `/work/shared/reference/gapless-changelog.md` and the `changelog` module docs):
//! 1. [`gaps`]: ids between the read position and a visible id, not returned, are holes.
//! 2. Every poll re-reads the holes by id; [`Holes::resolve`] takes the ids found: each one is
//!    a row now, delivered like any other, and leaves its hole.
//! 3. An id still absent is *decided* (never committed) once every transaction older than its
//!    tag has ended: the `xmin` of a snapshot taken **before the re-read** is at least the tag.
//!    Otherwise it stays a hole, with its tag.
//!    (The snapshot's `xmax` would not do as a tag: it is one past the newest *completed*
//!    transaction, and a running transaction can be newer than that.)
//! 4. [`Holes::undecided_floor`]: the checkpoint may not reach the lowest hole id; the reader
//!    never reports an undecided id, so the sequence tracker's contiguous prefix stops below it.

use std::collections::BTreeMap;

/// A run of ids `first..=last`.
pub type Span = (u64, u64);

/// Open holes: runs of ids not yet visible, by first id, each with its tag.
#[derive(Debug, Default, Clone)]
pub struct Holes {
    runs: BTreeMap<u64, Hole>,
}

#[derive(Debug, Clone, Copy)]
struct Hole {
    last: u64,
    /// A transaction id assigned after the snapshot that found the run.
    tag: u64,
}

/// The ids between `read_pos` and each id of `visible` (ascending, all above `read_pos`) that
/// did not come back: the new holes, as spans.
pub fn gaps(read_pos: u64, visible: &[u64]) -> Vec<Span> {
    let mut gaps = Vec::new();
    let mut expected = read_pos.saturating_add(1);
    for &id in visible {
        if id > expected {
            gaps.push((expected, id.saturating_sub(1)));
        }
        expected = expected.max(id.saturating_add(1));
    }
    gaps
}

impl Holes {
    /// Adds the run `first..=last` (nothing if empty), found by a snapshot older than `tag`.
    pub fn add(&mut self, (first, last): Span, tag: u64) {
        if first <= last {
            self.runs.insert(first, Hole { last, tag });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The runs, in order (for the re-read query).
    pub fn spans(&self) -> Vec<Span> {
        self.runs
            .iter()
            .map(|(&first, h)| (first, h.last))
            .collect()
    }

    /// How many ids are waiting on open transactions.
    pub fn open_ids(&self) -> u64 {
        self.runs.iter().fold(0u64, |sum, (&first, hole)| {
            sum.saturating_add(hole.last.saturating_sub(first).saturating_add(1))
        })
    }

    /// The lowest id still undecided: the checkpoint must stay below it. `None` without holes.
    pub fn undecided_floor(&self) -> Option<u64> {
        self.runs.keys().next().copied()
    }

    /// Removes every run (after a changelog reset), returning them.
    pub fn take(&mut self) -> Vec<Span> {
        let spans = self.spans();
        self.runs.clear();
        spans
    }

    /// Applies one re-read: `found` are the hole ids that are rows now (any order); `xmin` is
    /// the `xmin` of a snapshot taken before the re-read. Found ids leave their runs; absent
    /// ids of a decided run (`tag <= xmin`) are returned as never committed; the rest stay.
    pub fn resolve(&mut self, found: &[u64], xmin: u64) -> Vec<Span> {
        let mut found = found.to_vec();
        found.sort_unstable();
        let mut found = found.into_iter().peekable();
        let mut never_committed = Vec::new();
        for (first, hole) in std::mem::take(&mut self.runs) {
            let decided = hole.tag <= xmin;
            let mut next = first;
            while found.next_if(|&id| id < first).is_some() {}
            while let Some(id) = found.next_if(|&id| id <= hole.last) {
                self.absent(
                    (next, id.saturating_sub(1)),
                    hole.tag,
                    decided,
                    &mut never_committed,
                );
                next = id.saturating_add(1);
            }
            self.absent((next, hole.last), hole.tag, decided, &mut never_committed);
        }
        never_committed
    }

    fn absent(&mut self, span: Span, tag: u64, decided: bool, never: &mut Vec<Span>) {
        if span.0 > span.1 {
            return;
        }
        if decided {
            never.push(span);
        } else {
            self.add(span, tag);
        }
    }
}

#[cfg(test)]
mod tests;
