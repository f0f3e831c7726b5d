//! A panic is a bug, and a process with a panicked task must not live on as a zombie (probes
//! green, resume token frozen). The hook installed by [`install_hook`] logs the panic as one
//! ERROR line (without going through `tracing`, which may be what panicked, and without
//! panicking on a closed stderr), marks the watchdog dead (so `/healthz` fails at once) and
//! fires [`panicked`], on which the exporter's supervision stops with exit status 1 after
//! saving what was delivered. Release builds also set `panic = "abort"`, so a panic there ends
//! the process right after the hook (SIGABRT); Kubernetes restarts it either way.

use std::sync::{LazyLock, OnceLock};

use tokio_util::sync::CancellationToken;

static PANICKED: LazyLock<CancellationToken> = LazyLock::new(CancellationToken::new);
static FIRST: OnceLock<String> = OnceLock::new();

/// Cancelled once any thread or task has panicked.
pub fn panicked() -> &'static CancellationToken {
    &PANICKED
}

/// The first panic's message and location, once one happened.
pub fn first_panic() -> Option<&'static str> {
    FIRST.get().map(String::as_str)
}

/// Replaces the default panic hook (which prints with `eprint!`-like writes and nothing else).
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        crate::logging::emergency(
            "panic: a bug stopped a task; the exporter stops so it can be restarted",
            &[
                ("panic", &message),
                ("location", &location),
                ("thread", &thread),
            ],
        );
        let _ = FIRST.set(format!("{message} at {location}"));
        crate::watchdog::global().task_died(format!("a task panicked: {message} at {location}"));
        PANICKED.cancel();
    }));
}

/// Test-only fault injection, compiled into debug builds only: panics when the environment
/// variable `EVENT_EXPORTER_DEBUG_PANIC` equals `point` (e.g. `publish`). Release builds have
/// an empty body and never read the variable.
#[inline]
pub fn debug_panic_point(point: &str) {
    #[cfg(debug_assertions)]
    debug_panic(point);
    #[cfg(not(debug_assertions))]
    let _ = point;
}

#[cfg(debug_assertions)]
#[allow(clippy::panic)]
fn debug_panic(point: &str) {
    if std::env::var("EVENT_EXPORTER_DEBUG_PANIC").is_ok_and(|v| v == point) {
        panic!("EVENT_EXPORTER_DEBUG_PANIC={point}: deliberate panic for testing");
    }
}
