//! Prometheus metrics with upstream's names, labels and buckets, so existing dashboards and
//! alerts keep working, plus a few upstream lacks (attempt failures by reason, in-flight
//! events, datastore reconnects, readiness).
//!
//! **Every series exists from the first scrape.** Each labelled counter is created at 0 for
//! every label value known in advance ([`PUBLISHED_STATUSES`], [`PUBLISH_ERROR_TYPES`],
//! [`ATTEMPT_FAILURE_REASONS`], [`SKIP_REASONS`]), as Prometheus's instrumentation guidance
//! asks: `rate()`/`increase()` over a series that appears only with its first failure misses
//! that failure, and alerts written against it stay silent. A new label value used anywhere
//! in the code belongs in these lists (a unit test checks the sink's reasons).
//! The alert rules built on these names are `deploy/prometheus/event-exporter-rules.yaml`.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

type Labels = Vec<(String, String)>;

/// `status` values of `health_events_exporter_events_published_total`: upstream's `success`
/// and `failure`, and `already_delivered` (a status in
/// `exporter.failure_handling.already_delivered_statuses`).
pub const PUBLISHED_STATUSES: &[&str] = &["success", "failure", "already_delivered"];
/// `error_type` values of `health_events_exporter_publish_errors_total` (upstream has only
/// `max_retries_exceeded`: an event whose retries ran out; `dead_letter_failed`: a rejected
/// event whose dead-letter write failed).
pub const PUBLISH_ERROR_TYPES: &[&str] = &["max_retries_exceeded", "dead_letter_failed"];
/// `reason` values of `health_events_exporter_publish_attempt_failures_total`: those of
/// `sink::http::FailureReason` (transport failures, the token endpoint, and HTTP statuses).
pub const ATTEMPT_FAILURE_REASONS: &[&str] = &[
    "timeout",
    "connect",
    "network",
    "token",
    "redirect",
    "status_401",
    "status_403",
    "status_404",
    "status_408",
    "status_429",
    "status_500",
    "status_502",
    "status_503",
    "status_504",
    "status_4xx",
    "status_5xx",
    "status_other",
];
/// `reason` values of `health_events_exporter_events_skipped_total`.
pub const SKIP_REASONS: &[&str] = &[
    "undecodable",
    "no_health_event",
    "invalid_time",
    "invalid_cloudevent",
    "already_exported",
];
/// `reason` values of `health_events_exporter_resume_token_resets_total`.
pub const RESUME_TOKEN_RESET_REASONS: &[&str] = &["ahead_at_start", "ahead_while_running"];

/// Answers "would `/readyz` say ready now?" at scrape time.
type ReadyProbe = Box<dyn Fn() -> bool + Send + Sync>;

pub struct Metrics {
    registry: Registry,
    pub events_received: Counter,
    pub events_published: Family<Labels, Counter>,
    pub publish_duration: Histogram,
    pub transform_errors: Counter,
    pub publish_errors: Family<Labels, Counter>,
    pub token_refresh_errors: Counter,
    pub resume_token_update_timestamp: Gauge<f64, AtomicU64>,
    pub backfill_in_progress: Gauge,
    pub backfill_events_processed: Counter,
    pub backfill_duration: Histogram,
    pub backfill_remaining: Gauge,
    pub feature_flag: Family<Labels, Gauge>,
    pub publish_attempt_failures: Family<Labels, Counter>,
    pub events_in_flight: Gauge,
    /// Requests the sink may have in flight: `workers`, or the adaptive limit.
    pub concurrency_limit: Gauge,
    pub datastore_reconnects: Counter,
    pub events_skipped: Family<Labels, Counter>,
    pub events_filtered: Counter,
    pub filter_errors: Counter,
    pub stream_lag_seconds: Gauge<f64, AtomicU64>,
    pub changelog_head_id: Gauge,
    pub changelog_ids_behind: Gauge,
    pub changelog_open_ids: Gauge,
    /// One successful PostgreSQL changelog read (new rows and the holes re-read), in seconds,
    /// 0.5 ms–10 s buckets: a read that grows with the changelog's length, not with the rows it
    /// returns, shows here first. A failed read counts in `datastore_reconnects` instead, and a
    /// read that never returns is not observed (the stream lag and ExportStalled show it).
    pub changelog_poll_duration: Histogram,
    ready: std::sync::Arc<OnceLock<ReadyProbe>>,
    pub events_dead_lettered: Family<Labels, Counter>,
    /// Resume tokens found ahead of the changelog's head (ids reset, restored datastore).
    pub resume_token_resets: Family<Labels, Counter>,
    /// Handles of the known label values of the per-event families, so counting an event
    /// looks up no labels (a `Family` lookup builds, hashes and locks a label set).
    cached: Cached,
    /// Upstream's `change_stream_resume_token_recoveries_total{client, phase}` (MongoDB).
    pub resume_token_recoveries: Family<Labels, Counter>,
    /// 1 while this replica leads (exports), 0 on a standby (issue 16, `crate::leader`).
    pub leader: Gauge,
    /// Promotions and demotions of this replica.
    pub leadership_changes: Counter,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Registers `metric` as `name` (a handle: the registry's clone is the same series).
fn add<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: &M) {
    registry.register(name, help, metric.clone());
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    /// Every series, registered in exposition order, labelled counters created at 0.
    fn new() -> Metrics {
        let mut metrics = Metrics::unregistered();
        let registry = &mut metrics.registry;
        registry.register(
            "health_events_exporter_log_write_errors",
            "Log lines dropped because stderr could not take them (closed, broken pipe)",
            crate::logging::write_errors().clone(),
        );
        registry.register_collector(Box::new(crate::watchdog::Collector));
        metrics.register_upstream_publishing();
        metrics.register_backfill();
        metrics.register_attempts_and_leadership();
        metrics.register_stream();
        metrics.register_info_and_collectors();
        metrics.create_known_labels_at_zero();
        metrics
    }

    /// The handles, not yet in the registry.
    fn unregistered() -> Metrics {
        Metrics {
            registry: Registry::default(),
            events_received: Counter::default(),
            events_published: Family::<Labels, Counter>::default(),
            publish_duration: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            transform_errors: Counter::default(),
            publish_errors: Family::<Labels, Counter>::default(),
            token_refresh_errors: Counter::default(),
            resume_token_update_timestamp: Gauge::<f64, AtomicU64>::default(),
            backfill_in_progress: Gauge::default(),
            backfill_events_processed: Counter::default(),
            backfill_duration: Histogram::new([
                1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
            ]),
            backfill_remaining: Gauge::default(),
            changelog_poll_duration: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            feature_flag: Family::<Labels, Gauge>::default(),
            publish_attempt_failures: Family::<Labels, Counter>::default(),
            events_in_flight: Gauge::default(),
            concurrency_limit: Gauge::default(),
            datastore_reconnects: Counter::default(),
            resume_token_resets: Family::<Labels, Counter>::default(),
            resume_token_recoveries: Family::<Labels, Counter>::default(),
            leader: Gauge::default(),
            leadership_changes: Counter::default(),
            events_skipped: Family::<Labels, Counter>::default(),
            events_filtered: Counter::default(),
            filter_errors: Counter::default(),
            stream_lag_seconds: Gauge::<f64, AtomicU64>::default(),
            changelog_head_id: Gauge::default(),
            changelog_ids_behind: Gauge::default(),
            changelog_open_ids: Gauge::default(),
            events_dead_lettered: Family::<Labels, Counter>::default(),
            ready: std::sync::Arc::new(OnceLock::new()),
            cached: Cached::default(),
        }
    }

    /// Registers upstream's publishing series.
    fn register_upstream_publishing(&mut self) {
        let registry = &mut self.registry;
        add(
            registry,
            "health_events_exporter_events_received",
            "Total number of events received from change stream",
            &self.events_received,
        );
        add(
            registry,
            "health_events_exporter_events_published",
            "Total number of events published to sink",
            &self.events_published,
        );
        add(
            registry,
            "health_events_exporter_publish_duration_seconds",
            "Time taken to publish events to sink, including retries",
            &self.publish_duration,
        );
        add(
            registry,
            "health_events_exporter_transform_errors",
            "Total number of transformation errors",
            &self.transform_errors,
        );
        add(
            registry,
            "health_events_exporter_publish_errors",
            "Total number of publish errors by type",
            &self.publish_errors,
        );
        add(
            registry,
            "health_events_exporter_token_refresh_errors",
            "Total number of token refresh errors",
            &self.token_refresh_errors,
        );
        add(
            registry,
            "health_events_exporter_resume_token_update_timestamp",
            "Unix timestamp of the last resume token update",
            &self.resume_token_update_timestamp,
        );
    }

    /// Registers backfill and feature flags.
    fn register_backfill(&mut self) {
        let registry = &mut self.registry;
        add(
            registry,
            "health_events_exporter_backfill_in_progress",
            "Whether a backfill is running (1) or not (0)",
            &self.backfill_in_progress,
        );
        add(
            registry,
            "health_events_exporter_backfill_events_processed",
            "Total number of events processed during backfill",
            &self.backfill_events_processed,
        );
        add(
            registry,
            "health_events_exporter_backfill_duration_seconds",
            "Duration of completed backfills",
            &self.backfill_duration,
        );
        add(
            registry,
            "health_events_exporter_backfill_remaining",
            "Events the running backfill has still to deliver",
            &self.backfill_remaining,
        );
        add(
            registry,
            "nvsentinel_feature_flag_enabled",
            "Whether a feature flag is enabled (1) or not (0)",
            &self.feature_flag,
        );
    }

    /// Registers publish attempts, the datastore connection, resume-token resets and recoveries, leadership.
    fn register_attempts_and_leadership(&mut self) {
        let registry = &mut self.registry;
        add(
            registry,
            "health_events_exporter_publish_attempt_failures",
            "Failed publish attempts (each retry counts) by reason",
            &self.publish_attempt_failures,
        );
        add(
            registry,
            "health_events_exporter_events_in_flight",
            "Events being transformed or published right now",
            &self.events_in_flight,
        );
        add(
            registry,
            "health_events_exporter_concurrency_limit",
            "Requests the sink may have in flight: workers, or the adaptive limit (exporter.sink.concurrency = \"adaptive\")",
            &self.concurrency_limit,
        );
        add(
            registry,
            "health_events_exporter_datastore_reconnects",
            "Times the changelog reader lost its datastore connection and reconnected",
            &self.datastore_reconnects,
        );
        add(registry, "health_events_exporter_resume_token_resets", "Times the resume token was ahead of the changelog's head (ids reset by TRUNCATE ... RESTART IDENTITY, a restored or re-created datastore, a bogus token) and reading restarted from the new changelog, by reason (ahead_at_start, ahead_while_running)", &self.resume_token_resets);
        add(registry, "change_stream_resume_token_recoveries", "Times a MongoDB change stream's resume token could not be used (history lost: codes 286, 260, 280, 9) and the exporter recovered with a backfill from the last exported createdAt, by client and phase (initialization, runtime)", &self.resume_token_recoveries);
        add(
            registry,
            "health_events_exporter_leader",
            "Whether this replica leads and exports (1) or is a standby (0)",
            &self.leader,
        );
        add(
            registry,
            "health_events_exporter_leadership_changes",
            "Times this replica became leader or stopped leading",
            &self.leadership_changes,
        );
    }

    /// Registers skips, the filter, the stream's lag, the changelog and the dead letter.
    fn register_stream(&mut self) {
        let registry = &mut self.registry;
        add(
            registry,
            "health_events_exporter_events_skipped",
            "Health events not published, by reason (undecodable, invalid time, invalid CloudEvent, no health event, already exported)",
            &self.events_skipped,
        );
        // Upstream's help texts; prometheus-client adds the final period.
        add(
            registry,
            "health_events_exporter_events_filtered",
            "Total number of events not published because the filter expression evaluated false",
            &self.events_filtered,
        );
        add(
            registry,
            "health_events_exporter_filter_errors",
            "Total number of filter evaluation errors. The event is exported anyway",
            &self.filter_errors,
        );
        add(
            registry,
            "health_events_exporter_stream_lag_seconds",
            "Age of the oldest received stream event not yet delivered (0 when caught up)",
            &self.stream_lag_seconds,
        );
        add(
            registry,
            "health_events_exporter_changelog_head_id",
            "Highest datastore_changelog id at the last read",
            &self.changelog_head_id,
        );
        add(
            registry,
            "health_events_exporter_changelog_ids_behind",
            "Changelog ids between the resume token and the head of the changelog",
            &self.changelog_ids_behind,
        );
        add(
            registry,
            "health_events_exporter_changelog_poll_duration_seconds",
            "Duration of one successful read of the PostgreSQL changelog: new rows and the holes re-read (failed reads count in datastore_reconnects)",
            &self.changelog_poll_duration,
        );
        add(registry, "health_events_exporter_changelog_open_ids", "Changelog ids below the head not yet visible (transactions still open, or never committed); they hold the resume token back", &self.changelog_open_ids);
        add(registry, "health_events_exporter_events_dead_lettered", "Events the sink permanently rejected, written to the dead letter, by the sink's HTTP status", &self.events_dead_lettered);
    }

    /// Registers the build information and the collectors read at scrape time.
    fn register_info_and_collectors(&mut self) {
        let build_info = Family::<Labels, Gauge>::default();
        add(
            &mut self.registry,
            "health_events_exporter_build_info",
            "Build information; the value is always 1",
            &build_info,
        );
        build_info
            .get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
            .set(1);
        self.registry.register_collector(Box::new(ProcessCollector));
        self.registry
            .register_collector(Box::new(crate::lag::LagCollector));
        self.registry
            .register_collector(Box::new(ReadyCollector(self.ready.clone())));
    }

    /// Every labelled counter at 0 for its known label values (see the module docs).
    /// The per-event counters are kept as cached handles (no label lookup per event).
    fn create_known_labels_at_zero(&mut self) {
        self.cached = Cached {
            published: Handles::new(&self.events_published, "status", PUBLISHED_STATUSES),
            publish_errors: Handles::new(&self.publish_errors, "error_type", PUBLISH_ERROR_TYPES),
            attempt_failures: Handles::new(
                &self.publish_attempt_failures,
                "reason",
                ATTEMPT_FAILURE_REASONS,
            ),
            skipped: Handles::new(&self.events_skipped, "reason", SKIP_REASONS),
        };
        create_at_zero(
            &self.resume_token_resets,
            "reason",
            RESUME_TOKEN_RESET_REASONS,
        );
    }

    /// Creates `…_events_dead_lettered_total{status}` at 0 for each status that can be
    /// dead-lettered, so alerts on it work before the first one.
    pub fn dead_letter_statuses(&self, statuses: &[u16]) {
        create_at_zero(&self.events_dead_lettered, "status", statuses);
    }

    pub fn dead_lettered(&self, status: u16) {
        self.events_dead_lettered
            .get_or_create(&vec![("status".into(), status.to_string())])
            .inc();
    }

    /// Exposes `health_events_exporter_ready` (1 when `probe` says `/readyz` answers 200, else
    /// 0), evaluated at every scrape. The first probe set wins; before one is set the series
    /// is absent.
    pub fn watch_readiness(&self, probe: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.ready.set(Box::new(probe));
    }

    pub fn published(&self, status: &str) {
        self.cached
            .published
            .inc(&self.events_published, "status", status);
    }

    pub fn publish_error(&self, error_type: &str) {
        self.cached
            .publish_errors
            .inc(&self.publish_errors, "error_type", error_type);
    }

    pub fn record_attempt_failure(&self, reason: &str) {
        self.cached
            .attempt_failures
            .inc(&self.publish_attempt_failures, "reason", reason);
    }

    pub fn resume_token_reset(&self, reason: &str) {
        self.resume_token_resets
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    pub fn skipped(&self, reason: &str) {
        self.cached
            .skipped
            .inc(&self.events_skipped, "reason", reason);
    }

    pub fn set_feature_flag(&self, flag: &str, enabled: bool) {
        self.feature_flag
            .get_or_create(&vec![
                ("service".into(), "event-exporter".into()),
                ("flag".into(), flag.into()),
            ])
            .set(i64::from(enabled));
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// The process metrics every Prometheus user expects, read from /proc at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(process) = ProcessStats::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(process.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                process.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                process.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                process.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                process.max_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                process.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// `health_events_exporter_ready`, read from the probe at scrape time.
struct ReadyCollector(std::sync::Arc<OnceLock<ReadyProbe>>);

impl std::fmt::Debug for ReadyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadyCollector")
    }
}

impl Collector for ReadyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(probe) = self.0.get() else {
            return Ok(());
        };
        let gauge = ConstGauge::new(i64::from(probe()));
        gauge.encode(encoder.encode_descriptor(
            "health_events_exporter_ready",
            "Whether the exporter is ready (1: the stream runs and the last changelog read reached the datastore, as /readyz) or not (0)",
            None,
            gauge.metric_type(),
        )?)
    }
}

struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: f64,
    virtual_bytes: f64,
    open_fds: f64,
    max_fds: f64,
    start_time_seconds: f64,
}

/// Linux reports CPU times in clock ticks of 1/100 s.
const TICKS_PER_SECOND: f64 = 100.0;

impl ProcessStats {
    fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the parenthesised command name, counted from `state` (field 3).
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| {
            fields
                .get(n.checked_sub(3)?)
                .and_then(|f| f.parse::<f64>().ok())
        };
        let cpu_seconds = (field(14)? + field(15)?) / TICKS_PER_SECOND;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .map(|v| v * 1024.0)
        };
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("btime"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
            })?;
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3))
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        Some(ProcessStats {
            cpu_seconds,
            resident_bytes: kib("VmRSS:").unwrap_or(0.0),
            virtual_bytes: kib("VmSize:").unwrap_or(0.0),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .map(|d| d.count() as f64)
                .unwrap_or(0.0),
            max_fds,
            start_time_seconds: boot_time + field(22)? / TICKS_PER_SECOND,
        })
    }
}

/// See `Metrics::cached`.
#[derive(Default)]
struct Cached {
    published: Handles,
    publish_errors: Handles,
    attempt_failures: Handles,
    skipped: Handles,
}

/// A family's counters for a fixed list of label values, created at 0 (a `Counter` clone
/// shares the series).
#[derive(Default)]
struct Handles {
    values: &'static [&'static str],
    counters: Vec<Counter>,
}

impl Handles {
    fn new(family: &Family<Labels, Counter>, key: &str, values: &'static [&'static str]) -> Self {
        let counters = values
            .iter()
            .map(|value| {
                family
                    .get_or_create(&vec![(key.to_string(), value.to_string())])
                    .clone()
            })
            .collect();
        Handles { values, counters }
    }

    /// The counter of label value `value`, if it is one of the fixed list.
    fn get(&self, value: &str) -> Option<&Counter> {
        let index = self.values.iter().position(|known| *known == value)?;
        self.counters.get(index)
    }

    /// Counts one for `key=value`: through the cached handle when `value` is one of the fixed
    /// list, else through `family` (a label lookup).
    fn inc(&self, family: &Family<Labels, Counter>, key: &str, value: &str) {
        match self.get(value) {
            Some(counter) => counter.inc(),
            None => family
                .get_or_create(&vec![(key.into(), value.into())])
                .inc(),
        };
    }
}

/// Creates the series `key=value` of `family` at 0 for each of `values`, so `rate()` and
/// `increase()` work before the first event of that kind.
fn create_at_zero<V: ToString>(family: &Family<Labels, Counter>, key: &str, values: &[V]) {
    for value in values {
        let _ = family.get_or_create(&vec![(key.to_string(), value.to_string())]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_handles_count_into_the_exposed_series() {
        let metrics = Metrics::new();
        metrics.published("already_delivered");
        metrics.published("already_delivered");
        metrics.skipped("a_reason_not_in_the_list");
        let text = metrics.encode();
        assert!(
            text.contains(
                "health_events_exporter_events_published_total{status=\"already_delivered\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "health_events_exporter_events_skipped_total{reason=\"a_reason_not_in_the_list\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn exposition_has_upstream_names_and_process_metrics() {
        let text = get().encode();
        for name in [
            "health_events_exporter_events_received_total",
            "health_events_exporter_publish_duration_seconds_bucket",
            "health_events_exporter_build_info{version=",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        let stats = ProcessStats::read().expect("/proc readable");
        assert!(stats.resident_bytes > 0.0 && stats.open_fds > 0.0);
        let now = chrono::Utc::now().timestamp() as f64;
        assert!(stats.start_time_seconds > now - 86_400.0 && stats.start_time_seconds <= now + 1.0);
    }

    #[test]
    fn labelled_counters_exist_at_zero_before_any_event() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        let mut expected = Vec::new();
        for status in PUBLISHED_STATUSES {
            expected.push(format!(
                "health_events_exporter_events_published_total{{status=\"{status}\"}} 0"
            ));
        }
        for error_type in PUBLISH_ERROR_TYPES {
            expected.push(format!(
                "health_events_exporter_publish_errors_total{{error_type=\"{error_type}\"}} 0"
            ));
        }
        for reason in ATTEMPT_FAILURE_REASONS {
            expected.push(format!(
                "health_events_exporter_publish_attempt_failures_total{{reason=\"{reason}\"}} 0"
            ));
        }
        for reason in SKIP_REASONS {
            expected.push(format!(
                "health_events_exporter_events_skipped_total{{reason=\"{reason}\"}} 0"
            ));
        }
        for line in expected {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        // No readiness series until the exporter wires its probe in; then it follows it.
        assert!(!text.contains("health_events_exporter_ready"));
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = flag.clone();
        metrics.watch_readiness(move || seen.load(std::sync::atomic::Ordering::Relaxed));
        assert!(metrics
            .encode()
            .lines()
            .any(|l| l == "health_events_exporter_ready 0"));
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(metrics
            .encode()
            .lines()
            .any(|l| l == "health_events_exporter_ready 1"));
    }

    /// Every reason literal the sink client reports is pre-created (a reason missing here
    /// would have no series until its first failure).
    #[test]
    fn every_sink_failure_reason_is_known() {
        let reasons: Vec<&str> = crate::sink::http::FailureReason::ALL
            .iter()
            .map(|reason| reason.as_str())
            .collect();
        assert_eq!(reasons, ATTEMPT_FAILURE_REASONS);
    }
}
