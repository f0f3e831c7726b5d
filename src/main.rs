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
use event_exporter::cli::{normalize_go_flags, Cli, Command, RunArgs};
use event_exporter::commands::{check_config, status};
use event_exporter::exporter::{self, ExitError};

fn main() -> ExitCode {
    // Before anything can panic: a panic is logged without panicking and stops the exporter.
    event_exporter::panics::install_hook();
    let cli = Cli::parse_from(normalize_go_flags(std::env::args_os()));
    match cli.command {
        Some(Command::CheckConfig(args)) => check_config::main(&args),
        Some(Command::Status(args)) => status::main(&args),
        None => {
            let args = cli.run.clone();
            let code = run_async(&cli.run, exporter::run(args));
            match event_exporter::restart::requested() {
                Some(_) if code == ExitCode::SUCCESS => {
                    let error = event_exporter::restart::exec_self();
                    eprintln!("cannot restart in place: {error}; exiting so that Kubernetes restarts the exporter");
                    ExitCode::from(1)
                }
                _ => code,
            }
        }
    }
}

/// Sets up logging and the runtime, runs `job`, and maps its result to an exit status.
fn run_async(
    args: &RunArgs,
    job: impl std::future::Future<Output = Result<(), ExitError>> + Send + 'static,
) -> ExitCode {
    event_exporter::cli::run_job(&args.log_level, args.log_format, job)
}
