// The product binary: no panic reachable from input (issue 14), as in `src/lib.rs`.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::todo,
    clippy::unimplemented,
    clippy::unreachable,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::arithmetic_side_effects,
    clippy::unchecked_time_subtraction
)]

use std::process::ExitCode;

use clap::Parser;
use event_exporter::cli::LogFormat;
use event_exporter::cli::{normalize_go_flags, Cli, Command, RunArgs};
use event_exporter::commands::{bench, check_config, demo, generate, sink, status};
use event_exporter::exporter::{self, ExitError};
use event_exporter::logging;

fn main() -> ExitCode {
    // Before anything can panic: a panic is logged without panicking and stops the exporter.
    event_exporter::panics::install_hook();
    let cli = Cli::parse_from(normalize_go_flags(std::env::args_os()));
    match cli.command {
        Some(Command::CheckConfig(args)) => check_config::main(&args),
        Some(Command::Status(args)) => status::main(&args),
        Some(Command::Sink(args)) => run_async(&cli.run, sink::run(*args)),
        Some(Command::Generate(args)) => run_async(&cli.run, generate::run(args)),
        Some(Command::Bench(args)) => run_async(&cli.run, bench::run(args)),
        Some(Command::Demo(args)) => {
            // The demo prints its own progress; the exporter's log stays at warnings unless
            // LOG_LEVEL asks for more.
            let mut quiet = cli.run.clone();
            if std::env::var_os("LOG_LEVEL").is_none() {
                quiet.log_level = "warn".into();
            }
            quiet.log_format = LogFormat::Text;
            run_async(&quiet, demo::run(args))
        }
        None => {
            let args = cli.run.clone();
            run_async(&cli.run, exporter::run(args))
        }
    }
}

/// Sets up logging and the runtime, runs `job`, and maps its result to an exit status.
fn run_async(
    args: &RunArgs,
    job: impl std::future::Future<Output = Result<(), ExitError>>,
) -> ExitCode {
    if let Err(error) = logging::init(&args.log_level, args.log_format) {
        logging::print_stderr(&format!("--log-level: {error}"));
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            logging::print_stderr(&format!("cannot start the async runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(job) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "stopped with an error");
            ExitCode::from(error.code())
        }
    }
}
