//! Logs go to stderr: JSON lines by default, with the keys NVSentinel's Go services write
//! through `slog` (`time`, `level`, `msg`, `module="event-exporter"`, `version`) so existing log
//! pipelines keep working; text on request, for people.
//!
//! Logging never stops the export: a line that cannot be written (stderr closed, a broken pipe
//! after the log collector went away, a full disk) is dropped and counted in
//! `health_events_exporter_log_write_errors_total`; no write error reaches a caller or panics
//! (`eprintln!`/`println!` panic on `EPIPE`, so the product path uses [`print_stdout`] and
//! [`print_stderr`] instead).

use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::fmt::MakeWriter;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogInitError {
    /// `--log-level`/`LOG_LEVEL` is not in upstream's vocabulary (the level, lower-cased).
    #[error("log level {0:?} is not one of debug, info, warn, error")]
    Level(String),
    /// A global subscriber is already installed (tracing-subscriber's boxed error).
    #[error(transparent)]
    Install(Box<dyn std::error::Error + Send + Sync>),
}

/// The filter directive for `level`, upstream's `LOG_LEVEL` vocabulary (case-insensitive;
/// empty is `info`, `warning` is `warn`). Errors: [`LogInitError::Level`].
pub fn level_directive(level: &str) -> Result<&'static str, LogInitError> {
    match level.trim().to_ascii_lowercase().as_str() {
        "debug" => Ok("debug"),
        "" | "info" => Ok("info"),
        "warn" | "warning" => Ok("warn"),
        "error" => Ok("error"),
        other => Err(LogInitError::Level(other.to_string())),
    }
}

/// Installs the global subscriber. `level` is upstream's `LOG_LEVEL` vocabulary. Errors:
/// [`LogInitError`].
pub fn init(level: &str, format: LogFormat) -> Result<(), LogInitError> {
    let directive = level_directive(level)?;
    // Dependencies stay at warn unless debugging this crate.
    let filter = EnvFilter::new(format!("warn,event_exporter={directive}"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LossyStderr)
        // tracing-subscriber reports its own write failures with `eprint!`, which panics on a
        // closed stderr; the lossy writer never fails, and this keeps that path off.
        .log_internal_errors(false)
        // Colours only for a terminal: a log file or collector gets plain text.
        .with_ansi(std::io::stderr().is_terminal());
    JSON.store(matches!(format, LogFormat::Json), Ordering::Relaxed);
    let result = match format {
        LogFormat::Json => builder.event_format(SlogJson).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(LogInitError::Install)
}

/// Log lines that could not be written (dropped), for `/metrics`.
static WRITE_ERRORS: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Whether lines are JSON (the default) or text; read by [`emergency`].
static JSON: AtomicBool = AtomicBool::new(true);

/// The counter behind `health_events_exporter_log_write_errors_total` (registered by
/// `crate::metrics`): log lines dropped because stderr could not take them.
pub fn write_errors() -> &'static Counter {
    &WRITE_ERRORS
}

/// stderr that drops what it cannot write: every write reports success to the logger, a
/// failed line increments [`write_errors`]. tracing-subscriber writes each event with one
/// `write_all`, so one failure is one dropped line.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::stderr().write_all(buf).is_err() {
            WRITE_ERRORS.inc();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LossyStderr {
    type Writer = LossyStderr;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

/// `println!` that never panics: a closed or broken stdout drops the text (counted).
pub fn print_stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
        WRITE_ERRORS.inc();
    }
}

/// `eprintln!` that never panics: a closed or broken stderr drops the text (counted).
pub fn print_stderr(text: &str) {
    let _ = LossyStderr.write(format!("{text}\n").as_bytes());
}

/// Writes one ERROR line without going through `tracing` (for the panic hook, which may run
/// inside the logger): JSON in `slog`'s shape unless `--log-format=text`. Never panics.
pub fn emergency(message: &str, fields: &[(&str, &str)]) {
    let time = crate::cloudevent::go_rfc3339_nano(chrono::Utc::now());
    let line = if JSON.load(Ordering::Relaxed) {
        let mut line = Map::new();
        line.insert("time".into(), Value::String(time));
        line.insert("level".into(), Value::String("ERROR".into()));
        line.insert("msg".into(), Value::String(message.into()));
        for (key, value) in fields {
            line.insert((*key).into(), Value::String((*value).into()));
        }
        line.insert("module".into(), Value::String("event-exporter".into()));
        line.insert(
            "version".into(),
            Value::String(env!("CARGO_PKG_VERSION").into()),
        );
        serde_json::to_string(&line).unwrap_or_else(|_| message.to_string())
    } else {
        let mut line = format!("{time} ERROR {message}");
        for (key, value) in fields {
            line.push_str(&format!(" {key}={value:?}"));
        }
        line
    };
    print_stderr(&line);
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
