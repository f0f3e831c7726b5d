use super::*;

use proptest::prelude::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn answered(rtt: Duration) -> Sample {
    Sample {
        rtt,
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
fn slow_start_doubles_until_the_first_rise_then_adds_one() {
    let mut rule = AdaptiveLimit::new(100);
    let mut now = Duration::ZERO;
    let mut limits = vec![rule.limit()];
    // 300 ms answers: one window per answer.
    for _ in 0..8 {
        now += ms(300);
        limits.push(rule.observe(answered(ms(300)), now));
    }
    // The first answer opens the first window; each later one closes a window and doubles.
    assert_eq!(limits, vec![1, 1, 2, 4, 8, 16, 32, 64, 100]);
    now += ms(300);
    let after_rise = rule.observe(answered(ms(600)), now);
    assert_eq!(after_rise, 90);
    now += ms(300);
    assert_eq!(
        rule.observe(answered(ms(300)), now),
        91,
        "one at a time after a rise"
    );
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
    now += MIN_WINDOW;
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

/// A sink with `slots` parallel slots of `service` each: past `slots` requests in flight,
/// the others queue, so the RTT at limit L is `service × max(1, L / slots)`.
fn queueing_rtt(service: Duration, slots: usize, limit: usize) -> Duration {
    service.mul_f64((limit as f64 / slots as f64).max(1.0))
}

/// Drives the rule against [`queueing_rtt`] for `span`; returns the highest limit seen after
/// the first `warm_up`.
fn run_queueing(
    rule: &mut AdaptiveLimit,
    service: Duration,
    slots: usize,
    warm_up: Duration,
    span: Duration,
) -> usize {
    let mut now = Duration::ZERO;
    let mut highest = 0;
    while now < span {
        let rtt = queueing_rtt(service, slots, rule.limit());
        // `limit` requests finish per RTT, evenly spread.
        now += rtt / u32::try_from(rule.limit()).unwrap_or(u32::MAX);
        let limit = rule.observe(answered(rtt), now);
        if now >= warm_up {
            highest = highest.max(limit);
        }
    }
    highest
}

#[test]
fn holds_near_the_capacity_of_a_queueing_sink() {
    let mut rule = AdaptiveLimit::new(100);
    let highest = run_queueing(&mut rule, ms(50), 4, ms(10_000), ms(600_000));
    // At 6 in flight the RTT is 1.5 × the unloaded 50 ms: the rule's tolerance.
    assert!((4..=7).contains(&highest), "highest limit {highest}");
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
            let sample = Sample { rtt: ms(rtt), signal, at_limit };
            let limit = rule.observe(sample, now);
            prop_assert!(limit >= 1 && limit <= ceiling.max(1), "{} not in 1..={}", limit, ceiling);
        }
    }

    /// Whatever the sink's slots and service time, the limit settles within the RTT tolerance
    /// of the slots (`RTT_RATIO` × slots, plus the one step that finds the edge) instead of
    /// creeping to the ceiling with the queue.
    #[test]
    fn a_queueing_sink_is_not_pushed_past_its_tolerance(
        slots in 1usize..20,
        service in 5u64..300,
    ) {
        let mut rule = AdaptiveLimit::new(200);
        let highest = run_queueing(&mut rule, ms(service), slots, ms(60_000), ms(300_000));
        let bound = (slots as f64 * RTT_RATIO).floor() as usize + 1;
        prop_assert!(highest <= bound, "highest {} > {} with {} slots", highest, bound, slots);
    }

    /// A window at most doubles the limit (slow start), adds one after the first decrease, and
    /// takes at most a tenth off.
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
            prop_assert!(after >= (before * 9 / 10).max(1));
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
    concurrency.observe(ms(1), Signal::Backpressure);
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
        concurrency.observe(ms(1), Signal::Answered);
    }
    while held.len() < 4 {
        held.push(concurrency.acquire().await.expect("open semaphore"));
    }
    assert_eq!(concurrency.permits.available_permits(), 0);
    // 503s while all four are out: the limit falls to 1; permits returned beyond it retire.
    while concurrency.limit() > 1 {
        tokio::time::advance(MIN_WINDOW).await;
        concurrency.observe(ms(1), Signal::Backpressure);
    }
    held.clear();
    let one = concurrency.acquire().await.expect("open semaphore");
    assert_eq!(concurrency.permits.available_permits(), 0);
    drop(one);
}
