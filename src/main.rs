use std::process::ExitCode;

use clap::Parser;
use event_exporter::cli::{normalize_go_flags, Cli, Command, RunArgs};
use event_exporter::commands::{check_config, status};
use event_exporter::exporter::{self, ExitError};
use event_exporter::logging;

fn main() -> ExitCode {
    // Before anything can panic: a panic is logged without panicking and stops the exporter.
    event_exporter::panics::install_hook();
    let cli = Cli::parse_from(normalize_go_flags(std::env::args()));
    match cli.command {
        Some(Command::CheckConfig(args)) => match check_config::check(&args) {
            Ok(report) if report.unknown_keys.is_empty() => {
                logging::print_stdout(&report.json);
                ExitCode::SUCCESS
            }
            Ok(report) => {
                logging::print_stdout(&report.json);
                for message in &report.unknown_keys {
                    logging::print_stderr(&format!("invalid configuration: {message}"));
                }
                logging::print_stderr(&format!(
                    "invalid configuration: {} unknown key(s); the exporter would ignore them",
                    report.unknown_keys.len()
                ));
                ExitCode::from(2)
            }
            Err(error) => {
                logging::print_stderr(&format!("invalid configuration: {error}"));
                ExitCode::from(error.code())
            }
        },
        Some(Command::Status(args)) => status::main(&args),
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
    event_exporter::cli::run_job(&args.log_level, args.log_format, job)
}
