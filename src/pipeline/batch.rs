//! Batch mode (`exporter.sink.mode = "batch"`): the CloudEvents HTTP binding's batched content
//! mode, a JSON array of structured events per request, `application/cloudevents-batch+json`.
//!
//! A worker takes up to `batch_max_events` waiting events. Each is prepared as in structured
//! mode (skipped and filtered events finish at once, outside any batch); the rest are cut into
//! requests of at most `batch_max_bytes` (an event larger than that goes alone) and sent one
//! request after the other. A request is delivered or failed as a whole: it is retried whole
//! on the usual schedule; when the sink accepts it, every event in it is published; when the
//! sink permanently rejects it and `on_rejected = "dead_letter"`, every event in it is written
//! to the dead letter as its own record (the sink's answer does not say which event it
//! refused); any other failure fails every event in it, so the checkpoint stops below the
//! first of them. Batches carry no `traceparent` header (one request, many traces).

use std::ops::Range;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::{EventHandler, Feed, Outcome};
use crate::config::BatchLimits;
use crate::datastore::Change;
use crate::sink::http::CLOUDEVENTS_BATCH_JSON;

/// The outcome of each of `events`, in order (always as many outcomes as events).
pub(super) async fn handle(
    handler: &EventHandler,
    feed: Feed,
    events: &[Change],
    limits: BatchLimits,
    cancel: &CancellationToken,
) -> Vec<Outcome> {
    let mut outcomes = vec![Outcome::Cancelled; events.len()];
    let mut prepared: Vec<(usize, Vec<u8>)> = Vec::new();
    for (index, change) in events.iter().enumerate() {
        let Some(event) = change.event() else {
            // Only changes with an event wait for a worker.
            set(&mut outcomes, index, Outcome::Skipped);
            continue;
        };
        match handler.prepare(change.position, event, |_| ()) {
            Ok(((), body)) => prepared.push((index, body)),
            Err(outcome) => set(&mut outcomes, index, outcome),
        }
    }
    let sizes: Vec<usize> = prepared.iter().map(|(_, body)| body.len()).collect();
    for range in split_by_bytes(&sizes, limits.max_bytes) {
        let Some(members) = prepared.get(range) else {
            continue;
        };
        for (index, outcome) in deliver(handler, feed, events, members, cancel).await {
            set(&mut outcomes, index, outcome);
        }
    }
    outcomes
}

fn set(outcomes: &mut [Outcome], index: usize, outcome: Outcome) {
    if let Some(slot) = outcomes.get_mut(index) {
        *slot = outcome;
    }
}

/// Sends one request holding `members` (index into `events`, CloudEvent body); the outcome of
/// each member.
async fn deliver(
    handler: &EventHandler,
    feed: Feed,
    events: &[Change],
    members: &[(usize, Vec<u8>)],
    cancel: &CancellationToken,
) -> Vec<(usize, Outcome)> {
    let member = |index: usize| {
        let change = events.get(index)?;
        Some((change, change.event()?))
    };
    let body = bytes::Bytes::from(json_array(members.iter().map(|(_, body)| body.as_slice())));
    let first = members
        .first()
        .and_then(|(index, _)| member(*index))
        .map_or("", |(_, event)| event.record_id.as_str());
    let started = Instant::now();
    let published = handler
        .publisher
        .publish_as(&body, CLOUDEVENTS_BATCH_JSON, first, None, cancel)
        .await;
    let mut outcomes = Vec::with_capacity(members.len());
    for (index, event_body) in members {
        let Some((change, event)) = member(*index) else {
            continue;
        };
        let outcome = match handler
            .outcome(
                feed,
                change.position,
                event,
                event_body,
                &published,
                started,
            )
            .await
        {
            Outcome::Failed(error) => {
                Outcome::Failed(format!("its batch was not delivered: {error}"))
            }
            outcome => outcome,
        };
        outcomes.push((*index, outcome));
    }
    outcomes
}

/// `[body,body,…]`.
fn json_array<'a>(bodies: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut array = vec![b'['];
    for (i, body) in bodies.enumerate() {
        if i > 0 {
            array.push(b',');
        }
        array.extend_from_slice(body);
    }
    array.push(b']');
    array
}

/// Cuts events of `sizes` bytes, in order, into consecutive requests whose JSON array
/// (`[`, the events, commas, `]`) is at most `max_bytes`; an event too large for any request
/// goes alone. Every index is in exactly one range; no range is empty.
pub fn split_by_bytes(sizes: &[usize], max_bytes: usize) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    // Bytes of the open request: brackets, events and commas so far.
    let mut used = 2usize;
    for (index, size) in sizes.iter().enumerate() {
        let comma = usize::from(index > start);
        let grown = used.saturating_add(comma).saturating_add(*size);
        if index > start && grown > max_bytes {
            ranges.push(start..index);
            start = index;
            used = 2usize.saturating_add(*size);
        } else {
            used = grown;
        }
    }
    if start < sizes.len() {
        ranges.push(start..sizes.len());
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    #[test]
    fn arrays_are_comma_separated_events_in_brackets() {
        assert_eq!(json_array(std::iter::empty()), b"[]");
        let bodies: [&[u8]; 2] = [b"{\"id\":\"a\"}", b"{\"id\":\"b\"}"];
        assert_eq!(
            json_array(bodies.into_iter()),
            b"[{\"id\":\"a\"},{\"id\":\"b\"}]"
        );
    }

    #[test]
    fn requests_are_cut_at_the_byte_limit_and_a_large_event_goes_alone() {
        // [a,b] is 2 + 3 + 1 + 3 = 9 bytes.
        assert_eq!(split_by_bytes(&[3, 3], 9), vec![0..2]);
        assert_eq!(split_by_bytes(&[3, 3], 8), vec![0..1, 1..2]);
        assert_eq!(split_by_bytes(&[3, 50, 3], 9), vec![0..1, 1..2, 2..3]);
        assert_eq!(split_by_bytes(&[], 9), Vec::<Range<usize>>::new());
    }

    proptest! {
        #[test]
        fn every_event_is_in_one_request_within_the_limit_unless_alone(
            sizes in prop::collection::vec(0usize..2_000, 0..200),
            max in 2usize..5_000,
        ) {
            let ranges = split_by_bytes(&sizes, max);
            let mut next = 0;
            for range in &ranges {
                prop_assert_eq!(range.start, next);
                prop_assert!(range.end > range.start);
                next = range.end;
                let members = &sizes[range.clone()];
                let bytes = 2 + members.iter().sum::<usize>() + members.len() - 1;
                prop_assert!(bytes <= max || members.len() == 1, "{:?} is {} bytes", members, bytes);
            }
            prop_assert_eq!(next, sizes.len());
        }
    }
}
