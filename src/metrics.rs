//! Prometheus metrics with upstream's names, labels and buckets, so existing dashboards and
//! alerts keep working, plus a few upstream lacks (attempt failures by reason, in-flight
//! events, datastore reconnects).

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

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
    pub datastore_reconnects: Counter,
    pub events_skipped: Family<Labels, Counter>,
    pub events_filtered: Counter,
    pub filter_errors: Counter,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics.
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let events_received = Counter::default();
        registry.register(
            "health_events_exporter_events_received",
            "Total number of events received from change stream",
            events_received.clone(),
        );
        let events_published = Family::<Labels, Counter>::default();
        registry.register(
            "health_events_exporter_events_published",
            "Total number of events published to sink",
            events_published.clone(),
        );
        let publish_duration = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]);
        registry.register(
            "health_events_exporter_publish_duration_seconds",
            "Time taken to publish events to sink, including retries",
            publish_duration.clone(),
        );
        let transform_errors = Counter::default();
        registry.register(
            "health_events_exporter_transform_errors",
            "Total number of transformation errors",
            transform_errors.clone(),
        );
        let publish_errors = Family::<Labels, Counter>::default();
        registry.register(
            "health_events_exporter_publish_errors",
            "Total number of publish errors by type",
            publish_errors.clone(),
        );
        let token_refresh_errors = Counter::default();
        registry.register(
            "health_events_exporter_token_refresh_errors",
            "Total number of token refresh errors",
            token_refresh_errors.clone(),
        );
        let resume_token_update_timestamp = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "health_events_exporter_resume_token_update_timestamp",
            "Unix timestamp of the last resume token update",
            resume_token_update_timestamp.clone(),
        );
        let backfill_in_progress = Gauge::default();
        registry.register(
            "health_events_exporter_backfill_in_progress",
            "Whether a backfill is running (1) or not (0)",
            backfill_in_progress.clone(),
        );
        let backfill_events_processed = Counter::default();
        registry.register(
            "health_events_exporter_backfill_events_processed",
            "Total number of events processed during backfill",
            backfill_events_processed.clone(),
        );
        let backfill_duration =
            Histogram::new([1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0]);
        registry.register(
            "health_events_exporter_backfill_duration_seconds",
            "Duration of completed backfills",
            backfill_duration.clone(),
        );
        let backfill_remaining = Gauge::default();
        registry.register(
            "health_events_exporter_backfill_remaining",
            "Events the running backfill has still to deliver",
            backfill_remaining.clone(),
        );
        let feature_flag = Family::<Labels, Gauge>::default();
        registry.register(
            "nvsentinel_feature_flag_enabled",
            "Whether a feature flag is enabled (1) or not (0)",
            feature_flag.clone(),
        );
        let publish_attempt_failures = Family::<Labels, Counter>::default();
        registry.register(
            "health_events_exporter_publish_attempt_failures",
            "Failed publish attempts (each retry counts) by reason",
            publish_attempt_failures.clone(),
        );
        let events_in_flight = Gauge::default();
        registry.register(
            "health_events_exporter_events_in_flight",
            "Events being transformed or published right now",
            events_in_flight.clone(),
        );
        let datastore_reconnects = Counter::default();
        registry.register(
            "health_events_exporter_datastore_reconnects",
            "Times the changelog reader lost its datastore connection and reconnected",
            datastore_reconnects.clone(),
        );
        let events_skipped = Family::<Labels, Counter>::default();
        registry.register(
            "health_events_exporter_events_skipped",
            "Health events not published, by reason (undecodable, no health event)",
            events_skipped.clone(),
        );
        // Upstream's help texts; prometheus-client adds the final period.
        let events_filtered = Counter::default();
        registry.register(
            "health_events_exporter_events_filtered",
            "Total number of events not published because the filter expression evaluated false",
            events_filtered.clone(),
        );
        let filter_errors = Counter::default();
        registry.register(
            "health_events_exporter_filter_errors",
            "Total number of filter evaluation errors. The event is exported anyway",
            filter_errors.clone(),
        );
        Metrics {
            registry,
            events_received,
            events_published,
            publish_duration,
            transform_errors,
            publish_errors,
            token_refresh_errors,
            resume_token_update_timestamp,
            backfill_in_progress,
            backfill_events_processed,
            backfill_duration,
            backfill_remaining,
            feature_flag,
            publish_attempt_failures,
            events_in_flight,
            datastore_reconnects,
            events_skipped,
            events_filtered,
            filter_errors,
        }
    }

    pub fn published(&self, status: &str) {
        self.events_published
            .get_or_create(&vec![("status".into(), status.into())])
            .inc();
    }

    pub fn publish_error(&self, error_type: &str) {
        self.publish_errors
            .get_or_create(&vec![("error_type".into(), error_type.into())])
            .inc();
    }

    pub fn record_attempt_failure(&self, reason: &str) {
        self.publish_attempt_failures
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    pub fn skipped(&self, reason: &str) {
        self.events_skipped
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
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
