use std::process::ExitCode;

use clap::Parser;
use event_exporter::cli::{normalize_go_flags, Cli, Command};
use event_exporter::{check_config, exporter, logging};

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_go_flags(std::env::args()));
    match cli.command {
        Some(Command::CheckConfig(args)) => match check_config::check(&args) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("invalid configuration: {error}");
                ExitCode::from(2)
            }
        },
        None => {
            if let Err(error) = logging::init(&cli.run.log_level, cli.run.log_format) {
                eprintln!("--log-level: {error}");
                return ExitCode::from(2);
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(exporter::run(cli.run)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(error = %error, "event exporter stopped");
                    ExitCode::from(error.code())
                }
            }
        }
    }
}
