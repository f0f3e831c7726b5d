//! Unit tests for each hole rule, and a property over a small model of PostgreSQL's MVCC
//! (transaction ids assigned at the first write, changelog ids taken from a sequence, snapshots
//! with `xmin`, commits and rollbacks) driving a reader that polls the way `changelog` does.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::pipeline::SequenceTracker;

#[test]
fn ids_skipped_between_visible_ids_are_gaps() {
    assert_eq!(gaps(10, &[11, 12]), Vec::<Span>::new());
    assert_eq!(gaps(10, &[13, 14, 17]), [(11, 12), (15, 16)]);
    assert_eq!(gaps(0, &[1]), Vec::<Span>::new());
    assert_eq!(gaps(u64::MAX - 1, &[u64::MAX]), Vec::<Span>::new());
}

#[test]
fn a_found_id_leaves_its_hole_at_once_even_while_undecided() {
    let mut holes = Holes::default();
    holes.add((5, 9), 100);
    // xmin 99 < tag 100: undecided, but 7 is a row now.
    assert_eq!(holes.resolve(&[7], 99), Vec::<Span>::new());
    assert_eq!(holes.spans(), [(5, 6), (8, 9)]);
    assert_eq!(holes.open_ids(), 4);
}

#[test]
fn an_absent_id_is_never_committed_only_once_xmin_reaches_the_tag() {
    let mut holes = Holes::default();
    holes.add((5, 9), 100);
    assert!(
        holes.resolve(&[], 99).is_empty(),
        "an older transaction may still hold it"
    );
    assert_eq!(holes.undecided_floor(), Some(5));
    assert_eq!(holes.resolve(&[6, 8], 100), [(5, 5), (7, 7), (9, 9)]);
    assert!(holes.is_empty());
    assert_eq!(holes.undecided_floor(), None);
}

#[test]
fn runs_are_decided_by_their_own_tags() {
    let mut holes = Holes::default();
    holes.add((3, 3), 50);
    holes.add((10, 12), 80);
    holes.add((20, 19), 10); // empty: ignored
    assert_eq!(holes.resolve(&[11, 1, 30], 60), [(3, 3)]);
    assert_eq!(holes.spans(), [(10, 10), (12, 12)]);
    assert_eq!(holes.undecided_floor(), Some(10));
    assert_eq!(holes.take(), [(10, 10), (12, 12)]);
    assert!(holes.is_empty());
}

/// The interleaving that breaks an `xmax` tag (gapless-changelog.md): an old transaction O is
/// open; X takes its transaction id; W takes a newer one and changelog id 1; X inserts 2 and
/// commits. After O commits, `xmin >= xmax(S)` while W is still open: the tag rule keeps 1.
#[test]
fn the_tag_taken_after_the_snapshot_waits_for_a_writer_newer_than_xmax() {
    let mut db = Db::default();
    let old = db.begin();
    db.write_elsewhere(old);
    let x = db.begin();
    db.write_elsewhere(x);
    let w = db.begin();
    db.insert(w);
    db.insert(x);
    db.commit(x);
    let mut reader = Reader::default();
    reader.poll(&mut db);
    assert_eq!(reader.holes.spans(), [(1, 1)]);
    db.commit(old);
    reader.poll(&mut db); // would decide 1 as never committed with an xmax tag
    assert_eq!(reader.holes.spans(), [(1, 1)], "W still holds id 1");
    db.commit(w);
    reader.poll(&mut db);
    assert!(reader.holes.is_empty());
    assert_eq!(reader.delivered, BTreeSet::from([1, 2]));
    assert_eq!(reader.tracker.checkpoint().position, 2);
}

/// One writer transaction in the model.
#[derive(Debug, Default)]
struct Txn {
    xid: Option<u64>,
    ended: Option<bool>, // Some(true) committed, Some(false) rolled back
}

/// A small model of PostgreSQL's visibility: a row is visible once its transaction committed;
/// a snapshot's `xmin` is the oldest running transaction id (or the next one if none runs).
#[derive(Debug)]
struct Db {
    next_xid: u64,
    next_id: u64,
    txns: Vec<Txn>,
    /// Changelog id → the transaction that inserted it.
    rows: BTreeMap<u64, usize>,
}

impl Default for Db {
    fn default() -> Db {
        Db {
            next_xid: 3,
            next_id: 1,
            txns: Vec::new(),
            rows: BTreeMap::new(),
        }
    }
}

impl Db {
    fn begin(&mut self) -> usize {
        self.txns.push(Txn::default());
        self.txns.len() - 1
    }
    fn new_xid(&mut self) -> u64 {
        self.next_xid += 1;
        self.next_xid - 1
    }
    /// A write to another table: assigns the transaction id, takes no changelog id.
    fn write_elsewhere(&mut self, txn: usize) {
        if self.txns[txn].xid.is_none() {
            self.txns[txn].xid = Some(self.new_xid());
        }
    }
    /// The health-events insert assigns the transaction id, then the trigger takes an id.
    fn insert(&mut self, txn: usize) {
        self.write_elsewhere(txn);
        self.rows.insert(self.next_id, txn);
        self.next_id += 1;
    }
    fn commit(&mut self, txn: usize) {
        self.txns[txn].ended = Some(true);
    }
    fn rollback(&mut self, txn: usize) {
        self.txns[txn].ended = Some(false);
    }
    fn running(&self) -> Vec<usize> {
        (0..self.txns.len())
            .filter(|&t| self.txns[t].ended.is_none())
            .collect()
    }
    fn visible(&self, id: u64) -> bool {
        self.rows
            .get(&id)
            .is_some_and(|&t| self.txns[t].ended == Some(true))
    }
    fn xmin(&self) -> u64 {
        self.txns
            .iter()
            .filter(|t| t.ended.is_none())
            .filter_map(|t| t.xid)
            .min()
            .unwrap_or(self.next_xid)
    }
}

/// Where the reader is in a poll: each statement runs as its own step, so writers can act
/// between them, as they can between the reader's statements in PostgreSQL.
#[derive(Debug, Default, Clone)]
enum Phase {
    #[default]
    Read,
    /// After statement 1: the gaps found and the snapshot's `xmin`.
    Tag(Vec<Span>, u64),
    /// After the tag: the `xmin` of statement 1, for the re-read.
    ReRead(u64),
}

#[derive(Debug, Default)]
struct Reader {
    read_pos: u64,
    holes: Holes,
    phase: Phase,
    delivered: BTreeSet<u64>,
    tracker: SequenceTracker,
}

const BATCH: usize = 3;

impl Reader {
    fn step(&mut self, db: &mut Db) {
        match std::mem::take(&mut self.phase) {
            Phase::Read => {
                let xmin = db.xmin();
                let visible: Vec<u64> = (self.read_pos + 1..db.next_id)
                    .filter(|&id| db.visible(id))
                    .take(BATCH)
                    .collect();
                let gaps = gaps(self.read_pos, &visible);
                for &id in &visible {
                    self.deliver(id);
                }
                self.read_pos = visible.last().copied().unwrap_or(self.read_pos);
                self.phase = Phase::Tag(gaps, xmin);
            }
            Phase::Tag(gaps, xmin) => {
                if !gaps.is_empty() {
                    let tag = db.new_xid(); // autocommit `SELECT pg_current_xact_id()`
                    for gap in gaps {
                        self.holes.add(gap, tag);
                    }
                }
                self.phase = Phase::ReRead(xmin);
            }
            Phase::ReRead(xmin) => {
                let found: Vec<u64> = self
                    .holes
                    .spans()
                    .into_iter()
                    .flat_map(|(first, last)| first..=last)
                    .filter(|&id| db.visible(id))
                    .collect();
                for (first, last) in self.holes.resolve(&found, xmin) {
                    for id in first..=last {
                        let txn = db.rows.get(&id).map(|&t| &db.txns[t]);
                        assert!(
                            txn.is_some_and(|t| t.ended == Some(false)),
                            "id {id} declared never committed, but its transaction is {txn:?}"
                        );
                    }
                    self.tracker.finish_span(first, last, None);
                }
                for id in found {
                    self.deliver(id);
                }
            }
        }
    }

    fn poll(&mut self, db: &mut Db) {
        for _ in 0..3 {
            self.step(db);
        }
    }

    fn deliver(&mut self, id: u64) {
        assert!(self.delivered.insert(id), "id {id} delivered twice");
        self.tracker.finish(id, None);
    }

    /// The checkpoint stays below every undecided id, and everything at or below it is
    /// delivered or rolled back.
    fn check_checkpoint(&self, db: &Db) {
        let checkpoint = self.tracker.checkpoint().position;
        if let Some(floor) = self.holes.undecided_floor() {
            assert!(
                checkpoint < floor,
                "checkpoint {checkpoint} passed hole {floor}"
            );
        }
        for id in 1..=checkpoint {
            let txn = &db.txns[db.rows[&id]];
            assert!(
                self.delivered.contains(&id) || txn.ended == Some(false),
                "checkpoint {checkpoint} passed id {id} of {txn:?}"
            );
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Begin,
    WriteElsewhere(usize),
    Insert(usize),
    Commit(usize),
    Rollback(usize),
    ReaderStep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Begin),
        1 => any::<usize>().prop_map(Op::WriteElsewhere),
        4 => any::<usize>().prop_map(Op::Insert),
        2 => any::<usize>().prop_map(Op::Commit),
        1 => any::<usize>().prop_map(Op::Rollback),
        4 => Just(Op::ReaderStep),
    ]
}

fn apply(db: &mut Db, reader: &mut Reader, op: &Op) {
    let running = db.running();
    let pick = |n: usize| running.get(n % running.len().max(1)).copied();
    match *op {
        Op::Begin => {
            db.begin();
        }
        Op::WriteElsewhere(n) => pick(n).into_iter().for_each(|t| db.write_elsewhere(t)),
        Op::Insert(n) => pick(n).into_iter().for_each(|t| db.insert(t)),
        Op::Commit(n) => pick(n).into_iter().for_each(|t| db.commit(t)),
        Op::Rollback(n) => pick(n).into_iter().for_each(|t| db.rollback(t)),
        Op::ReaderStep => reader.step(db),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// For any interleaving of begins, inserts, commits, rollbacks and reader statements:
    /// nothing committed is skipped, nothing is delivered twice, only rolled-back ids are
    /// declared never committed, and the checkpoint never passes an undecided id.
    #[test]
    fn nothing_committed_is_skipped_and_the_checkpoint_waits(
        ops in proptest::collection::vec(op(), 0..120),
        commit_rest in any::<bool>(),
    ) {
        let mut db = Db::default();
        let mut reader = Reader::default();
        for op in &ops {
            apply(&mut db, &mut reader, op);
            reader.check_checkpoint(&db);
        }
        for txn in db.running() {
            if commit_rest { db.commit(txn) } else { db.rollback(txn) }
        }
        // Enough polls to read everything in batches and decide every hole.
        for _ in 0..(db.next_id as usize / BATCH + 3) {
            reader.poll(&mut db);
            reader.check_checkpoint(&db);
        }
        let committed: BTreeSet<u64> =
            (1..db.next_id).filter(|&id| db.visible(id)).collect();
        prop_assert_eq!(&reader.delivered, &committed);
        prop_assert!(reader.holes.is_empty());
        let last_committed = committed.last().copied().unwrap_or(0);
        prop_assert!(reader.tracker.checkpoint().position >= last_committed);
    }
}
