//! In-place restart: the exporter stops as on SIGTERM (in-flight events finish, the resume token
//! is saved, leadership is released), then replaces its own process image with a fresh start of
//! the same binary and arguments (`execv` of `/proc/self/exe`). The pod does not restart (no
//! crash-loop back-off, same PID, the container's stderr continues); everything that start-up
//! reads is read again. Used when the MongoDB client certificate rotates
//! (`MONGODB_ENABLE_CERT_ROTATION`): the driver reads its TLS files only when a client is made.

use std::sync::OnceLock;

static REQUESTED: OnceLock<String> = OnceLock::new();

/// Asks for a restart after the exporter stopped; the first reason wins.
pub fn request(reason: String) {
    let _ = REQUESTED.set(reason);
}

/// Why a restart was asked for, if one was.
pub fn requested() -> Option<&'static str> {
    REQUESTED.get().map(String::as_str)
}

/// Replaces this process with a fresh start of the same executable and arguments; returns only
/// when that fails.
pub fn exec_self() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os().skip(1);
    let program = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let mut command = std::process::Command::new(program);
    command.args(&mut args);
    command.exec()
}
