//! Upstream's change-stream lag (NVSentinel PR #1762), for both backends:
//! `change_stream_lag_seconds{client}` = now − the newest of (the last read that found nothing
//! new, the newest event time read), computed at scrape time, with **no series until known**;
//! `change_stream_lag_known{client}` is 0 until the first empty read or event, then 1.
//!
//! PostgreSQL: a poll with no new rows means caught up now; a poll with rows gives the newest
//! `changed_at` read. MongoDB: an empty batch means caught up; an event gives its
//! `clusterTime`. Times never move the mark back (rows arrive out of order), a failed read
//! records nothing, and a negative lag (clock skew) reads 0.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

/// The rule, without clocks of its own.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct LagMark {
    /// The newest instant the reader is known to have read everything up to.
    caught_up_to: Option<DateTime<Utc>>,
}

impl LagMark {
    /// A read found nothing new at `now`.
    pub fn caught_up(&mut self, now: DateTime<Utc>) {
        self.advance(now);
    }

    /// A read returned an event written at `time`.
    pub fn event(&mut self, time: DateTime<Utc>) {
        self.advance(time);
    }

    fn advance(&mut self, time: DateTime<Utc>) {
        self.caught_up_to = Some(self.caught_up_to.map_or(time, |t| t.max(time)));
    }

    /// Seconds behind at `now`; `None` until known.
    pub fn lag(&self, now: DateTime<Utc>) -> Option<f64> {
        let behind = now.signed_duration_since(self.caught_up_to?);
        Some((behind.num_milliseconds() as f64 / 1000.0).max(0.0))
    }
}

/// The exporter's mark and the client name it is reported under (no series before
/// [`ChangeStreamLag::set_client`]).
#[derive(Debug, Default)]
pub struct ChangeStreamLag {
    state: Mutex<(Option<String>, LagMark)>,
}

impl ChangeStreamLag {
    pub fn set_client(&self, client: &str) {
        if let Ok(mut state) = self.state.lock() {
            state.0 = Some(client.to_string());
        }
    }

    pub fn caught_up(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.1.caught_up(Utc::now());
        }
    }

    pub fn event(&self, time: DateTime<Utc>) {
        if let Ok(mut state) = self.state.lock() {
            state.1.event(time);
        }
    }
}

/// The process-wide lag, registered with the metrics registry.
pub fn global() -> &'static ChangeStreamLag {
    static LAG: std::sync::OnceLock<ChangeStreamLag> = std::sync::OnceLock::new();
    LAG.get_or_init(ChangeStreamLag::default)
}

/// Encodes [`global`] at scrape time.
#[derive(Debug)]
pub struct LagCollector;

impl Collector for LagCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (client, mark) = match global().state.lock() {
            Ok(state) => (state.0.clone(), state.1),
            Err(_) => return Ok(()),
        };
        let Some(client) = client else {
            return Ok(());
        };
        let labels = [("client", client.as_str())];
        let lag = mark.lag(Utc::now());
        let known = ConstGauge::new(i64::from(lag.is_some()));
        let mut family = encoder.encode_descriptor(
            "change_stream_lag_known",
            "Whether change_stream_lag_seconds is known (1 after the first empty read or event)",
            None,
            known.metric_type(),
        )?;
        known.encode(family.encode_family(&labels)?)?;
        if let Some(lag) = lag {
            let seconds = ConstGauge::new(lag);
            let mut family = encoder.encode_descriptor(
                "change_stream_lag_seconds",
                "Seconds between now and the newest of the last empty read and the newest event read",
                None,
                seconds.metric_type(),
            )?;
            seconds.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn unknown_until_an_empty_read_or_an_event() {
        let now = Utc::now();
        let mut mark = LagMark::default();
        assert_eq!(mark.lag(now), None);
        mark.event(now - Duration::seconds(30));
        assert_eq!(mark.lag(now), Some(30.0));
        mark.caught_up(now);
        assert_eq!(mark.lag(now + Duration::milliseconds(1500)), Some(1.5));
    }

    #[test]
    fn older_events_never_move_the_mark_back_and_skew_reads_zero() {
        let now = Utc::now();
        let mut mark = LagMark::default();
        mark.caught_up(now);
        mark.event(now - Duration::seconds(100));
        assert_eq!(mark.lag(now), Some(0.0));
        mark.event(now + Duration::seconds(5));
        assert_eq!(
            mark.lag(now),
            Some(0.0),
            "a clock ahead of ours reads 0, not negative"
        );
    }
}
