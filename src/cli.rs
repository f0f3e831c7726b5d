//! The command line: upstream's flags with upstream's defaults (so NVSentinel's Helm chart runs
//! this binary unchanged), a few additions, and subcommands.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "event-exporter",
    version,
    about = "Streams NVSentinel health events from the datastore to an HTTP sink as CloudEvents, at least once",
    long_about = "Streams NVSentinel health events from the datastore (MongoDB through the \
MONGODB_* environment variables, the default; PostgreSQL through DATASTORE_* with \
DATASTORE_PROVIDER=postgresql) to an HTTP sink as CloudEvents 1.0, with OAuth2 \
client-credentials authentication, concurrent publishing and an in-order resume token \
(at-least-once delivery). A drop-in replacement for NVSentinel's Go event-exporter.\n\n\
Go-style flags are accepted too: -config x, -config=x, --config=x.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate what the exporter would validate at start, with the same flags: the
    /// configuration file (unknown keys too), the flags, the OIDC secret file, the CA files and
    /// the datastore environment (DATASTORE_* with DATASTORE_PROVIDER=postgresql, else
    /// MONGODB_*); print the effective settings with secrets redacted. Exits 2 when anything is
    /// invalid. Makes no connection unless --connect.
    CheckConfig(CheckConfigArgs),
    /// Read the resume token, the changelog head, how far behind the token is, and an
    /// unfinished backfill from the datastore (the exporter's datastore environment, DATASTORE_*
    /// or MONGODB_*, and config file); exits 0 healthy, 1 behind by more than --max-behind, 2
    /// bad input.
    Status(crate::commands::status::StatusArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Path to the TOML configuration file.
    #[arg(long, value_name = "PATH", default_value = "/etc/config/config.toml")]
    pub config: PathBuf,

    /// Port of the HTTP server for /metrics, /healthz and /readyz (all interfaces).
    #[arg(long, value_name = "PORT", default_value = "2112")]
    pub metrics_port: String,

    /// File holding the OIDC client secret (the `oidc-client-secret` key of the Kubernetes
    /// Secret); re-read on every token refresh.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/secrets/oidc-client-secret"
    )]
    pub oidc_secret_path: PathBuf,

    /// Events published concurrently. Overrides `exporter.workers`; the default is
    /// `exporter.workers` from the configuration, else 10. 0 is treated as 1.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub workers: Option<i64>,

    /// Log level: debug, info, warn or error.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format: JSON lines (for log pipelines) or text (for people).
    #[arg(long, value_enum, default_value = "json")]
    pub log_format: LogFormat,

    /// On SIGTERM/SIGINT, how long in-flight publishes may finish before the exporter saves
    /// its resume token and exits (keep it below the pod's terminationGracePeriodSeconds).
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The exporter's own flags, checked as the exporter checks them.
    #[command(flatten)]
    pub run: RunArgs,

    /// Do not check the files the pod mounts (the OIDC client secret, CA files): for checking
    /// a rendered configuration outside the pod.
    #[arg(long)]
    pub skip_files: bool,

    /// After the offline checks, also try what the exporter connects to, each bounded by 10 s
    /// and reported as ok or failed (JSON `connect`, and stderr): the datastore (PostgreSQL:
    /// connect with the DATASTORE_* environment and look for the tables the exporter reads,
    /// read-only; MongoDB: ping and list the events and token collections), the OIDC token
    /// endpoint (a real client-credentials token request with the configured client
    /// authentication), the sink and the dead-letter endpoint (an OPTIONS request: any HTTP
    /// answer means reachable). Exits 2 if any fails.
    #[arg(long)]
    pub connect: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Sets up logging (`level`: debug, info, warn or error) and a multi-threaded tokio runtime,
/// runs `job`, and maps its result to the process exit status: 0 on success, 2 for a bad log
/// level, 1 when the runtime cannot start or the job's task panicked, else
/// [`ExitError::code`](crate::exporter::ExitError::code). Used by the `event-exporter` binary
/// and by the development tools' binary.
///
/// The job runs as a task on the runtime's worker threads, not on the calling thread that
/// `block_on` parks: the pipeline's loop spawns a task per publish and takes each result back,
/// and from the calling thread every such hand-over crossed threads (a futex wake each way,
/// two or more system calls per event). How many worker threads: [`worker_threads`].
pub fn run_job(
    level: &str,
    format: LogFormat,
    job: impl std::future::Future<Output = Result<(), crate::exporter::ExitError>> + Send + 'static,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    if let Err(error) = crate::logging::init(level, format) {
        crate::logging::print_stderr(&format!("--log-level/LOG_LEVEL: {error}"));
        return ExitCode::from(2);
    }
    let threads = match process_worker_threads() {
        Ok(threads) => threads,
        Err(error) => {
            crate::logging::print_stderr(&error.to_string());
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            crate::logging::print_stderr(&format!("cannot start the async runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    let joined = runtime.block_on(runtime.spawn(job));
    match joined.unwrap_or_else(|error| Err(crate::exporter::ExitError::failed(error))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error.report(), "stopped with an error");
            ExitCode::from(error.code())
        }
    }
}

/// The environment variable that sets the runtime's worker threads (tokio's own name for it).
pub const WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// `TOKIO_WORKER_THREADS` is set to something other than a positive whole number.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{WORKER_THREADS_ENV}={value:?}: expected a positive whole number of worker threads")]
pub struct WorkerThreadsError {
    /// The variable's value as set (lossily decoded when it is not UTF-8).
    pub value: String,
}

/// The async runtime's worker threads: `TOKIO_WORKER_THREADS` (`value`) when it is set, else
/// `available()`, the CPUs this process may use (`std::thread::available_parallelism`, which
/// honours a cgroup CPU limit: 1 in a pod with the chart's default `resources.limits.cpu: "1"`).
///
/// Read here rather than by tokio, which panics on a value that is not a positive number.
/// One thread is the cheapest per event (no hand-over between threads: ~25 % less CPU per
/// event than two in BENCHMARKS.md's drains) and carries tens of thousands of events/s;
/// more help only when a sink is fast enough to make the exporter the bottleneck.
pub fn worker_threads(
    value: Option<OsString>,
    available: impl FnOnce() -> usize,
) -> Result<usize, WorkerThreadsError> {
    let Some(value) = value else {
        return Ok(available().max(1));
    };
    match value.to_str().map(|text| text.trim().parse::<usize>()) {
        Some(Ok(threads)) if threads > 0 => Ok(threads),
        _ => Err(WorkerThreadsError {
            value: value.to_string_lossy().into_owned(),
        }),
    }
}

/// [`worker_threads`] for this process: its `TOKIO_WORKER_THREADS`, else the CPUs it may use.
/// The exporter's runtime and `check-config` read it here, so they agree.
pub fn process_worker_threads() -> Result<usize, WorkerThreadsError> {
    let available = || std::thread::available_parallelism().map_or(1, usize::from);
    worker_threads(std::env::var_os(WORKER_THREADS_ENV), available)
}

/// clap's value parser for duration flags (`--shutdown-grace=20s`): a Go duration string.
pub fn parse_duration(text: &str) -> Result<Duration, crate::config::DurationError> {
    crate::config::parse_go_duration(text)
}

/// Rewrites Go-style single-dash long flags (`-config=x`, `-workers 4`) to clap's `--` form, so
/// command lines written for the Go binary keep working. Takes `std::env::args_os()` (never
/// `args()`, which panics on an argument that is not UTF-8); arguments that are not UTF-8 are
/// passed on unchanged apart from that prefix.
pub fn normalize_go_flags<A: Into<OsString>>(args: impl IntoIterator<Item = A>) -> Vec<OsString> {
    const LONG_FLAGS: &[&str] = &[
        "config",
        "metrics-port",
        "oidc-secret-path",
        "workers",
        "log-level",
        "log-format",
        "shutdown-grace",
        "help",
        "version",
    ];
    args.into_iter()
        .enumerate()
        .map(|(i, arg)| {
            let arg: OsString = arg.into();
            // Only the flag's name has to be text: a value that is not UTF-8 (`-config=<path>`)
            // is kept byte for byte, and clap decides whether it may be (a path) or not.
            let text = arg.to_string_lossy();
            if i > 0 && !text.starts_with("--") {
                if let Some(rest) = text.strip_prefix('-') {
                    let name = rest.split('=').next().unwrap_or(rest);
                    if LONG_FLAGS.contains(&name) {
                        let mut long = OsString::from("-");
                        long.push(&arg);
                        return long;
                    }
                }
            }
            arg
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let args = normalize_go_flags(args.iter().map(|s| s.to_string()));
        Cli::try_parse_from(args).expect("valid command line")
    }

    #[test]
    fn upstream_defaults() {
        let cli = parse(&["event-exporter"]);
        assert_eq!(cli.run.config, PathBuf::from("/etc/config/config.toml"));
        assert_eq!(cli.run.metrics_port, "2112");
        assert_eq!(
            cli.run.oidc_secret_path,
            PathBuf::from("/var/secrets/oidc-client-secret")
        );
        assert_eq!(cli.run.workers, None);
        assert!(cli.command.is_none());
    }

    #[cfg(unix)]
    #[test]
    fn go_style_flags_keep_a_value_that_is_not_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let path = OsString::from_vec(b"/etc/\xffconfig.toml".to_vec());
        let mut go_flag = OsString::from("-config=");
        go_flag.push(&path);
        let args = normalize_go_flags([OsString::from("event-exporter"), go_flag]);
        let mut expected = OsString::from("--config=");
        expected.push(&path);
        assert_eq!(args.get(1), Some(&expected));
        let cli = Cli::try_parse_from(args).expect("a path may be any bytes");
        assert_eq!(cli.run.config, PathBuf::from(path));
    }

    #[test]
    fn helm_chart_arguments_and_go_style_flags() {
        let cli = parse(&[
            "event-exporter",
            "--config=/etc/config/config.toml",
            "--metrics-port=2113",
            "-oidc-secret-path=/s",
            "-workers",
            "4",
        ]);
        assert_eq!(cli.run.metrics_port, "2113");
        assert_eq!(cli.run.oidc_secret_path, PathBuf::from("/s"));
        assert_eq!(cli.run.workers, Some(4));
    }

    #[test]
    fn check_config_subcommand() {
        let cli = parse(&["event-exporter", "check-config", "--config", "x.toml"]);
        match cli.command {
            Some(Command::CheckConfig(args)) => {
                assert_eq!(args.run.config, PathBuf::from("x.toml"))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn worker_threads_come_from_the_variable_else_the_cpus_available() {
        let unset = worker_threads(None, || 2);
        assert_eq!(unset, Ok(2));
        assert_eq!(worker_threads(None, || 0), Ok(1), "at least one thread");
        let set = |text: &str| worker_threads(Some(OsString::from(text)), || 8);
        assert_eq!(set("1"), Ok(1));
        assert_eq!(set(" 3 "), Ok(3));
        for bad in ["0", "-1", "two", "", "1.5", "99999999999999999999999"] {
            let error = set(bad).expect_err(bad);
            assert_eq!(error.value, bad);
            assert!(
                error.to_string().starts_with("TOKIO_WORKER_THREADS="),
                "{error}"
            );
        }
    }
}
