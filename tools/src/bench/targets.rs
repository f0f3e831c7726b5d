//! Issue 17's targets, judged from the figures of one bench run and printed at its end as a
//! Markdown table (`BENCHMARKS.md` takes it as is).
//!
//! A target is judged only from a scenario that ran with the target's conditions (the drain
//! with the default 10 workers, the 300 ms sink, the rates 1,000 and 10,000 events/s); a run
//! whose precondition failed (the writer fell short of the rate) is "not measured", never
//! "met", and a scenario that did not run is "not run". Nothing here is asserted by a test on
//! timing: the table is what one run on a shared machine saw.

use std::fmt::Write as _;
use std::time::Duration;

/// A streaming writer below this share of its target rate did not reach it.
pub const WRITER_REACHED: f64 = 0.95;

/// The workers of the drain target (the exporter's default).
pub const DEFAULT_WORKERS: usize = 10;

/// The slow sink's latency in the targets.
pub const TARGET_LATENCY: Duration = Duration::from_millis(300);

/// The ceiling of the adaptive target.
pub const ADAPTIVE_CEILING: usize = 100;

/// Why a drain into nginx with `workers` cannot judge the drain targets, if it cannot.
pub fn drain_unjudged(workers: usize) -> Option<String> {
    (workers != DEFAULT_WORKERS)
        .then(|| format!("the drain ran {workers} workers, not {DEFAULT_WORKERS}"))
}

/// The target a fixed-workers run against the slow sink judges, if any: 100 workers at the
/// target latency (a sink with unlimited slots and no handshake delay).
pub fn slow_sink_target(workers: usize, latency: Duration) -> Option<Target> {
    (workers == 100 && latency == TARGET_LATENCY).then_some(Target::HundredWorkersShare)
}

/// The target an adaptive run judges, if any: the ceiling of 100 at the target latency, next
/// door (no handshake delay).
pub fn adaptive_target(ceiling: usize, latency: Duration, handshake: Duration) -> Option<Target> {
    (ceiling == ADAPTIVE_CEILING && latency == TARGET_LATENCY && handshake.is_zero())
        .then_some(Target::AdaptiveShare)
}

/// The target a streaming run judges, if any: one event per request at 1,000 or 10,000
/// events/s.
pub fn stream_target(rate: u64, batch: bool) -> Option<Target> {
    match (rate, batch) {
        (1_000, false) => Some(Target::StreamP99At1k),
        (10_000, false) => Some(Target::StreamP99At10k),
        _ => None,
    }
}

/// Why a streaming run at `rate` whose writer reached `written` events/s cannot judge its
/// target, if it cannot: the writer fell short, or the schema was not NVSentinel's.
pub fn stream_unjudged(rate: u64, written: f64, lean_schema: bool) -> Option<String> {
    if written < rate as f64 * WRITER_REACHED {
        return Some(format!("the writer reached only {written:.0} events/s"));
    }
    lean_schema.then(|| "`--lean-schema`: not NVSentinel's schema".to_owned())
}

/// The one figure a target is judged on, and which way it must go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// The figure must be this or more.
    AtLeast(f64),
    /// The figure must be this or less.
    AtMost(f64),
    /// The figure must be below this.
    Below(f64),
}

impl Goal {
    fn met_by(self, figure: f64) -> bool {
        match self {
            Goal::AtLeast(goal) => figure >= goal,
            Goal::AtMost(goal) => figure <= goal,
            Goal::Below(goal) => figure < goal,
        }
    }

    fn text(self, unit: &str) -> String {
        match self {
            Goal::AtLeast(goal) => format!("≥ {} {unit}", grouped(goal)),
            Goal::AtMost(goal) => format!("≤ {} {unit}", grouped(goal)),
            Goal::Below(goal) => format!("< {} {unit}", grouped(goal)),
        }
    }
}

/// The targets, in the issue's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    DrainCpu,
    DrainRate,
    PeakRss,
    AdaptiveShare,
    HundredWorkersShare,
    StreamP99At1k,
    StreamP99At10k,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::DrainCpu,
        Target::DrainRate,
        Target::PeakRss,
        Target::AdaptiveShare,
        Target::HundredWorkersShare,
        Target::StreamP99At1k,
        Target::StreamP99At10k,
    ];

    /// What is measured, the goal and the figure's unit.
    fn spec(self) -> (&'static str, Goal, &'static str) {
        match self {
            Target::DrainCpu => (
                "exporter CPU per event, drain into nginx",
                Goal::AtMost(20.0),
                "µs",
            ),
            Target::DrainRate => (
                "drain into nginx, 10 workers (steady rate)",
                Goal::AtLeast(40_000.0),
                "events/s",
            ),
            Target::PeakRss => ("peak RSS, the most of any run", Goal::Below(30.0), "MiB"),
            Target::AdaptiveShare => (
                "300 ms sink, adaptive (ceiling 100), from the ceiling on",
                Goal::AtLeast(95.0),
                "% of ceiling/latency",
            ),
            Target::HundredWorkersShare => (
                "300 ms sink, 100 workers",
                Goal::AtLeast(98.0),
                "% of workers/latency",
            ),
            Target::StreamP99At1k => (
                "commit-to-sink p99 at 1,000 events/s",
                Goal::Below(10.0),
                "ms",
            ),
            Target::StreamP99At10k => (
                "commit-to-sink p99 at 10,000 events/s, one event per request",
                Goal::Below(50.0),
                "ms",
            ),
        }
    }
}

/// What a run saw for one target.
#[derive(Debug, Clone, PartialEq)]
enum Reading {
    /// The figure, and what else the same run saw that a reader needs beside it.
    Measured { figure: f64, context: String },
    /// The scenario ran, but not under the target's conditions: why.
    NotMeasured(String),
}

/// The targets' readings of one run.
#[derive(Debug, Default)]
pub struct Scorecard {
    readings: Vec<(Target, Reading)>,
    /// The highest peak RSS of any run so far (MiB), and that run's name.
    peak_rss: Option<(f64, String)>,
}

impl Scorecard {
    /// Records `figure` for `target` (a later reading of the same target replaces it).
    pub fn measured(&mut self, target: Target, figure: f64, context: impl Into<String>) {
        self.put(
            target,
            Reading::Measured {
                figure,
                context: context.into(),
            },
        );
    }

    /// Records that `target`'s scenario ran but could not judge it, and why.
    pub fn not_measured(&mut self, target: Target, why: impl Into<String>) {
        self.put(target, Reading::NotMeasured(why.into()));
    }

    /// Notes a run's peak RSS; the table judges the highest.
    pub fn peak_rss(&mut self, run: &str, mib: f64) {
        if self.peak_rss.as_ref().is_none_or(|(most, _)| mib > *most) {
            self.peak_rss = Some((mib, run.to_owned()));
        }
    }

    fn put(&mut self, target: Target, reading: Reading) {
        self.readings.retain(|(t, _)| *t != target);
        self.readings.push((target, reading));
    }

    fn reading(&self, target: Target) -> Option<Reading> {
        if target == Target::PeakRss {
            return self.peak_rss.as_ref().map(|(mib, run)| Reading::Measured {
                figure: *mib,
                context: run.clone(),
            });
        }
        self.readings
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, reading)| reading.clone())
    }

    /// How many targets were met, of those measured.
    pub fn met(&self) -> (usize, usize) {
        let judged: Vec<bool> = Target::ALL
            .iter()
            .filter_map(|&target| match self.reading(target)? {
                Reading::Measured { figure, .. } => Some(target.spec().1.met_by(figure)),
                Reading::NotMeasured(_) => None,
            })
            .collect();
        (judged.iter().filter(|met| **met).count(), judged.len())
    }

    /// The table: one row per target, in the issue's order, with the verdict.
    pub fn markdown(&self) -> String {
        let (met, judged) = self.met();
        let mut table = format!(
            "issue 17's targets in this run: {judged} of {} measured, {met} of those met\n\n\
             | target | goal | this run | verdict |\n|---|---|---|---|\n",
            Target::ALL.len()
        );
        for target in Target::ALL {
            let (what, goal, unit) = target.spec();
            let (figure, verdict) = match self.reading(target) {
                None => ("—".to_owned(), "not run".to_owned()),
                Some(Reading::NotMeasured(why)) => ("—".to_owned(), format!("not measured: {why}")),
                Some(Reading::Measured { figure, context }) => {
                    let context = if context.is_empty() {
                        String::new()
                    } else {
                        format!(" ({context})")
                    };
                    let verdict = if goal.met_by(figure) {
                        "met"
                    } else {
                        "NOT met"
                    };
                    (
                        format!("{} {unit}{context}", rounded(figure)),
                        verdict.to_owned(),
                    )
                }
            };
            // Rows are written to a String: cannot fail.
            let _ = writeln!(
                table,
                "| {what} | {} | {figure} | {verdict} |",
                goal.text(unit)
            );
        }
        table
    }
}

/// A figure as the table prints it: whole numbers from 100 on (thousands separated), one
/// decimal from 10 on, two below (so that 9.96 does not print as the bound 10.0).
fn rounded(figure: f64) -> String {
    if figure.abs() >= 100.0 {
        grouped(figure)
    } else if figure.abs() >= 10.0 {
        format!("{figure:.1}")
    } else {
        format!("{figure:.2}")
    }
}

/// A whole number with commas between thousands (`40,000`), or one decimal if it has a
/// fraction and is below 100.
pub fn grouped(value: f64) -> String {
    if value.fract() != 0.0 && value.abs() < 100.0 {
        return format!("{value:.1}");
    }
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if value < 0.0 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row<'a>(table: &'a str, what: &str) -> &'a str {
        table
            .lines()
            .find(|line| line.starts_with(&format!("| {what} |")))
            .unwrap_or_else(|| panic!("no row for {what} in\n{table}"))
    }

    #[test]
    fn goals_judge_their_bound_the_right_way() {
        assert!(Goal::AtLeast(40_000.0).met_by(40_000.0));
        assert!(!Goal::AtLeast(40_000.0).met_by(39_999.9));
        assert!(Goal::AtMost(20.0).met_by(20.0));
        assert!(!Goal::AtMost(20.0).met_by(20.1));
        assert!(Goal::Below(10.0).met_by(9.99));
        assert!(!Goal::Below(10.0).met_by(10.0));
    }

    #[test]
    fn the_table_gives_each_target_its_verdict() {
        let mut card = Scorecard::default();
        card.measured(
            Target::DrainRate,
            44_360.4,
            "23.4% of the wrk → nginx ceiling",
        );
        card.measured(Target::DrainCpu, 23.5, "");
        card.not_measured(Target::StreamP99At10k, "the writer reached 7,084 events/s");
        let table = card.markdown();
        assert_eq!(
            row(&table, "drain into nginx, 10 workers (steady rate)"),
            "| drain into nginx, 10 workers (steady rate) | ≥ 40,000 events/s | 44,360 events/s \
             (23.4% of the wrk → nginx ceiling) | met |"
        );
        assert!(
            row(&table, "exporter CPU per event, drain into nginx")
                .ends_with("| 23.5 µs | NOT met |"),
            "{table}"
        );
        assert!(
            row(
                &table,
                "commit-to-sink p99 at 10,000 events/s, one event per request"
            )
            .ends_with("| — | not measured: the writer reached 7,084 events/s |"),
            "{table}"
        );
        assert!(
            row(&table, "300 ms sink, 100 workers").ends_with("| — | not run |"),
            "{table}"
        );
        assert!(
            table.starts_with("issue 17's targets in this run: 2 of 7 measured, 1 of those met"),
            "{table}"
        );
    }

    #[test]
    fn the_peak_rss_row_judges_the_highest_run() {
        let mut card = Scorecard::default();
        card.peak_rss("drain into nginx", 19.5);
        card.peak_rss("300ms sink, 100 workers", 31.0);
        card.peak_rss("backfill, unlimited", 20.0);
        let table = card.markdown();
        assert_eq!(
            row(&table, "peak RSS, the most of any run"),
            "| peak RSS, the most of any run | < 30 MiB | 31.0 MiB (300ms sink, 100 workers) | NOT met |"
        );
        assert_eq!(card.met(), (0, 1));
    }

    #[test]
    fn a_later_reading_replaces_an_earlier_one() {
        let mut card = Scorecard::default();
        card.measured(Target::StreamP99At1k, 12.0, "");
        card.measured(Target::StreamP99At1k, 1.5, "");
        assert_eq!(card.met(), (1, 1));
    }

    #[test]
    fn every_goal_is_the_issues() {
        let goals: Vec<String> = Target::ALL
            .iter()
            .map(|target| {
                let (_, goal, unit) = target.spec();
                goal.text(unit)
            })
            .collect();
        assert_eq!(
            goals,
            [
                "≤ 20 µs",
                "≥ 40,000 events/s",
                "< 30 MiB",
                "≥ 95 % of ceiling/latency",
                "≥ 98 % of workers/latency",
                "< 10 ms",
                "< 50 ms",
            ]
        );
    }

    #[test]
    fn only_runs_under_the_targets_conditions_are_judged() {
        assert_eq!(drain_unjudged(10), None);
        assert_eq!(
            drain_unjudged(20).as_deref(),
            Some("the drain ran 20 workers, not 10")
        );
        let latency = TARGET_LATENCY;
        assert_eq!(
            slow_sink_target(100, latency),
            Some(Target::HundredWorkersShare)
        );
        assert_eq!(slow_sink_target(10, latency), None);
        assert_eq!(slow_sink_target(100, Duration::from_millis(200)), None);
        let zero = Duration::ZERO;
        assert_eq!(
            adaptive_target(100, latency, zero),
            Some(Target::AdaptiveShare)
        );
        assert_eq!(adaptive_target(50, latency, zero), None);
        assert_eq!(adaptive_target(100, Duration::from_millis(200), zero), None);
        assert_eq!(
            adaptive_target(100, latency, Duration::from_millis(600)),
            None,
            "the remote run is not the target's"
        );
        assert_eq!(stream_target(1_000, false), Some(Target::StreamP99At1k));
        assert_eq!(stream_target(10_000, false), Some(Target::StreamP99At10k));
        assert_eq!(stream_target(10_000, true), None, "batched mode");
        assert_eq!(stream_target(5_000, false), None);
    }

    #[test]
    fn a_stream_is_judged_only_at_its_rate_and_on_nvsentinels_schema() {
        assert_eq!(stream_unjudged(10_000, 9_500.0, false), None);
        assert_eq!(
            stream_unjudged(10_000, 9_499.0, false).as_deref(),
            Some("the writer reached only 9499 events/s")
        );
        assert!(stream_unjudged(1_000, 999.0, true).is_some_and(|why| why.contains("lean")));
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(40_000.0), "40,000");
        assert_eq!(grouped(1_000_000.0), "1,000,000");
        assert_eq!(grouped(950.0), "950");
        assert_eq!(grouped(2.5), "2.5");
        assert_eq!(rounded(44_360.4), "44,360");
        assert_eq!(rounded(99.34), "99.3");
        assert_eq!(rounded(9.96), "9.96");
    }
}
