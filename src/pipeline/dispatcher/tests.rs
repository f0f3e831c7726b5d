use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::datastore::{RawEvent, SkipReason};

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

fn event(position: u64) -> Change {
    let raw = RawEvent {
        record_id: format!("e{position}"),
        document: crate::model::Document::Tree(serde_json::Value::Null),
        created_at: None,
    };
    Change::new(position, None, ChangeKind::Event(raw))
}

fn batch(changes: Vec<Change>) -> Received {
    Some(Ok(Some(changes)))
}

/// A dispatcher that found a token at position 0, saving at most once a second.
fn dispatcher(now: Instant) -> Dispatcher {
    Dispatcher::new(Feed::Backfill, 0, true, SEC, now)
}

fn saved_position(d: &Dispatcher) -> Option<u64> {
    d.saved.as_ref().map(|s| s.position)
}

/// Hands out every waiting event, as workers would take them.
fn take_all(d: &mut Dispatcher) -> Vec<Change> {
    let mut changes = Vec::new();
    loop {
        let batch = d.next_events();
        if batch.is_empty() {
            return changes;
        }
        changes.extend(batch);
    }
}

#[test]
fn skips_finish_at_once_and_events_wait_for_a_worker() {
    let now = Instant::now();
    let mut d = dispatcher(now);
    let skip = Change::skip_span(2, 5, SkipReason::NeverCommitted);
    assert_eq!(
        d.on_received(batch(vec![event(1), skip, event(6)]), now),
        Flow::Continue
    );
    assert!(
        !d.accepts_changes(),
        "no new batch while events wait for a worker"
    );
    assert!(d.to_save().is_none(), "1 is not finished");
    let events = take_all(&mut d);
    assert_eq!(
        events.iter().map(|c| c.position).collect::<Vec<_>>(),
        [1, 6]
    );
    assert!(d.accepts_changes());
    let first = events
        .into_iter()
        .next()
        .map(|c| d.on_result(c, Outcome::Published, now));
    assert_eq!(first, Some(Flow::Continue));
    assert_eq!(
        d.to_save().map(|c| c.position),
        Some(5),
        "the contiguous prefix"
    );
}

#[test]
fn a_failure_stops_intake_and_the_checkpoint_stays_below_it() {
    let now = Instant::now();
    let mut d = dispatcher(now);
    d.on_received(batch(vec![event(1), event(2), event(3)]), now);
    let mut events = take_all(&mut d).into_iter();
    let mut result = |outcome| {
        events
            .next()
            .map(|change| d.on_result(change, outcome, now))
    };
    assert_eq!(result(Outcome::Published), Some(Flow::Continue));
    assert_eq!(result(Outcome::Failed("HTTP 500".into())), Some(Flow::Stop));
    assert_eq!(result(Outcome::Published), Some(Flow::Continue));
    assert!(d.failed());
    assert_eq!(d.to_save().map(|c| c.position), Some(1));
    match d.finish(false, Ok(())) {
        Err(PipelineError::Undelivered {
            position,
            record_id,
            ..
        }) => assert_eq!((position, record_id.as_str()), (2, "e2")),
        other => panic!("expected the undelivered event, got {other:?}"),
    }
}

#[test]
fn a_dead_lettered_position_finishes_and_a_cancelled_one_does_not() {
    let now = Instant::now();
    let mut d = dispatcher(now);
    d.on_received(batch(vec![event(1), event(2)]), now);
    let mut events = take_all(&mut d).into_iter();
    let mut result = |outcome| {
        events
            .next()
            .map(|change| d.on_result(change, outcome, now))
    };
    assert_eq!(result(Outcome::DeadLettered), Some(Flow::Continue));
    assert_eq!(result(Outcome::Cancelled), Some(Flow::Continue));
    assert_eq!(d.to_save().map(|c| c.position), Some(1));
    let summary = d.finish(true, Ok(())).map_err(|e| e.to_string());
    let summary = summary
        .as_ref()
        .map(|s| (s.dead_lettered, s.checkpoint, s.finished));
    assert_eq!(summary, Ok((1, 1, false)));
}

#[test]
fn the_save_interval_is_respected() {
    let t0 = Instant::now();
    let mut d = dispatcher(t0);
    assert_eq!(d.save_due(), None, "nothing moved, nothing owed");
    d.on_received(batch(vec![event(1), event(2)]), t0);
    let mut events = take_all(&mut d).into_iter();
    if let Some(change) = events.next() {
        d.on_result(change, Outcome::Published, t0);
    }
    assert_eq!(d.save_due(), Some(t0), "the first write is due at once");
    let checkpoint = d.begin_save(t0);
    assert_eq!(checkpoint.as_ref().map(|c| c.position), Some(1));
    if let Some(checkpoint) = checkpoint {
        d.saved(checkpoint, Ok(()));
    }
    if let Some(change) = events.next() {
        d.on_result(change, Outcome::Skipped, t0 + MS * 10);
    }
    assert_eq!(
        d.save_due(),
        Some(t0 + SEC),
        "one interval after the last write"
    );
}

#[test]
fn a_failed_write_is_retried_one_interval_later_and_keeps_the_saved_checkpoint() {
    let t0 = Instant::now();
    let mut d = dispatcher(t0);
    d.on_received(
        batch(vec![Change::skip_span(1, 3, SkipReason::BeforeStart)]),
        t0,
    );
    let checkpoint = d.begin_save(t0);
    assert_eq!(checkpoint.as_ref().map(|c| c.position), Some(3));
    if let Some(checkpoint) = checkpoint {
        let refused = DatastoreError::Schema("read-only".into());
        d.saved(checkpoint, Err(refused));
    }
    assert_eq!(saved_position(&d), Some(0));
    assert_eq!(d.save_due(), Some(t0 + SEC));
}

#[test]
fn a_fresh_start_owes_one_write_even_without_progress() {
    let t0 = Instant::now();
    let mut d = Dispatcher::new(Feed::Stream, 7, false, SEC, t0);
    assert_eq!(d.save_due(), Some(t0 + LAG_INTERVAL));
    assert_eq!(d.begin_save(t0).map(|c| c.position), Some(7));
}

#[test]
fn the_source_ending_or_failing_stops_intake() {
    let now = Instant::now();
    let mut d = dispatcher(now);
    assert_eq!(d.on_received(Some(Ok(None)), now), Flow::Stop);
    assert!(d.source_finished() && !d.failed());
    assert!(d.finish(false, Ok(())).is_ok_and(|s| s.finished));
    let mut d = dispatcher(now);
    assert_eq!(d.on_received(None, now), Flow::Stop);
    assert!(matches!(
        d.finish(false, Ok(())),
        Err(PipelineError::Source(_))
    ));
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        6 => Just(Outcome::Published),
        1 => Just(Outcome::Skipped),
        1 => Just(Outcome::Filtered),
        1 => Just(Outcome::DeadLettered),
        1 => Just(Outcome::Cancelled),
        1 => Just(Outcome::Failed("HTTP 500".into())),
    ]
}

/// Positions 1..=n in any completion order, each with an outcome and a time step (ms).
fn completions() -> impl Strategy<Value = Vec<(u64, Outcome, u64)>> {
    (1u64..40).prop_flat_map(|n| {
        let order = Just((1..=n).collect::<Vec<u64>>()).prop_shuffle();
        let rest = proptest::collection::vec((outcome(), 0u64..400), n as usize);
        (order, rest).prop_map(|(order, rest)| {
            order
                .into_iter()
                .zip(rest)
                .map(|(p, (o, ms))| (p, o, ms))
                .collect()
        })
    })
}

proptest! {
    /// For any order of completions and outcomes, every checkpoint written is below every
    /// unfinished position, writes only move forward, and two writes are an interval apart.
    #[test]
    fn the_saved_checkpoint_never_passes_an_unfinished_position(completions in completions()) {
        let mut now = Instant::now();
        let mut d = Dispatcher::new(Feed::Backfill, 0, true, SEC / 10, now);
        let n = completions.len() as u64;
        d.on_received(batch((1..=n).map(event).collect()), now);
        let mut events: BTreeMap<u64, Change> =
            take_all(&mut d).into_iter().map(|c| (c.position, c)).collect();
        let mut unfinished: BTreeSet<u64> = (1..=n).collect();
        let mut writes: Vec<(u64, Instant)> = Vec::new();
        for (position, outcome, ms) in completions {
            now += MS * ms as u32;
            let finishes = !matches!(outcome, Outcome::Cancelled | Outcome::Failed(_));
            if let Some(change) = events.remove(&position) {
                d.on_result(change, outcome, now);
            }
            if finishes {
                unfinished.remove(&position);
            }
            if d.save_due().is_some_and(|due| due <= now) {
                if let Some(checkpoint) = d.begin_save(now) {
                    let lowest = unfinished.first().copied().unwrap_or(u64::MAX);
                    prop_assert!(checkpoint.position < lowest);
                    if let Some(&(previous, at)) = writes.last() {
                        prop_assert!(checkpoint.position > previous);
                        prop_assert!(now >= at + SEC / 10);
                    }
                    writes.push((checkpoint.position, now));
                    d.saved(checkpoint, Ok(()));
                }
            }
        }
        let last = d.to_save().map(|c| c.position).or(saved_position(&d)).unwrap_or(0);
        let expected = unfinished.first().map_or(n, |lowest| lowest - 1);
        prop_assert_eq!(last, expected);
    }
}

fn positions(events: SmallVec<[Change; 1]>) -> Vec<u64> {
    events.into_iter().map(|c| c.position).collect()
}

#[test]
fn batch_mode_takes_up_to_a_batch_and_lingers_for_more_only_while_short() {
    let t0 = Instant::now();
    let mut d = dispatcher(t0).with_batching(3, 10 * MS);
    d.on_received(batch(vec![event(1)]), t0);
    assert!(
        d.accepts_changes(),
        "fewer than a batch wait: more may come"
    );
    assert!(!d.has_waiting(t0), "one event lingers for more");
    assert_eq!(d.linger_due(t0), Some(t0 + 10 * MS));
    d.on_received(batch(vec![event(2), event(3), event(4)]), t0 + MS);
    assert!(!d.accepts_changes(), "a full batch waits: no more changes");
    assert_eq!(d.linger_due(t0 + MS), None, "a full batch goes at once");
    assert!(d.has_waiting(t0 + MS));
    assert_eq!(positions(d.next_events()), [1, 2, 3]);
    // The one left has waited since t0: its linger is over at t0 + 10 ms.
    assert!(!d.has_waiting(t0 + 2 * MS));
    assert_eq!(d.linger_due(t0 + 2 * MS), Some(t0 + 10 * MS));
    assert!(d.has_waiting(t0 + 10 * MS));
    // Over: the event waits for a worker now, not for a timer that would fire on every turn.
    assert_eq!(d.linger_due(t0 + 10 * MS), None);
    assert_eq!(d.linger_due(t0 + 11 * MS), None);
    assert_eq!(positions(d.next_events()), [4]);
    assert!(d.next_events().is_empty());
    assert_eq!(d.linger_due(t0 + 11 * MS), None);
}

#[test]
fn batch_mode_hands_out_what_waits_when_the_source_ends() {
    let t0 = Instant::now();
    let mut d = dispatcher(t0).with_batching(10, SEC);
    d.on_received(batch(vec![event(1), event(2)]), t0);
    assert_eq!(
        d.on_received(Some(Ok(None)), t0),
        Flow::Continue,
        "the waiting events still go out"
    );
    assert!(!d.accepts_changes());
    assert!(d.has_waiting(t0), "no lingering after the end");
    assert!(!d.intake_done());
    assert_eq!(positions(d.next_events()), [1, 2]);
    assert!(d.intake_done());
}

#[test]
fn structured_mode_takes_one_event_at_a_time_without_lingering() {
    let t0 = Instant::now();
    let mut d = dispatcher(t0);
    d.on_received(batch(vec![event(1), event(2)]), t0);
    assert!(d.has_waiting(t0));
    assert_eq!(d.linger_due(t0), None);
    assert_eq!(positions(d.next_events()), [1]);
    assert_eq!(positions(d.next_events()), [2]);
    assert_eq!(d.on_received(Some(Ok(None)), t0), Flow::Stop);
}

/// A step of a run with writes in flight: a completion (position, outcome) or a write's end.
#[derive(Debug, Clone)]
enum Step {
    Finish(u64, Outcome),
    /// The write in flight (if any) ends, failed or not.
    WriteEnds {
        failed: bool,
    },
}

/// Positions 1..=n in any completion order, with write ends interleaved and time steps (ms).
fn steps() -> impl Strategy<Value = Vec<(Step, u64)>> {
    completions().prop_flat_map(|completions| {
        let ends = proptest::collection::vec(
            (any::<bool>(), 0u64..200),
            completions.len()..=completions.len() * 2,
        );
        (Just(completions), ends).prop_map(|(completions, ends)| {
            let mut steps = Vec::new();
            let mut ends = ends.into_iter();
            for (position, outcome, ms) in completions {
                steps.push((Step::Finish(position, outcome), ms));
                if let Some((failed, ms)) = ends.next() {
                    steps.push((Step::WriteEnds { failed }, ms));
                }
            }
            steps.extend(ends.map(|(failed, ms)| (Step::WriteEnds { failed }, ms)));
            steps
        })
    })
}

proptest! {
    /// With writes running beside intake and ending (or failing) at any time: one write at a
    /// time, never past an unfinished position, writes only forward and an interval apart,
    /// and the saved checkpoint only moves forward.
    #[test]
    fn writes_in_flight_keep_every_rule(steps in steps()) {
        let mut now = Instant::now();
        let interval = SEC / 10;
        let mut d = Dispatcher::new(Feed::Backfill, 0, true, interval, now);
        let n = steps.iter().filter(|(s, _)| matches!(s, Step::Finish(..))).count() as u64;
        d.on_received(batch((1..=n).map(event).collect()), now);
        let mut events: BTreeMap<u64, Change> =
            take_all(&mut d).into_iter().map(|c| (c.position, c)).collect();
        let mut unfinished: BTreeSet<u64> = (1..=n).collect();
        let mut in_flight: Option<Checkpoint> = None;
        let mut last_write: Option<(u64, Instant)> = None;
        for (step, ms) in steps {
            now += MS * ms as u32;
            match step {
                Step::Finish(position, outcome) => {
                    if !matches!(outcome, Outcome::Cancelled | Outcome::Failed(_)) {
                        unfinished.remove(&position);
                    }
                    if let Some(change) = events.remove(&position) {
                        d.on_result(change, outcome, now);
                    }
                }
                Step::WriteEnds { failed } => {
                    let before = saved_position(&d);
                    if let Some(checkpoint) = in_flight.take() {
                        let refused = DatastoreError::Schema("read-only".into());
                        d.saved(checkpoint, if failed { Err(refused) } else { Ok(()) });
                    }
                    prop_assert!(saved_position(&d) >= before);
                }
            }
            prop_assert!(in_flight.is_none() || d.save_due().is_none());
            if d.save_due().is_some_and(|due| due <= now) {
                if let Some(checkpoint) = d.begin_save(now) {
                    prop_assert!(in_flight.is_none());
                    let lowest = unfinished.first().copied().unwrap_or(u64::MAX);
                    prop_assert!(checkpoint.position < lowest);
                    if let Some((previous, at)) = last_write {
                        prop_assert!(checkpoint.position >= previous);
                        prop_assert!(now >= at + interval);
                    }
                    last_write = Some((checkpoint.position, now));
                    in_flight = Some(checkpoint);
                }
            }
        }
    }
}

#[test]
fn no_write_is_due_while_one_is_in_flight_and_progress_meanwhile_is_written_next() {
    let t0 = Instant::now();
    let mut d = dispatcher(t0);
    d.on_received(batch(vec![event(1), event(2)]), t0);
    let mut events = take_all(&mut d).into_iter();
    if let Some(change) = events.next() {
        d.on_result(change, Outcome::Published, t0);
    }
    let checkpoint = d.begin_save(t0);
    assert_eq!(checkpoint.as_ref().map(|c| c.position), Some(1));
    if let Some(change) = events.next() {
        d.on_result(change, Outcome::Published, t0 + SEC * 2);
    }
    assert_eq!(d.save_due(), None, "a write is in flight");
    if let Some(checkpoint) = checkpoint {
        d.saved(checkpoint, Ok(()));
    }
    assert_eq!(saved_position(&d), Some(1));
    assert_eq!(d.save_due(), Some(t0 + SEC * 2), "progress made meanwhile");
    assert_eq!(d.begin_save(t0 + SEC * 2).map(|c| c.position), Some(2));
}
