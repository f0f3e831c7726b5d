use super::*;

use proptest::prelude::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn answered(rtt: Duration) -> Sample {
    Sample {
        rtt,
        age: rtt,
        signal: Signal::Answered,
        at_limit: true,
    }
}

/// Feeds `sample` every `every` from `*now` for `span`; returns the lowest and last limit.
fn run(
    rule: &mut AdaptiveLimit,
    now: &mut Duration,
    span: Duration,
    every: Duration,
    sample: Sample,
) -> (usize, usize) {
    let end = *now + span;
    let mut lowest = rule.limit();
    while *now < end {
        *now += every;
        lowest = lowest.min(rule.observe(sample, *now));
    }
    (lowest, rule.limit())
}

#[test]
fn starts_at_one_and_rises_to_the_ceiling_on_a_fast_steady_sink() {
    let mut rule = AdaptiveLimit::new(10);
    assert_eq!(rule.limit(), 1);
    let mut now = Duration::ZERO;
    let (_, last) = run(&mut rule, &mut now, ms(2_000), ms(1), answered(ms(1)));
    assert_eq!(last, 10);
    // It stays there: the ceiling is never exceeded.
    let (lowest, last) = run(&mut rule, &mut now, ms(2_000), ms(1), answered(ms(1)));
    assert_eq!((lowest, last), (10, 10));
}

#[test]
fn slow_start_doubles_until_the_first_rise_then_halves_and_adds_one() {
    // No queue at any limit: doubling all the way to the ceiling.
    let mut rule = AdaptiveLimit::new(100);
    let (_, trace) = simulate(&mut rule, 1_000, ms(300), Duration::ZERO, ms(60_000));
    let limits: Vec<usize> = trace.iter().map(|(_, limit)| *limit).collect();
    assert_eq!(limits, vec![2, 4, 8, 16, 32, 64, 100]);

    // 10 slots: 16 in flight queue, slow start ends with a halving, then one at a time.
    let mut rule = AdaptiveLimit::new(100);
    let (_, trace) = simulate(&mut rule, 10, ms(300), Duration::ZERO, ms(10_000));
    let limits: Vec<usize> = trace.iter().map(|(_, limit)| *limit).collect();
    assert_eq!(
        limits.get(..7),
        Some(&[2, 4, 8, 16, 8, 9, 10][..]),
        "{limits:?}"
    );
}

#[test]
fn an_answer_to_a_request_sent_before_the_last_change_is_ignored() {
    let mut rule = AdaptiveLimit::new(100);
    let mut now = Duration::ZERO;
    run(&mut rule, &mut now, ms(1_000), ms(1), answered(ms(1)));
    let before = rule.limit();
    assert!(before > 1);
    // Sent at the start, before the limit last changed, and very slow: it says nothing about
    // the limit now.
    for _ in 0..100 {
        now += ms(1);
        assert_eq!(rule.observe(answered(now), now), before);
    }
}

/// A request sent before the last change whose connection took it only after (it waited for a
/// connection's handshake) belongs to the old limit too: its age, not its round trip, says
/// when it was sent.
#[test]
fn a_request_sent_before_the_last_change_but_connected_after_is_ignored() {
    let mut rule = AdaptiveLimit::new(100);
    let mut now = Duration::ZERO;
    run(&mut rule, &mut now, ms(1_000), ms(1), answered(ms(1)));
    let before = rule.limit();
    // Sent 2 s ago (before the last change), taken by a connection 10 ms ago, slow for it.
    let late = Sample {
        rtt: ms(10),
        age: ms(2_000),
        ..answered(ms(10))
    };
    for _ in 0..100 {
        now += ms(1);
        assert_eq!(rule.observe(late, now), before);
    }
    // The same round trip of a request sent after the change is judged (a rise: it falls).
    let judged = (0..100).any(|_| {
        now += ms(1);
        rule.observe(answered(ms(10)), now) != before
    });
    assert!(judged, "a request sent after the change counts");
}

#[test]
fn does_not_rise_while_the_limit_is_not_what_holds_intake_back() {
    let mut rule = AdaptiveLimit::new(10);
    let idle = Sample {
        at_limit: false,
        ..answered(ms(1))
    };
    let mut now = Duration::ZERO;
    let (_, last) = run(&mut rule, &mut now, ms(2_000), ms(1), idle);
    assert_eq!(last, 1);
}

#[test]
fn falls_on_503s_down_to_one_and_rises_again_after() {
    let mut rule = AdaptiveLimit::new(50);
    let mut now = Duration::ZERO;
    run(&mut rule, &mut now, ms(5_000), ms(1), answered(ms(1)));
    assert_eq!(rule.limit(), 50);
    let busy = Sample {
        signal: Signal::Backpressure,
        ..answered(ms(1))
    };
    let before = rule.limit();
    now += ms(1);
    rule.observe(busy, now);
    // Still in slow start: a window is two baseline RTTs of at least MIN_WINDOW each, and
    // the one holding the first 503 began no later than it.
    now += MIN_WINDOW * 2;
    let after_one_window = rule.observe(busy, now);
    assert!(after_one_window < before, "{after_one_window} < {before}");
    let (_, last) = run(&mut rule, &mut now, ms(5_000), ms(1), busy);
    assert_eq!(last, 1);
    let (_, last) = run(&mut rule, &mut now, ms(5_000), ms(1), answered(ms(1)));
    assert!(last > 1, "{last}");
}

#[test]
fn ignored_failures_neither_raise_nor_lower_the_limit() {
    let mut rule = AdaptiveLimit::new(10);
    let mut now = Duration::ZERO;
    run(&mut rule, &mut now, ms(100), ms(1), answered(ms(1)));
    let before = rule.limit();
    let refused = Sample {
        signal: Signal::Ignored,
        ..answered(ms(1))
    };
    let (lowest, last) = run(&mut rule, &mut now, ms(1_000), ms(1), refused);
    assert_eq!((lowest, last), (before, before));
}

#[test]
fn falls_on_a_latency_step_then_settles_on_the_new_baseline() {
    let mut rule = AdaptiveLimit::new(20);
    let mut now = Duration::ZERO;
    run(&mut rule, &mut now, ms(5_000), ms(1), answered(ms(10)));
    assert_eq!(rule.limit(), 20);
    let (lowest, _) = run(&mut rule, &mut now, ms(500), ms(1), answered(ms(200)));
    assert!(lowest < 20, "the limit fell: {lowest}");
    // The step became the baseline: a steady sink at 200 ms lets the limit climb again.
    let (_, last) = run(&mut rule, &mut now, ms(60_000), ms(1), answered(ms(200)));
    assert_eq!(last, 20);
    assert!(rule.baseline().is_some_and(|b| b > ms(150)));
}

#[test]
fn a_small_rise_on_a_fast_sink_is_noise() {
    let mut rule = AdaptiveLimit::new(5);
    let mut now = Duration::ZERO;
    run(
        &mut rule,
        &mut now,
        ms(1_000),
        ms(1),
        answered(Duration::from_micros(200)),
    );
    assert_eq!(rule.limit(), 5);
    // Three times slower, but only 0.4 ms more: below MIN_RISE.
    let (lowest, _) = run(
        &mut rule,
        &mut now,
        ms(1_000),
        ms(1),
        answered(Duration::from_micros(600)),
    );
    assert_eq!(lowest, 5);
}

#[test]
fn holds_near_the_capacity_of_a_queueing_sink() {
    let mut rule = AdaptiveLimit::new(100);
    let (highest, _) = simulate(&mut rule, 10, ms(300), ms(20_000), ms(120_000));
    // 15 in flight is 1.5 × the unloaded 300 ms: the rule's tolerance; the +1 steps are
    // judged on the first answers at each limit, so it may climb a few past it.
    assert!((10..=22).contains(&highest), "highest in flight {highest}");
}

#[test]
fn a_slow_first_window_does_not_hold_the_baseline_up() {
    // The first answer took 40 ms (a new connection's handshake); the sink answers in 10 ms.
    let mut rule = AdaptiveLimit::new(100);
    rule.observe(answered(ms(40)), ms(40));
    assert_eq!(rule.baseline(), Some(ms(40)));
    let mut now = ms(40);
    while rule.limit() < 4 {
        now += ms(10);
        rule.observe(answered(ms(10)), now);
    }
    assert_eq!(
        rule.baseline(),
        Some(ms(10)),
        "slow start takes a faster window at once"
    );
}

#[test]
fn slow_start_finds_an_unqueued_sinks_ceiling_in_a_few_seconds() {
    let mut rule = AdaptiveLimit::new(100);
    // 1,000 slots: no queue at any limit up to the ceiling.
    let (_, trace) = simulate(&mut rule, 1_000, ms(300), Duration::ZERO, ms(60_000));
    let reached = trace
        .iter()
        .find(|(_, limit)| *limit == 100)
        .map(|(at, _)| *at);
    // One round trip per doubling here (every answer of a round comes back together, and a
    // slow-start window ends once a full round answered): 7 doublings, 2.1 s. Judged by
    // time alone (two-RTT windows) it took three round trips per doubling.
    assert!(
        reached.is_some_and(|at| at <= ms(2_400)),
        "reached the ceiling at {reached:?} (simulated time)"
    );
    assert_eq!(rule.limit(), 100);
}

fn signal() -> impl Strategy<Value = Signal> {
    prop_oneof![
        Just(Signal::Answered),
        Just(Signal::Backpressure),
        Just(Signal::Ignored)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_limit_stays_within_one_and_workers(
        ceiling in 0usize..300,
        samples in prop::collection::vec(
            (0u64..2_000, signal(), any::<bool>(), 0u64..400),
            0..400,
        ),
    ) {
        let mut rule = AdaptiveLimit::new(ceiling);
        let mut now = Duration::ZERO;
        for (rtt, signal, at_limit, step) in samples {
            now += ms(step);
            let sample = Sample { rtt: ms(rtt), age: ms(rtt), signal, at_limit };
            let limit = rule.observe(sample, now);
            prop_assert!(limit >= 1 && limit <= ceiling.max(1), "{} not in 1..={}", limit, ceiling);
        }
    }

    /// Whatever the sink's slots and service time, the requests in flight settle near the
    /// slots (within the RTT tolerance, plus the few +1 steps judged before the queue shows)
    /// instead of creeping to the ceiling with the queue.
    #[test]
    fn a_queueing_sink_is_not_pushed_far_past_its_capacity(
        slots in 1usize..20,
        service in 5u64..300,
    ) {
        let mut rule = AdaptiveLimit::new(200);
        let span = ms(service * 400);
        let (highest, _) = simulate(&mut rule, slots, ms(service), span / 4, span);
        let bound = slots * 2 + 3;
        prop_assert!(highest <= bound, "highest {} > {} with {} slots", highest, bound, slots);
    }

    /// A window at most doubles the limit (slow start), adds one after the first decrease, and
    /// takes at most half off (ending slow start), else a tenth.
    #[test]
    fn one_window_changes_the_limit_by_a_step_up_or_a_tenth_down(
        rtts in prop::collection::vec(0u64..500, 1..200),
    ) {
        let mut rule = AdaptiveLimit::new(100);
        let mut now = Duration::ZERO;
        // Slow start: on at first, off after a decrease, maybe on again at a limit of 1.
        let mut slow_start = true;
        for rtt in rtts {
            let before = rule.limit();
            slow_start |= before == 1;
            now += ms(rtt.max(1));
            let after = rule.observe(answered(ms(rtt)), now);
            let most = if slow_start { before * 2 } else { before + 1 };
            prop_assert!(after <= most, "{} -> {}", before, after);
            let least = if slow_start { before / 2 } else { before * 9 / 10 };
            prop_assert!(after >= least.max(1), "{} -> {}", before, after);
            slow_start &= after >= before;
        }
    }
}

#[tokio::test]
async fn fixed_mode_hands_out_workers_permits() {
    let concurrency = Concurrency::new(3, ConcurrencyMode::Fixed);
    assert_eq!(concurrency.limit(), 3);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(concurrency.acquire().await.expect("open semaphore"));
    }
    assert_eq!(concurrency.permits.available_permits(), 0);
    // Feeding samples changes nothing in fixed mode.
    concurrency.observe(
        RoundTrip {
            rtt: ms(1),
            age: ms(1),
        },
        Signal::Backpressure,
    );
    assert_eq!(concurrency.limit(), 3);
}

#[tokio::test(start_paused = true)]
async fn adaptive_permits_follow_the_limit_up_and_down() {
    let concurrency = Concurrency::new(4, ConcurrencyMode::Adaptive);
    assert_eq!(concurrency.limit(), 1);
    let mut held = Vec::new();
    // A fast sink at the limit: more permits each window (doubling: slow start), up to the
    // ceiling.
    while concurrency.limit() < 4 {
        while held.len() < concurrency.limit() {
            held.push(concurrency.acquire().await.expect("open semaphore"));
        }
        tokio::time::advance(MIN_WINDOW).await;
        concurrency.observe(
            RoundTrip {
                rtt: ms(1),
                age: ms(1),
            },
            Signal::Answered,
        );
    }
    while held.len() < 4 {
        held.push(concurrency.acquire().await.expect("open semaphore"));
    }
    assert_eq!(concurrency.permits.available_permits(), 0);
    // 503s while all four are out: the limit falls to 1; permits returned beyond it retire.
    while concurrency.limit() > 1 {
        tokio::time::advance(MIN_WINDOW).await;
        concurrency.observe(
            RoundTrip {
                rtt: ms(1),
                age: ms(1),
            },
            Signal::Backpressure,
        );
    }
    held.clear();
    let one = concurrency.acquire().await.expect("open semaphore");
    assert_eq!(concurrency.permits.available_permits(), 0);
    drop(one);
}

/// An event-driven queueing sink: `slots` servers of `service` each, FIFO; the exporter keeps
/// `limit` requests in flight (an endless backlog) and feeds every answer to the rule. Returns
/// the most requests ever in flight after `warm_up`, and the limits seen (time, limit).
fn simulate(
    rule: &mut AdaptiveLimit,
    slots: usize,
    service: Duration,
    warm_up: Duration,
    span: Duration,
) -> (usize, Vec<(Duration, usize)>) {
    let run = simulate_remote(rule, slots, service, Duration::ZERO, warm_up, span);
    (run.highest, run.trace)
}

/// What [`simulate_remote`] saw.
struct Simulated {
    /// The most requests in flight (the exporter's side) after the warm-up.
    highest: usize,
    /// Every limit change: (time, new limit).
    trace: Vec<(Duration, usize)>,
    /// The most requests the sink held at once (in service or waiting for a slot).
    most_held: usize,
    /// The longest any request waited at the sink for a slot.
    deepest_wait: Duration,
}

/// As [`simulate`], with the sink across a WAN and connections pooled as hyper-util's client
/// pools them: a request that finds no idle connection starts a new one (ready `handshake`
/// later) and takes whichever connection is free first, that one or a busy one that finishes
/// before (a new connection that lost the race stays in the pool). A request's round trip
/// starts when a connection takes it, as the client times it; its age when it was sent.
fn simulate_remote(
    rule: &mut AdaptiveLimit,
    slots: usize,
    service: Duration,
    handshake: Duration,
    warm_up: Duration,
    span: Duration,
) -> Simulated {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut free_at: BinaryHeap<Reverse<Duration>> =
        (0..slots).map(|_| Reverse(Duration::ZERO)).collect();
    // When each connection is next free (or, while connecting, ready).
    let mut connections: BinaryHeap<Reverse<Duration>> = BinaryHeap::new();
    // (finish, taken by a connection, sent)
    let mut in_flight: BinaryHeap<Reverse<(Duration, Duration, Duration)>> = BinaryHeap::new();
    let mut now = Duration::ZERO;
    let mut highest = 0;
    let mut trace = Vec::new();
    // At the sink: +1 when a request arrives, -1 when it is answered.
    let mut at_sink: Vec<(Duration, i32)> = Vec::new();
    let mut deepest_wait = Duration::ZERO;
    while now < span {
        while in_flight.len() < rule.limit() {
            if connections.peek().is_none_or(|Reverse(free)| *free > now) {
                connections.push(Reverse(now + handshake));
            }
            let Reverse(connection) = connections.pop().unwrap_or(Reverse(now));
            let taken = connection.max(now);
            let Reverse(slot) = free_at.pop().unwrap_or(Reverse(taken));
            let finish = slot.max(taken) + service;
            deepest_wait = deepest_wait.max(slot.saturating_sub(taken));
            at_sink.push((taken, 1));
            at_sink.push((finish, -1));
            free_at.push(Reverse(finish));
            connections.push(Reverse(finish));
            in_flight.push(Reverse((finish, taken, now)));
        }
        if now >= warm_up {
            highest = highest.max(in_flight.len());
        }
        let Some(Reverse((finish, taken, sent))) = in_flight.pop() else {
            break;
        };
        now = finish;
        let before = rule.limit();
        let sample = Sample {
            rtt: finish - taken,
            age: finish - sent,
            signal: Signal::Answered,
            at_limit: true,
        };
        let after = rule.observe(sample, now);
        if after != before {
            trace.push((now, after));
        }
    }
    // Answers before arrivals at the same instant: a slot handed over is not two requests.
    at_sink.sort();
    let mut held = 0i32;
    let most_held = at_sink
        .iter()
        .map(|(_, change)| {
            held += change;
            held
        })
        .max()
        .unwrap_or(0);
    Simulated {
        highest,
        trace,
        most_held: usize::try_from(most_held).unwrap_or(0),
        deepest_wait,
    }
}

/// Against a remote sink (600 ms of handshakes per new connection) with 10 slots of 300 ms,
/// slow start overshoots by one doubling, as the bench's saturated remote run did in 4 of 7
/// runs (32 requests at the sink at once; the bench estimates the deepest wait from that count
/// as 660 ms, here the last of 32 in FIFO order waits up to three service times): waiting requests
/// take the warm connections that free up first, so the requests a doubling adds reach the
/// sink spread over the round instead of together, and the answers that close its window show
/// too little queue to end slow start; the queue shows in the next round, which halves the
/// limit. Next door (no handshakes) the same sink ends slow start at 16.
#[test]
fn against_a_remote_queueing_sink_slow_start_overshoots_by_one_doubling_at_most() {
    let mut rule = AdaptiveLimit::new(100);
    let run = simulate_remote(&mut rule, 10, ms(300), ms(600), Duration::ZERO, ms(12_000));
    let limits: Vec<usize> = run.trace.iter().map(|(_, limit)| *limit).collect();
    assert_eq!(
        limits.get(..6),
        Some(&[2, 4, 8, 16, 32, 16][..]),
        "{limits:?}"
    );
    // What the sink saw: the overshoot, and how long it made a request wait.
    assert!((17..=32).contains(&run.most_held), "held {}", run.most_held);
    assert!(
        run.deepest_wait > ms(300) && run.deepest_wait <= ms(900),
        "deepest wait {:?}, held {}",
        run.deepest_wait,
        run.most_held
    );
    // Afterwards it stays near the slots (the rule's tolerance, as next door).
    let after = limits.get(6..).unwrap_or_default();
    assert!(
        after.iter().all(|limit| (10..=23).contains(limit)),
        "{limits:?}"
    );

    let mut rule = AdaptiveLimit::new(100);
    let next_door = simulate_remote(
        &mut rule,
        10,
        ms(300),
        Duration::ZERO,
        Duration::ZERO,
        ms(3_000),
    );
    let limits: Vec<usize> = next_door.trace.iter().map(|(_, limit)| *limit).collect();
    assert_eq!(limits.get(..5), Some(&[2, 4, 8, 16, 8][..]), "{limits:?}");
    assert!(next_door.most_held <= 16, "held {}", next_door.most_held);
    // 16 at 10 slots: the last six wait one service time.
    assert!(
        next_door.deepest_wait <= ms(300),
        "{:?}",
        next_door.deepest_wait
    );
}
