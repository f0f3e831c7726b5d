//! Logs go to stderr: JSON lines by default (log pipelines), text on request.

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
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| e.to_string())
}
