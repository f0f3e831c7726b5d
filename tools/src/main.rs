//! `event-exporter-dev`: the development tools (reference sink, generator, demo, benchmarks),
//! plus `exporter`, which runs the product's exporter from this binary (the benchmarks start
//! it as a child process).

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use event_exporter::cli::run_job;
use event_exporter::cli::{LogFormat, RunArgs};
use event_exporter::exporter;
use event_exporter_dev::{bench, demo, generate, sink};

#[derive(Debug, Parser)]
#[command(
    name = "event-exporter-dev",
    version,
    about = "Development tools for event-exporter: a reference sink with a token endpoint, an \
event generator, a one-command demo and benchmarks (not part of the product or its image)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Args)]
struct LogArgs {
    /// Log level: debug, info, warn or error.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,

    /// Log format: JSON lines (for log pipelines) or text (for people).
    #[arg(long, value_enum, default_value = "json")]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a reference CloudEvents sink with an OAuth2 token endpoint (for development and
    /// tests): the sink contract of NVSentinel's Event Exporter configuration guide (POST,
    /// `application/cloudevents+json` or batches as `application/cloudevents-batch+json`, Bearer
    /// token, 2xx), deduplication, and fault injection.
    Sink(Box<sink::SinkArgs>),
    /// Write realistic NVSentinel health events into the PostgreSQL datastore named by the
    /// `DATASTORE_*` environment (DATASTORE_HOST, DATASTORE_PORT, DATASTORE_DATABASE,
    /// DATASTORE_USERNAME, DATASTORE_PASSWORD, DATASTORE_SSLMODE, …), as the exporter reads it.
    Generate(generate::GenerateArgs),
    /// Run the whole job on this machine: PostgreSQL, sink and token endpoint, history, live
    /// events, the exporter with backfill; ends with a summary.
    Demo(demo::DemoArgs),
    /// Benchmark the exporter (run a release build) against the local PostgreSQL, Debian's nginx
    /// (started by the bench) and the reference sink: the wrk → nginx ceiling, drains into
    /// nginx and the reference sink (events/s, ratio to the ceiling), with `--callgrind` a
    /// callgrind drain (instructions per event), a 300 ms sink at fixed workers and in
    /// adaptive mode (ratio to workers/latency), streaming (commit-to-sink p50/p99), an
    /// unlimited backfill and rate-limited ones, with the exporter's CPU per event and peak
    /// memory for each; a size of 0 skips a scenario (`--drain-events 0`, `--stream-rates 0`, `--backfill-events 0`, …).
    Bench(bench::BenchArgs),
    /// Run the exporter itself (the product's code, same flags as `event-exporter`); the
    /// benchmarks start it this way as a child process.
    #[command(hide = true)]
    Exporter(RunArgs),
}

fn main() -> ExitCode {
    event_exporter::panics::install_hook();
    let cli = Cli::parse();
    let (level, format) = (cli.log.log_level, cli.log.log_format);
    match cli.command {
        Command::Sink(args) => run_job(&level, format, sink::run(*args)),
        Command::Generate(args) => run_job(&level, format, generate::run(args)),
        Command::Bench(args) => run_job(&level, format, bench::run(args)),
        Command::Demo(args) => {
            // The demo prints its own progress; the exporter's log stays at warnings unless
            // LOG_LEVEL asks for more.
            let level = if std::env::var_os("LOG_LEVEL").is_none() {
                "warn".to_string()
            } else {
                level
            };
            run_job(&level, LogFormat::Text, demo::run(args))
        }
        Command::Exporter(args) => {
            let (level, format) = (args.log_level.clone(), args.log_format);
            run_job(&level, format, exporter::run(args))
        }
    }
}
