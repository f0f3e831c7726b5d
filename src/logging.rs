//! Logs go to stderr: JSON lines by default, with the keys NVSentinel's Go services write
//! through `slog` (`time`, `level`, `msg`, `module="event-exporter"`, `version`) so existing log
//! pipelines keep working; text on request, for people.

use std::fmt;
use std::io::IsTerminal;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Installs the global subscriber. `level` is upstream's `LOG_LEVEL` vocabulary.
pub fn init(level: &str, format: LogFormat) -> Result<(), String> {
    let directive = match level.trim().to_ascii_lowercase().as_str() {
        "debug" => "debug",
        "" | "info" => "info",
        "warn" | "warning" => "warn",
        "error" => "error",
        other => {
            return Err(format!(
                "log level {other:?} is not one of debug, info, warn, error"
            ))
        }
    };
    // Dependencies stay at warn unless debugging this crate.
    let filter = EnvFilter::new(format!("warn,event_exporter={directive}"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal: a log file or collector gets plain text.
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Json => builder.event_format(SlogJson).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| e.to_string())
}

/// One JSON object per line in `slog`'s shape.
struct SlogJson;

impl<S, N> FormatEvent<S, N> for SlogJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let mut line = fields.0;
        line.insert(
            "time".into(),
            Value::String(crate::cloudevent::go_rfc3339_nano(chrono::Utc::now())),
        );
        let level = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARN",
            Level::INFO => "INFO",
            _ => "DEBUG",
        };
        line.insert("level".into(), Value::String(level.into()));
        line.insert("module".into(), Value::String("event-exporter".into()));
        line.insert(
            "version".into(),
            Value::String(env!("CARGO_PKG_VERSION").into()),
        );
        line.insert(
            "source".into(),
            Value::String(event.metadata().target().to_string()),
        );
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Collects an event's fields; the message goes under `msg`.
struct Fields(Map<String, Value>);

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        let name = match field.name() {
            "message" => "msg",
            other => other,
        };
        self.0.insert(name.to_string(), value);
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}
